"""Batch sharpness (Andreyev & Beneventano 2024, "edge of stochastic stability").

At a checkpoint, for mini-batches B of the run's own batch size drawn from the examples it trains
on, the curvature of each batch's own loss along its own gradient:

    BS = E_B[ g_Bᵀ H_B g_B / ‖g_B‖² ],   g_B = ∇L_B(θ), H_B = ∇²L_B(θ),

one Hessian-vector product per batch (double backward through the batch's loss; weight decay adds
wd·‖g_B‖² to the numerator, as it adds to every Hessian here). For mini-batch SGD it is this, not
λ_1 of the full Hessian, that Andreyev & Beneventano find settling at 2/η, with λ_1 below it and
lower for smaller batches. For a full-batch run the one "batch" is the whole training set, and BS is
the Rayleigh quotient of the full gradient (≤ λ_1).

Table ``runs/{run}/batch_sharpness/step*.parquet``: one row per checkpoint: ``batch_sharpness`` (the
mean over ``batches`` batches), ``batch_sharpness_se`` (their standard error; NaN for one batch),
``batch_sharpness_median``, ``batches``, ``batch_size``, ``lr`` (η in force), ``threshold`` (2/η),
``ratio`` (η·BS/2), ``lambda1`` (the checkpoint's spectrum: top eigenvalue of the Hessian subset's
H) and ``lambda1_ratio`` (η·λ_1/2), plus run, step, epoch, status. The batches are drawn without
replacement within each batch, seeded by the checkpoint's step; the model is in eval mode, as for
the spectrum. In an analysis job of several processes every rank draws the same batches and computes
every world-th of them; the values are gathered in order, so the table is the one process's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pydantic import Field, PositiveInt

from ..configbase import Strict
from .base import Analysis, strided

if TYPE_CHECKING:
    import pandas as pd
    from torch import Tensor, nn

    from ..params import LossFn
    from .context import CheckpointContext


class BatchSharpnessConfig(Strict):
    """E_B[g_Bᵀ H_B g_B / ‖g_B‖²] over mini-batches of the run's size, against 2/η."""

    enabled: bool = Field(False, description="Compute it.")
    batches: PositiveInt = Field(32, description="Mini-batches per checkpoint (one gradient and one product each).")
    stride: PositiveInt = Field(1, description="Every stride-th checkpoint, plus the last.")


def batch_sharpness(model: nn.Module, loss_fn: LossFn, batches: list[tuple[Tensor, Tensor]],
                    weight_decay: float = 0.0) -> list[float]:
    """g_Bᵀ H_B g_B / ‖g_B‖² for each batch ``(x, y)`` at the model's parameters (NaN where g_B = 0
    or the loss is not finite). The model is used as it is (put it in eval mode first)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for x, y in batches:
        loss = loss_fn(model(x), y)
        if weight_decay:
            loss = loss + 0.5 * weight_decay * sum(p.square().sum() for p in params)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        g = [t.detach() for t in grads]
        hg = torch.autograd.grad(grads, params, grad_outputs=g)
        num = sum(float((a.double() * b.double()).sum()) for a, b in zip(g, hg, strict=True))
        den = sum(float(a.double().square().sum()) for a in g)
        out.append(num / den if den > 0 and math.isfinite(num) and math.isfinite(float(loss.detach())) else math.nan)
    return out


def compute(ctx: CheckpointContext, cfg: BatchSharpnessConfig) -> dict[str, pd.DataFrame]:
    import numpy as np
    import pandas as pd
    import torch

    from ..hessian.distributed import gather_work, split_work
    from ..train import mix_seed
    from .context import add_ident, finite

    view, lr = ctx.view, ctx.lr
    bsz = view.batch_size
    nb = 1 if bsz >= view.n else cfg.batches
    lam1 = math.nan
    if ctx.eigvecs is not None and len(ctx.eigvecs["eigenvalues"]):
        lam1 = float(ctx.eigvecs["eigenvalues"][0])
    model = ctx.model()
    status = ctx.status
    values: list[float] = []
    if status != "diverged" and finite(model):
        model.eval()
        batches = view.random_batches(nb, torch.Generator().manual_seed(mix_seed(ctx.step, 7)))
        # several ranks: the same batches drawn on each, every rank computes its share, all gather them in order
        mine = [batches[i] for i in split_work(len(batches))]
        values = gather_work(batch_sharpness(model, ctx.loss_fn, mine, ctx.run.optimizer.weight_decay), len(batches),
                             what="the gather of the batch sharpness values")
    else:
        status = "diverged"
    arr = np.asarray(values, dtype=float)
    ok = arr[np.isfinite(arr)]
    mean = float(ok.mean()) if len(ok) else math.nan
    se = float(ok.std(ddof=1) / math.sqrt(len(ok))) if len(ok) > 1 else math.nan
    df = pd.DataFrame([{
        "batch_sharpness": mean, "batch_sharpness_se": se,
        "batch_sharpness_median": float(np.median(ok)) if len(ok) else math.nan,
        "batches": len(ok), "batch_size": bsz, "lr": lr, "threshold": 2.0 / lr if lr > 0 else math.inf,
        "ratio": lr * mean / 2,
        "lambda1": lam1, "lambda1_ratio": lr * lam1 / 2,
    }])
    add_ident(df, {**ctx.ident, "status": status})
    spread = f"± {se:.2g} over {len(ok)} batches" if math.isfinite(se) else f"over {len(ok)} batch(es)"
    edge = f"η·BS/2 = {lr * mean / 2:.2f}" + (f"; η·λ1/2 = {lr * lam1 / 2:.2f}" if math.isfinite(lam1) else "")
    ctx.log(f"[{ctx.run_name}] step {ctx.step}: batch sharpness {mean:.4g} {spread} ({edge})")
    return {"batch_sharpness": df}


ANALYSIS = Analysis(
    name="batch_sharpness",
    config=BatchSharpnessConfig,
    compute=compute,
    select=strided,
    format_version=1,
    summary="batch sharpness E_B[g_Bᵀ H_B g_B/‖g_B‖²] at the run's batch size, against 2/η (off by default)",
    distributed=True,
)
