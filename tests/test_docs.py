"""The README, results/README.md and the docs site against the registries and the repository.

Every list in the prose that names figure kinds, table kinds, analyses' tables or claims is checked
here against its registry, so adding a kind without its row fails; the generated reference pages
(docs/hooks/reference.py) are checked to cover every key, command and kind; paths the docs name
must exist. ``mkdocs build --strict`` (CI) checks the links and the docstrings.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
import yaml

import sharpflow.figures as figures
import sharpflow.tables as tables
from sharpflow.analyses import REGISTRY as ANALYSES
from sharpflow.analyses import TABLE_OWNERS
from sharpflow.claims import CLAIMS, ClaimsConfig
from sharpflow.study import expand_runs, json_schema, parse_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DEFAULT_CONFIG = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
#: per-run tables that no analysis of the registry owns: training's and the spectrum's.
STAGE_TABLES = {"metrics": "train", "spectrum": "spectrum", "spectrum_best": "spectrum"}


def _read(rel: str) -> str:
    return (ROOT / rel).read_text()


def _table(text: str, first_header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header row starts with ``| first_header |``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        rows.append([c.strip() for c in cells])
    return rows


def _code(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _hook(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", DOCS / "hooks" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- README's kind table
def _readme_kinds() -> dict[tuple[str, str], str]:
    """(figure|table, kind) -> the 'default suite' cell of the README's table."""
    rows = _table(_read("README.md"), "kind")
    out = {}
    for row in rows:
        what, kind = re.fullmatch(r"(figure|table) `(\w+)`", row[0]).groups()
        out[(what, kind)] = row[-1]
    return out


def test_readme_table_has_a_row_per_figure_and_table_kind():
    listed = _readme_kinds()
    assert [k for w, k in listed if w == "figure"] == list(figures.KINDS), "figure rows: one per kind, in order"
    assert [k for w, k in listed if w == "table"] == list(tables.KINDS), "table rows: one per kind, in order"


def _default_suite_entries(section: str, kind: str) -> list[tuple[str, list[str]]]:
    entries = DEFAULT_CONFIG.get(section) or {}
    return [(name, list(spec["studies"])) for name, spec in entries.items() if spec["kind"] == kind]


def _parse_where(cell: str) -> list[tuple[str, list[str]]]:
    """```eta_grid`: eta; `bs_grid`: bs`` -> [(eta_grid, [eta]), (bs_grid, [bs])]; '–' -> []."""
    if cell in ("–", "-", ""):
        return []
    out = []
    for part in cell.split(";"):
        m = re.fullmatch(r"`(\w+)`: (.+)", part.strip())
        assert m, f"README: cannot read {part!r} as `name`: studies"
        out.append((m.group(1), [s.strip() for s in m.group(2).split(",")]))
    return out


def test_readme_table_says_where_the_default_suite_draws_each_kind():
    for (what, kind), cell in _readme_kinds().items():
        section = "figures" if what == "figure" else "tables"
        assert sorted(_parse_where(cell)) == sorted(_default_suite_entries(section, kind)), (what, kind)


def test_readme_table_names_every_study_of_the_default_suite():
    named = {s for cell in _readme_kinds().values() for _, studies in _parse_where(cell) for s in studies}
    assert named == set(DEFAULT_CONFIG["studies"])


def test_readme_links_and_images_exist():
    text = _read("README.md")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert targets
    for target in targets:
        if "://" not in target:
            assert (ROOT / target).exists(), target


def test_readme_is_a_door():
    assert len(_read("README.md").encode()) < 15_000, "measurements and how-tos belong on the docs site"


# ------------------------------------------------------------------------ per-run table listings
def _per_run_tables() -> dict[str, str]:
    """Every per-run table kind -> what writes it: training, the spectrum or its analysis."""
    return {**STAGE_TABLES, **TABLE_OWNERS}


def test_results_readme_lists_every_per_run_table_with_its_writer_and_files():
    rows = _table(_read("results/README.md"), "table")
    listed = {_code(r[0])[0]: r for r in rows}
    assert set(listed) == set(_per_run_tables())
    for kind, row in listed.items():
        writer = row[1].split(",")[0].strip()
        assert writer == _per_run_tables()[kind], kind
        if kind in TABLE_OWNERS:
            analysis = ANALYSES[TABLE_OWNERS[kind]]
            expected = f"{analysis.name}/{analysis.relpath(kind, 0)}".replace("00000000", "{step:08d}")
            assert _code(row[2]) == [expected], kind
            assert _code(row[3]) == [f"sharpflow/analyses/{analysis.name}.py"], kind
        for path in _code(row[3]):
            assert "/" not in path or (ROOT / path).exists(), path


