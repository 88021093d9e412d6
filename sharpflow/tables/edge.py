"""``edge``: the edges of stability and the tiny subspace, one row per run.

Each statistic is the median over the checkpoints in the second half of training (step ≥ the last
checkpoint's step / 2) of:

- ``eta_lambda``: η·λ_1/2, λ_1 the top Hessian eigenvalue (``spectrum``). Full-batch GD settles at 1
  (Cohen et al. 2021); for mini-batch SGD it sits below (Andreyev & Beneventano 2024). "–" for
  Adam runs, whose threshold is on P^{-1}H.
- ``eta_bs``: η·BS/2, BS the batch sharpness (``batch_sharpness``): mini-batch SGD settles at 1
  ("–" for Adam runs).
- ``adam_ratio``: λ_1(P^{-1}H) / ((2 + 2β₁)/(η(1 − β₁))) (``precond``): Adam settles at 1 (Cohen et
  al. 2022).
- ``share``: the full gradient's share ‖P_C g‖²/‖g‖² in the top-C eigenspace and ``overlap``: the
  top-C overlap of consecutive checkpoints (``subspace``; C = style ``classes``, default 10, or the
  largest k computed if fewer), Gur-Ari et al. 2018.

"–" where a run has no such analysis. Rows in the order of the studies, then η, S, seed. Style
options: ``classes``.
"""

from __future__ import annotations

import math
from typing import Any

from ..results import Data, adaptive, lambda_max_rows, second_half_median, sort_value
from ._common import Column, Table

LOSS_NAMES = {"cross_entropy": "CE", "mse": "MSE"}


def run_edge(data: Data, run: str, classes: int = 10) -> dict[str, Any]:
    """The second-half medians of one run (NaN where it lacks the table)."""
    eta = data.value(run, "lr")
    eta = float(eta) if eta is not None else math.nan
    out: dict[str, Any] = {"run": run, "study": data.study(run), "optimizer": str(data.value(run, "optimizer") or ""),
                           "lr": eta, "batch_size": data.value(run, "batch_size"), "seed": data.value(run, "seed"),
                           "loss": LOSS_NAMES.get(str(data.value(run, "loss")), "CE"), "eta_lambda": math.nan,
                           "eta_bs": math.nan, "adam_ratio": math.nan, "share": math.nan, "overlap": math.nan}
    sp = lambda_max_rows(data.rows("spectrum", run))
    if len(sp) and not adaptive(data, run):
        out["eta_lambda"] = second_half_median(sp["step"], eta * sp["eigenvalue"].to_numpy(float) / 2)
    bs = data.rows("batch_sharpness", run)
    if len(bs) and not adaptive(data, run):
        out["eta_bs"] = second_half_median(bs["step"], bs["ratio"])
    pc = data.rows("precond", run)
    if len(pc):
        pc = pc[pc["rank"] == 1]
        out["adam_ratio"] = second_half_median(pc["step"], pc["ratio"])
    sub = data.rows("subspace", run)
    if len(sub):
        kk = min(classes, int(sub["k"].max()))
        d = sub[sub["k"] == kk]
        out["share"] = second_half_median(d["step"], d["fraction"])
        out["overlap"] = second_half_median(d["step"], d["overlap"])
        out["share_k"] = kk
    return out


def build(kind: str, data: Data, opts: dict[str, Any]) -> Table:
    classes = int(opts.get("classes", 10))
    studies = list(dict.fromkeys(data.study(r) for r in data.runs))
    rows = sorted((run_edge(data, r, classes) for r in data.runs_with("spectrum")),
                  key=lambda r: (studies.index(r["study"]),
                                 *(sort_value(r[k]) for k in ("lr", "batch_size", "seed")), r["run"]))
    for r in rows:
        r["S"] = str(r["batch_size"]) if r["batch_size"] is not None else ""
    ks = {r["share_k"] for r in rows if "share_k" in r}
    c = f"{ks.pop()}" if len(ks) == 1 else "C"
    columns = [
        Column("run", "run", kind="text"), Column("optimizer", "opt.", kind="text"),
        Column("lr", "η", kind="number", fmt="{:g}"), Column("S", "S", kind="text", csv=False),
        Column("loss", "loss", kind="text"),
        Column("eta_lambda", "η·λ1/2", r"$\eta\lambda_1/2$", fmt="{:.2f}"),
        Column("eta_bs", "η·BS/2", r"$\eta\,\mathrm{BS}/2$", fmt="{:.2f}"),
        Column("adam_ratio", "λ1(P⁻¹H)/thr.", r"$\lambda_1(P^{-1}H)/\mathrm{thr.}$", fmt="{:.2f}"),
        Column("share", f"grad. share top-{c}", f"grad.\\ share top-{c}", fmt="{:.2f}"),
        Column("overlap", f"top-{c} overlap", fmt="{:.2f}"),
    ]
    for r in rows:
        r.pop("share_k", None)
    notes = ["Medians over the checkpoints of the second half of training. 1 is the edge in the first three "
             "columns: 2/η for λ1 (full-batch GD) and for the batch sharpness BS (mini-batch SGD), "
             "(2+2β1)/(η(1−β1)) for Adam's preconditioned λ1. '–': not computed for that run."]
    return Table(columns, rows, notes)
