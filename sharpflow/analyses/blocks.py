"""Per-block spectra (Zhang et al. 2024), off by default: how the curvature splits over the model's
parameter blocks (layers; in a transformer, its embeddings, attention and MLP weights).

At a checkpoint, over the spectrum's Hessian (the run's Hessian subset, weight decay, eval mode):

- ``blocks``: for each parameter block b, the certified top eigenvalue of its diagonal block H[b, b]
  (:class:`~sharpflow.hessian.BlockOperator`; a block of at most 8 coordinates is solved densely);
- ``block_energy``: for each of the spectrum's top-k eigenvectors v_i of the full H, the share of
  it in each block, ‖v_i[b]‖² (the shares of a vector over blocks that cover every parameter sum to 1);
- ``blocks_density`` (with ``density.enabled``; else an empty table, as an analysis's tables are
  fixed): each block's spectral density, by stochastic Lanczos quadrature of H[b, b]
  (:func:`~sharpflow.hessian.density.spectral_density`, the density analysis's estimator) on the same
  block operator as its top eigenvalue, so the blocks' spectra can be compared whole, not only by
  their tops. A block of at most 8 coordinates is decomposed exactly instead: its nodes are its
  eigenvalues, each of weight 1/size, as one probe 0 (``exact`` true).

Blocks: by default every parameter whose name ends in ``weight`` is a block of its own (biases and
normalisation shifts are left out); ``patterns`` instead names blocks by regular expressions on the
parameter names (``named_parameters()``), each block the union of the parameters it matches.

Tables ``runs/{run}/blocks/blocks/step*.parquet``: ``block``, ``size``, ``eigenvalue``, ``residual``,
``rel_residual``, ``converged``, ``matvecs``, ``seconds``; ``runs/{run}/blocks/block_energy/step*.parquet``:
``block``, ``rank``, ``eigenvalue`` (of the full H), ``energy``; ``runs/{run}/blocks/blocks_density/step*.parquet``
(the density table's columns, per block): one row per (block, probe, node): ``block``, ``size``, ``exact``,
``probe``, ``node`` (a quadrature node, an eigenvalue estimate of H[b, b]), ``weight`` (a probe's weights sum to
1; padding nodes of a probe that found an invariant subspace early have weight 0), ``steps`` (that probe's
Lanczos steps; the block's size when exact), ``matvecs`` and ``seconds`` (of the block's whole estimate),
``n`` (Hessian examples); plus run, step, epoch, status for all three. A block's density is
Σ weight·kernel(λ − node) / probes, as the density analysis's
(:meth:`sharpflow.hessian.density.SpectralDensity.density`). Block i's probes are drawn with seed
i·1,000,003 + step (the density analysis's seed·1,000,003 + step with the block's index for the seed).

Cost: the top eigenvalues take one solve per block (at most ``max_matvecs`` products of the full H each);
the densities add ``density.probes × density.steps`` products per block (steps capped at the block's
size), each a product of the full H.
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
    from torch import Tensor

    from ..hessian.density import SpectralDensity
    from .context import CheckpointContext

DENSE_UP_TO = 8  # coordinates: a block this small is solved from its dense matrix


class BlockDensityConfig(Strict):
    """Each block's spectral density by stochastic Lanczos quadrature (off by default)."""

    enabled: bool = Field(False, description="Compute it (probes × steps products of the full H per block).")
    probes: PositiveInt = Field(3, description="Random probes per block (the spread of the estimate shrinks as "
                                "1/sqrt).")
    steps: PositiveInt = Field(20, description="Lanczos steps per probe, at most the block's size (resolution ~ "
                               "spectrum width / steps).")


class BlocksConfig(Strict):
    """Each parameter block's top eigenvalue and the top-k eigenvectors' energy per block."""

    omit_at_default = ("density",)

    enabled: bool = Field(False, description="Compute it (one solve of products of the full H per block).")
    stride: PositiveInt = Field(1, description="Every stride-th checkpoint, plus the last.")
    patterns: list[str] = Field(default_factory=list, description="Regular expressions on parameter names, one "
                                "block each (empty: every '*weight' parameter its own block).")
    tol: PositiveFloat = Field(1e-3, description="Relative residual each block's top pair must reach.")
    max_matvecs: PositiveInt = Field(300, description="Products per block's solve.")
    n: PositiveInt | None = Field(None, description="Hessian examples (None: the dataset's hessian_subset).")
    density: BlockDensityConfig = Field(BlockDensityConfig(), description="Each block's SLQ spectral density "
                                        "(table blocks_density).")


#: the columns of ``blocks_density`` (before run, step, epoch, status).
DENSITY_COLUMNS = ("block", "size", "exact", "probe", "node", "weight", "steps", "matvecs", "seconds", "n")


