"""The statistics behind each claim of :data:`sharpflow.claims.CLAIMS`, and the claims table.

Each check takes the loaded tables (:class:`~sharpflow.results.Data`), the runs the claim is
tested on and the thresholds, and returns an :class:`Outcome`: what was measured (one line per
run or group), the verdict and, for "not enough data", what is missing. The verdicts:

- ``holds``: the statistic meets the documented threshold on every run (or group) tested;
- ``does not hold``: it misses it on at least one (those are named);
- ``not enough data``: too few usable runs, checkpoints or seeds (named), or no study of the kind.

Where seeds exist (claims 6, 7) a difference between two groups counts only beyond the seed
spread (``spread_factor`` × the sum of their sample standard deviations); with one seed there is
no spread and the verdict is "not enough data".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..results import Data, adaptive, lambda_max_rows, load, second_half_median
from ..tables._common import Column, Table, mean_std, write
from ..tables.nsgd import run_summary
from . import CLAIMS, READS, Claim, ClaimsConfig

HOLDS, FAILS, NO_DATA = "holds", "does not hold", "not enough data"


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
    """Claim 1: per run, λ_1 reaches its peak (or plateau_ratio × the peak) by early_fraction of the
    run's checkpointed training."""
    measured, failing, short = [], [], []
    for run in runs:
        c = _lambda_curve(data, run)
        if len(c) < 3:
            short.append(run)
            continue
        lam, ep = c["lam"].to_numpy(), c["epoch"].to_numpy()
        i = int(np.argmax(lam))
        peak, last = float(lam[i]), float(ep[-1])
        cutoff = cfg.early_fraction * last
        reached = float(lam[ep <= cutoff].max()) if (ep <= cutoff).any() else -math.inf
        ok = ep[i] <= cutoff or reached >= cfg.plateau_ratio * peak
        measured.append(f"{_label(data, run)}: peak {peak:.3g} at epoch {ep[i]:.3g} of {last:.3g}, "
                        f"final/peak {lam[-1] / peak:.2f}")
        if not ok:
            failing.append(run)
    return _verdict(measured, failing, short, "fewer than 3 finite checkpoints")


def lower_peak(data: Data, runs: Sequence[str], cfg: ClaimsConfig) -> Outcome:
    """Claim 2: within each group of runs differing only in η (or only in S), Spearman ρ between η
    (or 1/S) and the peak λ_1 is at most −min_rho; at least 3 distinct values per group."""
    peaks = {r: float(c["lam"].max()) for r in runs if len(c := _lambda_curve(data, r))}
    measured, failing, short = [], [], []
    tested = 0
    for key, name, transform in (("lr", "η", float), ("batch_size", "1/S", lambda s: 1.0 / float(s))):
        for group in _groups_varying_only(data, [r for r in peaks if _numeric(data.value(r, key))], key):
            xs = sorted({transform(data.value(r, key)) for r in group})
            if len(xs) < 3:
                short.extend(group)
                continue
            tested += 1
            x = [transform(data.value(r, key)) for r in group]
            y = [peaks[r] for r in group]
            rho = _spearman(x, y)
            pairs = ", ".join(f"{data.value(r, key)}→{peaks[r]:.3g}" for _, r in sorted(zip(x, group, strict=True)))
            measured.append(f"ρ({name}, peak λ_1) = {rho:+.2f} over {len(group)} runs ({pairs})")
            if not rho <= -cfg.min_rho:
                failing.extend(group)
    if tested == 0:
        return Outcome(NO_DATA, measured, "no group of ≥ 3 runs differing only in η or only in S"
                       + (f" (runs: {', '.join(sorted(set(short)))})" if short else ""))
    return _verdict(measured, failing, [], "")


