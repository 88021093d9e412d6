"""The statistics behind each claim of :data:`sharpflow.claims.CLAIMS`, and the claims table.

Each check takes the loaded tables (:class:`~sharpflow.results.Data`), the runs the claim is
tested on and the thresholds, and returns an :class:`Outcome`: what was measured (one line per
run or group, each statistic with its 95 % interval and the number of units it is over), the
verdict and why. Each statistic is judged by its interval (:mod:`.intervals`):

- ``holds``: every test's interval lies on the claim's side of its threshold;
- ``does not hold``: at least one test's interval lies wholly on the other side (those are named);
- ``inconclusive``: an interval straddles its threshold, or there are too few units for one; the
  reason says how many units would be needed at the observed spread (80 % power);
- ``not enough data``: what a claim needs is missing entirely (no study of the kind, no rows), named.

The unit an interval is over: seeds where runs differ only by seed (their per-seed statistics);
otherwise the runs of a grid (claims 1, 2), the steps (5), the gradient rows (4) or the
checkpoints of one run (3, 8-11), which are serially correlated: intervals over checkpoints are
narrower than the run-to-run variation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..results import (
    END_MEASURES,
    Data,
    adaptive,
    end_of_run,
    group_by_settings,
    lambda_max_rows,
    load,
    replicate_groups,
)
from ..tables._common import Column, Table, mean_std, write
from ..tables.nsgd import run_summary
from . import CLAIMS, READS, Claim, ClaimsConfig
from .intervals import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    Estimate,
    combine,
    difference_proportions,
    difference_welch,
    judge,
    judge_band,
    kendall_bootstrap,
    mean_t,
    median_exact,
    ratio_of_means,
    spearman_of_means,
)

NO_DATA = "not enough data"


@dataclass
class Outcome:
    verdict: str
    measured: list[str] = field(default_factory=list)
    reason: str = ""


def _fmt(x: float, spec: str = "{:.3g}") -> str:
    return spec.format(x) if math.isfinite(x) else "–"


def _label(data: Data, run: str) -> str:
    """A short name of the run's sweep values (η, S, γ, seed), or the run id."""
    parts = []
    for key, name in (("lr", "η"), ("batch_size", "S"), ("gamma", "γ"), ("seed", "seed")):
        v = data.value(run, key)
        if v is not None:
            parts.append(f"{name}={v:g}" if isinstance(v, int | float) else f"{name}={v}")
    return f"{run} ({', '.join(parts)})" if parts else run


def _lambda_curve(data: Data, run: str) -> pd.DataFrame:
    """λ_max per finite, non-diverged checkpoint of ``run``: columns step, epoch, lam."""
    d = lambda_max_rows(data.rows("spectrum", run))
    if len(d) == 0:
        return pd.DataFrame({"step": [], "epoch": [], "lam": []})
    d = d[(d["status"] != "diverged") & np.isfinite(d["eigenvalue"].to_numpy(float))]
    return pd.DataFrame({"step": d["step"].to_numpy(float), "epoch": d["epoch"].to_numpy(float),
                         "lam": d["eigenvalue"].to_numpy(float)}).sort_values("step")


# ------------------------------------------------------------------------------------ claims
def peak_early(data: Data, runs: Sequence[str], cfg: ClaimsConfig) -> Outcome:
    """Claim 1: per grid (each run a unit, seeds included), the mean over runs of the fraction of the
    run's checkpointed training by which λ_1 first comes within plateau_ratio of its peak is at most
    early_fraction (t interval over runs)."""
    by_study: dict[str, list[tuple[str, float]]] = {}
    short = []
    for run in runs:
        c = _lambda_curve(data, run)
        if len(c) < 3:
            short.append(run)
            continue
        lam, ep = c["lam"].to_numpy(), c["epoch"].to_numpy()
        peak, last = float(lam.max()), float(ep[-1])
        first = float(ep[np.flatnonzero(lam >= cfg.plateau_ratio * peak)[0]])
        by_study.setdefault(data.study(run), []).append((run, first / last if last > 0 else math.nan))
    if not by_study:
        return _no_runs(short, "fewer than 3 finite checkpoints")
    tests = []
    for study, vals in by_study.items():
        est = mean_t([v for _, v in vals], "runs")
        verdict, why = judge(est, cfg.early_fraction, "<=")
        per_run = ", ".join(f"{_fmt(v, '{:.2f}')}" for _, v in vals)
        tests.append(_Test(f"{study}: mean fraction {est.text()} (per run: {per_run})", verdict, study, why))
    return _combine(tests, short, "fewer than 3 finite checkpoints")


