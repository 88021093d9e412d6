"""``fullbatch``: curvature and accuracy of full-batch gradient descent (paper Fig. 3).

Left: λ1 (solid) and λ2 (dashed) vs step on a log scale with the 2/η stability line (dotted);
right: training (solid) and test (dashed) accuracy vs step. One colour per run (by η when η
varies). Runs with ``batch_size == "full"`` are drawn; if the spec has none, all runs are. A run
that diverged ends with a × and says "(diverged)" in the legend.
An eigenvalue whose pair missed the solver's tolerance is ringed (o).

Style options: ``max_runs`` (default 6), ``width``, ``title``.
"""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from ..results import Data, adaptive, last_finite, varying
from . import style


def plot(data: Data, opts: dict[str, Any]) -> Figure:
    runs = [r for r in data.runs if r in set(data.runs_with("spectrum")) | set(data.runs_with("metrics"))]
    runs, full = style.full_batch_first(data, runs, int(opts.get("max_runs", 6)))
    if not runs:
        return style.no_data("fullbatch", "no spectrum or metrics rows")
    _, colours = style.run_colours(data, runs)
    keys = varying(data, runs)
    fig = style.new_figure(float(opts.get("width", style.DOUBLE)), 2.6)
    ax_s, ax_a = fig.subplots(1, 2)
    handles = []
    any_div = False
    any_unconverged = False
    for run in runs:
        c = colours[run]
        label, div = style.run_entry(data, run, keys)
        any_div |= div is not None
        handles.append(style.style_handle(label, color=c, ls="-"))
        _, _, unconverged = style.eigenvalue_curves(ax_s, data.rows("spectrum", run), c, x="step", div=div, lw2=0.9)
        any_unconverged |= unconverged
        eta = data.value(run, "lr")
        if eta and not adaptive(data, run):  # Adam's threshold is on P^{-1}H: figure kind precond
            ax_s.axhline(2.0 / float(eta), ls=":", lw=1.0, color=c)
        met = data.rows("metrics", run)
        for split, ls in (("train", "-"), ("test", "--")):
            d = met[met["split"] == split].sort_values("step") if len(met) else met
            if len(d) == 0:
                continue
            x, y = d["step"].to_numpy(float), 100 * d["accuracy"].to_numpy(float)
            ax_a.plot(x, y, ls=ls, color=c)
            if div is not None:
                lf = last_finite(x, y, before=div[0])
                style.mark_divergence(ax_a, div[0], lf[1] if lf else None, c)
    if not ax_s.lines:
        style.empty_panel(ax_s, "no spectrum")
    else:
        ax_s.set_yscale("log")
        style.plain_log(ax_s)
    if not ax_a.lines:
        style.empty_panel(ax_a, "no metrics")
    full_note = " (= epoch, full batch)" if full else ""
    ax_s.set_xlabel(f"step{full_note}")
    ax_s.set_ylabel(f"$\\lambda_1$, $\\lambda_2$ ({style.EIG_UNIT})")
    ax_a.set_xlabel(f"step{full_note}")
    ax_a.set_ylabel("accuracy (%)")
    # One legend, outside on the right: the runs, then what the line styles and marks mean.
    extra = [style.style_handle("$\\lambda_1$; train", ls="-"), style.style_handle("$\\lambda_2$; test", ls="--"),
             style.style_handle("2/η", ls=":")]
    if any_unconverged:
        extra.append(style.unconverged_handle())
    if any_div:
        extra.append(style.diverged_handle())
    ax_a.legend(handles=handles + extra, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    style.suptitle(fig, data, runs, opts, "Full-batch training")
    return fig
