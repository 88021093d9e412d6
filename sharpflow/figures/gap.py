"""``gap``: the sharpness measures at the end of training against the generalisation gap (claim 13).

One panel per measure — λ_max, worst-case sharpness, average-case sharpness, the PAC-Bayes flatness
1/σ′² (:data:`sharpflow.results.END_MEASURES`), read at each run's last checkpoint — with one point per
run: the measure on x, the train − test accuracy gap in percentage points on y, coloured by the study
the run presents as (a replicate study's seeds with their grid). Each panel's title gives Kendall's τ-b
of the points; the claims table gives its interval. Runs without the ``sharpness`` table appear in the
λ_max panel only; diverged runs are left out. Jiang et al. 2019; Andriushchenko et al. 2023.

Style options: ``width``, ``title``.
"""

from __future__ import annotations

import math
from typing import Any

from matplotlib.figure import Figure

from ..claims.intervals import kendall
from ..results import END_MEASURES, Data, end_of_run
from . import style

#: panel titles in mathtext where the measure's label has symbols
TITLES = {"lambda_max": "$\\lambda_{\\max}$", "pac_bayes": "PAC-Bayes $1/\\sigma'^2$"}


def points(data: Data) -> dict[str, dict[str, float]]:
    """Each usable run's end-of-training measures and gap (:func:`~sharpflow.results.end_of_run`)."""
    runs = [r for r in data.runs_with("spectrum") if data.divergence(r) is None]
    ends = {r: end_of_run(data, r) for r in runs}
    return {r: e for r, e in ends.items() if math.isfinite(e["gap"])}


def plot(data: Data, opts: dict[str, Any]) -> Figure:
    ends = points(data)
    if not ends:
        return style.no_data("gap", "no run with a spectrum and train and test accuracy at its last checkpoint")
    studies = sorted({data.study(r) for r in ends})
    colours = style.palette("study", studies)
    fig = style.new_figure(float(opts.get("width", style.DOUBLE)), 2.4)
    axes = fig.subplots(1, len(END_MEASURES), sharey=True, squeeze=False).ravel()
    for ax, (key, measure) in zip(axes, END_MEASURES, strict=True):
        label = TITLES.get(key, measure)
        xs, ys = [], []
        for study in studies:
            members = [r for r in ends if data.study(r) == study and math.isfinite(ends[r][key])]
            x = [ends[r][key] for r in members]
            y = [ends[r]["gap"] for r in members]
            ax.scatter(x, y, s=12, color=colours[study], label=study, gid=f"{key}:{study}")
            xs += x
            ys += y
        tau = kendall(xs, ys) if len(xs) >= 2 else math.nan
        ax.set_title(f"{label}\nτ = {tau:.2f} ({len(xs)} runs)" if math.isfinite(tau) else f"{label}\n(no τ)",
                     loc="left", fontsize="small")
        ax.set_xlabel("at the last checkpoint")
        if not xs:
            style.empty_panel(ax, "no sharpness rows")
    axes[0].set_ylabel("train − test accuracy (points)")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    style.suptitle(fig, data, list(ends), opts, "Sharpness at the end of training against the generalisation gap")
    return fig
