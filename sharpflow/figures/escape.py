"""``escape``: SGD continued from a checkpoint with the e1 component of each step edited.

Left: the loss on a fixed subset; right: λ_max; both vs SGD iterations from the checkpoint. One
line per mode (``none`` = plain SGD, the control; ``remove``/``freeze`` = no motion along e1;
``isolate`` = motion along e1 only; ``rescale`` = the e1 component multiplied by its factor).
One row per run. Reads ``escape.parquet`` (columns step, loss, lambda_max, mode, factor; see
:func:`sharpflow.analyses.escape_kernel.escape_ablation`).

Style options: ``yscale`` of the loss panel (default "linear"), ``max_runs`` (default 3), ``width``,
``title``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..results import Data, varying
from . import style

MODE_COLOURS = {"none": "k", "remove": "tab:blue", "freeze": "tab:cyan", "isolate": "tab:red",
                "rescale": "tab:green"}
MODE_NAMES = {"none": "plain SGD", "remove": "$e_1$ removed", "freeze": "$e_1$ coordinate frozen",
              "isolate": "$e_1$ only", "rescale": "$e_1$ ×{factor:g}"}


def _label(mode: str, factor: float) -> str:
    return MODE_NAMES.get(mode, mode).format(factor=factor)


def plot(data: Data, opts: dict[str, Any]) -> Figure:
    es = data.table("escape")
    runs = data.runs_with("escape")[: int(opts.get("max_runs", 3))]
    if not runs:
        return style.no_data("escape", "no escape-ablation rows")
    keys = varying(data, runs)
    fig = style.new_figure(float(opts.get("width", style.DOUBLE)), 2.4 * len(runs) + 0.35)
    axes = fig.subplots(len(runs), 2, squeeze=False)
    factors = es.loc[es["mode"] == "rescale", "factor"].astype(float)
    rescale_pal = style.palette("factor", sorted(set(factors)))
    for (ax_l, ax_m), run in zip(axes, runs, strict=True):
        d_run = es[es["run"] == run]
        label = style.run_label(data.meta.get(run, {}), keys, run)
        handles = []
        diverged_any = False
        for (mode, factor), d in d_run.groupby(["mode", "factor"], sort=False):
            d = d.sort_values("step")
            c = rescale_pal.get(float(factor)) if mode == "rescale" else MODE_COLOURS.get(str(mode), "0.4")
            x = d["step"].to_numpy(float)
            bad = d["status"].eq("diverged").to_numpy() | ~np.isfinite(d["loss"].to_numpy(float))
            div_here = bool(bad.any()) and bool((~bad).any())
            diverged_any |= div_here
            lbl = style.diverged_label(_label(str(mode), float(factor)), div_here)
            ls = "--" if mode == "none" else "-"
            (h,) = ax_l.plot(x, d["loss"].to_numpy(float), color=c, ls=ls, label=lbl)
            handles.append(h)
            ax_m.plot(x, d["lambda_max"].to_numpy(float), color=c, ls=ls)
            if div_here:
                i = int(np.flatnonzero(bad)[0])
                prev = d["loss"].to_numpy(float)[i - 1] if i > 0 else None
                style.mark_divergence(ax_l, x[i], prev, c)
        if not d_run["lambda_max"].notna().any():
            style.empty_panel(ax_m, "λ_max not computed")
        ax_l.set_yscale(str(opts.get("yscale", "linear")))
        if ax_l.get_yscale() == "log":
            style.plain_log(ax_l)
        ax_l.set_title(label, loc="left")
        ax_l.set_xlabel("SGD iterations from the checkpoint")
        ax_m.set_xlabel("SGD iterations from the checkpoint")
        ax_l.set_ylabel("loss (nats)")
        ax_m.set_ylabel(f"$\\lambda_{{max}}$ ({style.EIG_UNIT})")
        if diverged_any:
            handles.append(style.diverged_handle())
        ax_m.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    style.suptitle(fig, data, runs, opts, "Escape ablation: SGD with the $e_1$ component edited")
    return fig
