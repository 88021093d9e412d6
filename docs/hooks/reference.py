"""MkDocs hook: the generated reference pages.

- ``<!-- generated: config -->`` becomes the configuration reference, rendered from
  ``workflow/schemas/config.schema.json`` (the whole file: datasets, studies, spectrum, analyses,
  figures, tables, claims, resources) and from the JSON schema of
  :class:`sharpflow.config.RunConfig` (the run fields that ``defaults``, a study's ``base`` and its
  ``sweep`` take, which the file's schema leaves open).
- ``<!-- generated: cli -->`` becomes ``sharpflow --help`` and every command's ``--help``, from
  :func:`sharpflow.cli.build_parser`.
- ``<!-- generated: figure-kinds -->`` and ``<!-- generated: table-kinds -->`` become one section per
  registered figure or table kind: its description (its module's docstring; the package's bullet
  for a kind that shares the module of a kind above it), the tables it reads, its module and
  caption, where ``config/config.yaml`` draws it, and the default suite's PNG from ``docs/`` where
  there is one.

Both are rendered at every build, so the pages cannot drift from the code; ``tests/test_docs.py``
checks what they contain against the registries.
"""

from __future__ import annotations

import ast
import html
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from sharpflow_markup import markdown  # a sibling file, not a package

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.json"
DEFAULT_CONFIG = ROOT / "config" / "config.yaml"
MARKER = re.compile(r"<!-- generated: ([\w-]+) -->")
HELP_COLUMNS = "100"  # argparse wraps to $COLUMNS: fixed, so the page does not depend on a terminal


# ------------------------------------------------------------------------------------- config
def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _anchor(prefix: str, name: str) -> str:
    return f"{prefix}-{name.lower()}"


def _text(s: str) -> str:
    """A schema description as one line of Markdown: RST ``code`` as `code`, HTML escaped outside code."""
    s = " ".join(s.split())
    parts = re.split(r"``(.+?)``|`(.+?)`", s)
    out = []
    for i, part in enumerate(parts):
        if part is None:
            continue
        code = i % 3 != 0
        out.append(f"`{part}`" if code else html.escape(part, quote=False))
    return "".join(out).replace("|", "\\|")


def _bounds(s: dict[str, Any]) -> str:
    ops = (("exclusiveMinimum", ">"), ("minimum", "≥"), ("exclusiveMaximum", "<"), ("maximum", "≤"))
    return ", ".join(f"{op} {s[key]}" for key, op in ops if key in s)


def _type(s: dict[str, Any], prefix: str) -> str:
    """A field's type, with links to the sections of nested models."""
    if "$ref" in s:
        name = _ref_name(s["$ref"])
        return f"[{name}](#{_anchor(prefix, name)})"
    if "anyOf" in s:
        return " or ".join(_type(t, prefix) for t in s["anyOf"])
    if "enum" in s:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in s["enum"])
    if "const" in s:
        return f"`{json.dumps(s['const'])}`"
    t = s.get("type", "any")
    if t == "array":
        inner = _type(s.get("items", {}), prefix)
        return f"list of {inner}"
    if t == "object":
        if "patternProperties" in s:
            (value,) = s["patternProperties"].values()
            return f"name → {_type(value, prefix)}"
        extra = s.get("additionalProperties")
        if isinstance(extra, dict):
            return f"mapping of {_type(extra, prefix)}"
        return "mapping"
    if t == "null":
        return "null"
    bounds = _bounds(s)
    return f"{t} ({bounds})" if bounds else t


def _default(s: dict[str, Any], required: bool) -> str:
    if required:
        return "required"
    if "default" in s:
        return f"`{json.dumps(s['default'], ensure_ascii=False)}`"
    return ""


def _fields_table(model: dict[str, Any], prefix: str, defs: dict[str, Any]) -> list[str]:
    required = set(model.get("required", ()))
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, s in model.get("properties", {}).items():
        desc = s.get("description") or defs.get(_ref_name(s.get("$ref", "")), {}).get("description", "")
        desc = desc.split("\n\n")[0]  # a model's first paragraph; its section has the rest
        rows.append(f"| `{name}` | {_type(s, prefix)} | {_default(s, name in required)} | {_text(desc)} |")
    return rows


def _refs(s: Any) -> Iterator[str]:
    if isinstance(s, dict):
        if "$ref" in s:
            yield _ref_name(s["$ref"])
        for v in s.values():
            yield from _refs(v)
    elif isinstance(s, list):
        for v in s:
            yield from _refs(v)


def _models_in_order(schema: dict[str, Any]) -> list[str]:
    """The schema's models in the order a reader meets them: breadth first from the top level."""
    defs = schema.get("$defs", {})
    order: list[str] = []
    queue = list(_refs(schema.get("properties", {})))
    while queue:
        name = queue.pop(0)
        if name in order:
            continue
        order.append(name)
        queue.extend(_refs(defs[name].get("properties", {})))
    return order + sorted(set(defs) - set(order))


