"""A small table model and its three writers: Markdown (pipe table), LaTeX (booktabs), CSV.

A :class:`Table` is a list of :class:`Column` s and rows (dicts). A "meanstd" cell holds
(mean, std, flag): Markdown and LaTeX print "mean ± std" (a ``flag`` string such as "†" is
appended), while the CSV gets plain numbers in two columns, ``{key}_mean`` and ``{key}_std``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..io import atomic_path, write_text

MISSING = "–"  # printed for a NaN


@dataclass
class Column:
    """One column.

    Attributes:
        key: the CSV name (for "meanstd": the stem of ``{key}_mean`` / ``{key}_std``).
        header: the Markdown header (Unicode allowed).
        tex: the LaTeX header (already LaTeX); None: ``header`` escaped by :func:`tex_escape`.
        kind: "text", "int", "number" or "meanstd".
        fmt: format of numbers, e.g. "{:.3g}".
        csv: whether the CSV has this column (False for display-only text such as "2 (1 div.)").
    """

    key: str
    header: str
    tex: str | None = None
    kind: Literal["text", "int", "number", "meanstd"] = "number"
    fmt: str = "{:.3g}"
    csv: bool = True

    @property
    def align(self) -> str:
        return "l" if self.kind == "text" else "r"


@dataclass
class Table:
    columns: list[Column]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (ddof=1) of the finite values, and their count.

    The std is NaN with fewer than two finite values.
    """
    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return math.nan, math.nan, 0
    return float(np.mean(x)), float(np.std(x, ddof=1)) if len(x) > 1 else math.nan, len(x)


# --------------------------------------------------------------------------------- formatting
def _num(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return MISSING
    return fmt.format(v)


def cell_text(col: Column, v: Any, pm: str = " ± ") -> str:
    if col.kind == "text":
        return "" if v is None else str(v)
    if col.kind == "int":
        return MISSING if v is None or (isinstance(v, float) and not math.isfinite(v)) else str(int(v))
    if col.kind == "number":
        return _num(v, col.fmt)
    mean, std, flag = (*v, "")[:3] if isinstance(v, tuple | list) else (v, math.nan, "")
    text = _num(mean, col.fmt)
    if text != MISSING and std is not None and math.isfinite(std):
        text += pm + _num(std, col.fmt)
    return text + (flag or "") if text != MISSING else text


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_TEX_UNICODE = {"η": r"\ensuremath{\eta}", "γ": r"\ensuremath{\gamma}", "λ": r"\ensuremath{\lambda}",
                "θ": r"\ensuremath{\theta}", "±": r"\ensuremath{\pm}", "‖": r"\ensuremath{\|}",
                "≥": r"\ensuremath{\geq}", "≤": r"\ensuremath{\leq}", "·": r"\ensuremath{\cdot}",
                "†": r"\ensuremath{^\dagger}", "²": r"\ensuremath{^2}", "√": r"\ensuremath{\surd}",
                "Σ": r"\ensuremath{\Sigma}", "×": r"\ensuremath{\times}", "–": "--", "—": "---",
                "₀": r"\ensuremath{_0}", "₁": r"\ensuremath{_1}", "→": r"\ensuremath{\to}"}


def tex_escape(text: str) -> str:
    """Plain text -> LaTeX: special characters escaped, Greek and symbols as math (one pass, so
    nothing is escaped twice)."""
    return "".join(_TEX_SPECIAL.get(ch) or _TEX_UNICODE.get(ch) or ch for ch in text)


def md_escape(text: str) -> str:
    """Pipes would split a cell; underscores and asterisks would start emphasis."""
    return text.replace("\\", "\\\\").replace("|", r"\|").replace("_", r"\_").replace("*", r"\*")


def to_markdown(table: Table) -> str:
    head = "| " + " | ".join(md_escape(c.header) for c in table.columns) + " |"
    rule = "|" + "|".join(":---" if c.align == "l" else "---:" for c in table.columns) + "|"
    body = ["| " + " | ".join(md_escape(cell_text(c, row.get(c.key))) for c in table.columns) + " |"
            for row in table.rows]
    lines = [head, rule, *body]
    if table.notes:
        lines += ["", *(f"{md_escape(n)}  " for n in table.notes)]
    return "\n".join(lines) + "\n"


def to_latex(table: Table) -> str:
    """A booktabs ``tabular`` (to ``\\input`` inside a table environment), notes below it in small type."""
    spec = "".join(c.align for c in table.columns)
    head = " & ".join(c.tex if c.tex is not None else tex_escape(c.header) for c in table.columns)
    lines = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule", head + r" \\", "\\midrule"]
    for row in table.rows:
        cells = [tex_escape(cell_text(c, row.get(c.key))) for c in table.columns]
        lines.append(" & ".join(cells) + r" \\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if table.notes:
        # After the tabular, not in a multicolumn row: long notes wrap at the text width
        # instead of widening the table.
        lines += ["\\par\\smallskip", "{\\footnotesize", *(f"{tex_escape(n)}\\par" for n in table.notes), "}"]
    return "\n".join(lines) + "\n"


def to_frame(table: Table) -> pd.DataFrame:
    """The CSV content: plain numbers, a ``_std`` column beside every ``_mean``, extra keys kept."""
    cols: dict[str, list[Any]] = {}
    shown = {c.key for c in table.columns}
    for c in table.columns:
        if not c.csv:
            continue
        if c.kind == "meanstd":
            cols[f"{c.key}_mean"] = [_pair(r.get(c.key))[0] for r in table.rows]
            cols[f"{c.key}_std"] = [_pair(r.get(c.key))[1] for r in table.rows]
        else:
            cols[c.key] = [r.get(c.key) for r in table.rows]
    extra = [k for r in table.rows for k in r if k not in shown and not k.startswith("_")]
    for k in dict.fromkeys(extra):
        cols[k] = [r.get(k) for r in table.rows]
    return pd.DataFrame(cols)


def _pair(v: Any) -> tuple[float, float]:
    if isinstance(v, tuple | list):
        return float(v[0]), float(v[1])
    return (math.nan, math.nan) if v is None else (float(v), math.nan)


def write(table: Table, out_md: Path, out_tex: Path, out_csv: Path) -> None:
    write_text(out_md, to_markdown(table))
    write_text(out_tex, to_latex(table))
    with atomic_path(out_csv) as tmp:
        to_frame(table).to_csv(tmp, index=False)
