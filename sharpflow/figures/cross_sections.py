"""``cross_sections``: the loss along single sharp directions, in units of the SGD step.

One panel per direction (e1, e3, e5, … then random ones), one row per run. The x axis is k: the
point θ + k·s·d with s = η·mean|gᵀd| the typical SGD step projected on d, so k = 1 (dotted line)
is one SGD step along d. Curves are coloured by the checkpoint's epoch (colour bar). A curve
that rises steeply before k = 1 means the SGD step crosses the valley floor along that direction.

Style options: ``directions`` (list of names, default all present), ``y`` ("loss" | "rel_loss",
default "loss"), ``max_curves`` (checkpoints per panel, evenly spread, default 10), ``max_runs``
(default 3), ``yscale`` (default "log"), ``width``, ``title``.
"""

from __future__ import annotations

import re
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter

from ..results import Data, style_list, varying
from . import style


def direction_order(names: list[str]) -> list[str]:
    """e1, e2, …, then the other directions (random ones) in name order."""
    def key(n: str) -> tuple[int, int, str]:
        m = re.fullmatch(r"e(\d+)", n)
        return (0, int(m.group(1)), n) if m else (1, 0, n)

    return sorted(set(names), key=key)


def pick_steps(steps: np.ndarray, n: int) -> np.ndarray:
    """At most n of the sorted distinct steps, evenly spread, always with the first and last."""
    steps = np.unique(steps)
    if len(steps) <= n:
        return steps
    return steps[np.unique(np.round(np.linspace(0, len(steps) - 1, n)).astype(int))]


def plot(data: Data, opts: dict[str, Any]) -> Figure:
    cs = data.table("cross_sections")
    runs = data.runs_with("cross_sections")[: int(opts.get("max_runs", 3))]
    if not runs:
        return style.no_data("cross_sections", "no cross-section rows")
    ycol = str(opts.get("y", "loss"))
    present = set(cs["direction"])
    dirs = [d for d in style_list(opts, "directions", direction_order(list(present))) if d in present]
    dirs = dirs or direction_order(list(present))
    keys = varying(data, runs)
    cs = cs[cs["run"].isin(runs)]
    finite = cs[np.isfinite(cs[ycol])]
    epochs = (finite if len(finite) else cs)["epoch"]
    # One colour scale for all runs, so a colour means the same epoch in every row.
    norm = Normalize(float(epochs.min()), float(max(epochs.max(), epochs.min() + 1e-9)))
    cmap = matplotlib.colormaps["viridis"]
    yscale = str(opts.get("yscale", "log"))
    fig = style.new_figure(float(opts.get("width", style.DOUBLE)), 2.0 * len(runs) + 0.6)
    axes = fig.subplots(len(runs), len(dirs), squeeze=False, sharey="row")
    for row, run in zip(axes, runs, strict=True):
        d_run = cs[cs["run"] == run]
        steps = d_run.loc[np.isfinite(d_run[ycol]), "step"].to_numpy()
        chosen = pick_steps(steps, int(opts.get("max_curves", 10)))
        div = data.divergence(run)
        label = style.run_label(data.meta.get(run, {}), keys, run)
        if div is not None:
            label += f" (diverged at epoch {div[1]:g})"
        for ax, name in zip(row, dirs, strict=True):
            _panel(ax, d_run[d_run["direction"] == name], chosen, cmap, norm, ycol, yscale)
            ax.set_title(pretty_direction(name), loc="left")
        what = "loss (nats)" if ycol == "loss" else "loss / loss at k=0"
        # The run names the row (above the y label): titles stay short enough for narrow panels.
        row[0].set_ylabel(f"{label}\n{what}" if len(runs) > 1 else what)
    fig.supxlabel("k (multiples of the SGD step projected on the direction)", fontsize=8)
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes.ravel().tolist(), pad=0.01, aspect=30)
    cb.set_label("epoch")
    style.suptitle(fig, data, runs, opts, "Loss cross-sections along sharp directions")
    return fig


def pretty_direction(name: str) -> str:
    m = re.fullmatch(r"e(\d+)", name)
    if m:
        return f"along $e_{{{m.group(1)}}}$"
    m = re.fullmatch(r"rand(?:om)?(\d*)", name)
    if m:
        return f"random direction {m.group(1)}".rstrip()
    return f"along {name}"


def _panel(ax: Any, d: pd.DataFrame, chosen: np.ndarray, cmap: Any, norm: Normalize, ycol: str,
           yscale: str) -> None:
    drew = False
    for step in chosen:
        line = d[d["step"] == step].sort_values("k")
        x, y = line["k"].to_numpy(float), line[ycol].to_numpy(float)
        ok = np.isfinite(y) & (y > 0)
        if ok.sum() == 0:
            continue
        ax.plot(x[ok], y[ok], color=cmap(norm(float(line["epoch"].iloc[0]))), lw=1.0, marker="o", ms=1.8)
        drew = True
    if not drew:
        style.empty_panel(ax, "no finite losses")
        return
    ax.axvline(1.0, color="0.4", ls=":", lw=0.9)
    ax.axvline(0.0, color="0.7", ls="-", lw=0.6)
    ax.set_xscale("symlog", linthresh=1.0, linscale=0.6)
    kmax = float(np.nanmax(np.abs(d["k"].to_numpy(float)))) if len(d) else 1.0
    ticks = [t for t in (-16, -4, -1, 0, 1, 4, 16) if abs(t) <= kmax * 1.001]
    ticks = [t for t in ticks if abs(t) != 4] if len(ticks) > 5 else ticks  # 7 labels crowd a narrow panel
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(FixedLocator([]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_yscale(yscale)
    if yscale == "log":
        style.plain_log(ax)