def lower_peak(data: Data, runs: Sequence[str], cfg: ClaimsConfig) -> Outcome:
    """Claim 2: within each group of runs differing only in η (or only in S), Spearman ρ between η (or
    1/S) and the seed-mean peak λ_1 is at most −min_rho (t bootstrap over seeds: 2 seeds per value at
    least for an interval); at least 3 distinct values per group."""
    peaks = {r: float(c["lam"].max()) for r in runs if len(c := _lambda_curve(data, r))}
    tests, short = [], []
    for key, name, transform in (("lr", "η", float), ("batch_size", "1/S", lambda s: 1.0 / float(s))):
        for group in _groups_varying_only(data, [r for r in peaks if _numeric(data.value(r, key))], key):
            by_x: dict[float, list[str]] = {}
            for r in group:
                by_x.setdefault(transform(data.value(r, key)), []).append(r)
            if len(by_x) < 3:
                short.extend(group)
                continue
            xs = sorted(by_x)
            est = spearman_of_means(xs, [[peaks[r] for r in by_x[x]] for x in xs], "seeds")
            verdict, why = judge(est, -cfg.min_rho, "<=")
            pairs = ", ".join(f"{data.value(by_x[x][0], key)}→{np.mean([peaks[r] for r in by_x[x]]):.3g}" for x in xs)
            tests.append(_Test(f"ρ({name}, peak λ_1) = {est.text()} per value (seed means: {pairs})", verdict,
                               f"the {name} group", why))
    if not tests:
        return Outcome(NO_DATA, [], "no group of ≥ 3 runs differing only in η or only in S"
                       + (f" (runs: {', '.join(sorted(set(short)))})" if short else ""))
    return _combine(tests, [], "")


def steered(data: Data, runs: Sequence[str], cfg: ClaimsConfig) -> Outcome:
    """Claim 3: after the early phase, no mini-batch run's η·λ_1/2 goes above far_above (its observed
    maximum; with seeds, the seed mean of the maxima with a t interval), and at the largest η the median
    η·λ_1/2 is at least near_low (over checkpoints, or the seed mean of the medians)."""
    late: dict[str, np.ndarray] = {}
    short = []
    for run in runs:
        eta, bs = data.value(run, "lr"), data.value(run, "batch_size")
        if bs == "full" or not _numeric(eta):
            continue
        c = _lambda_curve(data, run)
        if len(c) == 0:
            short.append(run)
            continue
        sel = c[c["epoch"] >= cfg.skip_fraction * float(c["epoch"].max())]
        late[run] = float(eta) * sel["lam"].to_numpy() / 2
    if not late:
        return Outcome(NO_DATA, [], "no mini-batch run with a spectrum"
                       + (f" (missing: {', '.join(short)})" if short else ""))
    top_eta = max(float(data.value(r, "lr")) for r in late)
    tests = []
    for label, members in _replicates(data, list(late)).items():
        if len(members) > 1:
            peak = mean_t([late[r].max() for r in members], "seeds")
            verdict, why = judge(peak, cfg.far_above, "<=")
            text = f"{label}: peak η·λ_1/2 {peak.text()}"
        else:
            value = float(late[members[0]].max())
            verdict, why = (HOLDS if value <= cfg.far_above else FAILS), ""
            text = f"{label}: peak η·λ_1/2 {value:.2f} (observed maximum)"
        tests.append(_Test(text, verdict, label, why))
        if float(data.value(members[0], "lr")) == top_eta:
            med = _median_over(data, {r: late[r] for r in members})
            verdict, why = judge(med, cfg.near_low, ">=")
            tests.append(_Test(f"{label}: median η·λ_1/2 {med.text()}", verdict, label, why))
    return _combine(tests, short, "no spectrum")


