"""``precond``: Adam's preconditioned sharpness λ_1(P^{-1}H) over training (Cohen et al. 2022).

One colour per run: λ_1 of P^{-1}H (solid; the ``precond`` table) on a log scale against epoch, with
its stability threshold (2 + 2β₁)/(η(1 − β₁)) dotted in the same colour, as the eigenvalue figures
draw 2/η for SGD; an unconverged pair is ringed. Style options: ``max_runs`` (default 8), ``width``,
``title``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..results import Data, varying
from . import style


def plot(data: Data, opts: dict[str, Any]) -> Figure:
    pc = data.table("precond")
    runs = data.runs_with("precond")[: int(opts.get("max_runs", 8))]
    if not runs:
        return style.no_data("precond", "no preconditioned-sharpness rows")
    _, colours = style.run_colours(data, runs)
    keys = varying(data, runs)
    fig = style.new_figure(float(opts.get("width", style.SINGLE * 1.6)), 2.6)
    ax = fig.subplots()
    handles = []
    any_unconverged = False
    for run in runs:
        d = pc[(pc["run"] == run) & (pc["rank"] == 1)].sort_values("step")
        x, y = d["epoch"].to_numpy(float), d["eigenvalue"].to_numpy(float)
        ok = np.isfinite(y) & (y > 0)
        (h,) = ax.plot(x[ok], y[ok], color=colours[run], marker="o", ms=2.5, lw=1.2,
                       label=style.run_label(data.meta.get(run, {}), keys, run))
        handles.append(h)
        any_unconverged |= style.mark_unconverged(ax, d[ok], x[ok], y[ok], colours[run])
        thr = d["threshold"].to_numpy(float)
        if np.isfinite(thr).any():
            ax.plot(x, thr, ls=":", lw=1.0, color=colours[run])
    ax.set_yscale("log")
    style.plain_log(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"$\\lambda_1(P^{{-1}}H)$ ({style.EIG_UNIT})")
    extra = [style.style_handle("$(2+2\\beta_1)/(\\eta(1-\\beta_1))$", ls=":")]
    if any_unconverged:
        extra.append(style.unconverged_handle())
    ax.legend(handles=handles + extra, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    style.suptitle(fig, data, runs, opts, "Adam's preconditioned sharpness")
    return fig
