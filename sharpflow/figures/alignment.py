"""``alignment``: how strongly gradients point along the sharpest directions (paper Fig. 5).

The y value is mean |cos(g, e_i)| over i ≤ ``top`` (default 5) and over the mini-batch gradients
of a checkpoint. Default view (``view: epoch``): left, against epoch; right, the training accuracy
of the same runs against epoch, so a run whose accuracy falls back reads as a turn in time rather
than a curve folding back on itself. The paper's view (``view: paper``, Fig. 5): left, against the
training accuracy at that checkpoint (metrics split "train", same step); right, against epoch.
One colour per run (by η when it varies); solid with dots for
mini-batch gradients, dashed for the full-batch gradient. Grey dash-dot: the measured random
baseline (mean |cos| between the same gradients and random unit vectors); grey dotted:
sqrt(2/(πD)), the expected |cos| of a random direction in D dimensions, drawn only when the table
has a ``dim`` (or ``n_params``) column.

Style options: ``view`` ("epoch" | "paper"), ``top`` (default 5), ``yscale`` ("log" | "linear",
default "log"), ``width``, ``title``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..results import Data, last_finite, varying
from . import style

DIM_COLUMNS = ("dim", "n_params", "num_params", "D")


def plot(data: Data, opts: dict[str, Any]) -> Figure:
    al = data.table("alignment")
    if len(al) == 0:
        return style.no_data("alignment", "no alignment rows")
    top = int(opts.get("top", 5))
    mb, fb = _gradient_means(data, al, top)

    runs = [r for r in data.runs if r in set(mb["run"]) | set(fb["run"])]
    if not runs:
        return style.no_data("alignment", f"no rows for e1..e{top}")
    _, colours = style.run_colours(data, runs)
    keys = varying(data, runs)

    view = str(opts.get("view", "epoch"))
    if view not in ("epoch", "paper"):
        raise ValueError(f"alignment: style.view must be 'epoch' or 'paper', got {view!r}")
    fig = style.new_figure(float(opts.get("width", style.DOUBLE)), 2.7)
    if view == "paper":
        ax_acc, ax_ep = fig.subplots(1, 2, sharey=True)
        ax_train = None
    else:
        ax_ep, ax_train = fig.subplots(1, 2)
        ax_acc = None
    handles = []
    any_div = False
    for run in runs:
        div = data.divergence(run)
        any_div |= div is not None
        label = style.diverged_label(style.run_label(data.meta.get(run, {}), keys, run), div is not None)
        handles.append(style.style_handle(label, color=colours[run], ls="-", marker="o", ms=3))
        _draw_run(ax_acc, ax_ep, run, (mb, fb), colours[run], div)
        if ax_train is not None:
            _draw_accuracy(ax_train, data, run, colours[run])

    extra = _reference_lines(al, tuple(ax for ax in (ax_acc, ax_ep) if ax is not None))
    if any_div:
        extra.append(style.diverged_handle())

    _label_axes(ax_acc, ax_ep, opts, top)
    if ax_train is not None:
        if not ax_train.lines:
            style.empty_panel(ax_train, "no training accuracy")
        ax_train.set_xlabel("epoch")
        ax_train.set_ylabel("training accuracy (%)")
    last = ax_train if ax_train is not None else ax_ep
    last.legend(handles=handles + extra, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    style.suptitle(fig, data, runs, opts, "Gradient alignment with the top Hessian eigenvectors")
    return fig


def _gradient_means(data: Data, al: pd.DataFrame, top: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean |cos| over e1..e_top per (run, step, epoch), mini-batch and full-batch, each with
    the training accuracy of that step (NaN where metrics lack it)."""
    eig = al[(al["kind"] == "eigen") & (al["rank"] <= top)]
    keys_cols = ["run", "step", "epoch"]
    mb = eig[eig["source"] == "minibatch"].groupby(keys_cols, as_index=False)["abs_cos"].mean()
    fb = eig[eig["source"] == "full"].groupby(keys_cols, as_index=False)["abs_cos"].mean()
    met = data.table("metrics")
    if len(met):
        train = met[met["split"] == "train"][["run", "step", "accuracy"]].drop_duplicates(["run", "step"])
    else:
        train = pd.DataFrame({"run": [], "step": [], "accuracy": []})
    mb = mb.merge(train, on=["run", "step"], how="left")
    fb = fb.merge(train, on=["run", "step"], how="left")
    return mb, fb


