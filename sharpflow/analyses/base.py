"""The registry's base type: an :class:`Analysis` entry and the ``select`` functions entries use.

Kept apart from :mod:`sharpflow.analyses` (the registry itself) so that the analysis modules can
import it at their top while the registry imports them at its top: no import circle. Imports no
torch or pandas (the Snakefile loads it).
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
    compute: Callable[[CheckpointContext, Any], dict[str, pd.DataFrame]]
    #: (its config section, run id, the run's checkpoint steps) -> the steps it runs at.
    select: Callable[[Any, str, Sequence[int]], list[int]]
    #: the table kinds it writes; by default one, named after the analysis.
    tables: tuple[str, ...] = ()
    format_version: int = 1
    summary: str = ""
    #: optional config check: (its section, run id -> checkpoint steps, analysed run ids); raises
    #: ValueError naming the field.
    check: Callable[[Any, dict[str, list[int]], set[str]], None] | None = None
    #: it reads the eigenvectors of the checkpoint before (``CheckpointContext.previous_eigvecs``),
    #: so its results also depend on them (part of its stash key).
    previous: bool = False
    #: it also runs inside an analysis job of several processes (``resources.spectrum.world_size`` > 1): its
    #: operators come from :meth:`CheckpointContext.hessian` (or the distributed constructors), so every rank
    #: computes the same result in lockstep on its shard of the Hessian subset; rank 0 writes it.
    distributed: bool = False

    def __post_init__(self) -> None:
        if not self.tables:
            object.__setattr__(self, "tables", (self.name,))

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
    always including the last (only the last where its config has ``last_only`` set)."""
    if not getattr(cfg, "enabled", True) or not steps:
        return []
    if getattr(cfg, "last_only", False):
        return [steps[-1]]
    chosen = list(steps[:: cfg.stride])
    return chosen if chosen[-1] == steps[-1] else [*chosen, steps[-1]]
