"""``density``: the Hessian's spectral density over training (stochastic Lanczos quadrature).

One panel per selected checkpoint (``style.panels`` evenly spaced steps among those with a density,
default 4, always the first and last); in each, the Gaussian-smoothed density of every run (one
colour per run) on a log scale, with the run's top-k eigenvalues from the spectrum table at that
step as ticks along the top. The bulk near zero and the outliers leaving it show the separation
the SLQ papers describe. Kernel width: ``style.sigma`` (eigenvalue units) or, by default,
``style.sigma_rel`` (0.01) × the widest node range of the figure.

Style options: ``panels``, ``sigma``, ``sigma_rel``, ``floor`` (the smallest density drawn, 1e-5),
``max_runs`` (default 4), ``width``, ``title``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..results import Data, varying
from . import style


def smoothed(nodes: np.ndarray, weights: np.ndarray, probes: int, grid: np.ndarray, sigma: float) -> np.ndarray:
    """Σ weight·N(grid; node, σ) / probes: the density the quadrature estimates."""
    z = (grid[:, None] - nodes[None, :]) / sigma
    return (np.exp(-0.5 * z * z) * weights[None, :]).sum(axis=1) / (probes * sigma * math.sqrt(2 * math.pi))


def plot(data: Data, opts: dict[str, Any]) -> Figure:
    de = data.table("density")
    if len(de):
        de = de[np.isfinite(de["node"].to_numpy(float)) & (de["status"] != "diverged")]
    runs = [r for r in data.runs if len(de) and r in set(de["run"])][: int(opts.get("max_runs", 4))]
    if not runs:
        return style.no_data("density", "no spectral-density rows")
    de = de[de["run"].isin(runs)]
    steps = sorted(set(de["step"]))
    n_panels = max(1, min(int(opts.get("panels", 4)), len(steps)))
    picked = [steps[round(i * (len(steps) - 1) / max(1, n_panels - 1))] for i in range(n_panels)]
    picked = sorted(set(picked))
    lo, hi = float(de["node"].min()), float(de["node"].max())
    sigma = float(opts.get("sigma", float(opts.get("sigma_rel", 0.01)) * max(hi - lo, 1e-12)))
    grid = np.linspace(lo - 4 * sigma, hi + 4 * sigma, 1200)
    floor = float(opts.get("floor", 1e-5))
    _, colours = style.run_colours(data, runs)
    keys = varying(data, runs)
    fig = style.new_figure(float(opts.get("width", style.DOUBLE)), 2.5)
    axes = fig.subplots(1, len(picked), sharey=True, squeeze=False)[0]
    handles = [style.style_handle(style.run_label(data.meta.get(r, {}), keys, r), color=colours[r], ls="-")
               for r in runs]
    sp = data.table("spectrum")
    for ax, step in zip(axes, picked, strict=True):
        for run in runs:
            d = de[(de["run"] == run) & (de["step"] == step)]
            if len(d) == 0:
                continue
            dens = smoothed(d["node"].to_numpy(float), d["weight"].to_numpy(float), int(d["probe"].nunique()),
                            grid, sigma)
            ax.plot(grid, np.maximum(dens, floor), color=colours[run], lw=1.1)
            _eigen_ticks(ax, sp, run, step, colours[run])
        epoch = float(de.loc[de["step"] == step, "epoch"].iloc[0])
        ax.set_title(f"epoch {epoch:.3g}", loc="left")
        ax.set_yscale("log")
    fig.supxlabel(f"eigenvalue ({style.EIG_UNIT})", fontsize="medium")
    axes[0].set_ylabel("spectral density")
    extra = [style.style_handle("top-k eigenvalues (spectrum)", ls="", marker="|", ms=8)]
    axes[-1].legend(handles=handles + extra, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    style.suptitle(fig, data, runs, opts, f"Hessian spectral density (SLQ, σ = {sigma:.2g})")
    return fig


def _eigen_ticks(ax: Any, sp: pd.DataFrame, run: str, step: int, colour: Any) -> None:
    """The run's computed eigenvalues at ``step`` as ticks along the top of the panel."""
    if len(sp) == 0:
        return
    d = sp[(sp["run"] == run) & (sp["step"] == step)]
    lam = d["eigenvalue"].to_numpy(float) if len(d) else np.array([])
    lam = lam[np.isfinite(lam)]
    if len(lam) == 0:
        return
    ax.plot(lam, np.full(len(lam), 0.97), ls="", marker="|", ms=8, color=colour,
            transform=ax.get_xaxis_transform(), clip_on=False)


__all__ = ["plot", "smoothed"]
