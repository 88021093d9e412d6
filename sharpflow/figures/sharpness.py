"""``sharpness``: the generalisation literature's sharpness beside the Hessian's λ1, over training.

Left: worst-case sharpness max_{‖δ‖≤ρ} L_B(w + δ) − L_B(w) (the ``sharpness`` table's
``worst_case``, ± its standard error over batches; solid, markers) and the quadratic model's value
ρ²λ1/2 from the spectrum (dotted), one colour per run, against epoch on a log scale: where the two
agree the loss is quadratic at radius ρ along the top direction. Middle: average-case sharpness
E_δ L(w + δ) − L(w) (± its Monte-Carlo standard error). Right, where the analysis ran with
``pac_bayes``: the PAC-Bayes flatness σ′ (larger is flatter; the bar is the bisection's bracket; σ′
at the search's upper end, 1, means no such accuracy drop was reached, as at a chance-level
initialisation). A panel without rows says so.

Style options: ``max_runs`` (default 8), ``width``, ``title``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..results import Data, lambda_max_rows, varying
from . import style

PANELS = (("worst_case", "worst-case sharpness"), ("average_case", "average-case sharpness"),
          ("pac_bayes_sigma", "PAC-Bayes $\\sigma'$"))


def plot(data: Data, opts: dict[str, Any]) -> Figure:
    runs = data.runs_with("sharpness")[: int(opts.get("max_runs", 8))]
    if not runs:
        return style.no_data("sharpness", "no sharpness rows")
    _, colours = style.run_colours(data, runs)
    keys = varying(data, runs)
    have = [(m, t) for m, t in PANELS if any((data.rows("sharpness", r)["measure"] == m).any() for r in runs)]
    fig = style.new_figure(float(opts.get("width", style.DOUBLE)), 2.6)
    axes = fig.subplots(1, max(len(have), 1), squeeze=False).ravel()
    handles = []
    for run in runs:
        c = colours[run]
        label, _ = style.run_entry(data, run, keys)
        handles.append(style.style_handle(label, color=c, ls="-"))
        d = data.rows("sharpness", run)
        d = d[d["status"] != "diverged"].sort_values("step")
        for ax, (measure, _title) in zip(axes, have, strict=False):
            m = d[d["measure"] == measure]
            if len(m) == 0:
                continue
            x, y, se = (m[c_].to_numpy(float) for c_ in ("epoch", "value", "se"))
            if measure == "pac_bayes_sigma":
                se = y * se  # σ′'s "se" is its bisection bracket's relative width
            bars = ax.errorbar(x, y, yerr=np.where(np.isfinite(se), se, 0.0), color=c, lw=1.2, marker="o", ms=2,
                               capsize=1.5)
            bars.lines[0].set_gid(f"{measure}:{run}")
            if measure == "worst_case":
                rho = float(m["radius"].iloc[0])
                lam = lambda_max_rows(data.rows("spectrum", run))
                lam = lam[lam["status"] != "diverged"].sort_values("step") if len(lam) else lam
                if len(lam):
                    ax.plot(lam["epoch"].to_numpy(float), rho**2 * lam["eigenvalue"].to_numpy(float) / 2, ls=":",
                            color=c, lw=1.0, gid=f"quadratic:{run}")
    for ax, (measure, title) in zip(axes, have, strict=False):
        ax.set_title(title, loc="left", fontsize="small")
        ax.set_xlabel("epoch")
        if measure != "pac_bayes_sigma":
            positive = [v for ln in ax.lines for v in np.asarray(ln.get_ydata(), float) if np.isfinite(v) and v > 0]
            if positive:
                ax.set_yscale("log")
                style.plain_log(ax)
    if not have:
        style.empty_panel(axes[0], "no sharpness rows")
    axes[0].set_ylabel("loss increase")
    extra = [style.style_handle("$\\rho^2\\lambda_1/2$", ls=":")] if any(m == "worst_case" for m, _ in have) else []
    axes[-1].legend(handles=handles + extra, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    style.suptitle(fig, data, runs, opts, "Sharpness as the generalisation literature measures it")
    return fig
