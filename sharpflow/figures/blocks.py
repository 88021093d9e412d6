"""``blocks``: per-block spectra over training (Zhang et al. 2024), a heatmap of parameter block ×
checkpoint.

One panel per run (at most ``max_runs``, default 4): the colour is log10 of the top eigenvalue of
each block's diagonal Hessian block (the ``blocks`` table; blocks in the model's order, top to
bottom), checkpoints left to right by step; a block whose value is not positive or finite is blank.
Style options: ``max_runs``, ``width``, ``title``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..results import Data, varying
from . import style


def plot(data: Data, opts: dict[str, Any]) -> Figure:
    runs = data.runs_with("blocks")[: int(opts.get("max_runs", 4))]
    if not runs:
        return style.no_data("blocks", "no per-block rows")
    keys = varying(data, runs)
    fig = style.new_figure(float(opts.get("width", style.DOUBLE)), style.ROW_HEIGHT * 1.3 * len(runs) + 0.4)
    axes = fig.subplots(len(runs), 1, squeeze=False).ravel()
    image = None
    for ax, run in zip(axes, runs, strict=True):
        d = data.rows("blocks", run)
        blocks = list(dict.fromkeys(d["block"]))
        steps = sorted(d["step"].unique())
        grid = np.full((len(blocks), len(steps)), np.nan)
        col = {s: j for j, s in enumerate(steps)}
        row = {b: i for i, b in enumerate(blocks)}
        for r in d.itertuples():
            if np.isfinite(r.eigenvalue) and r.eigenvalue > 0:
                grid[row[r.block], col[r.step]] = np.log10(r.eigenvalue)
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_yticks(range(len(blocks)), blocks, fontsize=6)
        ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 6)).round().astype(int))
        ax.set_xticks(ticks, [f"{steps[t]:g}" for t in ticks])
        ax.set_title(style.run_label(data.meta.get(run, {}), keys, run), loc="left")
        ax.set_xlabel("step")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label=f"log10 λ_max of the block ({style.EIG_UNIT})")
    style.suptitle(fig, data, runs, opts, "Per-block spectra")
    return fig