def aligned(data: Data, runs: Sequence[str], cfg: ClaimsConfig) -> Outcome:
    """Claim 4: per run, the mean |cos(g, e_i)| of mini-batch gradients over i ≤ alignment_top and
    all checkpoints, divided by the mean |cos| with random directions, is at least alignment_factor
    (delta-method interval over the rows; with seeds, a t interval over the seeds' ratios)."""
    ratios: dict[str, Estimate] = {}
    short = []
    for run in runs:
        al = data.rows("alignment", run)
        if len(al) == 0:
            short.append(run)
            continue
        al = al[(al["source"] == "minibatch") & (al["status"] != "diverged")]
        eig = al[(al["kind"] == "eigen") & (al["rank"] <= cfg.alignment_top)]["abs_cos"].to_numpy(float)
        rnd = al[al["kind"] == "random"]["abs_cos"].to_numpy(float)
        est = ratio_of_means(eig, rnd, "gradient rows")
        if not math.isfinite(est.value):
            short.append(run)
            continue
        ratios[run] = est
    tests = []
    for label, members in _replicates(data, list(ratios)).items():
        est = ratios[members[0]] if len(members) == 1 else mean_t([ratios[r].value for r in members], "seeds")
        verdict, why = judge(est, cfg.alignment_factor, ">=")
        tests.append(_Test(f"{label}: multiple of the random baseline {est.text()}", verdict, label, why))
    return _combine(tests, short, "no alignment rows")


def overshoot(data: Data, runs: Sequence[str], cfg: ClaimsConfig) -> Outcome:
    """Claim 5: over the e_1 rows at multiplier 1 of every run, the fraction that raised the loss is
    at least overshoot_gap larger where η·λ_1/2 > 1 than where it is < 1 (Newcombe interval)."""
    frames = [data.rows("decomposed", r) for r in runs]
    present = [r for r, f in zip(runs, frames, strict=True) if len(f)]
    missing = [r for r in runs if r not in present]
    if not present:
        return Outcome(NO_DATA, [], "no decomposed-step rows" + (f" (missing: {', '.join(missing)})" if missing
                                                                 else ""))
    d = pd.concat([f for f in frames if len(f)], ignore_index=True)
    d = d[(d["direction"] == "e1") & np.isclose(d["multiplier"].to_numpy(float), 1.0) & ~d["diverged"].astype(bool)]
    d = d[np.isfinite(d["rel_change_pct"].to_numpy(float)) & np.isfinite(d["eta_lambda_half"].to_numpy(float))]
    above, below = d[d["eta_lambda_half"] > 1], d[d["eta_lambda_half"] < 1]
    k1, k2 = int((above["rel_change_pct"] > 0).sum()), int((below["rel_change_pct"] > 0).sum())
    measured = [f"η·λ_1/2 > 1: {k1} of {len(above)} steps raised the loss; "
                f"< 1: {k2} of {len(below)} (runs: {', '.join(present)})"]
    if len(above) < cfg.min_points or len(below) < cfg.min_points:
        return Outcome(NO_DATA, measured, f"fewer than {cfg.min_points} points on one side of η·λ_1/2 = 1")
    est = difference_proportions(k1, len(above), k2, len(below), "steps")
    verdict, why = judge(est, cfg.overshoot_gap, ">=")
    measured.append(f"difference in the fraction raising the loss: {est.text()} (threshold {cfg.overshoot_gap:g})")
    return Outcome(verdict, measured, why)


def nsgd_sharpness(data: Data, runs: Sequence[str], cfg: ClaimsConfig) -> Outcome:
    """Claim 6: the difference of mean λ_max at best validation from γ = 1's is above 0 for every γ < 1
    and below 0 for every γ > 1 (Welch interval over seeds)."""
    return _versus_gamma_one(data, runs, "lmax_best", "λ_max at best validation",
                             lambda g: (0.0, ">=") if g < 1 else (0.0, "<="))


def nsgd_generalisation(data: Data, runs: Sequence[str], cfg: ClaimsConfig) -> Outcome:
    """Claim 7: for every γ < 1, the difference of mean test accuracy at best validation from γ = 1's
    is above −accuracy_margin_pct (Welch interval over seeds)."""
    return _versus_gamma_one(data, runs, "test_acc_best_pct", "test accuracy (%) at best validation",
                             lambda g: (-cfg.accuracy_margin_pct, ">="), only_below_one=True)


