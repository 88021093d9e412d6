"""Preconditioned sharpness of adaptive optimizers (Cohen et al. 2022): the top eigenvalues of
P^{-1}H at a checkpoint of an Adam or AdamW run, P = diag(sqrt(v̂) + ε) its preconditioner there.

They are those of the symmetric P^{-1/2} H P^{-1/2} (``D @ h @ D`` with D = P^{-1/2} a
:class:`~sharpflow.hessian.DiagonalOperator`, h the spectrum's Hessian: the run's Hessian subset,
Adam's L2 weight decay but not AdamW's decoupled one, eval mode), certified like the spectrum. Adam
is stable on a quadratic while λ_1(P^{-1}H) < (2 + 2β₁)/(η(1 − β₁)) (38/η at β₁ = 0.9), the
threshold Cohen et al. find it settles at.

Table ``runs/{run}/precond/step*.parquet``: one row per rank: ``eigenvalue`` (of P^{-1}H),
``residual``, ``rel_residual``, ``converged``, ``matvecs``, ``seconds``, ``threshold``
((2 + 2β₁)/(η(1 − β₁)) with η in force at the checkpoint), ``ratio`` (eigenvalue / threshold),
``lr``, ``beta1``, plus run, step, epoch, status. A checkpoint before Adam's first step has no
preconditioner: NaN rows. Needs an Adam or AdamW run (a clear error otherwise).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from pydantic import Field, PositiveFloat, PositiveInt

from ..configbase import Strict
from ..errors import SharpflowError
from .base import Analysis, strided

if TYPE_CHECKING:
    import pandas as pd

    from .context import CheckpointContext


class PrecondConfig(Strict):
    """Adam's preconditioned sharpness λ(P^{-1}H) at chosen checkpoints of Adam/AdamW runs."""

    enabled: bool = Field(False, description="Compute it (Adam and AdamW runs only).")
    k: PositiveInt = Field(1, description="Top eigenvalues of P^{-1}H.")
    tol: PositiveFloat = Field(1e-3, description="Relative residual each pair must reach.")
    stride: PositiveInt = Field(1, description="Every stride-th checkpoint, plus the last.")
    n: PositiveInt | None = Field(None, description="Hessian examples (None: the dataset's hessian_subset).")


def adam_threshold(lr: float, beta1: float) -> float:
    """(2 + 2β₁)/(η(1 − β₁)): the stability threshold of Adam's preconditioned sharpness (inf at η = 0,
    e.g. the last step of a schedule that decays to zero)."""
    return (2 + 2 * beta1) / (lr * (1 - beta1)) if lr > 0 else math.inf


def compute(ctx: CheckpointContext, cfg: PrecondConfig) -> dict[str, pd.DataFrame]:
    import pandas as pd

    from ..hessian import DiagonalOperator, top_eigenpairs
    from .context import add_ident, finite

    opt = ctx.run.optimizer
    if not opt.adaptive:
        raise SharpflowError(f"{ctx.run_name}: the precond analysis needs an Adam or AdamW run, "
                             f"this one uses {opt.name!r} (switch precond off for its study)")
    beta1, lr = float(opt.betas[0]), ctx.lr
    base = {"threshold": adam_threshold(lr, beta1), "lr": lr, "beta1": beta1}
    ident = ctx.ident
    model = ctx.model()
    pre = ctx.checkpoint.get("precond")
    if pre is None or ctx.status == "diverged" or not finite(model):
        nan = math.nan
        df = pd.DataFrame([{"rank": r + 1, "eigenvalue": nan, "residual": nan, "rel_residual": nan,
                            "converged": False, "matvecs": 0, "seconds": 0.0, **base, "ratio": nan}
                           for r in range(cfg.k)])
        add_ident(df, ident if pre is None else {**ident, "status": "diverged"})
        return {"precond": df}
    n = cfg.n or len(ctx.data.hessian_idx)
    # AdamW's decay is decoupled: it acts on θ directly, unpreconditioned, and is not part of the loss
    # whose preconditioned sharpness is measured (with it, a coordinate whose gradients are ~0 would
    # give λ ≈ weight_decay/ε). Adam's L2 decay is part of the gradient it preconditions: kept.
    h = ctx.hessian(model, n, weight_decay=0.0 if opt.name == "adamw" else None)
    d = DiagonalOperator(pre.double().rsqrt().to(dtype=h.dtype, device=h.device))  # P^{-1/2}
    op = d @ h @ d
    t0 = time.perf_counter()
    res = top_eigenpairs(op, k=cfg.k, tol=cfg.tol, seed=ctx.step)
    secs = time.perf_counter() - t0
    df = pd.DataFrame([{"rank": r + 1, "eigenvalue": float(res.eigenvalues[r]), "residual": float(res.residuals[r]),
                        "rel_residual": float(res.rel_residuals[r]), "converged": bool(res.converged[r]),
                        "matvecs": int(res.matvecs), "seconds": secs, **base,
                        "ratio": float(res.eigenvalues[r]) / base["threshold"]} for r in range(len(res.eigenvalues))])
    add_ident(df, ident)
    ctx.log(f"[{ctx.run_name}] step {ctx.step}: preconditioned λ1 = {float(res.eigenvalues[0]):.4g} "
            f"({float(res.eigenvalues[0]) / base['threshold']:.2f} of (2+2β1)/(η(1−β1)))")
    return {"precond": df}


ANALYSIS = Analysis(
    name="precond",
    config=PrecondConfig,
    compute=compute,
    select=strided,
    format_version=2,
    summary="Adam's preconditioned sharpness λ(P^{-1}H) against (2+2β1)/(η(1−β1)) (off by default)",
)
