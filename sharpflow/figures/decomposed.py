"""``decomposed``: what the SGD step does along single directions, over training.

For each multiplier a (columns; the step length η' = a·η), the upper panel shows the relative
change of the training loss (%) when only the step's component along e_i (i ≤ 4), along a random
direction, or the full step is taken, vs epoch: mean over the mini-batch gradients, band = ± one
standard error. The lower panel shows η'·λ_i/2: along a quadratic direction the projected step
raises the loss exactly when this exceeds 1 (red dotted line). One pair of rows per run.

Style options: ``multipliers`` (default [0.5, 1, 2]), ``directions`` (eigen directions, default
e1..e4), ``yscale`` of the loss-change panels ("linear" | "symlog", default "linear"; ``linthresh`` in %,
default 1),
``max_runs`` (default 2), ``width``, ``title``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from ..results import Data, last_finite, style_list, varying
from . import style


def summarise(dc: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard error of ``rel_change_pct`` per (run, step, epoch, line, multiplier).

    ``line`` is the direction name for eigen directions, "random" for all random directions
    together and "full" for the whole step.
    """
    line = np.where(dc["kind"] == "random", "random", np.where(dc["kind"] == "full", "full", dc["direction"]))
    g = dc.assign(line=line).groupby(["run", "step", "epoch", "line", "multiplier"], as_index=False)
    out = g.agg(mean=("rel_change_pct", "mean"), std=("rel_change_pct", "std"), n=("rel_change_pct", "count"),
                elh=("eta_lambda_half", "mean"))
    out["sem"] = out["std"] / np.sqrt(out["n"].where(out["n"] > 0))
    return out


def plot(data: Data, opts: dict[str, Any]) -> Figure:
    dc = data.table("decomposed")
    runs = data.runs_with("decomposed")[: int(opts.get("max_runs", 2))]
    if not runs:
        return style.no_data("decomposed", "no decomposed-step rows")
    s = summarise(dc[dc["run"].isin(runs)])
    present = np.unique(s["multiplier"].to_numpy(float))
    wanted = [float(a) for a in style_list(opts, "multipliers", [0.5, 1.0, 2.0])]
    mults = [float(present[np.isclose(present, a)][0]) for a in wanted if np.isclose(present, a).any()]
    mults = mults or [float(a) for a in present[:3]]
    eig = [d for d in style_list(opts, "directions", ["e1", "e2", "e3", "e4"]) if d in set(s["line"])]
    lines = [*eig, *[x for x in ("random", "full") if x in set(s["line"])]]
    keys = varying(data, runs)

    fig = style.new_figure(float(opts.get("width", style.DOUBLE)), 3.3 * len(runs) + 0.3)
    subfigs = np.atleast_1d(fig.subfigures(len(runs), 1))
    any_div = False
    for sub, run in zip(subfigs, runs, strict=True):
        _run_block(sub, data, run, s[s["run"] == run], mults, eig, lines, opts,
                   label=style.run_label(data.meta.get(run, {}), keys, run))
        any_div |= data.divergence(run) is not None
    # One legend for all runs, below the panels, so every run's panels get the same width.
    handles = [style.style_handle(_pretty(n), color=_colour(n, eig), ls=_DASHES.get(n, "-"), marker="o", ms=2)
               for n in lines]
    handles.append(style.style_handle("η'λ/2 = 1 (above: the step raises the loss)", ls=":", color="tab:red"))
    if any_div:
        handles.append(style.diverged_handle())
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4))
    style.suptitle(fig, data, runs, opts, "The SGD step projected on single directions")
    return fig


_DASHES = {"random": "-.", "full": "--"}


def _colour(name: str, eig: list[str]) -> Any:
    if name in eig:
        return style.rank_colours(len(eig), "plasma")[eig.index(name)]
    return {"random": "0.55", "full": "k"}.get(name, "0.3")


def _run_block(sub: Any, data: Data, run: str, d_run: pd.DataFrame, mults: list[float], eig: list[str],
               lines: list[str], opts: dict[str, Any], label: str) -> None:
    """Two rows (loss change; η'λ_i/2) × one column per multiplier, for one run."""
    div = data.divergence(run)
    axes = sub.subplots(2, len(mults), squeeze=False, sharex=True, gridspec_kw={"height_ratios": [1.5, 1.0]})
    sub.suptitle(label + (f" — diverged at epoch {div[1]:g}" if div else ""), x=0.01, ha="left", fontsize=8,
                 fontweight="bold")
    yscale = str(opts.get("yscale", "linear"))
    for j, a in enumerate(mults):
        ax, ax_l = axes[0, j], axes[1, j]
        d_a = d_run[np.isclose(d_run["multiplier"], a)]
        finite = False
        for name in lines:
            d = d_a[d_a["line"] == name].sort_values("step")
            if len(d) == 0:
                continue
            x, m, e = (d[c].to_numpy(float) for c in ("epoch", "mean", "sem"))
            finite |= bool(np.isfinite(m).any())
            c = _colour(name, eig)
            ax.plot(x, m, color=c, ls=_DASHES.get(name, "-"), lw=1.1, marker="o", ms=1.8, label=_pretty(name))
            ax.fill_between(x, m - np.nan_to_num(e), m + np.nan_to_num(e), color=c, alpha=0.18, lw=0)
            if name in eig:
                ax_l.plot(x, d["elh"].to_numpy(float), color=c, lw=1.1, marker="o", ms=1.8)
            if div is not None and name == lines[0]:
                lf = last_finite(x, m, before=div[1])
                style.mark_divergence(ax, div[1], lf[1] if lf else None, c)
        if not finite:
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center", color="0.4",
                    transform=ax.transAxes)
        ax.axhline(0.0, color="0.5", lw=0.6)
        if yscale == "symlog":
            ax.set_yscale("symlog", linthresh=float(opts.get("linthresh", 1.0)), linscale=0.8)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        else:
            ax.set_yscale(yscale)
        ax.set_title(f"a = {a:g}  (η' = {a:g}·η)", loc="left")
        ax_l.axhline(1.0, color="tab:red", ls=":", lw=1.0)
        ax_l.set_xlabel("epoch")
    axes[0, 0].set_ylabel("loss change (%)")
    axes[1, 0].set_ylabel("η'λ$_i$/2")


def _pretty(name: str) -> str:
    if name.startswith("e") and name[1:].isdigit():
        return f"along $e_{{{name[1:]}}}$"
    return {"random": "random direction", "full": "full step"}.get(name, name)