def _draw_accuracy(ax: Any, data: Data, run: str, c: Any) -> None:
    """The run's training accuracy (metrics split "train") against epoch."""
    met = data.rows("metrics", run)
    d = met[met["split"] == "train"].sort_values("step") if len(met) else met
    if len(d):
        x, y = d["epoch"].to_numpy(float), 100 * d["accuracy"].to_numpy(float)
        ok = np.isfinite(x) & np.isfinite(y)
        ax.plot(x[ok], y[ok], color=c, marker="o", ms=2.5, lw=1.1)


def _draw_run(ax_acc: Any, ax_ep: Any, run: str, tables: tuple[pd.DataFrame, pd.DataFrame], c: Any, div: Any) -> None:
    """One run's mini-batch (solid, dots) and full-batch (dashed) curves on both axes (``ax_acc``
    None: the epoch axis only), with the divergence marks on the mini-batch curve."""
    mb, fb = tables
    for table, ls, marker in ((mb, "-", "o"), (fb, "--", None)):
        d = table[table["run"] == run].sort_values("step")
        if len(d) == 0:
            continue
        y = d["abs_cos"].to_numpy(float)
        for ax, x in ((ax_acc, 100 * d["accuracy"].to_numpy(float)), (ax_ep, d["epoch"].to_numpy(float))):
            if ax is None:
                continue
            ok = np.isfinite(x) & np.isfinite(y)
            ax.plot(x[ok], y[ok], ls=ls, color=c, marker=marker, ms=2.5, lw=1.1)
        if div is not None and marker is not None:
            _mark_divergence(ax_acc, ax_ep, d, y, div, c)


def _mark_divergence(ax_acc: Any, ax_ep: Any, d: pd.DataFrame, y: np.ndarray, div: Any, c: Any) -> None:
    """The divergence marks of one curve: at the divergence epoch, and after the last finite accuracy."""
    x_ep = d["epoch"].to_numpy(float)
    lf = last_finite(x_ep, y, before=div[1])
    style.mark_divergence(ax_ep, div[1], lf[1] if lf else None, c)
    lfa = last_finite(100 * d["accuracy"].to_numpy(float), y) if ax_acc is not None else None
    if lfa:
        style.mark_divergence(ax_acc, lfa[0], lfa[1], c)


def _reference_lines(al: pd.DataFrame, axes: tuple[Any, Any]) -> list[Any]:
    """The grey baselines (measured random, sqrt(2/(πD))) on both axes; returns the legend
    handles: the two line styles, then one per baseline drawn."""
    extra = [style.style_handle("mini-batch g", ls="-", marker="o", ms=3),
             style.style_handle("full-batch g", ls="--")]
    rnd = al[(al["kind"] == "random") & (al["source"] == "minibatch")]["abs_cos"].to_numpy(float)
    if np.isfinite(rnd).any():
        level = float(np.nanmean(rnd))
        for ax in axes:
            ax.axhline(level, color="0.45", ls="-.", lw=1.0)
        extra.append(style.style_handle("random direction (measured)", ls="-.", color="0.45"))
    dims = _dims(al)
    for dim in dims:
        for ax in axes:
            ax.axhline(math.sqrt(2 / (math.pi * dim)), color="0.45", ls=":", lw=1.0)
    if dims:
        extra.append(style.style_handle("$\\sqrt{2/(\\pi D)}$", ls=":", color="0.45"))
    return extra


def _label_axes(ax_acc: Any, ax_ep: Any, opts: dict[str, Any], top: int) -> None:
    """Scale and labels; a note on the accuracy panel (paper view) when no curve has a point there."""
    ax_ep.set_yscale(str(opts.get("yscale", "log")))
    if ax_ep.get_yscale() == "log":
        style.plain_log(ax_ep)
    ax_ep.set_xlabel("epoch")
    ylabel = f"mean |cos(g, $e_i$)|, i ≤ {top}"
    if ax_acc is None:
        ax_ep.set_ylabel(ylabel)
        return
    if not any(len(line.get_xdata()) for line in ax_acc.lines if line.get_linestyle() in ("-", "--")):
        ax_acc.text(0.5, 0.5, "no training accuracy at these steps", ha="center", va="center",
                    color="0.4", transform=ax_acc.transAxes)
    ax_acc.set_xlabel("training accuracy (%)")
    ax_acc.set_ylabel(ylabel)


def _dims(al: pd.DataFrame) -> list[int]:
    """Parameter counts D named by the table, if any column holds them."""
    for col in DIM_COLUMNS:
        if col in al:
            vals = pd.to_numeric(al[col], errors="coerce").dropna()
            return sorted({int(v) for v in vals if v > 0})
    return []
