"""``nsgd`` and ``nsgd_k``: Nudged-SGD against SGD baselines, mean ± std over seeds.

Per run:

- best-validation checkpoint: with ``checkpoints.best`` (a ``spectrum_best`` table), the run's
  saved best-validation checkpoint: the epoch end with the highest validation accuracy of all
  (validated at every epoch), its spectrum, and its train/test rows. Otherwise the checkpoint (a
  step present in the spectrum table, or in the metrics if there is no spectrum) with the highest
  validation accuracy, which can be up to one checkpoint interval from the best epoch. Ties go to
  the earliest;
- last checkpoint: the largest step of the spectrum table (of the metrics' evaluations without one);
- ‖H‖_F: the spectrum's ``frobenius`` (a Gaussian-probe estimate). If it is NaN the table uses
  sqrt(Σ λ_i²) over the top-K eigenvalues instead, a LOWER BOUND, marked "†" with a footnote (and
  ``frob_*_lower_bound`` = True in the CSV);
- λ_max: the largest algebraic eigenvalue computed (rank 1 with ``which: LA``);
- test accuracy at the best-validation checkpoint (metrics split "test", same step);
- validation accuracy at an early epoch E, a measure of speed: ``style.early_epoch`` (default 50,
  the paper's); ``"quarter"``: the first validation epoch at or after 25 % of the longest run. E is
  printed in the column header; per run, its first validation evaluation at epoch ≥ E;
- final training loss (the last "train" evaluation);
- ‖θ − θ₀‖₂ (``dist_init``) at the best-validation checkpoint, as in the paper's Table 1.

Rows (groups of runs differing only in seed): NSGD by γ ascending (then K), then SGD baselines
"SGD(η=…)" by η descending. ``nsgd_k`` names rows by K (and γ if it varies) — the K-ablation;
``nsgd`` names them by γ (and K if it varies). Style: ``early_epoch`` (epochs, or "quarter"), ``by`` ("gamma" |
"k", overrides the kind's default naming).

Aggregation: mean and sample std (ddof=1) over the seeds whose value is finite; a diverged seed's
NaN values are left out and counted in the "seeds" column.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ..results import Data, group_label, group_order, group_runs, label_keys, lambda_max_rows
from ._common import Column, Table, mean_std

ACC_FMT = "{:.1f}"
EPS = 1e-9

#: the per-run quantities, in column order: (key, header, LaTeX header, format).
QUANTITIES: list[tuple[str, str, str, str]] = [
    ("frob_best", "‖H‖_F best-val", r"$\|H\|_F$ best-val", "{:.3g}"),
    ("frob_last", "‖H‖_F last", r"$\|H\|_F$ last", "{:.3g}"),
    ("lmax_best", "λ_max best-val", r"$\lambda_{\max}$ best-val", "{:.3g}"),
    ("lmax_last", "λ_max last", r"$\lambda_{\max}$ last", "{:.3g}"),
    ("test_acc_best_pct", "test acc best-val (%)", r"test acc best-val (\%)", ACC_FMT),
    ("val_acc_early_pct", "val acc @ epoch {E} (%)", r"val acc @ epoch {E} (\%)", ACC_FMT),
    ("train_loss_final", "final train loss (nats)", "final train loss (nats)", "{:.3g}"),
    ("dist_init_best", "‖θ−θ₀‖ best-val", r"$\|\theta-\theta_0\|$ best-val", "{:.3g}"),
]


#: The paper's speed column: validation accuracy at epoch 50 (of its up-to-2000-epoch protocol).
PAPER_EARLY_EPOCH = 50.0


def early_epoch(data: Data, runs: list[str], opts: dict[str, Any]) -> float:
    """E: ``style.early_epoch`` (unset or null: the paper's 50); ``"quarter"``: the first validation epoch
    ≥ 25 % of the longest run (for studies far shorter than the paper's)."""
    chosen = opts.get("early_epoch")
    if chosen != "quarter":
        return PAPER_EARLY_EPOCH if chosen is None else float(chosen)
    met = data.table("metrics")
    if len(met) == 0:
        return math.nan
    met = met[met["run"].isin(runs)]
    valid = met[met["split"] == "valid"]["epoch"].to_numpy(float)
    if len(valid) == 0:
        return math.nan
    target = 0.25 * float(np.nanmax(met["epoch"].to_numpy(float)))
    later = valid[valid >= target - EPS]
    return float(later.min()) if len(later) else math.nan


def _frobenius(sp_step: pd.DataFrame) -> tuple[float, bool]:
    """(‖H‖_F, is_lower_bound) at one checkpoint's spectrum rows."""
    if len(sp_step) == 0:
        return math.nan, False
    frob = float(sp_step["frobenius"].iloc[0]) if "frobenius" in sp_step else math.nan
    if math.isfinite(frob):
        return frob, False
    lam = sp_step["eigenvalue"].to_numpy(float)
    if sp_step["status"].eq("diverged").any() or not np.isfinite(lam).any():
        return math.nan, False
    return float(np.sqrt(np.sum(lam[np.isfinite(lam)] ** 2))), True


def _at(df: pd.DataFrame, step: float, col: str) -> float:
    d = df[df["step"] == step]
    vals = d[col].to_numpy(float) if len(d) else np.array([])
    vals = vals[np.isfinite(vals)]
    return float(vals[0]) if len(vals) else math.nan


def run_summary(data: Data, run: str, early: float) -> dict[str, Any]:
    """The per-run quantities of the table (accuracies in %), plus the chosen steps."""
    sp = data.rows("spectrum", run)
    sp_best = data.rows("spectrum_best", run)
    met = data.rows("metrics", run)
    evals = met[met["split"] != "batch"] if len(met) else met
    valid = evals[(evals["split"] == "valid") & np.isfinite(evals["accuracy"])] if len(evals) else evals
    ckpts = set(sp["step"]) if len(sp) else set(evals["step"]) if len(evals) else set()
    out: dict[str, Any] = {"best_step": math.nan, "last_step": math.nan, "best_saved": len(sp_best) > 0}
    if len(sp_best):  # the saved best-validation checkpoint: its own spectrum
        out["best_step"], out["best_epoch"] = float(sp_best["step"].iloc[0]), float(sp_best["epoch"].iloc[0])
        sp_at_best = sp_best
    else:
        cand = valid[valid["step"].isin(ckpts)] if len(valid) else valid
        if len(cand):
            cand = cand.sort_values("step", kind="stable")
            best = cand.loc[cand["accuracy"].idxmax()]  # idxmax: the first maximum in step order
            out["best_step"], out["best_epoch"] = float(best["step"]), float(best["epoch"])
        sp_at_best = sp[sp["step"] == out["best_step"]] if len(sp) else sp
    if ckpts:
        out["last_step"] = float(max(ckpts))
    bs, ls = out["best_step"], out["last_step"]
    rank1 = lambda_max_rows(sp)
    out["frob_best"], out["frob_best_lb"] = _frobenius(sp_at_best)
    out["frob_last"], out["frob_last_lb"] = _frobenius(sp[sp["step"] == ls]) if len(sp) else (math.nan, False)
    out["lmax_best"] = _at(lambda_max_rows(sp_at_best), bs, "eigenvalue") if len(sp_at_best) else math.nan
    out["lmax_last"] = _at(rank1, ls, "eigenvalue") if len(sp) else math.nan
    test = evals[evals["split"] == "test"] if len(evals) else evals
    out["test_acc_best_pct"] = 100 * _at(test, bs, "accuracy") if len(test) else math.nan
    early_rows = valid[valid["epoch"] >= early - EPS].sort_values("step") if len(valid) else valid
    out["val_acc_early_pct"] = 100 * float(early_rows["accuracy"].iloc[0]) if len(early_rows) else math.nan
    train = evals[evals["split"] == "train"].sort_values("step") if len(evals) else evals
    out["train_loss_final"] = _at(train, float(train["step"].max()), "loss") if len(train) else math.nan
    # the paper's distance from initialisation is read at the best-validation checkpoint
    out["dist_init_best"] = _at(evals, bs, "dist_init") if len(evals) else math.nan
    out["diverged"] = data.divergence(run) is not None
    return out


def build(kind: str, data: Data, opts: dict[str, Any]) -> Table:
    runs = [r for r in data.runs if r in set(data.runs_with("spectrum")) | set(data.runs_with("metrics"))]
    groups = group_runs(data, runs)
    by = opts.get("by", "k" if kind == "nsgd_k" else None)
    keys = label_keys(groups, by)
    early = early_epoch(data, runs, opts)
    e_text = f"{early:g}" if math.isfinite(early) else "?"
    summaries = {r: run_summary(data, r, early) for r in runs}

    def order(g: Any) -> tuple:
        # nsgd_k: K first, then γ; nsgd: γ first, then K (group_order's default).
        if kind == "nsgd_k" and g[0] == "nsgd":
            return (0, math.inf if g[2] is None else g[2], math.inf if g[1] is None else g[1])
        return group_order(g)

    rows = []
    any_lb = False
    for g in sorted(groups, key=order):
        members = groups[g]
        row: dict[str, Any] = {"name": group_label(g, keys), "optimizer": g[0],
                               "gamma": g[1] if g[0] == "nsgd" else math.nan,
                               "k": g[2] if g[0] == "nsgd" and g[2] is not None else math.nan,
                               "lr": _common_value(data, members, "lr"),
                               **({"rho": g[1]} if g[0] == "sam" else {}),
                               "n_seeds": len(members),
                               "n_diverged": sum(bool(summaries[r]["diverged"]) for r in members)}
        for key, *_ in QUANTITIES:
            mean, std, _n = mean_std([summaries[r][key] for r in members])
            flag = ""
            if key in ("frob_best", "frob_last"):
                lb = any(summaries[r][f"{key}_lb"] for r in members)
                row[f"{key}_lower_bound"] = lb
                if lb:
                    flag, any_lb = "†", True
            row[key] = (mean, std, flag)
        row["seeds"] = f"{len(members)}" + (f" ({row['n_diverged']} div.)" if row["n_diverged"] else "")
        rows.append(row)

    columns = [Column("name", "optimizer", kind="text"), Column("seeds", "seeds", kind="text", csv=False)]
    for key, header, tex, fmt in QUANTITIES:
        columns.append(Column(key, header.replace("{E}", e_text), tex.replace("{E}", e_text), kind="meanstd",
                              fmt=fmt))
    if opts.get("early_epoch") is None:
        how = "the paper's epoch 50"
    elif opts["early_epoch"] == "quarter":
        how = "the first validation epoch at or after 25 % of training (style.early_epoch: quarter)"
    else:
        how = "style.early_epoch"
    saved = [bool(s["best_saved"]) for s in summaries.values()]
    if all(saved):
        best_how = "the epoch with the highest validation accuracy (validated every epoch; checkpoints.best)"
    elif any(saved):
        best_how = ("the epoch with the highest validation accuracy where a run keeps it (checkpoints.best), "
                    "else the checkpoint with the highest")
    else:
        best_how = "the checkpoint with the highest validation accuracy (checkpoints.best: the exact epoch)"
    notes = [
        "Mean ± sample std (ddof=1) over seeds; diverged seeds' NaN values are left out.",
        f"best-val: {best_how}, earliest on ties; last: the last checkpoint. λ and ‖H‖ in nats/param².",
        f"val acc @ epoch {e_text}: {how}; each run's first validation at or after it.",
    ]
    if any_lb:
        notes.append("†: no probe estimate of ‖H‖_F; sqrt(Σ λ_i²) over the top-K eigenvalues, a lower bound.")
    for r in rows:
        r["early_epoch"] = early
    return Table(columns, rows, notes)


def _common_value(data: Data, runs: list[str], key: str) -> float:
    vals = {data.value(r, key) for r in runs}
    if len(vals) == 1:
        v = vals.pop()
        return float(v) if isinstance(v, int | float) else math.nan
    return math.nan
