"""Per-checkpoint analyses, each declared once in :data:`REGISTRY`.

Every checkpoint of an analysed run gets its top-k Hessian eigenpairs (:mod:`.spectrum`, the
base every analysis builds on). An *analysis* then computes tables from one checkpoint and its
eigenvectors. It is one module holding:

- its config section (a pydantic model; the top-level config key and the study override key are
  the analysis's name, its resources section too);
- ``compute(ctx, cfg) -> {table kind: DataFrame}``, given a :class:`~.context.CheckpointContext`
  (the run, its data, the restored model, the eigenvectors);
- its :class:`Analysis` entry: name, config, table kinds, which checkpoints it runs at, and a
  result-format version (bumped when its results change meaning; part of the rule's params).

From the registry the rest is derived: the config fields and the JSON schema
(:mod:`sharpflow.config`), the ``sharpflow <analysis>`` command (:mod:`sharpflow.cli`), the
outputs of the Snakemake analysis jobs and their aggregate rules (``workflow/rules``), and the
resources section. Adding an analysis: write the module, add its entry to :data:`REGISTRY`, a
figure module that plots its tables and a report caption.

Layout of the results: ``runs/{run}/{name}/step{step:08d}.parquet`` for an analysis with one
table of its own name, else ``runs/{run}/{name}/{kind}/step{step:08d}.parquet``; aggregated per
run into ``runs/{run}/{kind}.parquet``.

This package's top level imports no torch (the Snakefile loads it); the analysis modules import
torch inside ``compute``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    import pandas as pd

    from .context import CheckpointContext


@dataclass(frozen=True)
class Analysis:
    """One per-checkpoint analysis (see the module docstring)."""

    name: str
    config: type[BaseModel]
    tables: tuple[str, ...]
    compute: Callable[[CheckpointContext, Any], dict[str, pd.DataFrame]]
    #: (its config section, run id, the run's checkpoint steps) -> the steps it runs at.
    select: Callable[[Any, str, Sequence[int]], list[int]]
    format_version: int = 1
    summary: str = ""
    #: optional config check: (its section, run id -> checkpoint steps, analysed run ids); raises
    #: ValueError naming the field.
    check: Callable[[Any, dict[str, list[int]], set[str]], None] | None = None
    #: it reads the eigenvectors of the checkpoint before (``CheckpointContext.previous_eigvecs``),
    #: so its results also depend on them (part of its stash key).
    previous: bool = False

    def relpath(self, kind: str, step: int) -> str:
        """The table ``kind`` of checkpoint ``step``, relative to the analysis's directory."""
        return f"step{step:08d}.parquet" if self.tables == (self.name,) else f"{kind}/step{step:08d}.parquet"

    def path(self, root: str, run: str, kind: str, step: int) -> str:
        """Where the table ``kind`` of checkpoint ``step`` goes (a declared output)."""
        return f"{root}/runs/{run}/{self.name}/{self.relpath(kind, step)}"


def every_checkpoint(cfg: Any, run: str, steps: Sequence[int]) -> list[int]:
    """``select`` for an analysis of every checkpoint, switched by its ``enabled`` field."""
    return list(steps) if getattr(cfg, "enabled", True) else []


def strided(cfg: Any, run: str, steps: Sequence[int]) -> list[int]:
    """``select`` for an analysis switched by ``enabled`` that runs at every ``stride``-th checkpoint,
    always including the last."""
    if not getattr(cfg, "enabled", True) or not steps:
        return []
    chosen = list(steps[:: cfg.stride])
    return chosen if chosen[-1] == steps[-1] else [*chosen, steps[-1]]


def _registry() -> dict[str, Analysis]:
    from . import batch_sharpness, density, escape, ggn, precond, project, subspace

    entries = [project.ANALYSIS, escape.ANALYSIS, density.ANALYSIS, ggn.ANALYSIS, precond.ANALYSIS,
               batch_sharpness.ANALYSIS, subspace.ANALYSIS]
    return {a.name: a for a in entries}


#: name -> analysis, in the order a checkpoint's analyses run.
REGISTRY: dict[str, Analysis] = _registry()

#: every table kind an analysis writes -> the analysis that writes it.
TABLE_OWNERS: dict[str, str] = {kind: a.name for a in REGISTRY.values() for kind in a.tables}

__all__ = ["REGISTRY", "TABLE_OWNERS", "Analysis", "every_checkpoint"]