def steered(data: Data, runs: Sequence[str], cfg: ClaimsConfig) -> Outcome:
    """Claim 3: after the early phase, no mini-batch run has η·λ_1/2 above far_above, and the run(s)
    at the largest η have a median η·λ_1/2 of at least near_low."""
    stats: dict[str, tuple[float, float, float]] = {}
    short = []
    for run in runs:
        eta, bs = data.value(run, "lr"), data.value(run, "batch_size")
        if bs == "full" or not _numeric(eta):
            continue
        c = _lambda_curve(data, run)
        if len(c) == 0:
            short.append(run)
            continue
        late = c[c["epoch"] >= cfg.skip_fraction * float(c["epoch"].max())]
        ratio = float(eta) * late["lam"].to_numpy() / 2
        stats[run] = (float(eta), float(ratio.max()), float(np.median(ratio)))
    if not stats:
        return Outcome(NO_DATA, [], "no mini-batch run with a spectrum"
                       + (f" (missing: {', '.join(short)})" if short else ""))
    top_eta = max(s[0] for s in stats.values())
    measured, failing = [], []
    for run, (eta, peak, med) in stats.items():
        measured.append(f"{_label(data, run)}: η·λ_1/2 peak {peak:.2f}, median {med:.2f}")
        if peak > cfg.far_above or (eta == top_eta and med < cfg.near_low):
            failing.append(run)
    return _verdict(measured, failing, short, "no spectrum")


def aligned(data: Data, runs: Sequence[str], cfg: ClaimsConfig) -> Outcome:
    """Claim 4: per run, the mean |cos(g, e_i)| of mini-batch gradients over i ≤ alignment_top and
    all checkpoints, divided by the mean |cos| with random directions, is at least alignment_factor."""
    measured, failing, short = [], [], []
    for run in runs:
        al = data.rows("alignment", run)
        if len(al) == 0:
            short.append(run)
            continue
        al = al[(al["source"] == "minibatch") & (al["status"] != "diverged")]
        eig = al[(al["kind"] == "eigen") & (al["rank"] <= cfg.alignment_top)]["abs_cos"].to_numpy(float)
        rnd = al[al["kind"] == "random"]["abs_cos"].to_numpy(float)
        eig, rnd = eig[np.isfinite(eig)], rnd[np.isfinite(rnd)]
        if len(eig) == 0 or len(rnd) == 0 or rnd.mean() <= 0:
            short.append(run)
            continue
        mult = float(eig.mean() / rnd.mean())
        measured.append(f"{_label(data, run)}: {eig.mean():.3g} vs random {rnd.mean():.3g} = {mult:.1f}×")
        if mult < cfg.alignment_factor:
            failing.append(run)
    return _verdict(measured, failing, short, "no alignment rows")


def overshoot(data: Data, runs: Sequence[str], cfg: ClaimsConfig) -> Outcome:
    """Claim 5: over the e_1 rows at multiplier 1 of every run, the fraction that raised the loss is
    at least overshoot_gap larger where η·λ_1/2 > 1 than where it is < 1."""
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
    measured = [f"η·λ_1/2 > 1: {int((above['rel_change_pct'] > 0).sum())} of {len(above)} steps raised the loss; "
                f"< 1: {int((below['rel_change_pct'] > 0).sum())} of {len(below)} (runs: {', '.join(present)})"]
    if len(above) < cfg.min_points or len(below) < cfg.min_points:
        return Outcome(NO_DATA, measured, f"fewer than {cfg.min_points} points on one side of η·λ_1/2 = 1")
    gap = float((above["rel_change_pct"] > 0).mean() - (below["rel_change_pct"] > 0).mean())
    measured.append(f"difference in the fraction raising the loss: {gap:+.2f} (threshold {cfg.overshoot_gap:g})")
    return Outcome(HOLDS if gap >= cfg.overshoot_gap else FAILS, measured)


def nsgd_sharpness(data: Data, runs: Sequence[str], cfg: ClaimsConfig) -> Outcome:
    """Claim 6: mean λ_max at best validation is above γ = 1's for every γ < 1 and below it for every
    γ > 1, each by more than the seed spread."""
    return _versus_gamma_one(data, runs, cfg, "lmax_best", "λ_max at best validation",
                             lambda g, diff, spread: diff > spread if g < 1 else -diff > spread)