def _at_edge(data: Data, runs: Sequence[str], cfg: ClaimsConfig,
             curve: Callable[[str], tuple[np.ndarray, np.ndarray] | None], what: str) -> Outcome:
    """Claims 8 and 10: per run, the ratio curve (steps, ratio to the threshold) must reach
    1/edge_tolerance; from then on (and over the second half) its median must lie within
    [1/edge_tolerance, edge_tolerance] (order-statistic interval over those checkpoints; with seeds,
    a t interval over the seeds' medians). Runs that never reach it are named and left out; with none
    reaching it, not enough data."""
    lo, hi = 1 / cfg.edge_tolerance, cfg.edge_tolerance
    measured, short, unreached = [], [], []
    kept: dict[str, np.ndarray] = {}
    for run in runs:
        c = curve(run)
        if c is None or int(np.isfinite(c[1]).sum()) < 3:
            short.append(run)
            continue
        x, y = c
        ok = np.isfinite(y)
        x, y = x[ok], y[ok]
        hit = np.flatnonzero(y >= lo)
        if len(hit) == 0:
            measured.append(f"{_label(data, run)}: {what} never reached {lo:.2f} (max {y.max():.2f})")
            unreached.append(run)
            continue
        kept[run] = y[x >= max(float(x[hit[0]]), float(x.max()) / 2)]
        measured.append(f"{_label(data, run)}: reached at step {x[hit[0]]:g}")
    if unreached and not kept:
        return Outcome(NO_DATA, measured, f"no run reached the edge: {', '.join(unreached)}"
                       + (f"; too few checkpoints: {', '.join(short)}" if short else ""))
    tests = []
    for label, members in _replicates(data, list(kept)).items():
        est = _median_over(data, {r: kept[r] for r in members})
        verdict, why = judge_band(est, lo, hi)
        tests.append(_Test(f"{label}: median {what} {est.text()}", verdict, label, why))
    out = _combine(tests, short, "fewer than 3 finite checkpoints")
    out.measured = measured + out.measured
    if unreached:
        out.reason = "; ".join(x for x in (out.reason, f"did not reach the edge (left out): {', '.join(unreached)}")
                               if x)
    return out


def edge_of_stability(data: Data, runs: Sequence[str], cfg: ClaimsConfig) -> Outcome:
    """Claim 8: every full-batch (non-adaptive) run that reaches η·λ_1/2 ≥ 1/edge_tolerance hovers there:
    its median from then on, over the second half, lies within the band."""
    gd = [r for r in runs if data.value(r, "batch_size") == "full" and not adaptive(data, r)]
    if not gd:
        return Outcome(NO_DATA, [], "no full-batch gradient-descent run")

    def curve(run: str) -> tuple[np.ndarray, np.ndarray] | None:
        c = _lambda_curve(data, run)
        eta = data.value(run, "lr")
        return (c["step"].to_numpy(), float(eta) * c["lam"].to_numpy() / 2) if len(c) and _numeric(eta) else None

    return _at_edge(data, gd, cfg, curve, "η·λ_1/2")


def adam_edge(data: Data, runs: Sequence[str], cfg: ClaimsConfig) -> Outcome:
    """Claim 10: every Adam run that reaches 1/edge_tolerance of its threshold settles within the band."""
    def curve(run: str) -> tuple[np.ndarray, np.ndarray] | None:
        d = data.rows("precond", run)
        d = d[(d["rank"] == 1) & (d["status"] != "diverged")].sort_values("step") if len(d) else d
        return (d["step"].to_numpy(float), d["ratio"].to_numpy(float)) if len(d) else None

    adam = [r for r in runs if adaptive(data, r)]
    if not adam:
        return Outcome(NO_DATA, [], "no Adam or AdamW run")
    return _at_edge(data, adam, cfg, curve, "λ_1(P⁻¹H)/threshold")


