"""``evolution``: the top-K Hessian eigenvalues over training (paper Fig. 1 right / Fig. 2).

One row of three panels per run: (a) λ_1..λ_K vs step over the whole run, (b) the same over the
early phase only (epochs ≤ ``zoom_until_epoch``), (c) train and test accuracy vs epoch.
In (a), an eigenvalue whose pair missed the solver's tolerance is ringed (o).

Style options: ``top_k`` (eigenvalues drawn, default 10), ``zoom_until_epoch`` (default 2),
``max_runs`` (rows, default 4), ``yscale`` of the eigenvalue panels ("linear" | "log", default
"linear"), ``width`` (inches), ``title``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..results import Data, last_finite, steps_per_epoch, varying
from . import style


def plot(data: Data, opts: dict[str, Any]) -> Figure:
    runs = [r for r in data.runs if r in set(data.runs_with("spectrum")) | set(data.runs_with("metrics"))]
    runs = runs[: int(opts.get("max_runs", 4))]
    if not runs:
        return style.no_data("evolution", "no spectrum or metrics rows")
    keys = varying(data, runs)
    fig = style.new_figure(float(opts.get("width", style.DOUBLE)), style.ROW_HEIGHT * len(runs) + 0.35)
    axes = fig.subplots(len(runs), 3, squeeze=False, gridspec_kw={"width_ratios": [1.35, 1.0, 1.0]})
    for row, run in zip(axes, runs, strict=True):
        _row(row, data, run, style.run_label(data.meta.get(run, {}), keys, run), opts)
    style.suptitle(fig, data, runs, opts, "Top Hessian eigenvalues over training")
    return fig


def _row(axes: np.ndarray, data: Data, run: str, label: str, opts: dict[str, Any]) -> None:
    ax_s, ax_z, ax_a = axes
    sp = data.rows("spectrum", run)
    met = data.rows("metrics", run)
    div = data.divergence(run)
    spe = steps_per_epoch(sp if len(sp) else met)
    zoom_until = float(opts.get("zoom_until_epoch", 2))
    top_k = int(opts.get("top_k", 10))
    yscale = str(opts.get("yscale", "linear"))

    title = label if div is None else f"{label} — diverged at step {div[0]:g}"
    ax_s.set_title(title, loc="left")
    unit = f" (1 epoch = {spe:.4g} steps)" if np.isfinite(spe) else ""
    ax_s.set_xlabel(f"step{unit}")
    ax_s.set_ylabel(f"eigenvalue ({style.EIG_UNIT})")
    ax_z.set_title(f"early phase (epoch ≤ {zoom_until:g})", loc="left")
    ax_z.set_xlabel("step")
    ax_a.set_xlabel("epoch")
    ax_a.set_ylabel("accuracy (%)")

    if len(sp) and sp["eigenvalue"].notna().any():
        ranks = sorted(int(r) for r in sp["rank"].unique())[:top_k]
        colours = style.rank_colours(len(ranks))
        handles = []
        zoomed = False
        unconverged = False
        for rank, c in zip(ranks, colours, strict=True):
            d = sp[sp["rank"] == rank].sort_values("step")
            x, y = d["step"].to_numpy(float), d["eigenvalue"].to_numpy(float)
            lw = 1.5 if rank == 1 else 0.9
            (h,) = ax_s.plot(x, y, color=c, lw=lw, label=f"$\\lambda_{{{rank}}}$")
            handles.append(h)
            unconverged |= style.mark_unconverged(ax_s, d, x, y, c)
            m = d["epoch"].to_numpy(float) <= zoom_until + 1e-9
            if m.sum() > 0:
                zoomed = True
                ax_z.plot(x[m], y[m], color=c, lw=lw, marker="o" if m.sum() <= 40 else None, ms=2)
        # Name the first and last ranks only: the colour ramp says the rest.
        shown = handles if len(handles) <= 3 else [handles[0], handles[-1]]
        if div is not None:
            d1 = sp[sp["rank"] == ranks[0]].sort_values("step")
            lf = last_finite(d1["step"].to_numpy(float), d1["eigenvalue"].to_numpy(float), before=div[0])
            style.mark_divergence(ax_s, div[0], lf[1] if lf else None, "k")
            shown.append(style.diverged_handle())
        if unconverged:
            shown.append(style.unconverged_handle())
        ax_s.legend(handles=shown, loc="best")
        for ax in (ax_s, ax_z):
            ax.set_yscale(yscale)
            if yscale == "log":
                style.plain_log(ax)
        # Keep the whole run on the axis, so a run that diverged visibly stops short.
        last = float(sp["step"].max())
        if last > 0:
            ax_s.set_xlim(-0.02 * last, 1.02 * last)
        if not zoomed:
            style.empty_panel(ax_z, f"no checkpoint at epoch ≤ {zoom_until:g}")
    else:
        style.empty_panel(ax_s, "no spectrum" if div is None else "no spectrum (diverged)")
        style.empty_panel(ax_z, "no spectrum")

    _accuracy(ax_a, met, div)


def _accuracy(ax: Axes, met: Any, div: tuple[float, float] | None) -> None:
    """Train (solid) and test (dashed) accuracy in % vs epoch; valid if there is no test split."""
    if len(met) == 0:
        style.empty_panel(ax, "no metrics")
        return
    splits = [("train", "-", "0.15"), ("test", "--", "tab:red")]
    if not (met["split"] == "test").any():
        splits[1] = ("valid", "--", "tab:red")
    drew = False
    for split, ls, c in splits:
        d = met[met["split"] == split].sort_values("step")
        if len(d) == 0:
            continue
        x, y = d["epoch"].to_numpy(float), 100 * d["accuracy"].to_numpy(float)
        ax.plot(x, y, ls=ls, color=c, label=split)
        drew = True
        if div is not None:
            lf = last_finite(x, y, before=div[1])
            style.mark_divergence(ax, div[1], lf[1] if lf else None, c)
    if not drew:
        style.empty_panel(ax, "no evaluations")
        return
    if not np.isfinite(met.loc[met["split"] != "batch", "accuracy"].to_numpy(float)).any():
        style.empty_panel(ax, "no finite accuracy" + (" (diverged)" if div is not None else ""))
        return
    emax = float(met["epoch"].max())
    if np.isfinite(emax) and emax > 0:
        ax.set_xlim(-0.02 * emax, 1.02 * emax)
    ax.legend(loc="lower right")
