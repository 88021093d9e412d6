"""The tiny subspace (Gur-Ari, Roberts & Dyer 2018): how much of the gradient lies in the top-k
Hessian eigenspace, and how fast that eigenspace turns.

At a checkpoint with top-K eigenvectors V (the spectrum's, K = spectrum.k; take K ≥ the number of
classes) and the full gradient g of the loss over the Hessian subset (the examples V's Hessian is
taken over, weight decay included), for k = 1…K:

- ``fraction`` = ‖V_kᵀ g‖² / ‖g‖², the share of the gradient's squared norm in the top-k eigenspace;
- ``overlap`` = ‖V_kᵀ V'_k‖_F² / k with V' the previous checkpoint's eigenvectors: 1 when the top-k
  eigenspace did not move, k/D for random subspaces.

Gur-Ari et al. report that after a short early phase the fraction is large at k = number of classes
(with a jump there) and the subspace changes slowly.

The previous checkpoint is the one before it in the same analysis job (a grouped job holds the whole
run; a split job is one warm-start chain, ``spectrum.warm_chain``): at the first checkpoint of a
job there is none, and ``overlap`` is NaN. With ``spectrum.augment: fixed`` the eigenvectors are of
the augmented Hessian while g is over the raw subset.

Table ``runs/{run}/subspace/step*.parquet``: one row per k: ``k``, ``fraction``, ``overlap``,
``previous_step`` (-1 without one), ``eigenvalue`` (λ_k), ``grad_norm``, plus run, step, epoch, status.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pydantic import Field, PositiveInt

from ..configbase import Strict
from ..errors import SharpflowError
from .base import Analysis, strided

if TYPE_CHECKING:
    import pandas as pd
    from torch import Tensor

    from .context import CheckpointContext


class SubspaceConfig(Strict):
    """The gradient's share in the top-k eigenspace, k = 1…spectrum.k, and the eigenspace's turn."""

    enabled: bool = Field(False, description="Compute it (uses the spectrum's k eigenvectors: k ≥ classes).")
    stride: PositiveInt = Field(1, description="Every stride-th checkpoint, plus the last.")
    n: PositiveInt | None = Field(None, description="Examples of the gradient (None: the dataset's hessian_subset; "
                                  "keep it the spectrum's n).")


def gradient_fractions(vecs: Tensor, grad: Tensor) -> list[float]:
    """‖V_kᵀ g‖²/‖g‖² for k = 1…K, ``vecs`` (K, D) orthonormal rows (float64 arithmetic)."""
    g = grad.double().flatten()
    norm2 = float(g.square().sum())
    if norm2 == 0 or not math.isfinite(norm2):
        return [math.nan] * len(vecs)
    c = (vecs.to(device=g.device, dtype=g.dtype) @ g).square()
    return [float(x) / norm2 for x in c.cumsum(0)]


def subspace_overlaps(a: Tensor, b: Tensor) -> list[float]:
    """‖A_kᵀ B_k‖_F²/k for k = 1…min(K_a, K_b), rows of ``a`` and ``b`` orthonormal bases."""
    kk = min(len(a), len(b))
    m = (a[:kk].double() @ b[:kk].to(device=a.device).double().T).square()
    return [float(m[:k, :k].sum()) / k for k in range(1, kk + 1)]


def compute(ctx: CheckpointContext, cfg: SubspaceConfig) -> dict[str, pd.DataFrame]:
    import pandas as pd

    from .context import add_ident, finite

    if ctx.eigvecs is None:
        raise SharpflowError(f"{ctx.run_name} step {ctx.step}: the subspace analysis needs the spectrum's eigenvectors")
    vecs = ctx.eigvecs["eigenvectors"]
    vals = ctx.eigvecs["eigenvalues"]
    ident = ctx.ident
    model = ctx.model()
    prev = ctx.previous_eigvecs
    prev_vecs = prev["eigenvectors"] if prev is not None and len(prev["eigenvectors"]) else None
    if len(vecs) == 0 or ctx.status == "diverged" or not finite(model):
        k = ctx.eigvecs["eigenvalues"].numel() or 1
        df = pd.DataFrame([{"k": i + 1, "fraction": math.nan, "overlap": math.nan, "previous_step": -1,
                            "eigenvalue": math.nan, "grad_norm": math.nan} for i in range(k)])
        add_ident(df, {**ident, "status": "diverged"})
        return {"subspace": df}
    grad = ctx.hessian(model, cfg.n).gradient()
    fractions = gradient_fractions(vecs, grad)
    overlaps = subspace_overlaps(vecs, prev_vecs) if prev_vecs is not None else []
    rows = [{"k": i + 1, "fraction": fractions[i], "overlap": overlaps[i] if i < len(overlaps) else math.nan,
             "previous_step": int(prev["step"]) if prev_vecs is not None and prev is not None else -1,
             "eigenvalue": float(vals[i]), "grad_norm": float(grad.norm())} for i in range(len(vecs))]
    df = pd.DataFrame(rows)
    add_ident(df, ident)
    kc = min(len(vecs), 10)
    ctx.log(f"[{ctx.run_name}] step {ctx.step}: gradient share in the top-{kc} eigenspace {fractions[kc - 1]:.3f}"
            + (f", top-{kc} overlap with step {int(prev['step'])} {overlaps[kc - 1]:.3f}"
               if overlaps and prev is not None else ""))
    return {"subspace": df}


ANALYSIS = Analysis(
    name="subspace",
    config=SubspaceConfig,
    compute=compute,
    select=strided,
    format_version=1,
    summary="the gradient's share in the top-k eigenspace and the eigenspace's overlap between "
    "checkpoints (off by default)",
    previous=True,
)
