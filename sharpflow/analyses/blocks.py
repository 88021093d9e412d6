"""Per-block spectra (Zhang et al. 2024), off by default: how the curvature splits over the model's
parameter blocks (layers; in a transformer, its embeddings, attention and MLP weights).

At a checkpoint, over the spectrum's Hessian (the run's Hessian subset, weight decay, eval mode):

- ``blocks``: for each parameter block b, the certified top eigenvalue of its diagonal block H[b, b]
  (:class:`~sharpflow.hessian.BlockOperator`; a block of at most 8 coordinates is solved densely);
- ``block_energy``: for each of the spectrum's top-k eigenvectors v_i of the full H, the share of
  it in each block, ‖v_i[b]‖² (the shares of a vector over blocks that cover every parameter sum to 1).

Blocks: by default every parameter whose name ends in ``weight`` is a block of its own (biases and
normalisation shifts are left out); ``patterns`` instead names blocks by regular expressions on the
parameter names (``named_parameters()``), each block the union of the parameters it matches.

Tables ``runs/{run}/blocks/blocks/step*.parquet``: ``block``, ``size``, ``eigenvalue``, ``residual``,
``rel_residual``, ``converged``, ``matvecs``, ``seconds``; ``runs/{run}/blocks/block_energy/step*.parquet``:
``block``, ``rank``, ``eigenvalue`` (of the full H), ``energy``; plus run, step, epoch, status.
"""

from __future__ import annotations

import math
import re
import time
from typing import TYPE_CHECKING, Any

from pydantic import Field, PositiveFloat, PositiveInt

from ..configbase import Strict
from ..errors import SharpflowError
from .base import Analysis, strided

if TYPE_CHECKING:
    import pandas as pd

    from .context import CheckpointContext

DENSE_UP_TO = 8  # coordinates: a block this small is solved from its dense matrix


class BlocksConfig(Strict):
    """Each parameter block's top eigenvalue and the top-k eigenvectors' energy per block."""

    enabled: bool = Field(False, description="Compute it (one solve of products of the full H per block).")
    stride: PositiveInt = Field(1, description="Every stride-th checkpoint, plus the last.")
    patterns: list[str] = Field(default_factory=list, description="Regular expressions on parameter names, one "
                                "block each (empty: every '*weight' parameter its own block).")
    tol: PositiveFloat = Field(1e-3, description="Relative residual each block's top pair must reach.")
    max_matvecs: PositiveInt = Field(300, description="Products per block's solve.")
    n: PositiveInt | None = Field(None, description="Hessian examples (None: the dataset's hessian_subset).")


def parameter_blocks(names_sizes: list[tuple[str, int]], patterns: list[str]) -> dict[str, list[int]]:
    """Block name -> its flat coordinates, from the parameters' (name, numel) in flat order."""
    offsets, start = {}, 0
    for name, size in names_sizes:
        offsets[name] = range(start, start + size)
        start += size
    if not patterns:
        return {n: list(r) for n, r in offsets.items() if n.endswith("weight")}
    blocks = {}
    for pat in patterns:
        rx = re.compile(pat)
        idx = [i for n, r in offsets.items() if rx.search(n) for i in r]
        if not idx:
            raise SharpflowError(f"blocks.patterns: {pat!r} matches no parameter (they are: {', '.join(offsets)})")
        blocks[pat] = idx
    return blocks


def compute(ctx: CheckpointContext, cfg: BlocksConfig) -> dict[str, pd.DataFrame]:
    import pandas as pd
    import torch

    from ..hessian import BlockOperator, top_eigenpairs
    from ..params import trainable
    from .context import add_ident, finite

    model = ctx.model()
    blocks = parameter_blocks([(n, p.numel()) for n, p in trainable(model).items()], cfg.patterns)
    if ctx.status == "diverged" or not finite(model):
        nan = math.nan
        rows = [{"block": b, "size": len(i), "eigenvalue": nan, "residual": nan, "rel_residual": nan,
                 "converged": False, "matvecs": 0, "seconds": 0.0} for b, i in blocks.items()]
        diverged = {**ctx.ident, "status": "diverged"}
        spec, energy = pd.DataFrame(rows), pd.DataFrame({"block": [], "rank": [], "eigenvalue": [], "energy": []})
        add_ident(spec, diverged)
        add_ident(energy, diverged)
        return {"blocks": spec, "block_energy": energy}
    h = ctx.hessian(model, cfg.n)
    rows = []
    for b, idx in blocks.items():
        rows.append({"block": b, "size": len(idx), **_top(BlockOperator(h, torch.tensor(idx)), cfg, ctx.step,
                                                          top_eigenpairs)})
    spec = pd.DataFrame(rows)
    add_ident(spec, ctx.ident)
    energy = pd.DataFrame(_energies(ctx, blocks))
    add_ident(energy, ctx.ident)
    return {"blocks": spec, "block_energy": energy}


def _top(op: Any, cfg: BlocksConfig, step: int, top_eigenpairs: Any) -> dict[str, Any]:
    """The block's top eigenpair: densely for a small block, else certified by the solver."""
    import torch

    t0 = time.perf_counter()
    if op.dim <= DENSE_UP_TO:
        dense = op @ torch.eye(op.dim, dtype=op.dtype, device=op.device)
        lam = float(torch.linalg.eigvalsh((dense + dense.T) / 2)[-1])
        return {"eigenvalue": lam, "residual": 0.0, "rel_residual": 0.0, "converged": True, "matvecs": op.dim,
                "seconds": time.perf_counter() - t0}
    res = top_eigenpairs(op, k=1, tol=cfg.tol, max_matvecs=cfg.max_matvecs, seed=step)
    return {"eigenvalue": float(res.eigenvalues[0]), "residual": float(res.residuals[0]),
            "rel_residual": float(res.rel_residuals[0]), "converged": bool(res.converged[0]),
            "matvecs": int(res.matvecs), "seconds": time.perf_counter() - t0}


def _energies(ctx: CheckpointContext, blocks: dict[str, list[int]]) -> list[dict[str, Any]]:
    if ctx.eigvecs is None or not len(ctx.eigvecs["eigenvalues"]):
        return []
    vecs = ctx.eigvecs["eigenvectors"].double()
    lams = ctx.eigvecs["eigenvalues"]
    out = []
    for r in range(len(lams)):
        v = vecs[r] / vecs[r].norm()
        for b, idx in blocks.items():
            out.append({"block": b, "rank": r + 1, "eigenvalue": float(lams[r]),
                        "energy": float(v[idx].square().sum())})
    return out


ANALYSIS = Analysis(
    name="blocks",
    config=BlocksConfig,
    compute=compute,
    select=strided,
    tables=("blocks", "block_energy"),
    format_version=1,
    summary="per parameter block: the top eigenvalue of its diagonal Hessian block, and the top-k eigenvectors' "
    "energy in it (off by default)",
)