def batch_edge(data: Data, runs: Sequence[str], cfg: ClaimsConfig) -> Outcome:
    """Claim 9: per mini-batch (non-adaptive) run, the median η·BS/2 over the second half lies within
    the band, and the median of η·λ_1/2 − η·BS/2 is below 0 (order-statistic intervals over those
    checkpoints; with seeds, t intervals over the seeds' medians)."""
    lo, hi = 1 / cfg.edge_tolerance, cfg.edge_tolerance
    bs_vals: dict[str, np.ndarray] = {}
    gap_vals: dict[str, np.ndarray] = {}
    short = []
    for run in runs:
        if data.value(run, "batch_size") == "full" or adaptive(data, run):
            continue
        d = data.rows("batch_sharpness", run)
        d = d[d["status"] != "diverged"].sort_values("step") if len(d) else d
        if len(d) < 3:
            short.append(run)
            continue
        step = d["step"].to_numpy(float)
        second = step >= step.max() / 2
        bs_vals[run] = d["ratio"].to_numpy(float)[second]
        gap_vals[run] = (d["lambda1_ratio"].to_numpy(float) - d["ratio"].to_numpy(float))[second]
    tests = []
    for label, members in _replicates(data, list(bs_vals)).items():
        bs = _median_over(data, {r: bs_vals[r] for r in members})
        gap = _median_over(data, {r: gap_vals[r] for r in members})
        v1, why1 = judge_band(bs, lo, hi)
        v2, why2 = judge(gap, 0.0, "<=")
        tests.append(_Test(f"{label}: median η·BS/2 {bs.text()}", v1, label, why1))
        tests.append(_Test(f"{label}: median η·λ_1/2 − η·BS/2 {gap.text()}", v2, label, why2))
    return _combine(tests, short, "fewer than 3 checkpoints")


def tiny_subspace(data: Data, runs: Sequence[str], cfg: ClaimsConfig) -> Outcome:
    """Claim 11: per run, the median (second half) share of ‖g‖² in the top-C eigenspace is at least
    subspace_share and the median top-C overlap of consecutive checkpoints at least subspace_overlap
    (order-statistic intervals over those checkpoints; with seeds, t intervals over the seeds' medians).
    A run whose spectrum has fewer than C eigenvectors is left out (K ≥ C is needed)."""
    shares: dict[str, np.ndarray] = {}
    overlaps: dict[str, np.ndarray] = {}
    short = []
    for run in runs:
        d = data.rows("subspace", run)
        if len(d) == 0 or int(d["k"].max()) < cfg.classes:
            short.append(run)
            continue
        d = d[(d["k"] == cfg.classes) & (d["status"] != "diverged")].sort_values("step")
        step = d["step"].to_numpy(float)
        second = step >= step.max() / 2 if len(step) else step.astype(bool)
        shares[run] = d["fraction"].to_numpy(float)[second]
        overlaps[run] = d["overlap"].to_numpy(float)[second]
    tests = []
    for label, members in _replicates(data, list(shares)).items():
        share = _median_over(data, {r: shares[r] for r in members})
        overlap = _median_over(data, {r: overlaps[r] for r in members})
        v1, why1 = judge(share, cfg.subspace_share, ">=")
        v2, why2 = judge(overlap, cfg.subspace_overlap, ">=")
        tests.append(_Test(f"{label}: top-{cfg.classes} share {share.text()}", v1, label, why1))
        tests.append(_Test(f"{label}: top-{cfg.classes} overlap {overlap.text()}", v2, label, why2))
    return _combine(tests, short, f"fewer than {cfg.classes} eigenvectors or no rows")


