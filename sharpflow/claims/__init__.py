"""Claims: each published finding, declared once, turned into a verdict on the user's own runs.

A :class:`Claim` names the statement, the paper it comes from, the statistic that tests it, the
presentation kind whose config items give its runs (the studies of every figure or table of that
kind) and link its figures, and the per-run tables it reads. The ``claims`` stage
(``sharpflow claims``, rule ``claims``) evaluates every declared claim on those runs
(:mod:`.checks`) and writes ``tables/claims.{md,csv,tex}``: the statistic with its 95 % interval
(:mod:`.intervals`), the verdict by the interval ("holds", "does not hold", "inconclusive" with the
units a clear verdict would need, "not enough data" naming what is missing) and the evidence.

Thresholds are fields of :class:`ClaimsConfig` (the ``claims`` config section) with documented
defaults: those of claims 1-7 fixed before any run was looked at, claim 13's before its runs'
generalisation gaps were, those of 8-11 from the papers'
wording after exploratory runs; ``accuracy_margin_pct`` (claim 7's non-inferiority margin, which
replaced the seed-spread rule when verdicts became intervals) before the seeded runs were seen. A
study must never tune them until a claim holds.
Adding a claim: one :class:`Claim` entry in :data:`CLAIMS` and its function in :mod:`.checks`.

Light: no pandas or torch here (the Snakefile imports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt

from ..configbase import Strict


class ClaimsConfig(Strict):
    """The claims stage: each published claim checked on the study's runs, with these thresholds."""

    enabled: bool = Field(True, description="Write tables/claims.{md,csv,tex} (and its report section).")
    early_fraction: float = Field(
        0.5, gt=0, le=1, description="Claim 1: λ_1 must peak, or come within plateau_ratio of its peak, "
        "in this first fraction of training.")
    plateau_ratio: float = Field(0.9, gt=0, le=1, description="Claim 1: 'at its plateau' = at least this × the peak.")
    min_rho: float = Field(
        0.8, gt=0, le=1, description="Claim 2: Spearman ρ between η (or 1/S) and the peak λ_1 must be ≤ −min_rho.")
    skip_fraction: float = Field(
        0.1, ge=0, lt=1, description="Claim 3: the early phase left out, as a fraction of training.")
    far_above: PositiveFloat = Field(
        2.0, description="Claim 3: 'far above' the stability threshold: η·λ_1/2 above this after the early phase.")
    near_low: PositiveFloat = Field(
        0.5, description="Claim 3: at the largest η, the median η·λ_1/2 after the early phase must be at least this.")
    alignment_top: PositiveInt = Field(5, description="Claim 4: the top directions e_1..e_top averaged over.")
    alignment_factor: PositiveFloat = Field(
        3.0, description="Claim 4: mean |cos(g, e_i)| must be at least this multiple of the random baseline.")
    overshoot_gap: float = Field(
        0.5, gt=0, le=1, description="Claim 5: the fraction of e_1 steps that raise the loss must be this much "
        "larger where η·λ_1/2 > 1 than where it is < 1.")
    min_points: PositiveInt = Field(5, description="Claim 5: checkpoint×gradient points needed on each side of 1.")
    accuracy_margin_pct: NonNegativeFloat = Field(
        1.0, description="Claims 7 and 12: 'generalises no worse' = the difference of mean test accuracy from γ = 1's "
        "(Welch interval over seeds) lies above −this, in percentage points (set with the intervals, before the "
        "seeded runs were seen).")
    edge_tolerance: float = Field(
        1.25, gt=1, description="Claims 8-10: 'at the edge' = a median ratio (η·λ_1/2, η·BS/2, λ_1(P⁻¹H) over "
        "Adam's threshold) within [1/edge_tolerance, edge_tolerance]; 'reached' = the ratio at or above "
        "1/edge_tolerance once.")
    subspace_share: float = Field(
        0.5, gt=0, le=1, description="Claim 11: 'mostly in the top-C eigenspace' = the gradient's median share "
        "over the second half at least this.")
    subspace_overlap: float = Field(
        0.5, gt=0, le=1, description="Claim 11: 'changes slowly' = the median top-C overlap of consecutive "
        "checkpoints over the second half at least this.")
    classes: PositiveInt = Field(10, description="Claim 11: C, the number of classes (MNIST-1D, CIFAR-10: 10).")
    weak_tau: float = Field(
        0.5, gt=-1, lt=1, description="Claim 13: 'ranks the generalisation gap only weakly or inversely' = Kendall τ "
        "between a non-adaptive sharpness measure and the train − test accuracy gap over the runs below this (set "
        "with the claim, before its runs' gaps were looked at).")


@dataclass(frozen=True)
class Claim:
    """One published claim and how the runs test it."""

    number: int
    statement: str
    paper: str
    statistic: str
    kind: str  # the figure/table kind whose config items give the runs (their studies) and the figures
    reads: tuple[str, ...]  # the per-run tables it needs
    check: str  # the function in .checks


SEED = "Jastrzębski et al. 2019"
EOS = "Cohen et al. 2021"
ESS = "Andreyev & Beneventano 2024"
ADAM = "Cohen et al. 2022"
TINY = "Gur-Ari et al. 2018"
SAM = "Foret et al. 2021"
RANK = "Jiang et al. 2019; Andriushchenko et al. 2023"