def _schema_sections(schema: dict[str, Any], title: str, prefix: str, level: int) -> list[str]:
    h = "#" * level
    lines = [f"{h} {title} {{#{prefix}}}", "", _text(schema.get("description", "")), ""]
    defs = schema.get("$defs", {})
    lines += [*_fields_table(schema, prefix, defs), ""]
    for name in _models_in_order(schema):
        model = defs[name]
        lines += [f"{h}# {name} {{#{_anchor(prefix, name)}}}", ""]
        if model.get("description"):
            lines += [_text(model["description"]), ""]
        lines += [*_fields_table(model, prefix, defs), ""]
    return lines


def run_schema() -> dict[str, Any]:
    from sharpflow.config import RunConfig

    return RunConfig.model_json_schema()


def config_reference() -> str:
    """The configuration reference in Markdown: the config file's schema, then the run fields."""
    lines = [
        "_Rendered at build time from `workflow/schemas/config.schema.json` and from the schema of "
        "`sharpflow.config.RunConfig`._",
        "",
    ]
    lines += _schema_sections(json.loads(SCHEMA.read_text()), "The config file", "file", 2)
    run = run_schema()
    run["description"] = (
        "The fields of one run: what `defaults` and a study's `base` hold (partially) and what a `sweep` "
        "varies by dotted path (`optimizer.lr`, `optimizer.nsgd.gamma`). " + run.get("description", "")
    )
    lines += _schema_sections(run, "A run", "run", 2)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- cli
def _subcommands(parser: Any) -> dict[str, Any]:
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return dict(action.choices)
    return {}


def cli_reference() -> str:
    """``sharpflow --help`` and each command's ``--help``, as Markdown."""
    from sharpflow.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        parser = build_parser()
        lines = ["_Rendered at build time from `sharpflow.cli.build_parser()`._", "",
                 "## sharpflow", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, sub in _subcommands(parser).items():
            lines += [f"## sharpflow {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(lines)


# ------------------------------------------------------------------------- figure/table kinds
def _module_doc(package: str, module: str) -> str:
    path = ROOT / package.replace(".", "/") / module
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def _bullet(package_doc: str, kind: str) -> str:
    """The text of the package docstring's bullet for ``kind``, after its (module; tables) part."""
    m = re.search(rf"^- ``{kind}`` \(.*?\):(.*?)(?=^- ``|^\S|\Z)", package_doc, re.M | re.S)
    return " ".join(m.group(1).split()) if m else ""


def default_suite_entries(section: str) -> dict[str, list[tuple[str, list[str]]]]:
    """kind -> [(entry name, its studies)] of the ``figures`` or ``tables`` of config/config.yaml."""
    entries: dict[str, list[tuple[str, list[str]]]] = {}
    for name, spec in (yaml.safe_load(DEFAULT_CONFIG.read_text()).get(section) or {}).items():
        entries.setdefault(spec["kind"], []).append((name, list(spec["studies"])))
    return entries


def _kind_sections(package: Any, section: str, docs_prefix: str) -> list[str]:
    reg = package.REGISTRY
    used = default_suite_entries(section)
    lines: list[str] = []
    for kind, reads in package.KINDS.items():
        optional = reg.optional_for(kind)
        module = reg.modules[kind]
        shared = next((k for k in package.KINDS if reg.modules[k] == module and k != kind), None)
        if shared is not None and list(package.KINDS).index(shared) < list(package.KINDS).index(kind):
            body = f"{_bullet(package.__doc__ or '', kind)} Described with ``{shared}``, whose module it shares."
        else:
            body = _module_doc(package.__name__, module)
        read = ", ".join(f"`{t}`" + (" (where a run has it)" if t in optional else "") for t in reads)
        where = "; ".join(f"`{name}` ({', '.join(studies)})" for name, studies in used.get(kind, [])) or "–"
        lines += [f"### `{kind}`", "", markdown(body), "",
                  f"**Reads:** {read}. **Module:** `{package.__name__.replace('.', '/')}/{module}`. "
                  f"**Caption:** `{reg.captions[kind]}`. **In the default suite:** {where}.", ""]
        for name, _ in used.get(kind, []):
            if (ROOT / "docs" / f"{name}.png").exists():
                lines += [f"![{name}: the default suite's figure]({docs_prefix}{name}.png)", ""]
    return lines


def figure_kinds_reference() -> str:
    import sharpflow.figures as figures

    return "\n".join(_kind_sections(figures, "figures", "../"))


def table_kinds_reference() -> str:
    import sharpflow.tables as tables

    return "\n".join(_kind_sections(tables, "tables", "../"))


GENERATORS = {
    "config": config_reference,
    "cli": cli_reference,
    "figure-kinds": figure_kinds_reference,
    "table-kinds": table_kinds_reference,
}


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return MARKER.sub(lambda m: GENERATORS[m.group(1)](), markdown)