def test_outputs_page_lists_every_per_run_table_with_its_writer():
    rows = _table((DOCS / "reference" / "outputs.md").read_text(), "table")
    listed = {_code(r[0])[0]: r[1].split(",")[0].strip() for r in rows}
    assert listed == _per_run_tables()


# ---------------------------------------------------------------------------------------- claims
def test_claims_page_has_a_row_per_claim_with_its_kind_and_thresholds():
    rows = _table((DOCS / "concepts" / "claims.md").read_text(), "claim")
    by_number = {}
    for row in rows:
        m = re.match(r"(\d+)\. .*\(`(\w+)`\)$", row[0])
        assert m, row[0]
        by_number[int(m.group(1))] = (m.group(2), row[1])
    assert list(by_number) == [c.number for c in CLAIMS]
    fields = set(ClaimsConfig.model_fields)
    for claim in CLAIMS:
        kind, statistic = by_number[claim.number]
        assert kind == claim.kind, claim.number
        for name in _code(statistic):
            assert name in fields, f"claim {claim.number}: `{name}` is not a claims config field"


# ------------------------------------------------------------------------------------- tutorial
def test_tutorial_config_is_valid_and_has_the_runs_it_names():
    page = (DOCS / "tutorial.md").read_text()
    text = re.search(r"```yaml\n(.*?)```", page, re.S).group(1)
    cfg = parse_config(yaml.safe_load(text), "docs/tutorial.md")
    runs = expand_runs(cfg)
    named = set(re.findall(r"\blr-lr[\d.]+\b", page))
    assert named and named <= set(runs)
    for line in re.findall(r"^(lr-lr\S+)\t", page, re.M):
        assert line in runs
    figure_kinds = {f.kind for f in cfg.figures.values()}
    for claim in CLAIMS:
        # the page says claims 1-3 are tested on this study and the rest lack data
        assert (claim.kind in figure_kinds) == (claim.number <= 3), claim.number


# --------------------------------------------------------------------------- generated references
def test_config_reference_covers_every_key_and_analysis():
    text = _hook("reference").config_reference()
    schema = json_schema()
    for key in schema["properties"]:
        assert f"| `{key}` |" in text, key
    for name in ANALYSES:
        assert f"| `{name}` |" in text, name
    for model in schema["$defs"]:
        assert f"## {model} {{#file-{model.lower()}}}" in text, model
    for field in ("model", "optimizer", "checkpoints", "loss", "seed"):
        assert f"| `{field}` |" in text, field


def test_cli_reference_has_every_command():
    from sharpflow.cli import build_parser

    text = _hook("reference").cli_reference()
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in sub.choices:
        assert f"## sharpflow {name}\n" in text, name


@pytest.mark.parametrize("package", [figures, tables], ids=["figures", "tables"])
def test_kinds_reference_has_a_section_per_kind(package):
    hook = _hook("reference")
    text = hook.figure_kinds_reference() if package is figures else hook.table_kinds_reference()
    assert re.findall(r"^### `(\w+)`$", text, re.M) == list(package.KINDS)
    for section in text.split("### ")[1:]:
        assert "**Reads:**" in section and len(section.split("\n\n")[1].strip()) > 20, section[:60]


def test_api_pages_render_the_checked_modules():
    targets = []
    for page in sorted((DOCS / "reference" / "api").glob("*.md")):
        targets += re.findall(r"^::: ([\w.]+)$", page.read_text(), re.M)
    assert sorted(targets) == sorted(_hook("docstrings").API_MODULES)


# -------------------------------------------------------------------------------------- paths
PATH_RE = re.compile(r"`((?:sharpflow|bench|config|workflow|tests|docs|results)/[\w./-]+)`")


def test_paths_named_in_the_docs_exist():
    pages = [ROOT / "README.md", ROOT / "results" / "README.md", *DOCS.rglob("*.md")]
    missing = []
    for page in pages:
        for path in PATH_RE.findall(page.read_text()):
            if path.startswith("results/") or path.endswith("/"):
                continue  # outputs of a run, or a directory named as a prefix
            if not (ROOT / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert missing == []


def test_ci_builds_the_docs_strictly():
    ci = _read(".ci/run")
    assert "pip install -e '.[docs]'" in ci and "mkdocs build --strict" in ci
    assert "docs = [" in _read("pyproject.toml")


def test_config_page_names_every_built_in_model():
    from sharpflow.config import MODEL_NAMES

    text = (DOCS / "reference" / "config.md").read_text()
    line = re.search(r"a built-in one — (.*?) — or", text, re.S).group(1)
    assert _code(line) == list(MODEL_NAMES)
