"""One source of truth per registry: every list that names analyses, figure or table kinds or claims
is derived from its registry or checked against it here (hand-kept lists drift)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sharpflow.figures as figures
import sharpflow.tables as tables
from sharpflow.analyses import REGISTRY as ANALYSES
from sharpflow.analyses import TABLE_OWNERS
from sharpflow.claims import CLAIMS, code_files
from sharpflow.study import FORMAT_VERSION, json_schema

ROOT = Path(__file__).resolve().parents[1]


def _bulleted_kinds(doc: str) -> dict[str, str]:
    """``- ``kind`` (module.py; tables…)`` bullets of a package docstring: kind -> module."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^- ``(\w+)`` \((\w+\.py);", doc, re.M)}


@pytest.mark.parametrize("package", [figures, tables], ids=["figures", "tables"])
def test_package_docstring_lists_every_kind_with_its_module(package):
    listed = _bulleted_kinds(package.__doc__ or "")
    assert listed == {kind: package.REGISTRY.modules[kind] for kind in package.KINDS}


@pytest.mark.parametrize("package", [figures, tables], ids=["figures", "tables"])
def test_package_docstring_names_the_tables_each_kind_reads(package):
    doc = package.__doc__ or ""
    for kind, reads in package.KINDS.items():
        bullet = re.search(rf"^- ``{kind}`` \(\w+\.py;(.*?)\)", doc, re.M | re.S)
        assert bullet, kind
        named = bullet.group(1)
        missing = [t for t in reads if t not in named and "the same tables" not in named]
        assert missing == [], f"{kind}: the docstring does not name {missing}"


def test_schema_figure_kind_description_names_every_kind():
    desc = json_schema()["$defs"]["FigureConfig"]["properties"]["kind"]["description"]
    for kind in [*figures.KINDS, *tables.KINDS]:
        assert re.search(rf"\b{kind}\b", desc), kind


def test_config_has_one_section_and_resources_per_analysis():
    schema = json_schema()
    props = schema["properties"]
    resources = schema["$defs"]["ResourcesConfig"]["properties"]
    study = schema["$defs"]["StudyConfig"]["properties"]
    for name in ANALYSES:
        assert name in props and name in resources and name in study, name
    assert set(FORMAT_VERSION) == {"prepare", "train", "spectrum", *ANALYSES}


def test_cli_has_a_command_per_analysis_and_lists_the_kinds():
    help_text = subprocess.run([sys.executable, "-m", "sharpflow.cli", "--help"], capture_output=True, text=True,
                               cwd=ROOT, check=True).stdout
    for name, a in ANALYSES.items():
        assert re.search(rf"^\s+{name}\b", help_text, re.M), name
        assert a.summary, f"{name} has no summary for its --help line"
    for sub, package in (("figure", figures), ("table", tables)):
        text = subprocess.run([sys.executable, "-m", "sharpflow.cli", sub, "--help"], capture_output=True,
                              text=True, cwd=ROOT, check=True).stdout
        flat = " ".join(text.split())
        for kind in package.KINDS:
            assert re.search(rf"\b{kind}\b", flat), (sub, kind)


def test_table_owners_cover_every_analysis_table_once():
    kinds = [k for a in ANALYSES.values() for k in a.tables]
    assert len(kinds) == len(set(kinds)) == len(TABLE_OWNERS)


def test_an_analysis_table_defaults_to_its_name():
    from sharpflow.analyses.base import Analysis

    a = Analysis(name="probe", config=ANALYSES["density"].config, compute=lambda ctx, cfg: {},
                 select=lambda cfg, run, steps: list(steps))
    assert a.tables == ("probe",)
    assert a.relpath("probe", 5) == "step00000005.parquet"


def test_claims_read_tables_that_exist():
    known = {"metrics", "spectrum", "spectrum_best", *TABLE_OWNERS}
    for claim in CLAIMS:
        assert set(claim.reads) <= known, claim.number
        assert claim.kind in figures.KINDS or claim.kind in tables.KINDS, claim.number


def _sharpflow_imports(path: Path) -> set[Path]:
    """The package files a module imports (relative imports resolved; leaf modules skipped)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            target = base.joinpath(*(node.module or "").split(".")) if node.module else base
            for cand in (target.with_suffix(".py"), target / "__init__.py"):
                if cand.is_file():
                    out.add(cand.resolve())
    return out


def test_claims_code_files_cover_what_the_checks_import():
    """Editing a module the claims' checks compute with re-evaluates the claims (a Snakemake input);
    the leaves (errors, io, config) change no statistic."""
    checks = ROOT / "sharpflow" / "claims" / "checks.py"
    leaves = {(ROOT / "sharpflow" / f).resolve() for f in ("errors.py", "io.py", "config.py")}
    needed = (_sharpflow_imports(checks) | {checks.resolve()}) - leaves
    assert needed <= {p.resolve() for p in code_files()}
