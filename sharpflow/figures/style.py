"""The look shared by every figure: sizes, fonts, colours per η / S / γ / K, labels, saving.

Sizes are for a two-column paper: :data:`SINGLE` (one column, 3.4 in) and :data:`DOUBLE` (full
width, 7 in); fonts are 8 pt (7 pt for ticks and legends), so a figure included at its natural
size stays readable. Colours are assigned by the rank of a value among all runs of the figure's
spec, one sequential palette per quantity (η: plasma, S: viridis, γ: a qualitative set, K:
cividis), so the same η has the same colour in every figure of a study.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display, deterministic output; must precede any pyplot import

import matplotlib.colors as mcolors
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..io import atomic_path
from ..results import last_finite, sort_value, varying

SINGLE = 3.4  # inches, one column
DOUBLE = 7.0  # inches, full width
DPI = 200.0  # PNG resolution
ROW_HEIGHT = 2.0  # inches per row of panels

#: units, so every axis label says what it measures.
EIG_UNIT = "nats/param²"  # Hessian eigenvalues: loss (nats) per squared parameter unit

#: symbols of the run settings, for legends.
SYMBOL = {"lr": "η", "batch_size": "S", "gamma": "γ", "k": "K", "momentum": "μ", "seed": "seed",
          "optimizer": "opt", "warmup_steps": "W"}

_PALETTES = {"lr": ("plasma", 0.05, 0.80), "batch_size": ("viridis", 0.05, 0.85), "k": ("cividis", 0.0, 0.85),
             "momentum": ("cool", 0.0, 1.0), "seed": ("tab10", None, None),
             "optimizer": ("Dark2", None, None),
             "gamma": ("Set1", None, None), "run": ("tab10", None, None),
             "factor": ("Greens", 0.45, 0.9), "warmup_steps": ("viridis", 0.05, 0.85)}

DIVERGED_MARKER = {"marker": "x", "markersize": 7, "markeredgewidth": 1.6, "linestyle": "none", "zorder": 5}
#: an eigenvalue whose pair missed the solver's tolerance: drawn, but hollow-ringed
UNCONVERGED_MARKER = {"marker": "o", "markersize": 4.5, "markerfacecolor": "none", "markeredgewidth": 0.9,
                      "linestyle": "none", "zorder": 4}

RC = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "figure.titlesize": 9,
    "legend.frameon": False,
    "legend.handlelength": 1.8,
    "lines.linewidth": 1.2,
    "lines.markersize": 3,
    "axes.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.35,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "pdf.fonttype": 42,  # embed TrueType, so text stays text in the PDF
    "savefig.bbox": "standard",
    "figure.constrained_layout.use": True,
    "mathtext.default": "regular",
}


@contextlib.contextmanager
def context() -> Iterator[None]:
    """The shared rcParams, restored afterwards (no global state leaks into the caller)."""
    with matplotlib.rc_context(RC):
        yield


def new_figure(width: float, height: float) -> Figure:
    """A figure not registered with pyplot (so nothing needs closing)."""
    return Figure(figsize=(width, height), layout="constrained")


def save(fig: Figure, out_pdf: Path, out_png: Path, dpi: float = DPI) -> None:
    """Write PDF and PNG atomically, without timestamps (same data, same bytes)."""
    with atomic_path(out_pdf) as tmp:
        fig.savefig(tmp, format="pdf", metadata={"CreationDate": None, "Creator": "sharpflow"})
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": "sharpflow"})


def no_data(title: str, message: str = "no data") -> Figure:
    """A small figure that says why there is nothing to show."""
    fig = new_figure(SINGLE, 1.6)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.62, title, ha="center", va="center", fontsize=9, fontweight="bold", transform=ax.transAxes)
    ax.text(0.5, 0.38, message, ha="center", va="center", fontsize=8, color="0.35", transform=ax.transAxes,
            wrap=True)
    return fig


def empty_panel(ax: Axes, message: str = "no data") -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", color="0.4", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------------------- colours
def palette(key: str, values: Sequence[Any]) -> dict[Any, tuple[float, float, float, float]]:
    """A colour per distinct value of the setting ``key``, ordered by value."""
    distinct = sorted(set(values), key=sort_value)
    name, lo, hi = _PALETTES.get(key, ("tab10", None, None))
    cmap = matplotlib.colormaps[name]
    n = len(distinct)
    if lo is None:  # qualitative palette: take its colours in order
        cols = [cmap(i % cmap.N) for i in range(n)]
    else:
        cols = [cmap(lo + (hi - lo) * (i / (n - 1) if n > 1 else 0.5)) for i in range(n)]
    return {v: mcolors.to_rgba(c) for v, c in zip(distinct, cols, strict=True)}


def rank_colours(n: int, cmap: str = "viridis") -> list[tuple[float, float, float, float]]:
    """n colours from dark (rank 1, the sharpest direction) to light."""
    cm = matplotlib.colormaps[cmap]
    return [cm(0.85 * i / max(n - 1, 1)) for i in range(n)]


# ---------------------------------------------------------------------------------------- labels
def fmt_value(key: str, v: Any) -> str:
    """``η=0.1``, ``S=128``, ``S=full``, ``γ=0.01``."""
    if v is None:
        return f"{SYMBOL.get(key, key)}=–"
    s = f"{v:g}" if isinstance(v, float) else str(v)
    if key == "optimizer":
        return s.upper()
    return f"{SYMBOL.get(key, key)}={s}"


def run_label(settings: dict[str, Any], keys: Sequence[str], run: str) -> str:
    """A legend label naming the settings in ``keys`` (the run id if there are none)."""
    parts = [fmt_value(k, settings.get(k)) for k in keys]
    return ", ".join(parts) if parts else run


def diverged_label(label: str, diverged: bool) -> str:
    return f"{label} (diverged)" if diverged else label


def mark_divergence(ax: Axes, x: float, y: float | None, colour: Any) -> None:
    """A × at the divergence point; with no finite value before it, at the bottom of the axes."""
    if y is None or not np.isfinite(y):
        ax.plot([x], [0.02], color=colour, transform=ax.get_xaxis_transform(), clip_on=False,
                **DIVERGED_MARKER)
    else:
        ax.plot([x], [y], color=colour, **DIVERGED_MARKER)


def mark_unconverged(ax: Axes, rows: Any, x: np.ndarray, y: np.ndarray, colour: Any) -> bool:
    """Ring the points (x, y) whose eigenpair did not converge (``rows.converged`` False).

    ``rows`` are the spectrum rows the points were drawn from, in the same order. Returns
    whether any point was ringed (then add :func:`unconverged_handle` to the legend).
    """
    if "converged" not in getattr(rows, "columns", ()):
        return False
    bad = ~rows["converged"].to_numpy(bool) & np.isfinite(y)
    if not bad.any():
        return False
    ax.plot(x[bad], y[bad], color=colour, gid="unconverged", **UNCONVERGED_MARKER)
    return True


# ------------------------------------------------------------------------------ per-run panels
def run_entry(data: Any, run: str, keys: Sequence[str]) -> tuple[str, tuple[float, float] | None]:
    """A run's legend label (its settings in ``keys``, "(diverged)" when it diverged) and its
    divergence ((step, epoch) or None): what every per-run panel starts from."""
    div = data.divergence(run)
    return diverged_label(run_label(data.meta.get(run, {}), keys, run), div is not None), div


def eigenvalue_curves(ax: Axes, sp: Any, colour: Any, *, x: str, div: tuple[float, float] | None,
                      lw2: float = 1.0, label: str | None = None) -> tuple[tuple[Line2D, np.ndarray, np.ndarray] | None,
                                                                             bool, bool]:
    """One run's λ_1 (solid) and λ_2 (dashed) from its spectrum rows ``sp`` against ``x`` ("step" or
    "epoch"), for a log axis (λ ≤ 0 left out): unconverged pairs ringed, the divergence marked on λ_1.
    Returns (λ_1's line with its x and y, or None), whether any value is finite and positive, and
    whether a pair was ringed."""
    first = None
    finite = unconverged = False
    for rank, ls, lw in ((1, "-", 1.4), (2, "--", lw2)):
        d = sp[sp["rank"] == rank].sort_values("step") if len(sp) else sp
        if len(d) == 0:
            continue
        xs, ys = d[x].to_numpy(float), d["eigenvalue"].to_numpy(float)
        ys = np.where(ys > 0, ys, np.nan)  # a log axis cannot show λ ≤ 0
        finite |= bool(np.isfinite(ys).any())
        (h,) = ax.plot(xs, ys, ls=ls, lw=lw, color=colour, label=label if rank == 1 else None)
        unconverged |= mark_unconverged(ax, d, xs, ys, colour)
        if rank == 1:
            first = (h, xs, ys)
            if div is not None:
                at = div[0] if x == "step" else div[1]
                lf = last_finite(xs, ys, before=at)
                mark_divergence(ax, at, lf[1] if lf else None, colour)
    return first, finite, unconverged


def unconverged_handle() -> Line2D:
    return Line2D([], [], color="0.3", label="not converged (residual > tol)", **UNCONVERGED_MARKER)


def diverged_handle() -> Line2D:
    return Line2D([], [], color="0.3", label="divergence", **DIVERGED_MARKER)


def style_handle(label: str, **kw: Any) -> Line2D:
    """A legend entry for a line style (not a run), drawn in dark grey."""
    kw.setdefault("color", "0.25")
    return Line2D([], [], label=label, **kw)


def title_from(settings: Sequence[tuple[str, Any]]) -> str:
    return ", ".join(fmt_value(k, v) for k, v in settings)


def full_batch_first(data: Any, runs: Sequence[str], max_runs: int) -> tuple[list[str], bool]:
    """The full-batch runs among ``runs`` (all of them if none is), at most ``max_runs``, and whether
    they are full-batch (a step is then an epoch)."""
    full = [r for r in runs if data.value(r, "batch_size") == "full"]
    return list(full or runs)[:max_runs], bool(full)


def run_colours(
    data: Any,
    runs: Sequence[str],
    prefer: Sequence[str] = ("lr", "batch_size", "gamma", "k", "momentum", "seed"),
) -> tuple[str | None, dict[str, tuple[float, float, float, float]]]:
    """Colour each run by the first setting in ``prefer`` that varies among ``runs``.

    The palette spans the values of that setting over every run of the spec (not only the ones
    drawn), so a value keeps its colour across the figures of a study. When nothing varies, or
    two settings other than the seed vary (a 2-D sweep, where one colour would stand for several
    runs), the runs get distinct qualitative colours instead. Returns (the colouring key or
    None, run -> colour).
    """
    keys = [k for k in varying(data, runs, prefer) if k in prefer]
    if not keys or len([k for k in keys if k != "seed"]) > 1:
        cols = palette("run", list(runs))
        return None, {r: cols[r] for r in runs}
    key = keys[0]
    universe = [data.value(r, key) for r in set(data.meta) | set(runs)]
    pal = palette(key, [v for v in universe if v is not None] + [data.value(r, key) for r in runs])
    return key, {r: pal[data.value(r, key)] for r in runs}


def suptitle(fig: Figure, data: Any, runs: Sequence[str], opts: dict[str, Any], what: str) -> None:
    """``style.title`` if given, else "<what> — <studies>: <settings shared by all runs>"."""
    if "title" in opts:
        if opts["title"]:
            fig.suptitle(str(opts["title"]))
        return

    studies = list(dict.fromkeys(data.study(r) for r in runs))  # in the spec's order
    fixed = [k for k in ("lr", "batch_size", "momentum") if k not in varying(data, runs, (k,))]
    shared = [(k, data.value(runs[0], k)) for k in fixed if runs and data.value(runs[0], k) is not None]
    text = f"{what} — {', '.join(studies)}"
    if shared:
        text += f" ({title_from(shared)})"
    fig.suptitle(text)


def plain_log(ax: Axes, which: str = "y") -> None:
    """Label a log axis with plain numbers (0.5, 1, 2, 10) instead of 2×10⁰; minor ticks at 2 and 5
    get labels only when the axis spans less than two decades (otherwise they would crowd)."""
    from matplotlib.ticker import FuncFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis

    def major(v: float, _: int) -> str:
        return f"{v:g}" if v > 0 else ""

    def minor(v: float, _: int) -> str:
        lo, hi = sorted(axis.get_view_interval())
        if v <= 0 or lo <= 0 or hi / lo > 100:
            return ""
        mant = v / 10 ** math.floor(math.log10(v))
        return f"{v:g}" if abs(mant - round(mant)) < 1e-6 and round(mant) in (2, 5) else ""

    axis.set_major_formatter(FuncFormatter(major))
    axis.set_minor_formatter(FuncFormatter(minor))
