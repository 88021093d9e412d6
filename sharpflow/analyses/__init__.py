"""Per-checkpoint analyses, each declared once in :data:`REGISTRY`.

Every checkpoint of an analysed run gets its top-k Hessian eigenpairs (:mod:`.spectrum`, the
base every analysis builds on). An *analysis* then computes tables from one checkpoint and its
eigenvectors. It is one module holding:

- its config section (a pydantic model; the top-level config key and the study override key are
  the analysis's name, its resources section too);
- ``compute(ctx, cfg) -> {table kind: DataFrame}``, given a :class:`~.context.CheckpointContext`
  (the run, its data, the restored model, the eigenvectors);
- its :class:`~.base.Analysis` entry: name, config, table kinds (by default one, named after the
  analysis), which checkpoints it runs at, and a result-format version (bumped when its results
  change meaning; part of the rule's params).

From the registry the rest is derived: the config fields and the JSON schema
(:mod:`sharpflow.study`), the ``sharpflow <analysis>`` command (:mod:`sharpflow.cli`), the
outputs of the Snakemake analysis jobs and their aggregate rules (``workflow/rules``), and the
resources section. Adding an analysis: write the module, add its entry to :data:`REGISTRY`, a
figure module that plots its tables and a report caption.

Layout of the results: ``runs/{run}/{name}/step{step:08d}.parquet`` for an analysis with one
table of its own name, else ``runs/{run}/{name}/{kind}/step{step:08d}.parquet``; aggregated per
run into ``runs/{run}/{kind}.parquet``.

This package's top level imports no torch or pandas (the Snakefile loads it): the analysis modules
import torch, and the kernels and context they compute with, inside ``compute``.
"""

from __future__ import annotations

from . import batch_sharpness, blocks, density, escape, ggn, precond, project, selfstab, sharpness, subspace
from .base import Analysis, every_checkpoint, strided

#: name -> analysis, in the order a checkpoint's analyses run.
REGISTRY: dict[str, Analysis] = {
    a.name: a
    for a in (project.ANALYSIS, escape.ANALYSIS, density.ANALYSIS, ggn.ANALYSIS, precond.ANALYSIS,
              batch_sharpness.ANALYSIS, subspace.ANALYSIS, sharpness.ANALYSIS, blocks.ANALYSIS, selfstab.ANALYSIS)
}

#: every table kind an analysis writes -> the analysis that writes it.
TABLE_OWNERS: dict[str, str] = {kind: a.name for a in REGISTRY.values() for kind in a.tables}


def distributed_names() -> str:
    """"the spectrum, density and ggn": what an analysis job of several processes computes (the spectrum
    and the analyses marked ``distributed``)."""
    names = ["the spectrum", *(name for name, a in REGISTRY.items() if a.distributed)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

__all__ = ["REGISTRY", "TABLE_OWNERS", "Analysis", "distributed_names", "every_checkpoint", "strided"]