def nsgd_generalisation(data: Data, runs: Sequence[str], cfg: ClaimsConfig) -> Outcome:
    """Claim 7: for every γ < 1, mean test accuracy at best validation is not below γ = 1's by more
    than the seed spread."""
    return _versus_gamma_one(data, runs, cfg, "test_acc_best_pct", "test accuracy (%) at best validation",
                             lambda g, diff, spread: diff >= -spread, only_below_one=True)


def _at_edge(data: Data, runs: Sequence[str], cfg: ClaimsConfig,
             curve: Callable[[str], tuple[np.ndarray, np.ndarray] | None], what: str) -> Outcome:
    """Claims 8 and 10: per run, the ratio curve (steps, ratio to the threshold) must reach
    1/edge_tolerance; from then on (and over the second half) its median must lie within
    [1/edge_tolerance, edge_tolerance]. Runs that never reach it are named and left out; with none
    reaching it, not enough data."""
    lo, hi = 1 / cfg.edge_tolerance, cfg.edge_tolerance
    measured, failing, short, unreached = [], [], [], []
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
        sel = x >= max(float(x[hit[0]]), float(x.max()) / 2)
        med = float(np.median(y[sel]))
        measured.append(f"{_label(data, run)}: reached at step {x[hit[0]]:g}; median {what} {med:.2f} over "
                        f"{int(sel.sum())} checkpoints")
        if not lo <= med <= hi:
            failing.append(run)
    if unreached and len(unreached) + len(short) == len(runs):
        return Outcome(NO_DATA, measured, f"no run reached the edge: {', '.join(unreached)}"
                       + (f"; too few checkpoints: {', '.join(short)}" if short else ""))
    out = _verdict(measured, failing, short, "fewer than 3 finite checkpoints")
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
    the band, and the median η·λ_1/2 is below it."""
    lo, hi = 1 / cfg.edge_tolerance, cfg.edge_tolerance
    measured, failing, short = [], [], []
    for run in runs:
        if data.value(run, "batch_size") == "full" or adaptive(data, run):
            continue
        d = data.rows("batch_sharpness", run)
        d = d[d["status"] != "diverged"].sort_values("step") if len(d) else d
        if len(d) < 3:
            short.append(run)
            continue
        bs = second_half_median(d["step"], d["ratio"])
        lam = second_half_median(d["step"], d["lambda1_ratio"])
        measured.append(f"{_label(data, run)}: median η·BS/2 {bs:.2f}, η·λ_1/2 {lam:.2f}")
        if not (lo <= bs <= hi and lam < bs):
            failing.append(run)
    return _verdict(measured, failing, short, "fewer than 3 checkpoints")


def tiny_subspace(data: Data, runs: Sequence[str], cfg: ClaimsConfig) -> Outcome:
    """Claim 11: per run, the median (second half) share of ‖g‖² in the top-C eigenspace is at least
    subspace_share and the median top-C overlap of consecutive checkpoints at least subspace_overlap.
    A run whose spectrum has fewer than C eigenvectors is left out (K ≥ C is needed)."""
    measured, failing, short = [], [], []
    for run in runs:
        d = data.rows("subspace", run)
        if len(d) == 0 or int(d["k"].max()) < cfg.classes:
            short.append(run)
            continue
        d = d[(d["k"] == cfg.classes) & (d["status"] != "diverged")].sort_values("step")
        share = second_half_median(d["step"], d["fraction"])
        overlap = second_half_median(d["step"], d["overlap"])
        measured.append(f"{_label(data, run)}: top-{cfg.classes} share {share:.2f}, overlap {overlap:.2f}")
        if not (share >= cfg.subspace_share and overlap >= cfg.subspace_overlap):
            failing.append(run)
    return _verdict(measured, failing, short, f"fewer than {cfg.classes} eigenvectors or no rows")


CHECKS: dict[str, Callable[[Data, Sequence[str], ClaimsConfig], Outcome]] = {
    "peak_early": peak_early, "lower_peak": lower_peak, "steered": steered, "aligned": aligned,
    "overshoot": overshoot, "nsgd_sharpness": nsgd_sharpness, "nsgd_generalisation": nsgd_generalisation,
    "edge_of_stability": edge_of_stability, "batch_edge": batch_edge, "adam_edge": adam_edge,
    "tiny_subspace": tiny_subspace,
}


# ------------------------------------------------------------------------------------ helpers
def _verdict(measured: list[str], failing: list[str], short: list[str], why_short: str) -> Outcome:
    if not measured:
        return Outcome(NO_DATA, measured, f"{why_short}: {', '.join(short)}" if short else "no runs")
    note = f"left out ({why_short}): {', '.join(short)}" if short else ""
    if failing:
        return Outcome(FAILS, measured, "; ".join(x for x in (f"fails for {', '.join(failing)}", note) if x))
    return Outcome(HOLDS, measured, note)


def _numeric(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))


def _groups_varying_only(data: Data, runs: list[str], key: str) -> list[list[str]]:
    """The runs grouped by every sweep setting but ``key`` (and the seed, averaged over by ranks)."""
    others = [k for k in ("lr", "batch_size", "momentum", "optimizer", "gamma", "k", "study") if k != key]
    groups: dict[tuple, list[str]] = {}
    for r in runs:
        groups.setdefault(tuple(repr(data.value(r, k)) for k in others), []).append(r)
    return list(groups.values())


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ (average ranks for ties)."""
    rx = pd.Series(list(x)).rank().to_numpy()
    ry = pd.Series(list(y)).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def _versus_gamma_one(data: Data, runs: Sequence[str], cfg: ClaimsConfig, key: str, what: str,
                      ok: Callable[[float, float, float], bool], only_below_one: bool = False) -> Outcome:

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
    measured, failing, short = [], [], []
    for (gamma, k), vals in sorted(by_group.items(), key=lambda kv: (repr(kv[0][1]), kv[0][0])):
        if gamma == 1.0 or (only_below_one and gamma > 1):
            continue
        ref = by_group.get((1.0, k))
        if ref is None:
            short.append(f"γ=1 (K={k})")
            continue
        m, s, n = mean_std(vals)
        m1, s1, n1 = mean_std(ref)
        if n < 2 or n1 < 2:
            short.append(f"γ={gamma:g} and γ=1 with ≥ 2 seeds each (have {n} and {n1}: "
                         f"{', '.join(names[(gamma, k)] + names[(1.0, k)])})")
            continue
        spread = cfg.spread_factor * (s + s1)
        diff = m - m1
        measured.append(f"γ={gamma:g}: {what} {_fmt(m)} ± {_fmt(s)} vs γ=1 {_fmt(m1)} ± {_fmt(s1)} "
                        f"(difference {diff:+.3g}, spread {spread:.3g})")
        if not ok(gamma, diff, spread):
            failing.append(f"γ={gamma:g}")
    if not measured:
        return Outcome(NO_DATA, measured, "need " + "; ".join(short) if short else "no γ ≠ 1 to compare")
    return _verdict(measured, failing, short, "missing")


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
            have = [r for r in runs if all(len(data.rows(t, r)) for t in required)]
            missing = [r for r in runs if r not in have]
            out = CHECKS[claim.check](data, have, cfg) if have else Outcome(NO_DATA)
            if missing:
                note = f"missing tables ({', '.join(required)}) for: {', '.join(missing)}"
                out.reason = "; ".join(x for x in (out.reason, note) if x)
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
             "before any run was seen, of 8-11 from the papers' wording after exploratory runs): "
             + ", ".join(f"{k}={v}" for k, v in cfg.model_dump().items() if k != "enabled") + ".",
             "A difference inside the seed spread is not a difference; 'not enough data' names what is missing."]
    write(Table(columns, rows, notes), Path(out_md), Path(out_tex), Path(out_csv))
    return rows


__all__ = ["CHECKS", "FAILS", "HOLDS", "NO_DATA", "Outcome", "evaluate", "make_claims"]
