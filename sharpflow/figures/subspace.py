"""``subspace``: the tiny subspace (Gur-Ari, Roberts & Dyer 2018).

Left: the share ‖P_k g‖²/‖g‖² of the full gradient in the top-k Hessian eigenspace against k, at a
few checkpoints of the first run (coloured by epoch), with the number of classes marked (style
``classes``, default 10). Middle: that share at k = classes (k = the largest computed if fewer)
against epoch, one colour per run. Right: the overlap ‖V_tᵀ V_{t'}‖_F²/k of the top-k eigenspaces of
consecutive checkpoints at the same k against epoch (1: the subspace did not move).

Style options: ``classes`` (default 10), ``checkpoints`` (how many on the left, default 6),
``max_runs`` (default 6), ``width``, ``title``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..results import Data, varying
from . import style


def plot(data: Data, opts: dict[str, Any]) -> Figure:
    sub = data.table("subspace")
    runs = data.runs_with("subspace")[: int(opts.get("max_runs", 6))]
    if not runs:
        return style.no_data("subspace", "no subspace rows")
    classes = int(opts.get("classes", 10))
    _, colours = style.run_colours(data, runs)
    keys = varying(data, runs)
    fig = style.new_figure(float(opts.get("width", style.DOUBLE * 1.2)), 2.9)
    ax_k, ax_f, ax_o = fig.subplots(1, 3)
    first = sub[sub["run"] == runs[0]]
    steps = sorted(first["step"].unique())
    n_show = int(opts.get("checkpoints", 6))
    shown = [steps[int(i)] for i in np.unique(np.linspace(0, len(steps) - 1, min(n_show, len(steps))).round())]
    cols = style.rank_colours(len(shown))
    for c, step in zip(cols, shown, strict=True):
        d = first[first["step"] == step].sort_values("k")
        ax_k.plot(d["k"], d["fraction"], color=c, marker="o", ms=2.5, lw=1.0, label=f"epoch {d['epoch'].iloc[0]:.3g}")
    ax_k.axvline(classes, ls=":", lw=1.0, color="k")
    ax_k.set_xlabel("k")
    ax_k.set_ylabel("$\\|P_k g\\|^2/\\|g\\|^2$")
    ax_k.set_ylim(0, 1.02)
    ax_k.legend(fontsize="xx-small", loc="lower right", ncol=2, title=style.run_label(data.meta.get(runs[0], {}),
                                                                                        keys, runs[0]),
                title_fontsize="xx-small")
    handles = []
    for run in runs:
        d = sub[sub["run"] == run]
        kk = min(classes, int(d["k"].max()))
        d = d[d["k"] == kk].sort_values("step")
        (h,) = ax_f.plot(d["epoch"], d["fraction"], color=colours[run], lw=1.2,
                         label=style.run_label(data.meta.get(run, {}), keys, run))
        handles.append(h)
        ax_o.plot(d["epoch"], d["overlap"], color=colours[run], lw=1.2)
    kk = min(classes, int(sub["k"].max()))
    ax_f.set_ylim(0, 1.02)
    ax_o.set_ylim(0, 1.02)
    ax_f.set_xlabel("epoch")
    ax_o.set_xlabel("epoch")
    ax_f.set_ylabel(f"gradient share in top-{kk}")
    ax_o.set_ylabel(f"top-{kk} overlap with the checkpoint before")
    ax_o.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="x-small")
    style.suptitle(fig, data, runs, opts, "The tiny subspace")
    return fig
