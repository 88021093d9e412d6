"""``batch_sharpness``: batch sharpness and λ_1 against 2/η (Andreyev & Beneventano 2024).

One panel per study (e.g. the η grid and the batch-size grid): for each run, η·BS/2 (solid, with a
band of ± one standard error over the mini-batches), BS = E_B[g_Bᵀ H_B g_B/‖g_B‖²] at the run's batch
size, and η·λ_1/2 of the Hessian subset (dashed), against epoch. Both are in units of the stability
threshold 2/η (the dotted line at 1), so runs of different η share one axis. The ``batch_sharpness``
table gives both columns.

Style options: ``max_runs`` per panel (default 6), ``width``, ``title``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..results import Data, varying
from . import style


def plot(data: Data, opts: dict[str, Any]) -> Figure:
    bs = data.table("batch_sharpness")
    runs = data.runs_with("batch_sharpness")
    if not runs:
        return style.no_data("batch_sharpness", "no batch-sharpness rows")
    studies = list(dict.fromkeys(data.study(r) for r in runs))
    fig = style.new_figure(float(opts.get("width", style.DOUBLE)), 2.6)
    axes = np.atleast_1d(fig.subplots(1, len(studies), sharey=True))
    for ax, study in zip(axes, studies, strict=True):
        mine = [r for r in runs if data.study(r) == study][: int(opts.get("max_runs", 6))]
        _, colours = style.run_colours(data, mine)
        keys = varying(data, mine)
        handles = []
        for run in mine:
            c = colours[run]
            d = bs[bs["run"] == run].sort_values("step")
            x = d["epoch"].to_numpy(float)
            y, se = d["ratio"].to_numpy(float), (d["lr"] * d["batch_sharpness_se"] / 2).to_numpy(float)
            (h,) = ax.plot(x, y, color=c, lw=1.2, label=style.run_label(data.meta.get(run, {}), keys, run))
            handles.append(h)
            ok = np.isfinite(se)
            if ok.any():
                ax.fill_between(x[ok], (y - se)[ok], (y + se)[ok], color=c, alpha=0.2, lw=0)
            ax.plot(x, d["lambda1_ratio"].to_numpy(float), color=c, lw=0.9, ls="--")
        ax.axhline(1.0, ls=":", lw=1.0, color="k")
        ax.set_xlabel("epoch")
        ax.set_title(study, fontsize="medium")
        ax.legend(handles=handles, loc="best", fontsize="x-small")
    axes[0].set_ylabel("in units of 2/η")
    extra = [style.style_handle("η·batch sharpness/2 (± s.e.)", ls="-"), style.style_handle("η·λ$_1$/2", ls="--"),
             style.style_handle("2/η", ls=":", color="k")]
    axes[-1].legend(handles=[*axes[-1].get_legend().legend_handles, *extra], loc="upper left",
                    bbox_to_anchor=(1.0, 1.0), fontsize="x-small")
    style.suptitle(fig, data, runs, opts, "Batch sharpness")
    return fig
