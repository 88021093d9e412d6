"""The registry shared by figures and tables: kind -> the tables it reads, its module, its caption.

:mod:`sharpflow.figures` and :mod:`sharpflow.tables` each hold one :class:`Kinds`. The workflow
derives from it which aggregated tables a figure or table rule reads and which source files are
its code inputs (editing a plotting module reruns only the figures of that kind). Light: no
pandas, matplotlib or torch, because the Snakefile imports it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import SharpflowError

#: Tables a figure or table reads where a run has them, without requiring them of every run:
#: ``spectrum_best`` exists only for runs with ``checkpoints.best``.
OPTIONAL_TABLES = frozenset({"spectrum_best"})


@dataclass(frozen=True)
class Kinds:
    """One package of presentation kinds (``figures`` or ``tables``)."""

    package: str  # "sharpflow.figures"
    what: str  # "figure" | "table", for messages
    reads: dict[str, tuple[str, ...]]  # kind -> the table kinds (file stems) it reads
    modules: dict[str, str]  # kind -> its module's file name in the package directory
    shared: tuple[str, ...]  # modules every kind uses, relative to the package directory
    captions: dict[str, str]  # kind -> its report caption, relative to the repository root
    #: kind -> tables of ``reads`` it uses where a run has them (an analysis switched on for some
    #: studies only), beside the global :data:`OPTIONAL_TABLES`.
    optional: dict[str, frozenset[str]] = field(default_factory=dict)

    def optional_for(self, kind: str) -> frozenset[str]:
        """The tables ``kind`` reads only where a run has them."""
        return OPTIONAL_TABLES | self.optional.get(kind, frozenset())

    @property
    def directory(self) -> Path:
        return Path(importlib.import_module(self.package).__file__ or "").resolve().parent

    def code_files(self, kind: str) -> list[Path]:
        """The source files whose edits should redraw items of ``kind`` (absolute, normalised)."""
        d = self.directory
        return [(d / self.modules[kind]).resolve(), *((d / m).resolve() for m in self.shared)]

    def resolve(self, kind: str, spec: dict[str, Any]) -> str:
        """``kind`` if it is one, else ``spec["kind"]`` (an item's name is allowed as ``kind`` when
        the spec names the kind). Raises SharpflowError otherwise."""
        declared = spec.get("kind")
        if kind in self.reads:
            if declared not in (None, kind):
                raise SharpflowError(f"{self.what} {kind!r}: the spec says kind {declared!r}")
            return kind
        if declared in self.reads:
            return str(declared)
        raise SharpflowError(f"unknown {self.what} kind {declared or kind!r}; known: {', '.join(self.reads)}")

    def module(self, kind: str) -> ModuleType:
        return importlib.import_module(f"{self.package}.{self.modules[kind].removesuffix('.py')}")


__all__ = ["OPTIONAL_TABLES", "Kinds"]
