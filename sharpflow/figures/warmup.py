"""``warmup``: sharpness under learning-rate warmup (Kalra & Barkeshli 2024; Cohen et al. 2022).

One colour per run (by warmup length W when it varies), three panels against step:

- η(t)·λ_1/2 of the Hessian (the ``spectrum`` table, η in force at each checkpoint from the
  metrics), with the line at 1 (λ_1 = 2/η, gradient descent's threshold);
- η(t)·λ_1(P^{-1}H) of an Adam(W) run's preconditioned Hessian (the ``precond`` table, where a run
  has it) with its threshold (2 + 2β₁)/(1 − β₁) (38 at β₁ = 0.9) dotted;
- the training loss at the checkpoints (log scale) and η(t)/η dashed on a right-hand axis, so the
  end of each warmup shows.

An unconverged pair is ringed; a diverged run ends with a ×. Style options: ``max_runs``
(default 8), ``width``, ``title``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..results import Data, lambda_max_rows, last_finite, varying
from . import style

PREFER = ("warmup_steps", "lr", "batch_size", "seed")


def _lr_by_step(met: pd.DataFrame) -> pd.Series:
    """η in force at each step: the per-step rows of the metrics, and the evaluation rows (at the
    checkpoints, the last one included), each recording the rate of the update that follows."""
    if not len(met):
        return pd.Series(dtype=float)
    rows = met[np.isfinite(met["lr"].to_numpy(float))].drop_duplicates("step").sort_values("step")
    return rows.set_index("step")["lr"].astype(float)


def _plain_sharpness(ax: Axes, data: Data, run: str, colour: Any) -> bool:
    """η(t)·λ_1/2 against step; returns whether a pair was unconverged."""
    d = lambda_max_rows(data.rows("spectrum", run)).sort_values("step")
    lr = _lr_by_step(data.rows("metrics", run))
    if not len(d) or not len(lr):
        return False
    x = d["step"].to_numpy(float)
    y = lr.reindex(d["step"]).to_numpy(float) * d["eigenvalue"].to_numpy(float) / 2
    ax.plot(x, y, color=colour, lw=1.2, marker="o", ms=2)
    div = data.divergence(run)
    if div is not None:
        lf = last_finite(x, y, before=div[0])
        style.mark_divergence(ax, div[0], lf[1] if lf else None, colour)
    return style.mark_unconverged(ax, d, x, y, colour)


def _preconditioned(ax: Axes, data: Data, run: str, colour: Any) -> bool:
    """η(t)·λ_1(P^{-1}H) and its threshold η·(2+2β₁)/(η(1−β₁)); returns whether a pair was unconverged."""
    d = data.rows("precond", run)
    if not len(d):
        return False
    d = d[d["rank"] == 1].sort_values("step")
    x, lr = d["step"].to_numpy(float), d["lr"].to_numpy(float)
    y = lr * d["eigenvalue"].to_numpy(float)
    ok = np.isfinite(y) & (y > 0)
    ax.plot(x[ok], y[ok], color=colour, lw=1.2, marker="o", ms=2)
    thr = lr * d["threshold"].to_numpy(float)
    if np.isfinite(thr).any():
        ax.plot(x, thr, ls=":", lw=1.0, color=colour)
    return style.mark_unconverged(ax, d[ok], x[ok], y[ok], colour)


def _loss_and_rate(ax: Axes, ax_lr: Axes, data: Data, run: str, colour: Any) -> None:
    met = data.rows("metrics", run)
    if not len(met):
        return
    tr = met[met["split"] == "train"].sort_values("step")
    x, y = tr["step"].to_numpy(float), tr["loss"].to_numpy(float)
    ok = np.isfinite(y) & (y > 0)
    ax.plot(x[ok], y[ok], color=colour, lw=1.2)
    lr = _lr_by_step(met)
    eta = data.value(run, "lr")
    if len(lr) and eta:
        ax_lr.plot(lr.index.to_numpy(float), lr.to_numpy(float) / float(eta), color=colour, lw=0.8, ls="--")


def plot(data: Data, opts: dict[str, Any]) -> Figure:
    runs = data.runs_with("spectrum")[: int(opts.get("max_runs", 8))]
    if not runs:
        return style.no_data("warmup", "no spectrum rows")
    _, colours = style.run_colours(data, runs, prefer=PREFER)
    keys = varying(data, runs, PREFER)
    fig = style.new_figure(float(opts.get("width", style.DOUBLE)), 2.6)
    ax_h, ax_p, ax_l = fig.subplots(1, 3)
    ax_lr = ax_l.twinx()
    handles, unconverged = [], False
    for run in runs:
        c = colours[run]
        label, _ = style.run_entry(data, run, keys)
        handles.append(style.style_handle(label, color=c, ls="-"))
        unconverged |= _plain_sharpness(ax_h, data, run, c)
        unconverged |= _preconditioned(ax_p, data, run, c)
        _loss_and_rate(ax_l, ax_lr, data, run, c)
    ax_h.axhline(1.0, ls=":", lw=1.0, color="k")
    ax_h.set_ylabel("$\\eta(t)\\,\\lambda_1/2$")
    ax_p.set_ylabel("$\\eta(t)\\,\\lambda_1(P^{-1}H)$")
    ax_l.set_ylabel("training loss")
    ax_lr.set_ylabel("$\\eta(t)/\\eta$ (dashed)")
    ax_lr.set_ylim(0, 1.05)
    for ax, empty in ((ax_h, "no spectrum"), (ax_p, "no preconditioned sharpness"), (ax_l, "no training loss")):
        ax.set_xlabel("step")
        if not ax.lines:
            style.empty_panel(ax, empty)
        elif ax is not ax_h:
            ax.set_yscale("log")
            style.plain_log(ax)
    extra = [style.style_handle("$\\lambda_1 = 2/\\eta$; $(2+2\\beta_1)/(1-\\beta_1)$", ls=":", color="k")]
    if unconverged:
        extra.append(style.unconverged_handle())
    if any(data.divergence(r) is not None for r in runs):
        extra.append(style.diverged_handle())
    ax_lr.legend(handles=handles + extra, loc="upper left", bbox_to_anchor=(1.25, 1.0))
    style.suptitle(fig, data, runs, opts, "Sharpness under warmup")
    return fig