#: The claims, in the order the table lists them.
CLAIMS: tuple[Claim, ...] = (
    Claim(1, "λ_1 peaks early in training, then falls or plateaus", SEED,
          "per grid: mean over runs of the fraction of training by which λ_1 is within plateau_ratio of its "
          "peak (t interval over runs)", "grid", ("spectrum",), "peak_early"),
    Claim(2, "a larger η or a smaller S gives a lower peak λ_1", SEED,
          "Spearman ρ between η (and 1/S) and the seed-mean peak λ_1 over each grid (t bootstrap over seeds)", "grid",
          ("spectrum",), "lower_peak"),
    Claim(3, "SGD is steered to where η·λ_1/2 ≈ 1, never far above", SEED,
          "per mini-batch run: peak (observed maximum; t interval over seeds) and median η·λ_1/2 after "
          "the early phase (order-statistic interval; t over seeds)", "grid", ("spectrum",),
          "steered"),
    Claim(4, "mini-batch gradients align with the top Hessian eigenvectors", SEED,
          "per run: mean |cos(g, e_i)|, i ≤ top, as a multiple of the random baseline (delta-method "
          "interval; t over seeds)", "alignment",
          ("alignment",), "aligned"),
    Claim(5, "the SGD step along e_1 overshoots (raises the loss) when η·λ_1/2 > 1", SEED,
          "fraction of e_1 steps (multiplier 1) that raise the loss, where η·λ_1/2 > 1 vs < 1 "
          "(difference, Newcombe interval)", "decomposed",
          ("decomposed",), "overshoot"),
    Claim(6, "Nudged-SGD with γ < 1 ends sharper, with γ > 1 flatter", SEED,
          "λ_max at best validation per γ minus γ = 1's (Welch interval over seeds)", "nsgd",
          ("metrics", "spectrum", "spectrum_best"), "nsgd_sharpness"),
    Claim(7, "Nudged-SGD with γ < 1 generalises no worse than γ = 1", SEED,
          "test accuracy at best validation per γ < 1 minus γ = 1's, above −accuracy_margin_pct "
          "(Welch interval over seeds)", "nsgd",
          ("metrics", "spectrum", "spectrum_best"), "nsgd_generalisation"),
    Claim(8, "full-batch GD: λ_1 rises until η·λ_1/2 ≈ 1, then hovers there", EOS,
          "per full-batch GD run: median η·λ_1/2 over the second half (after the edge is first reached; "
          "order-statistic interval; t over seeds)",
          "eos", ("spectrum",), "edge_of_stability"),
    Claim(9, "mini-batch SGD: batch sharpness settles at 2/η, λ_1 below it", ESS,
          "per mini-batch run: median η·BS/2 and η·λ_1/2 − η·BS/2 over the second half (order-statistic "
          "intervals; t over seeds)", "batch_sharpness",
          ("batch_sharpness",), "batch_edge"),
    Claim(10, "Adam: λ_1(P⁻¹H) settles at (2+2β₁)/(η(1−β₁))", ADAM,
          "per Adam run: median λ_1(P⁻¹H) over its threshold over the second half (after it is first "
          "reached; order-statistic interval; t over seeds)",
          "precond", ("precond",), "adam_edge"),
    Claim(11, "after an early phase the gradient lies mostly in the top-C eigenspace, which changes slowly", TINY,
          "per run: median share of ‖g‖² in the top-C eigenspace and top-C overlap of consecutive checkpoints "
          "over the second half (order-statistic intervals; t over seeds)", "subspace", ("subspace",), "tiny_subspace"),
    Claim(12, "SAM ends flatter than SGD at the same η and generalises no worse", SAM,
          "per ρ: λ_max at the last checkpoint minus SGD's at the same η (< 0), and test accuracy at best "
          "validation minus SGD's (≥ −accuracy_margin_pct); Welch intervals over seeds", "nsgd",
          ("metrics", "spectrum", "spectrum_best"), "sam_flatter"),
    Claim(13, "non-adaptive sharpness measures rank the generalisation gap only weakly, or inversely", RANK,
          "per measure at the last checkpoint (λ_max, worst-case and average-case sharpness, PAC-Bayes 1/σ′²): "
          "Kendall τ-b with the train − test accuracy gap over the runs, below weak_tau (percentile bootstrap over "
          "runs)", "gap", ("metrics", "spectrum", "sharpness"), "sharpness_rank"),
)

#: Every table kind a claim reads.
READS: tuple[str, ...] = tuple(dict.fromkeys(t for c in CLAIMS for t in c.reads))


def code_files() -> list[Path]:
    """The source files whose edits should re-evaluate the claims (absolute)."""
    here = Path(__file__).resolve().parent
    return [here / "__init__.py", here / "checks.py", here / "intervals.py", here.parent / "results.py",
            here.parent / "tables" / "_common.py", here.parent / "tables" / "nsgd.py"]


__all__ = ["CLAIMS", "READS", "Claim", "ClaimsConfig", "code_files"]
