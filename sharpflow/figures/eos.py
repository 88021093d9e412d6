"""``eos``: the edge of stability of full-batch gradient descent (Cohen et al. 2021).

Left: η·λ_1/2 against step, one colour per run (by η when η varies), with the stability line
η·λ_1/2 = 1 (λ_1 = 2/η) dotted; a tick on the right edge marks each run's median over the second
half of training (the ``eta_lambda`` column of the ``edge`` table). Right: the training loss at
every step (a full-batch run's per-step rows) on a log scale — at the edge it keeps falling over
long spans while rising over short ones. Where runs have the ``selfstab`` table (Damian et al. 2023), a
third panel: α = −∇L·∇S (progressive sharpening: S = λ1 grows along −∇L where α > 0; solid) and
β = ‖∇S‖² (the strength of self-stabilization; dashed) against step, on a symmetric log scale, and in
the left panel η·ΔθᵀHΔθ/(2‖Δθ‖²), the curvature along each checkpoint's last update (the table's
``update_curvature``, where the checkpoints stored their last update), as a thin dotted line of the
run's colour.
Full-batch runs are drawn (``batch_size == "full"``); if the spec has none, all runs are. An
unconverged pair is ringed; a diverged run ends with a ×.

Style options: ``max_runs`` (default 8), ``width``, ``title``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..results import Data, lambda_max_rows, last_finite, second_half_median, varying
from . import style


def plot(data: Data, opts: dict[str, Any]) -> Figure:
    runs, full = style.full_batch_first(data, data.runs_with("spectrum"), int(opts.get("max_runs", 8)))
    if not runs:
        return style.no_data("eos", "no spectrum rows")
    _, colours = style.run_colours(data, runs)
    keys = varying(data, runs)
    stab = [r for r in runs if len(data.rows("selfstab", r))]
    fig = style.new_figure(float(opts.get("width", style.DOUBLE)) * (1.4 if stab else 1.0), 2.6)
    if stab:
        ax_s, ax_l, ax_a = fig.subplots(1, 3)
        _self_stabilization(ax_a, data, stab, colours)
    else:
        ax_s, ax_l = fig.subplots(1, 2)
    handles = []
    any_div = any_unconverged = any_update = False
    for run in runs:
        c = colours[run]
        eta = data.value(run, "lr")
        label, div = style.run_entry(data, run, keys)
        any_div |= div is not None
        handles.append(style.style_handle(label, color=c, ls="-"))
        d = lambda_max_rows(data.rows("spectrum", run)).sort_values("step")
        if eta and len(d):
            x, y = d["step"].to_numpy(float), float(eta) * d["eigenvalue"].to_numpy(float) / 2
            ax_s.plot(x, y, color=c, lw=1.2, marker="o", ms=2)
            any_unconverged |= style.mark_unconverged(ax_s, d, x, y, c)
            med = second_half_median(x, y)
            if np.isfinite(med):
                ax_s.plot([1.0], [med], marker="<", ms=6, color=c, transform=ax_s.get_yaxis_transform(),
                          clip_on=False)
            if div is not None:
                lf = last_finite(x, y, before=div[0])
                style.mark_divergence(ax_s, div[0], lf[1] if lf else None, c)
        if eta and run in stab:
            any_update |= _update_curvature(ax_s, data, run, float(eta), c)
        met = data.rows("metrics", run)
        # every step's loss: a full-batch run's "batch" rows are its whole training loss before each step
        split = "batch" if full and len(met) and (met["split"] == "batch").any() else "train"
        tr = met[met["split"] == split].sort_values("step") if len(met) else met
        if len(tr):
            x, y = tr["step"].to_numpy(float), tr["loss"].to_numpy(float)
            ok = np.isfinite(y) & (y > 0)
            ax_l.plot(x[ok], y[ok], color=c, lw=1.0)
    ax_s.axhline(1.0, ls=":", lw=1.0, color="k")
    if not ax_s.lines:
        style.empty_panel(ax_s, "no spectrum")
    if not ax_l.lines:
        style.empty_panel(ax_l, "no training loss")
    else:
        ax_l.set_yscale("log")
        style.plain_log(ax_l)
    note = " (= epoch, full batch)" if full else ""
    ax_s.set_xlabel(f"step{note}")
    ax_s.set_ylabel("$\\eta\\lambda_1/2$")
    ax_l.set_xlabel(f"step{note}")
    ax_l.set_ylabel("training loss")
    extra = [style.style_handle("$\\lambda_1 = 2/\\eta$", ls=":", color="k"),
             style.style_handle("median, 2nd half", marker="<", ls="none")]
    if any_update:
        # the curvature along the last update, in the units of the left panel
        extra.append(style.style_handle("$\\eta\\,\\Delta\\theta^\\top H\\Delta\\theta/(2\\|\\Delta\\theta\\|^2)$",
                                        ls=":", lw=0.8))
    if any_unconverged:
        extra.append(style.unconverged_handle())
    if any_div:
        extra.append(style.diverged_handle())
    ax_l.legend(handles=handles + extra, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    style.suptitle(fig, data, runs, opts, "Edge of stability")
    return fig


def _update_curvature(ax: Any, data: Data, run: str, eta: float, colour: Any) -> bool:
    """η·update_curvature/2 of the run's selfstab rows (those with a last update), thin and dotted;
    True if drawn."""
    d = data.rows("selfstab", run)
    if "update_curvature" not in d:
        return False  # a table of format 1, before the column existed
    d = d[(d["status"] != "diverged") & np.isfinite(d["update_curvature"].to_numpy(float))].sort_values("step")
    if not len(d):
        return False
    ax.plot(d["step"].to_numpy(float), eta * d["update_curvature"].to_numpy(float) / 2, color=colour, lw=0.8,
            ls=":", gid="update_curvature")
    return True


def _self_stabilization(ax: Any, data: Data, runs: list[str], colours: dict[str, Any]) -> None:
    """α (solid) and β (dashed) of each run's selfstab rows against step, symmetric log scale."""
    for run in runs:
        d = data.rows("selfstab", run).sort_values("step")
        d = d[d["status"] != "diverged"]
        x = d["step"].to_numpy(float)
        ax.plot(x, d["alpha"].to_numpy(float), color=colours[run], lw=1.2, marker="o", ms=2, gid="alpha")
        ax.plot(x, d["beta"].to_numpy(float), color=colours[run], lw=1.0, ls="--", gid="beta")
    ax.axhline(0.0, lw=0.6, color="0.5")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("$\\alpha$ (solid), $\\beta$ (dashed)")
    ax.set_title("self-stabilization", loc="left", fontsize="small")