def sam_flatter(data: Data, runs: Sequence[str], cfg: ClaimsConfig) -> Outcome:
    """Claim 12: for every SAM setting (η, ρ, adaptive), the difference of mean λ_max at the last
    checkpoint from the SGD runs' at the same η is below 0, and of mean test accuracy at best validation
    above −accuracy_margin_pct (Welch intervals over seeds)."""
    sam = [r for r in runs if data.value(r, "optimizer") == "sam"]
    sgd = [r for r in runs if data.value(r, "optimizer") in (None, "sgd") and data.value(r, "gamma") is None]
    if not sam or not sgd:
        return Outcome(NO_DATA, [], "needs SAM runs and SGD runs at the same η" +
                       (f" (SAM: {', '.join(sam) or 'none'}; SGD: {', '.join(sgd) or 'none'})"))
    summary = {r: run_summary(data, r, math.nan) for r in [*sam, *sgd]}
    groups: dict[tuple[Any, ...], list[str]] = {}
    for r in sam:
        groups.setdefault((data.value(r, "lr"), data.value(r, "rho"), data.value(r, "adaptive")), []).append(r)
    tests, short = [], []
    for (lr, rho, adaptive_), members in sorted(groups.items(), key=lambda kv: repr(kv[0])):
        ref = [r for r in sgd if data.value(r, "lr") == lr]
        name = f"{'ASAM' if adaptive_ else 'SAM'} ρ={rho:g}, η={lr:g}" if _numeric(rho) else f"SAM η={lr:g}"
        if not ref:
            short.append(f"{name} (no SGD run at η={lr:g})")
            continue
        for key, what, thr, side in (("lmax_last", "λ_max at the end", 0.0, "<="),
                                     ("test_acc_best_pct", "test accuracy (%) at best validation",
                                      -cfg.accuracy_margin_pct, ">=")):
            est = difference_welch([summary[r][key] for r in members], [summary[r][key] for r in ref], "seeds")
            verdict, why = judge(est, thr, side)
            if min(len(members), len(ref)) < 2:
                why = f"{name} and SGD need ≥ 2 seeds each (have {len(members)} and {len(ref)})"
            tests.append(_Test(f"{name}: {what} minus SGD's {est.text()} (claim: {side} {thr:g})", verdict, name, why))
    return _combine(tests, short, "missing")


def sharpness_rank(data: Data, runs: Sequence[str], cfg: ClaimsConfig) -> Outcome:
    """Claim 13: for each non-adaptive sharpness measure at the last checkpoint, Kendall τ-b with the train
    − test accuracy gap over the runs (seeds and grid values alike; percentile bootstrap over runs) is
    below ``weak_tau``. Adaptive variants (``sharpness_adaptive``, ``sharpness_magnitude_aware`` in the
    runs' settings) are reported beside it without a verdict; diverged runs are left out."""
    usable = [r for r in runs if data.divergence(r) is None]
    short = [r for r in runs if r not in usable]
    ends = {r: end_of_run(data, r) for r in usable}
    tests: list[_Test] = []
    reported: list[str] = []
    for key, label in END_MEASURES:
        flag = {"worst_case": "sharpness_adaptive", "average_case": "sharpness_magnitude_aware"}.get(key)
        plain = [r for r in usable if not (flag and data.value(r, flag))]
        other = [r for r in usable if r not in plain]
        for members, judged in ((plain, True), (other, False)):
            pairs = [(ends[r][key], ends[r]["gap"]) for r in members
                     if math.isfinite(ends[r][key]) and math.isfinite(ends[r]["gap"])]
            if not members or not pairs:
                continue
            est = kendall_bootstrap([p[0] for p in pairs], [p[1] for p in pairs], "runs")
            name = label if judged else f"{label} (adaptive)"
            if not judged:
                reported.append(f"{name}: τ {est.text()} (reported, not judged)")
                continue
            verdict, why = judge(est, cfg.weak_tau, "<=")
            tests.append(_Test(f"{name}: τ {est.text()} (claim: ≤ {cfg.weak_tau:g})", verdict, name, why))
    if not tests:
        return Outcome(NO_DATA, reported, "no run with a finite measure and accuracy gap at its last checkpoint")
    gap = np.array([e["gap"] for e in ends.values() if math.isfinite(e["gap"])])
    out = _combine(tests, short, "diverged")
    out.measured = [*out.measured, *reported,
                    f"gap (train − test accuracy, points) {_fmt(gap.min())}–{_fmt(gap.max())} over {len(gap)} runs"]
    return out


CHECKS: dict[str, Callable[[Data, Sequence[str], ClaimsConfig], Outcome]] = {
    "peak_early": peak_early, "lower_peak": lower_peak, "steered": steered, "aligned": aligned,
    "overshoot": overshoot, "nsgd_sharpness": nsgd_sharpness, "nsgd_generalisation": nsgd_generalisation,
    "edge_of_stability": edge_of_stability, "batch_edge": batch_edge, "adam_edge": adam_edge,
    "tiny_subspace": tiny_subspace, "sam_flatter": sam_flatter,
    "sharpness_rank": sharpness_rank,
}


# ------------------------------------------------------------------------------------ helpers
@dataclass
class _Test:
    """One interval-judged test of a claim (a run, a group of seeds, a grid)."""

    measured: str
    verdict: str
    name: str
    why: str = ""


