"""Update sharpness and self-stabilization (Damian et al. 2023), off by default.

At a checkpoint, over the Hessian subset (the spectrum's loss: weight decay included), with u the
spectrum's top eigenvector and g = ∇L:

- ``grad_curvature``: the curvature along the gradient, gᵀHg/‖g‖²;
- ``lambda1``: S(θ) = uᵀH(θ)u (the top eigenvalue, recomputed here in float64 for the check);
- ``alpha`` = −∇L·∇S and ``beta`` = ‖∇S‖², with ∇S = ∇³L[u, u], the third-order derivative along u
  twice, by differentiating uᵀH(θ)u (one Hessian-vector product built with ``create_graph``) once
  more. Damian et al.'s self-stabilization: when η·λ1/2 > 1 the step along ∇S (size set by α and
  β) pulls the sharpness back to 2/η;
- ``eta_lambda_half``: η·λ1/2 with η in force at the checkpoint;
- ``update_curvature``: the curvature along the last update, ΔθᵀHΔθ/‖Δθ‖² with Δθ = θ_t − θ_{t−1} the
  update that produced the checkpoint (its ``last_update``, stored by training; one more
  Hessian-vector product on the same graph), and ``update_norm`` = ‖Δθ‖. For full-batch gradient
  descent without momentum Δθ = −η∇L, so it is the curvature along the gradient one step earlier;
  with momentum or mini-batches it is the curvature the step actually met (Damian et al. 2023 track
  it beside 2/η). NaN at step 0 and where the checkpoint has no ``last_update`` (checkpoints written
  before training stored it: one log line per run says so; retraining the run stores it).

Meant for full-batch runs (the ``eos`` studies), where the gradient is that of the whole loss. Table
``runs/{run}/selfstab/step*.parquet``: one row per checkpoint with those columns and ``grad_norm``,
plus run, step, epoch, status. Format 2 added ``update_curvature`` and ``update_norm``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pydantic import Field, PositiveInt

from ..configbase import Strict
from ..errors import SharpflowError
from .base import Analysis, strided

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from .context import CheckpointContext


class SelfStabConfig(Strict):
    """Curvature along the gradient and the self-stabilization terms α, β at chosen checkpoints."""

    enabled: bool = Field(False, description="Compute it (third-order products over the Hessian subset).")
    stride: PositiveInt = Field(1, description="Every stride-th checkpoint, plus the last.")
    n: PositiveInt | None = Field(None, description="Hessian examples (None: the dataset's hessian_subset).")


def third_order_terms(loss: Any, theta: torch.Tensor, u: torch.Tensor,
                      direction: torch.Tensor | None = None) -> dict[str, float]:
    """For a loss of the flat parameters: ∇L, S = uᵀHu, ∇S = ∇³L[u, u], gᵀHg/‖g‖², α and β; with a
    ``direction`` d also ``update_curvature`` dᵀHd/‖d‖² and ``update_norm`` ‖d‖ (one more
    Hessian-vector product through the same graph, no further forward pass)."""
    import torch

    th = theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(th), th, create_graph=True)
    (hu,) = torch.autograd.grad(g @ u, th, create_graph=True)
    s = hu @ u
    (grad_s,) = torch.autograd.grad(s, th, retain_graph=True)
    out: dict[str, float] = {}
    if direction is not None:
        d = direction.detach().to(th)
        (hd,) = torch.autograd.grad(g @ d, th, retain_graph=True)
        dd = float(d @ d)
        out = {"update_curvature": float(hd @ d) / dd if dd > 0 else math.nan, "update_norm": math.sqrt(dd)}
    gd = g.detach()
    (hg,) = torch.autograd.grad(g @ gd, th)
    gg = float(gd @ gd)
    return {"lambda1": float(s.detach()), "grad_norm": math.sqrt(gg),
            "grad_curvature": float(hg @ gd) / gg if gg > 0 else math.nan,
            "alpha": -float(gd @ grad_s), "beta": float(grad_s @ grad_s), **out}


#: the runs (their checkpoint directories) already told in this process that their checkpoints lack
#: ``last_update``: one line per run, not one per checkpoint.
_TOLD: set[str] = set()


def _last_update(ctx: CheckpointContext) -> torch.Tensor | None:
    """The checkpoint's ``last_update`` (None at step 0, and where training did not store it: then one
    log line per run, unless the run diverged or stopped before the checkpoint)."""
    d = ctx.checkpoint.get("last_update")
    if d is None and ctx.step > 0 and ctx.status == "ok":
        where = str(ctx.checkpoint_path.parent)
        if where not in _TOLD:
            _TOLD.add(where)
            ctx.log(f"[{ctx.run_name}] selfstab: checkpoint step {ctx.step} (and maybe others) has no last update "
                    "(written before training stored it): update_curvature is NaN; retraining the run stores it")
    return d


def compute(ctx: CheckpointContext, cfg: SelfStabConfig) -> dict[str, pd.DataFrame]:
    import pandas as pd
    import torch

    from ..data import hessian_batches
    from ..params import flat_params, loss_of_params, unflatten
    from .context import add_ident, finite

    model = ctx.model()
    nan = math.nan
    row: dict[str, Any] = {"lambda1": nan, "grad_norm": nan, "grad_curvature": nan, "alpha": nan, "beta": nan,
                           "update_curvature": nan, "update_norm": nan}
    ident = ctx.ident
    have_u = ctx.eigvecs is not None and len(ctx.eigvecs["eigenvalues"]) > 0
    if ctx.status != "diverged" and finite(model) and have_u:
        model = model.double().eval()
        f = loss_of_params(model, ctx.loss_fn)
        like = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
        chunks = hessian_batches(ctx.data, cfg.n or len(ctx.data.hessian_idx))
        total = sum(len(y) for _, y in chunks)
        wd = ctx.run.optimizer.weight_decay

        def loss(th: torch.Tensor) -> torch.Tensor:
            data_loss = sum(f(unflatten(th, like), x.double() if x.is_floating_point() else x, y) * len(y)
                            for x, y in chunks) / total
            return data_loss + 0.5 * wd * th.square().sum()

        u = ctx.eigvecs["eigenvectors"][0].double()
        theta = flat_params(model).double()
        d = _last_update(ctx)
        if d is not None and d.numel() != theta.numel():
            raise SharpflowError(f"{ctx.checkpoint_path}: last_update has {d.numel()} entries, the model "
                                 f"{theta.numel()} trainable parameters")
        direction = None if d is None else d.to(theta.device, torch.float64)
        row = {**row, **third_order_terms(loss, theta, u / u.norm(), direction)}
    elif ctx.status != "diverged" and finite(model):
        pass  # no eigenvector: NaN row, status as it is
    else:
        ident = {**ident, "status": "diverged"}
    row["eta_lambda_half"] = ctx.lr * row["lambda1"] / 2
    df = pd.DataFrame([row])
    add_ident(df, ident)
    return {"selfstab": df}


ANALYSIS = Analysis(
    name="selfstab",
    config=SelfStabConfig,
    compute=compute,
    select=strided,
    format_version=2,
    summary="curvature along the gradient and the last update, and Damian et al.'s self-stabilization terms "
    "α = −∇L·∇S, β = ‖∇S‖² (off by default)",
)