def density_seed(step: int, index: int) -> int:
    """The probes' seed of block ``index`` (in block order) at checkpoint ``step``: the density analysis's
    ``seed * 1_000_003 + step`` with the block's index for the seed."""
    return index * 1_000_003 + step


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
    examples = cfg.n or len(ctx.data.hessian_idx)
    if ctx.status == "diverged" or not finite(model):
        nan = math.nan
        rows = [{"block": b, "size": len(i), "eigenvalue": nan, "residual": nan, "rel_residual": nan,
                 "converged": False, "matvecs": 0, "seconds": 0.0} for b, i in blocks.items()]
        diverged = {**ctx.ident, "status": "diverged"}
        spec, energy = pd.DataFrame(rows), pd.DataFrame({"block": [], "rank": [], "eigenvalue": [], "energy": []})
        dens = pd.DataFrame([{"block": b, "size": len(i), "exact": len(i) <= DENSE_UP_TO, "probe": 0, "node": nan,
                              "weight": nan, "steps": 0, "matvecs": 0, "seconds": 0.0, "n": examples}
                             for b, i in blocks.items()] if cfg.density.enabled else [], columns=DENSITY_COLUMNS)
        for df in (spec, energy, dens):
            add_ident(df, diverged)
        return {"blocks": spec, "block_energy": energy, "blocks_density": dens}
    h = ctx.hessian(model, cfg.n)
    rows, dens_rows = [], []
    for i, (b, idx) in enumerate(blocks.items()):
        op = BlockOperator(h, torch.tensor(idx))
        rows.append({"block": b, "size": len(idx), **_top(op, cfg, ctx.step, top_eigenpairs)})
        if cfg.density.enabled:
            sd, exact = block_density(op, cfg.density.probes, cfg.density.steps, density_seed(ctx.step, i))
            dens_rows += _density_rows(b, len(idx), sd, exact, examples)
            ctx.log(f"[{ctx.run_name}] step {ctx.step}: block {b} density "
                    f"{'exact' if exact else f'from {len(sd.steps)} probes × {sd.nodes.shape[1]} steps'}, "
                    f"{sd.matvecs} HVPs, {sd.seconds:.2f} s")
    spec = pd.DataFrame(rows)
    add_ident(spec, ctx.ident)
    energy = pd.DataFrame(_energies(ctx, blocks))
    add_ident(energy, ctx.ident)
    dens = pd.DataFrame(dens_rows, columns=DENSITY_COLUMNS)
    add_ident(dens, ctx.ident)
    return {"blocks": spec, "block_energy": energy, "blocks_density": dens}


def block_density(op: Any, probes: int, steps: int, seed: int) -> tuple[SpectralDensity, bool]:
    """A block's SLQ density (nodes, weights per probe) and whether it is exact: a block of at most
    :data:`DENSE_UP_TO` coordinates is decomposed densely (its eigenvalues, weight 1/size each, one
    probe); a larger one gets ``probes`` probes of ``min(steps, size)`` Lanczos steps from ``seed``."""
    import torch

    from ..hessian.density import SpectralDensity, spectral_density

    if op.dim > DENSE_UP_TO:
        return spectral_density(op, num_probes=probes, lanczos_steps=steps, seed=seed), False
    t0 = time.perf_counter()
    lam = _dense_eigvalsh(op)
    weights = torch.full((1, op.dim), 1.0 / op.dim, dtype=torch.float64)
    return SpectralDensity(lam[None], weights, [op.dim], op.dim, time.perf_counter() - t0), True


def _density_rows(block: str, size: int, sd: SpectralDensity, exact: bool, n: int) -> list[dict[str, Any]]:
    p, m = sd.nodes.shape
    nodes, weights = sd.nodes.tolist(), sd.weights.tolist()
    return [{"block": block, "size": size, "exact": exact, "probe": i, "node": nodes[i][j], "weight": weights[i][j],
             "steps": sd.steps[i], "matvecs": sd.matvecs, "seconds": sd.seconds, "n": n}
            for i in range(p) for j in range(m)]


def _dense_eigvalsh(op: Any) -> Tensor:
    """The eigenvalues (ascending, float64, on the CPU) of a small operator, from its dense matrix."""
    import torch

    dense = (op @ torch.eye(op.dim, dtype=op.dtype, device=op.device)).double().cpu()
    return torch.linalg.eigvalsh((dense + dense.T) / 2)


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
    tables=("blocks", "block_energy", "blocks_density"),
    format_version=1,
    summary="per parameter block: the top eigenvalue of its diagonal Hessian block, and the top-k eigenvectors' "
    "energy in it, optionally its SLQ density (off by default)",
)