def _combine(tests: list[_Test], short: list[str], why_short: str) -> Outcome:
    """The claim's verdict from its tests (:func:`~.intervals.combine`): the failing ones named, the
    inconclusive ones with why; runs left out named."""
    if not tests:
        return _no_runs(short, why_short)
    verdict = combine([t.verdict for t in tests])
    notes = []
    failing = list(dict.fromkeys(t.name for t in tests if t.verdict == FAILS))
    if failing:
        notes.append(f"fails for {', '.join(failing)}")
    if verdict == INCONCLUSIVE:
        notes += [f"inconclusive for {t.name}: {t.why}" for t in tests if t.verdict == INCONCLUSIVE]
    if short:
        notes.append(f"left out ({why_short}): {', '.join(short)}")
    return Outcome(verdict, [t.measured for t in tests], "; ".join(notes))


def _no_runs(short: list[str], why_short: str) -> Outcome:
    return Outcome(NO_DATA, [], f"{why_short}: {', '.join(short)}" if short else "no runs")


def _numeric(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))


def _replicates(data: Data, runs: list[str]) -> dict[str, list[str]]:
    """The runs grouped into replicates (:func:`~sharpflow.results.replicate_groups`), by a label: the
    run's label for a lone run, the first run's with its seeds for a group."""
    out = {}
    for members in replicate_groups(data, runs):
        if len(members) == 1:
            out[_label(data, members[0])] = members
        else:
            seeds = ", ".join(str(data.value(r, "seed")) for r in members)
            base = _label(data, members[0]).split(" (")[0]
            out[f"{base} and its seeds ({seeds})"] = members
    return out


def _median_over(data: Data, values: dict[str, np.ndarray]) -> Estimate:
    """One run: the median of its values with the order-statistic interval over them (checkpoints);
    several seeds: the mean of their medians with a t interval over the seeds."""
    if len(values) == 1:
        return median_exact(next(iter(values.values())), "checkpoints")
    meds = [float(np.median(v[np.isfinite(v)])) for v in values.values() if np.isfinite(v).any()]
    return mean_t(meds, "seeds")


def _groups_varying_only(data: Data, runs: list[str], key: str) -> list[list[str]]:
    """The runs grouped by every sweep setting but ``key`` (and the seed, pooled)."""
    others = [k for k in ("lr", "batch_size", "momentum", "optimizer", "gamma", "k", "study") if k != key]
    return group_by_settings(data, runs, others)


def _versus_gamma_one(data: Data, runs: Sequence[str], key: str, what: str,
                      threshold: Callable[[float], tuple[float, str]], only_below_one: bool = False) -> Outcome:
    nsgd = [r for r in runs if data.value(r, "gamma") is not None and data.value(r, "optimizer") in (None, "nsgd")]
    if not nsgd:
        return Outcome(NO_DATA, [], "no Nudged-SGD runs")
    by_group: dict[tuple[float, Any], list[float]] = {}
    names: dict[tuple[float, Any], list[str]] = {}
    for r in nsgd:
        v = run_summary(data, r, math.nan)[key]
        g = (float(data.value(r, "gamma")), data.value(r, "k"))
        by_group.setdefault(g, []).append(v)
        names.setdefault(g, []).append(r)
    tests, short = [], []
    for (gamma, k), vals in sorted(by_group.items(), key=lambda kv: (repr(kv[0][1]), kv[0][0])):
        if gamma == 1.0 or (only_below_one and gamma > 1):
            continue
        ref = by_group.get((1.0, k))
        if ref is None:
            short.append(f"γ=1 (K={k})")
            continue
        m, s, n = mean_std(vals)
        m1, s1, n1 = mean_std(ref)
        est = difference_welch(vals, ref, "seeds")
        thr, side = threshold(gamma)
        verdict, why = judge(est, thr, side)
        if n < 2 or n1 < 2:
            why = (f"γ={gamma:g} and γ=1 need ≥ 2 seeds each (have {n} and {n1}: "
                   f"{', '.join(names[(gamma, k)] + names[(1.0, k)])})")
        tests.append(_Test(f"γ={gamma:g}: {what} {_fmt(m)} ± {_fmt(s)} vs γ=1 {_fmt(m1)} ± {_fmt(s1)}; "
                           f"difference {est.text()} (claim: {side} {thr:g})", verdict, f"γ={gamma:g}", why))
    if not tests:
        return Outcome(NO_DATA, [], "need " + "; ".join(short) if short else "no γ ≠ 1 to compare")
    return _combine(tests, short, "missing")


