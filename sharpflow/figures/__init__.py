"""Figures: one module per figure kind, each reading only the aggregated Parquet tables it plots.

This package is imported by the Snakefile, so its top level stays light: no matplotlib, pandas or
torch here. :func:`draw` imports the plotting module of the requested kind only when called.

Figure kinds (module, tables read):

- ``evolution`` (evolution.py; metrics, spectrum): top-K eigenvalues vs step with an early-phase
  zoom and train/test accuracy, one row of panels per run (paper Fig. 1 right / Fig. 2).
- ``grid`` (grid.py; spectrum): λ1 and λ2 on a log scale vs epoch per run, coloured by the swept
  η or S, with the 2/η stability line and the early phase shaded (paper Fig. 4).
- ``fullbatch`` (fullbatch.py; metrics, spectrum): spectrum and accuracy of full-batch runs,
  divergence marked (paper Fig. 3).
- ``alignment`` (alignment.py; alignment, metrics): mean |cos(g, e_i)|, i ≤ 5, vs training
  accuracy and vs epoch, with the random-direction baseline (paper Fig. 5).
- ``cross_sections`` (cross_sections.py; cross_sections): loss along e1, e3, e5 and a random
  direction vs k (in projected SGD steps), coloured by epoch.
- ``decomposed`` (decomposed.py; decomposed): relative loss change of the step projected on single
  directions, with η'·λ_i/2 beside it.
- ``escape`` (escape.py; escape): loss and λ_max vs iteration per ablation mode.
- ``nsgd`` (nsgd.py; metrics, spectrum): λ_max and validation accuracy per γ (or per K for a
  K-ablation), mean over seeds with a min/max band, SGD baselines dashed.
- ``density`` (density.py; density, spectrum): the SLQ spectral density at a few checkpoints,
  one curve per run, with the top-k eigenvalues marked.
- ``precond`` (precond.py; precond): Adam's preconditioned sharpness λ_1(P^{-1}H) vs epoch with
  its threshold (2 + 2β₁)/(η(1 − β₁)).
- ``eos`` (eos.py; metrics, spectrum, and selfstab where a run has it): η·λ_1/2 of full-batch runs
  vs step with the line at 1 and each run's second-half median, the training loss (Cohen et al.
  2021), and Damian et al.'s (2023) α and β where runs have the selfstab table (with η times the
  curvature along the last update, dotted, beside η·λ_1/2).
- ``batch_sharpness`` (batch_sharpness.py; batch_sharpness): η·BS/2 and η·λ_1/2 vs epoch, one
  panel per study (Andreyev & Beneventano 2024).
- ``subspace`` (subspace.py; subspace): the gradient's share in the top-k eigenspace vs k and vs
  epoch, and the overlap of consecutive checkpoints' top-k eigenspaces (Gur-Ari et al. 2018).
- ``warmup`` (warmup.py; metrics, spectrum, and precond where a run has it): η(t)·λ_1/2 and
  η(t)·λ_1(P^{-1}H) against their thresholds vs step per warmup length, with the training loss and
  η(t)/η (Kalra & Barkeshli 2024).
- ``blocks`` (blocks.py; blocks): a heatmap of parameter block × checkpoint of each block's top
  Hessian eigenvalue, one panel per run (Zhang et al. 2024).
- ``sharpness`` (sharpness.py; sharpness, spectrum): worst-case sharpness beside ρ²λ_1/2,
  average-case sharpness and the PAC-Bayes σ′ over training (Foret et al. 2021; Jiang et al. 2019).
- ``gap`` (gap.py; metrics, spectrum, and sharpness where a run has it): λ_max, worst-case and
  average-case sharpness and 1/σ′² at each run's last checkpoint against its train − test accuracy
  gap, Kendall's τ per panel (claim 13; Jiang et al. 2019; Andriushchenko et al. 2023).

Inputs are paths ``…/runs/{run}/{table}.parquet``: the run id is the parent directory's name and
the table kind the file stem. A figure with nothing to plot says "no data" instead of failing;
diverged runs are drawn up to their divergence and marked with a × and "(diverged)".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..kinds import Kinds

#: figure kind -> the table kinds (file stems) it reads.
KINDS: dict[str, tuple[str, ...]] = {
    "evolution": ("metrics", "spectrum"),
    "grid": ("spectrum",),
    "fullbatch": ("metrics", "spectrum"),
    "alignment": ("alignment", "metrics"),
    "cross_sections": ("cross_sections",),
    "decomposed": ("decomposed",),
    "escape": ("escape",),
    "nsgd": ("metrics", "spectrum"),
    "density": ("density", "spectrum"),
    "precond": ("precond",),
    "eos": ("metrics", "spectrum", "selfstab"),
    "batch_sharpness": ("batch_sharpness",),
    "subspace": ("subspace",),
    "warmup": ("metrics", "spectrum", "precond"),
    "blocks": ("blocks",),
    "sharpness": ("sharpness", "spectrum"),
    "gap": ("metrics", "spectrum", "sharpness"),
}

#: The registry: what each kind reads, its module (a Snakemake input, so that editing one module
#: reruns only the figures of that kind), the modules every figure uses, its report caption.
REGISTRY = Kinds(
    package=__name__,
    what="figure",
    reads=KINDS,
    modules={kind: f"{kind}.py" for kind in KINDS},
    shared=("../results.py", "style.py"),
    captions={kind: f"workflow/report/{kind}.rst" for kind in KINDS},
    optional={"warmup": frozenset({"precond"}), "eos": frozenset({"selfstab"}), "gap": frozenset({"sharpness"})},
)


def draw(kind: str, spec: dict[str, Any], inputs: list[Path], out_pdf: Path, out_png: Path) -> None:
    """Draw one figure from its aggregated tables and write PDF and PNG atomically.

    Args:
        kind: a key of :data:`KINDS` (or a figure name, when ``spec["kind"]`` gives the kind).
        spec: {"kind", "studies": [...], "style": {...}, "runs": {run_id: {"study", "lr",
            "batch_size", "momentum", "optimizer", "gamma", "seed", "k"}}}. ``style`` options are
            free; common ones: ``dpi`` (PNG, default 200), ``width`` (inches), ``max_runs``,
            ``title``; per-kind options are documented in each module.
        inputs: Parquet files ``…/runs/{run}/{table}.parquet`` (tables from ``KINDS[kind]``).
        out_pdf, out_png: where the figure goes; both are replaced atomically.
    """
    from .. import results
    from . import style

    kind = REGISTRY.resolve(kind, spec)
    module = REGISTRY.module(kind)
    opts = dict(spec.get("style") or {})
    data = results.load(inputs, KINDS[kind], spec)
    with style.context():
        fig = module.plot(data, opts) if not data.empty else style.no_data(kind, "no data: empty inputs")
        style.save(fig, Path(out_pdf), Path(out_png), dpi=float(opts.get("dpi", style.DPI)))
