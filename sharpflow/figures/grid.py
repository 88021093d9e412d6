"""``grid``: λ1 and λ2 over training across an η or S sweep (paper Fig. 4).

One panel per study. λ1 (solid) and λ2 (dashed) on a log scale vs epoch, one colour per value of
the swept setting (detected: the first of η, S, momentum, γ, K, seed that differs among the
study's runs); runs that differ only by seed (a seed sweep, or a study that ``replicates`` this one)
are drawn as their mean with a band from the smallest to the largest λ1 of the seeds at each
checkpoint; a dotted horizontal line at 2/η per learning rate (the stability limit of
gradient descent on a quadratic with curvature λ: λ < 2/η); the early phase shaded, up to the
epoch at which λ1 of the first run peaks, or up to ``style.early_epochs`` if given. An eigenvalue whose
pair missed the solver's tolerance is ringed (o).

Style options: ``early_epochs`` (float), ``stability_line`` (bool, default true), ``xscale``
("linear" | "log" | "symlog", default "linear"), ``width``, ``title``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..results import Data, adaptive, replicate_groups, varying
from . import style


def plot(data: Data, opts: dict[str, Any]) -> Figure:
    runs = data.runs_with("spectrum")
    if not runs:
        return style.no_data("grid", "no spectrum rows")
    studies: list[str] = []
    for r in runs:
        if data.study(r) not in studies:
            studies.append(data.study(r))
    n = len(studies)
    ncols = min(n, 2)
    nrows = -(-n // ncols)
    width = float(opts.get("width", style.DOUBLE if ncols == 2 else 4.6))
    fig = style.new_figure(width, 2.5 * nrows + 0.3)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, study in zip(axes, studies, strict=False):
        _panel(ax, data, study, [r for r in runs if data.study(r) == study], opts)
    for ax in axes[n:]:
        ax.set_visible(False)
    style.suptitle(fig, data, runs, opts, "$\\lambda_1$ and $\\lambda_2$ of the training-loss Hessian")
    return fig


#: the settings a grid sweeps, in the order in which one is picked for the colours.
SWEPT = ("lr", "batch_size", "momentum", "gamma", "k", "seed")


def _panel(ax: Axes, data: Data, study: str, runs: list[str], opts: dict[str, Any]) -> None:
    key, colours = style.run_colours(data, runs, prefer=SWEPT)
    groups = replicate_groups(data, runs)
    label_keys = varying(data, runs)
    if any(len(g) > 1 for g in groups):
        label_keys = [k for k in label_keys if k != "seed"]
    run_handles = []
    any_div = False
    first_peak: float | None = None
    finite = False
    any_unconverged = False
    for members in groups:
        run = members[0]
        c = colours[run]
        label, div = style.run_entry(data, run, label_keys)
        rows = data.rows("spectrum", run)
        if len(members) > 1:
            rows, lo, hi = _seed_mean(data, members)
            label = f"{label} (mean of {len(members)} seeds)"
            div = min((d for d in (data.divergence(r) for r in members) if d is not None), default=None)
            if len(lo):
                ax.fill_between(lo.index.to_numpy(float), np.where(lo > 0, lo, np.nan), np.where(hi > 0, hi, np.nan),
                                color=c, alpha=0.2, lw=0)
        any_div |= div is not None
        first, drawn, unconverged = style.eigenvalue_curves(ax, rows, c, x="epoch", div=div, label=label)
        finite |= drawn
        any_unconverged |= unconverged
        if first is not None and first_peak is None and np.isfinite(first[2]).any():
            first_peak = float(first[1][np.nanargmax(first[2])])
        # keep the run in the legend even with nothing drawable
        run_handles.append(first[0] if first is not None else style.style_handle(label, color=c))

    extra = [style.style_handle("$\\lambda_1$", ls="-"), style.style_handle("$\\lambda_2$", ls="--")]
    if opts.get("stability_line", True):
        # 2/η is the threshold of (S)GD on H; Adam's is on its preconditioned H (figure kind precond)
        sgd_like = [r for r in runs if not adaptive(data, r)]
        etas = sorted({float(v) for v in (data.value(r, "lr") for r in sgd_like) if v is not None})
        for eta in etas:
            c = next((colours[r] for r in runs if key == "lr" and data.value(r, "lr") == eta), "0.3")
            ax.axhline(2.0 / eta, ls=":", lw=1.0, color=c)
        if etas:
            extra.append(style.style_handle("2/η", ls=":"))
    end = opts.get("early_epochs", first_peak)
    if end is not None and float(end) > 0:
        ax.axvspan(0, float(end), color="0.88", lw=0, zorder=0)
        extra.append(Patch(color="0.88", label="early phase"))
    if any_div:
        extra.append(style.diverged_handle())
    if any_unconverged:
        extra.append(style.unconverged_handle())

    ax.set_yscale("log")
    style.plain_log(ax)
    if not finite:
        ax.text(0.5, 0.5, "no finite positive eigenvalues", ha="center", va="center", color="0.4",
                transform=ax.transAxes)
    xscale = str(opts.get("xscale", "linear"))
    ax.set_xscale(xscale, **({"linthresh": 1.0} if xscale == "symlog" else {}))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"$\\lambda_1$, $\\lambda_2$ ({style.EIG_UNIT})")
    ax.set_title(f"{study}: swept {style.SYMBOL.get(key, key)}" if key else study, loc="left")
    ax.legend(handles=run_handles + extra, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _seed_mean(data: Data, runs: list[str]) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """The seeds' mean spectrum rows (rank, step, epoch, eigenvalue, converged: all of them) at the
    checkpoints every seed has, and λ1's smallest and largest value there (indexed by epoch)."""
    frames = [data.rows("spectrum", r)[["rank", "step", "epoch", "eigenvalue", "converged"]] for r in runs]
    d = pd.concat(frames, keys=range(len(frames)), names=["seed_index", None]).reset_index(level=0)
    d = d[d["rank"] <= 2]
    counts = d.groupby(["rank", "step"])["seed_index"].nunique()
    full = counts[counts == len(runs)].index
    d = d.set_index(["rank", "step"]).loc[lambda x: x.index.isin(full)].reset_index()
    mean = d.groupby(["rank", "step"], as_index=False).agg(
        epoch=("epoch", "first"), eigenvalue=("eigenvalue", "mean"), converged=("converged", "all"))
    top = d[d["rank"] == 1].groupby("epoch")["eigenvalue"]
    return mean, top.min(), top.max()
