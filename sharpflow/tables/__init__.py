"""Tables: Markdown, LaTeX (booktabs) and CSV summaries of a study's runs.

Imported by the Snakefile, so its top level stays light (no pandas, matplotlib or torch); the
module of a table kind is imported only by :func:`make_table`.

Table kinds (module, tables read):

- ``nsgd`` (nsgd.py; metrics, spectrum, and spectrum_best where a run keeps its best checkpoint):
  one row per NSGD γ (per (γ, K) when K varies too) and per
  SGD baseline η, mean ± std over seeds of ‖H‖_F and λ_max at the best-validation and the last
  checkpoint, test accuracy at the best-validation checkpoint, validation accuracy at an early
  epoch, final training loss and distance from the initialisation.
- ``nsgd_k`` (nsgd.py; the same tables): the same columns for a K-ablation, one row per K
  (and γ when it varies), then the SGD baselines.
- ``peak`` (peak.py; spectrum): per run (η, S), the peak of λ_max, the step and epoch at which it
  peaks, η·λ_max/2 there, and the final λ_max.
- ``edge`` (edge.py; spectrum, and batch_sharpness, precond, subspace where a run has them): per
  run, second-half medians of η·λ_1/2, η·BS/2, Adam's λ_1(P^{-1}H) over its threshold, and the
  gradient's share in and the overlap of the top-C eigenspace.

Inputs are ``…/runs/{run}/{table}.parquet`` (run = directory name, table = file stem).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..kinds import Kinds

#: table kind -> the table kinds (file stems) it reads.
KINDS: dict[str, tuple[str, ...]] = {
    "nsgd": ("metrics", "spectrum", "spectrum_best"),
    "nsgd_k": ("metrics", "spectrum", "spectrum_best"),
    "peak": ("spectrum",),
    "edge": ("spectrum", "batch_sharpness", "precond", "subspace"),
}

#: The registry (see :class:`sharpflow.kinds.Kinds`). Captions have a "table_" prefix: the figure
#: kind ``nsgd`` has its own caption ``nsgd.rst``.
REGISTRY = Kinds(
    package=__name__,
    what="table",
    reads=KINDS,
    modules={"nsgd": "nsgd.py", "nsgd_k": "nsgd.py", "peak": "peak.py", "edge": "edge.py"},
    shared=("_common.py", "../results.py"),
    captions={kind: f"workflow/report/table_{kind}.rst" for kind in KINDS},
    optional={"edge": frozenset({"batch_sharpness", "precond", "subspace"})},
)


def make_table(kind: str, spec: dict[str, Any], inputs: list[Path], out_md: Path, out_tex: Path,
               out_csv: Path) -> None:
    """Build one table from its aggregated inputs and write Markdown, LaTeX and CSV atomically.

    Args:
        kind: a key of :data:`KINDS` (or a table name, when ``spec["kind"]`` gives the kind).
        spec: {"kind", "studies", "style": {...}, "runs": {run_id: {"study", "lr", "batch_size",
            "momentum", "optimizer", "gamma", "seed", "k"}}}; style options per kind are
            documented in its module.
        inputs: ``…/runs/{run}/{table}.parquet`` files of the tables in ``KINDS[kind]``.
    """
    from ..results import load
    from ._common import write

    kind = REGISTRY.resolve(kind, spec)
    data = load(inputs, KINDS[kind], spec)
    table = REGISTRY.module(kind).build(kind, data, dict(spec.get("style") or {}))
    write(table, Path(out_md), Path(out_tex), Path(out_csv))