# ------------------------------------------------------------------------------------ the table
def evaluate(spec: dict[str, Any], inputs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per claim: number, claim, paper, statistic, measured, verdict, reason, figures, runs.

    ``spec``: {"config": the claims section, "claims": {number: {"runs": [...], "figures": [...]}},
    "runs": {run: settings}} (as the workflow writes it); ``inputs``: the runs' tables.
    """
    cfg = ClaimsConfig.model_validate(spec.get("config") or {})
    data = load(inputs, READS, spec)
    rows = []
    for claim in CLAIMS:
        entry = (spec.get("claims") or {}).get(str(claim.number)) or {}
        runs = [str(r) for r in entry.get("runs") or []]
        figures = [str(f) for f in entry.get("figures") or []]
        if not runs:
            out = Outcome(NO_DATA, [], f"no study of kind '{claim.kind}' in the config's figures or tables")
        else:
            required = [t for t in claim.reads if t != "spectrum_best"]
            lacking = {r: tuple(t for t in required if not len(data.rows(t, r))) for r in runs}
            have = [r for r in runs if not lacking[r]]
            out = CHECKS[claim.check](data, have, cfg) if have else Outcome(NO_DATA)
            by_tables: dict[tuple[str, ...], list[str]] = {}
            for r in runs:
                if lacking[r]:
                    by_tables.setdefault(lacking[r], []).append(r)
            notes = [f"missing tables ({', '.join(t)}) for: {', '.join(rs)}" for t, rs in by_tables.items()]
            out.reason = "; ".join(x for x in (out.reason, *notes) if x)
        rows.append(_row(claim, out, figures, runs))
    return rows


def _row(claim: Claim, out: Outcome, figures: list[str], runs: list[str]) -> dict[str, Any]:
    return {"number": claim.number, "claim": claim.statement, "paper": claim.paper, "statistic": claim.statistic,
            "measured": "; ".join(out.measured) if out.measured else "–", "verdict": out.verdict,
            "reason": out.reason, "figures": ", ".join(figures), "runs": ", ".join(runs)}


def make_claims(spec: dict[str, Any], inputs: Sequence[str | Path], out_md: Path, out_tex: Path,
                out_csv: Path) -> list[dict[str, Any]]:
    """Evaluate every claim and write the Markdown, LaTeX and CSV tables atomically."""
    rows = evaluate(spec, inputs)
    columns = [Column("number", "#", kind="int"), Column("claim", "claim", kind="text"),
               Column("statistic", "statistic", kind="text"), Column("measured", "measured", kind="text"),
               Column("verdict", "verdict", kind="text"), Column("reason", "reason", kind="text"),
               Column("figures", "figures", kind="text"), Column("paper", "paper", kind="text"),
               Column("runs", "runs", kind="text")]
    cfg = ClaimsConfig.model_validate(spec.get("config") or {})
    notes = ["Verdicts on these runs with the thresholds of the claims config section (defaults of claims 1-7 fixed "
             "before any run was seen, of 13 before its runs' gaps were seen, of 8-11 from the papers' wording after "
             "exploratory runs): "
             + ", ".join(f"{k}={v}" for k, v in cfg.model_dump().items() if k != "enabled") + ".",
             "Each statistic carries its 95 % interval and the units it is over (seeds where runs differ only by "
             "seed; otherwise runs, steps, gradient rows or checkpoints of one run, which are correlated); the "
             "verdict is by the interval: holds or does not hold where it is wholly on one side of the threshold, "
             "inconclusive where it straddles it (with the units needed at that spread); 'not enough data' names "
             "what is missing."]
    write(Table(columns, rows, notes), Path(out_md), Path(out_tex), Path(out_csv))
    return rows


__all__ = ["CHECKS", "FAILS", "HOLDS", "INCONCLUSIVE", "NO_DATA", "Outcome", "evaluate", "make_claims"]
