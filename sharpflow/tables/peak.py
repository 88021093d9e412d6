"""``peak``: where λ_max peaks, per run (the paper's claim 1: lower and earlier for larger η or
smaller S).

One row per run, ordered by η, then S, then seed: the peak of λ_max (the largest algebraic
eigenvalue computed: rank 1 for ``which: LA``) over the finite checkpoints, the first step and
epoch at which it is reached, η·λ_max/2 there (> 1: on a quadratic, a step along e1 lands past the
1-D minimum at a higher loss, and GD is unstable), the final λ_max (at the last checkpoint; "–" for
a run that diverged) and the run's status.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..results import Data, lambda_max_rows, sort_value, varying
from ._common import Column, Table


def run_peak(data: Data, run: str) -> dict[str, Any]:
    sp = data.rows("spectrum", run)
    d = lambda_max_rows(sp)
    lam = d["eigenvalue"].to_numpy(float) if len(d) else np.array([])
    eta = data.value(run, "lr")
    out: dict[str, Any] = {"run": run, "lr": float(eta) if eta is not None else math.nan,
                           "batch_size": data.value(run, "batch_size"), "seed": data.value(run, "seed"),
                           "peak_lambda_max": math.nan, "peak_step": math.nan, "peak_epoch": math.nan,
                           "eta_lambda_half_at_peak": math.nan, "final_lambda_max": math.nan}
    if np.isfinite(lam).any():
        i = int(np.nanargmax(lam))  # the first maximum: the earliest step reaching the peak
        out["peak_lambda_max"] = float(lam[i])
        out["peak_step"] = int(d["step"].iloc[i])
        out["peak_epoch"] = float(d["epoch"].iloc[i])
        out["eta_lambda_half_at_peak"] = out["lr"] * out["peak_lambda_max"] / 2
    if len(lam):
        out["final_lambda_max"] = float(lam[-1])
    div = data.divergence(run)
    stopped = len(sp) and sp["status"].eq("stopped").any()
    out["status"] = f"diverged at step {div[0]:g}" if div else "stopped early" if stopped else "ok"
    return out


def build(kind: str, data: Data, opts: dict[str, Any]) -> Table:
    runs = data.runs_with("spectrum")
    rows = sorted((run_peak(data, r) for r in runs),
                  key=lambda r: (*(sort_value(r[k]) for k in ("lr", "batch_size", "seed")), r["run"]))
    for r in rows:
        r["S"] = str(r["batch_size"]) if r["batch_size"] is not None else ""
    columns = [Column("run", "run", kind="text"), Column("lr", "η", kind="number", fmt="{:g}"),
               Column("S", "S", kind="text", csv=False)]
    if "seed" in varying(data, runs, ("seed",)):
        columns.append(Column("seed", "seed", kind="int"))
    columns += [
        Column("peak_lambda_max", "peak λ_max", r"peak $\lambda_{\max}$"),
        Column("peak_step", "peak step", kind="int"),
        Column("peak_epoch", "peak epoch", fmt="{:.3g}"),
        Column("eta_lambda_half_at_peak", "η·λ_max/2 at peak", r"$\eta\lambda_{\max}/2$ at peak"),
        Column("final_lambda_max", "final λ_max", r"final $\lambda_{\max}$"),
        Column("status", "status", kind="text"),
    ]
    notes = ["λ_max: the largest Hessian eigenvalue (the largest algebraic one computed), in nats/param²; "
             "the peak is the first checkpoint reaching the maximum over finite values."]
    return Table(columns, rows, notes)
