"""The package's import structure: layers, no circle, torch and pandas kept out of the Snakefile.

``../shared/DESIGN.md`` (Layers) fixes the rules these tests check, statically from the sources
(the AST), except the last, which imports in a fresh process:

- no import circle among sharpflow's modules, counting every import (a function-local one too);
- a module imports only from its own layer or below;
- a function-local import of a sharpflow module is *deliberate*: it sits in a light module (one
  whose top-level imports load no torch, pandas or matplotlib: what the Snakefile imports, and the
  CLI, whose ``--help`` and light commands start without torch) and imports a heavy one. Anything
  else belongs at the top of the file;
- importing what the Snakefile imports loads neither torch nor pandas.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sharpflow"
HEAVY_LIBS = {"torch", "torchvision", "pandas", "pyarrow", "matplotlib", "scipy"}

#: DESIGN.md's layers, bottom up: a module's layer is that of its longest matching prefix.
LAYERS: dict[str, int] = {
    # leaves
    "sharpflow": 0, "sharpflow.errors": 0, "sharpflow.configbase": 0, "sharpflow.io": 0,
    "sharpflow.params": 0, "sharpflow.kinds": 0, "sharpflow.usersources": 0,
    # the run-level config
    "sharpflow.config": 1,
    # what computes on one run: data, models, checkpoints, nsgd, hessian, results
    "sharpflow.data": 2, "sharpflow.synthetic": 2, "sharpflow.models": 2, "sharpflow.checkpoints": 2,
    "sharpflow.nsgd": 2, "sharpflow.sam": 2, "sharpflow.hessian": 2, "sharpflow.results": 2, "sharpflow.devices": 2,
    "sharpflow.cost": 2,
    # training, a checkpoint's context, the gradient plumbing
    "sharpflow.train": 3, "sharpflow.analyses.context": 3,
    "sharpflow.analyses.gradients": 3,
    # one module per kind: analyses (with their kernels, beside them), claims, figures, tables
    "sharpflow.analyses": 4, "sharpflow.claims": 4, "sharpflow.figures": 4, "sharpflow.tables": 4,
    # the registry of analyses and the stage that runs them
    "sharpflow.analyses.__init__": 5, "sharpflow.analyses.stage": 5,
    # the study assembly
    "sharpflow.study": 6,
    # entry points
    "sharpflow.cli": 7, "sharpflow.__main__": 7,
}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    local: bool  # inside a function


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def _resolve(mod: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The sharpflow modules an import statement loads (``from . import x`` may name a module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = mod if _is_package(mod) else mod.rsplit(".", 1)[0]
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            full = f"{base}.{node.module}" if node.module else base
        else:
            full = node.module or ""
        names = [f"{full}.{a.name}" if f"{full}.{a.name}" in MODULES else full for a in node.names]
    out = []
    for name in names:
        while name and name not in MODULES and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in MODULES and name != mod:
            out.append(name)
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    return skip


def _local_nodes(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(node) if n is not node}
    return inside


def _imports() -> tuple[list[Edge], dict[str, set[str]]]:
    """Every import edge between sharpflow modules, and each module's top-level third-party roots."""
    edges, libs = [], {}
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip, local = _type_checking_nodes(tree), _local_nodes(tree)
        libs[mod] = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in skip:
                continue
            for target in _resolve(mod, node):
                edges.append(Edge(mod, target, node.lineno, id(node) in local))
            if id(node) not in local:
                if isinstance(node, ast.Import):
                    libs[mod] |= {a.name.split(".")[0] for a in node.names}
                elif not node.level and node.module:
                    libs[mod].add(node.module.split(".")[0])
    return edges, libs


EDGES, LIBS = _imports()


def _cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for e in edges:
        graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _heavy() -> set[str]:
    """Modules whose top-level imports (transitively) load torch, pandas, matplotlib or scipy. A
    package's submodule counts its package too: Python runs the package's ``__init__`` first."""
    top = {m: {e.target for e in EDGES if e.source == m and not e.local} for m in MODULES}
    for m in MODULES:
        parts = m.split(".")
        top[m] |= {".".join(parts[:i]) for i in range(1, len(parts))} & set(MODULES)
    heavy = {m for m, roots in LIBS.items() if roots & HEAVY_LIBS}
    changed = True
    while changed:
        changed = False
        for m in MODULES:
            if m not in heavy and top[m] & heavy:
                heavy.add(m)
                changed = True
    return heavy


def layer(mod: str) -> int:
    key = f"{mod}.__init__" if _is_package(mod) and f"{mod}.__init__" in LAYERS else mod
    while key not in LAYERS:
        assert "." in key, f"{mod}: no layer in tests/test_layers.py's LAYERS (add it, as in DESIGN.md)"
        key = key.rsplit(".", 1)[0]
    return LAYERS[key]


def test_no_import_circle():
    assert _cycles(EDGES) == []


def test_the_cycle_finder_finds_a_circle():
    # the check itself can fail: a made-up edge back up the layers closes a circle
    fake = [*EDGES, Edge("sharpflow.config", "sharpflow.study", 1, False)]
    assert any({"sharpflow.config", "sharpflow.study"} <= set(c) for c in _cycles(fake))


def test_imports_point_down_the_layers():
    upward = [f"{e.source}:{e.line} imports {e.target} (layer {layer(e.source)} -> {layer(e.target)})"
              for e in EDGES if layer(e.target) > layer(e.source)]
    assert upward == []


def test_function_local_imports_are_deliberate():
    heavy = _heavy()
    wrong = []
    for e in EDGES:
        if not e.local:
            continue
        if e.source in heavy:
            wrong.append(f"{e.source}:{e.line}: {e.target} (the module is heavy already: import at the top)")
        elif e.target not in heavy:
            wrong.append(f"{e.source}:{e.line}: {e.target} (light: import at the top)")
    assert wrong == []


def _snakefile_imports() -> list[str]:
    """The sharpflow modules workflow/rules/*.smk import (read from the rules, not listed here)."""
    mods = []
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for m in re.finditer(r"^\s*(?:from\s+(sharpflow[\w.]*)\s+import|import\s+(sharpflow[\w.]*))",
                             smk.read_text(encoding="utf-8"), re.M):
            name = m.group(1) or m.group(2)
            if name not in mods:
                mods.append(name)
    return mods


def test_the_snakefile_imports_are_light_statically():
    mods = _snakefile_imports()
    assert "sharpflow.study" in mods and "sharpflow.analyses" in mods
    assert sorted(set(mods) & _heavy()) == []


@pytest.mark.parametrize("extra", [[], ["sharpflow.cli"]])
def test_importing_what_the_snakefile_imports_loads_no_torch_or_pandas(extra):
    mods = _snakefile_imports() + extra
    probe = "print(json.dumps(sorted(m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules)))"
    code = "import json, sys\n" + "".join(f"import {m}\n" for m in mods) + probe
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
