"""``nsgd``: Nudged-SGD against SGD — sharpness and validation accuracy over training.

Left: λ_max (spectrum rank 1) on a log scale; right: validation accuracy (%); both vs epoch. One
line per NSGD setting (γ, or K for a K-ablation), the mean over its seeds with a min–max band;
SGD baselines dashed, one per η. A seed that diverged is marked with a × and counted in the
legend ("1/2 diverged"); the mean is over the seeds still finite.

K-ablation: when the NSGD runs differ in K (or ``style.by == "k"``) the lines are per K,
coloured on the K palette; when both γ and K vary, each line names both.

Style options: ``by`` ("gamma" | "k", default: detect), ``width``, ``title``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..results import Data, Group, group_label, group_order, group_runs, label_keys, lambda_max_rows, last_finite
from . import style


def series(data: Data, runs: list[str], getter: Callable[[str], pd.Series]) -> pd.DataFrame:
    """Columns: epoch, mean, lo, hi (over runs; NaN-skipping), n (finite runs)."""
    cols = {r: getter(r) for r in runs}
    frame = pd.DataFrame({r: s for r, s in cols.items() if len(s)})
    if frame.empty:
        return pd.DataFrame(columns=["epoch", "mean", "lo", "hi", "n"])
    frame = frame.sort_index()
    return pd.DataFrame({"epoch": frame.index.to_numpy(float), "mean": frame.mean(axis=1).to_numpy(),
                         "lo": frame.min(axis=1).to_numpy(), "hi": frame.max(axis=1).to_numpy(),
                         "n": frame.notna().sum(axis=1).to_numpy()})


def _lambda_max(data: Data, run: str) -> pd.Series:
    sp = data.rows("spectrum", run)
    if len(sp) == 0:
        return pd.Series(dtype=float)
    d = lambda_max_rows(sp)
    return pd.Series(d["eigenvalue"].to_numpy(float), index=np.round(d["epoch"].to_numpy(float), 6))


def _val_acc(data: Data, run: str) -> pd.Series:
    met = data.rows("metrics", run)
    if len(met) == 0:
        return pd.Series(dtype=float)
    d = met[met["split"] == "valid"].drop_duplicates("step").sort_values("step")
    return pd.Series(100 * d["accuracy"].to_numpy(float), index=np.round(d["epoch"].to_numpy(float), 6))


def plot(data: Data, opts: dict[str, Any]) -> Figure:
    runs = [r for r in data.runs if r in set(data.runs_with("spectrum")) | set(data.runs_with("metrics"))]
    if not runs:
        return style.no_data("nsgd", "no spectrum or metrics rows")
    groups = group_runs(data, runs)
    order = sorted(groups, key=group_order)
    by = opts.get("by")
    keys = label_keys(groups, by)
    # One palette per swept quantity; when γ and K both vary, a qualitative colour per (γ, K).
    colour_key = {("k",): "k", ("gamma",): "gamma"}.get(tuple(keys), "run")

    def colour_value(g: Group) -> Any:
        return {"k": g[2], "gamma": g[1]}.get(colour_key, f"{g[1]}|{g[2]}")

    nsgd_pal = style.palette(colour_key, [colour_value(g) for g in order if g[0] == "nsgd"])
    sgd_pal = style.palette("lr", [g[1] for g in order if g[0] == "sgd"])
    sam_pal = style.palette("run", [f"sam|{g[1]}|{g[2]}" for g in order if g[0] == "sam"])

    fig = style.new_figure(float(opts.get("width", style.DOUBLE)), 2.7)
    ax_l, ax_v = fig.subplots(1, 2)
    handles = []
    any_div = False
    lam_values: list[float] = []
    for g in order:
        members = groups[g]
        c = (nsgd_pal[colour_value(g)] if g[0] == "nsgd" else sam_pal[f"sam|{g[1]}|{g[2]}"] if g[0] == "sam"
             else sgd_pal[g[1]])
        ls = "-" if g[0] == "nsgd" else "--"
        divs = {r: data.divergence(r) for r in members}
        n_div = sum(d is not None for d in divs.values())
        any_div |= n_div > 0
        notes = [f"{len(members)} seeds"] if len(members) > 1 else []
        if n_div:
            notes.append(f"{n_div} diverged" if len(members) > 1 else "diverged")
        label = group_label(g, keys) + (f" ({', '.join(notes)})" if notes else "")
        for ax, getter in ((ax_l, lambda r: _lambda_max(data, r)), (ax_v, lambda r: _val_acc(data, r))):
            s = series(data, members, getter)
            _draw(ax, s, c, ls)
            if ax is ax_l:
                lam_values.extend(s["mean"].dropna().tolist())
            for r, d in divs.items():
                if d is not None:
                    s = getter(r)
                    lf = last_finite(s.index.to_numpy(float), s.to_numpy(float), before=d[1])
                    style.mark_divergence(ax, d[1], lf[1] if lf else None, c)
        handles.append(style.style_handle(label, color=c, ls=ls))
    if any_div:
        handles.append(style.diverged_handle())
    for ax, what in ((ax_l, "spectrum"), (ax_v, "validation accuracy")):
        if not [ln for ln in ax.lines if len(ln.get_xdata())]:
            style.empty_panel(ax, f"no {what}")
    if lam_values and min(lam_values) > 0:
        ax_l.set_yscale("log")
        style.plain_log(ax_l)
    ax_l.set_xlabel("epoch")
    ax_v.set_xlabel("epoch")
    ax_l.set_ylabel(f"$\\lambda_{{max}}$ ({style.EIG_UNIT})")
    ax_v.set_ylabel("validation accuracy (%)")
    ax_v.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    what = "K-ablation" if keys == ["k"] else "Nudged-SGD vs SGD"
    style.suptitle(fig, data, runs, opts, f"{what}: sharpness and validation accuracy")
    return fig


def _draw(ax: Axes, s: pd.DataFrame, colour: Any, ls: str) -> None:
    if len(s) == 0:
        return
    x = s["epoch"].to_numpy(float)
    ax.plot(x, s["mean"].to_numpy(float), color=colour, ls=ls, lw=1.3)
    if (s["n"] > 1).any():
        ax.fill_between(x, s["lo"].to_numpy(float), s["hi"].to_numpy(float), color=colour, alpha=0.18, lw=0)
