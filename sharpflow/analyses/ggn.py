"""The generalised Gauss-Newton matrix at chosen checkpoints: its top-k, the residual H − G, and how
the top subspaces of H and G overlap.

Table ``runs/{run}/ggn/step*.parquet`` (aggregated ``runs/{run}/ggn.parquet``): one row per
(matrix, rank): ``matrix`` ("ggn": G; "residual": H − G, its largest-*magnitude* eigenvalues, as it
is indefinite), ``rank``, ``eigenvalue``, ``residual`` ‖Av − λv‖, ``rel_residual``, ``converged``,
``matvecs`` and ``seconds`` (of that solve), and per checkpoint ``overlap`` = ‖V_Hᵀ V_G‖_F²/k' over
the top k' = min(k, spectrum.k) eigenvectors of H (the spectrum's) and of G (1: the same subspace),
``outliers`` = the rank i of G's largest ratio λ_i/λ_{i+1} among its top k (Papyan: about the number
of classes), ``n`` and ``k``; plus run, step, epoch, status. Same operator conventions as the
spectrum: the run's Hessian subset, weight decay added to both, the model in eval mode.

Cost: a G product costs about one H product; each checkpoint solves two top-k problems.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field, PositiveFloat, PositiveInt

from ..configbase import Strict
from .base import Analysis, strided

if TYPE_CHECKING:
    import pandas as pd

    from .context import CheckpointContext


class GGNConfig(Strict):
    """The Gauss-Newton matrix G = JᵀH_outJ beside the Hessian (Papyan 2019), at chosen checkpoints."""

    enabled: bool = Field(False, description="Compute it (two top-k solves per checkpoint).")
    k: PositiveInt = Field(12, description="Eigenpairs of G and of H − G (≥ the number of classes).")
    tol: PositiveFloat = Field(1e-3, description="Relative residual each pair must reach.")
    residual: bool = Field(True, description="Also the top-k (largest magnitude) of H − G.")
    stride: PositiveInt = Field(1, description="Every stride-th checkpoint, plus the last.")
    max_matvecs: PositiveInt | None = Field(None, description="Product budget per solve (None: the solver's).")
    n: PositiveInt | None = Field(None, description="Hessian examples (None: the dataset's hessian_subset).")


def outliers(eigenvalues: Sequence[float]) -> int:
    """The rank i (1-based) with the largest ratio λ_i/λ_{i+1} among positive eigenvalues, 0 if none."""
    lam = [x for x in eigenvalues if math.isfinite(x) and x > 0]
    if len(lam) < 2:
        return 0
    ratios = [lam[i] / lam[i + 1] for i in range(len(lam) - 1)]
    return 1 + max(range(len(ratios)), key=ratios.__getitem__)


def compute(ctx: CheckpointContext, cfg: GGNConfig) -> dict[str, pd.DataFrame]:
    import pandas as pd
    import torch

    from ..data import hessian_batches
    from ..hessian import top_eigenpairs
    from ..hessian.distributed import distributed_ggn, group_rank_world
    from ..hessian.ggn import GGNOperator
    from .context import add_ident, finite

    model = ctx.model()
    n = cfg.n or len(ctx.data.hessian_idx)
    ident = ctx.ident
    if ctx.status == "diverged" or not finite(model):
        df = pd.DataFrame([{"matrix": "ggn", "rank": r + 1, "eigenvalue": math.nan, "residual": math.nan,
                            "rel_residual": math.nan, "converged": False, "matvecs": 0, "seconds": 0.0,
                            "overlap": math.nan, "outliers": 0, "n": n, "k": cfg.k} for r in range(cfg.k)])
        add_ident(df, {**ident, "status": "diverged"})
        return {"ggn": df}
    batches = hessian_batches(ctx.data, n)
    wd = ctx.run.optimizer.weight_decay
    several = group_rank_world()[1] > 1  # inside an analysis job of several processes: this rank's shard
    g = (distributed_ggn(model, batches, weight_decay=wd, loss=ctx.run.loss) if several
         else GGNOperator(model, batches, weight_decay=wd, loss=ctx.run.loss))
    rows: list[dict[str, Any]] = []

    def solve(op: Any, name: str, which: str) -> Any:
        t0 = time.perf_counter()
        res = top_eigenpairs(op, k=cfg.k, tol=cfg.tol, which=which, max_matvecs=cfg.max_matvecs, seed=ctx.step)
        secs = time.perf_counter() - t0
        rows.extend({"matrix": name, "rank": r + 1, "eigenvalue": float(res.eigenvalues[r]),
                     "residual": float(res.residuals[r]), "rel_residual": float(res.rel_residuals[r]),
                     "converged": bool(res.converged[r]), "matvecs": int(res.matvecs), "seconds": secs}
                    for r in range(len(res.eigenvalues)))
        return res

    res_g = solve(g, "ggn", "LA")
    overlap = math.nan
    if ctx.eigvecs is not None and len(ctx.eigvecs["eigenvectors"]):
        kk = min(cfg.k, len(ctx.eigvecs["eigenvectors"]))
        vh = ctx.eigvecs["eigenvectors"][:kk].to(dtype=torch.float64)
        vg = res_g.eigenvectors[:kk].to(device=vh.device, dtype=torch.float64)
        overlap = float((vh @ vg.T).square().sum()) / kk
    if cfg.residual:
        h = ctx.hessian(model, n)  # this rank's shard inside a process group of several, as g
        solve(h - g, "residual", "LM")  # both carry weight decay: H − G = R
    df = pd.DataFrame(rows)
    df["overlap"] = overlap
    df["outliers"] = outliers([float(x) for x in res_g.eigenvalues])
    df["n"], df["k"] = n, cfg.k
    add_ident(df, ident)
    ctx.log(f"[{ctx.run_name}] step {ctx.step}: GGN λ1={float(res_g.eigenvalues[0]):.4g}, overlap with H "
            f"{overlap:.3f}, {int(df['outliers'].iloc[0])} outliers")
    return {"ggn": df}


ANALYSIS = Analysis(
    name="ggn",
    config=GGNConfig,
    compute=compute,
    select=strided,
    format_version=1,
    summary="the Gauss-Newton matrix: its top-k, the residual H − G, the overlap with H's top-k (off by default)",
    distributed=True,
)
