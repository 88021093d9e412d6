"""The escape ablation (optional): from chosen checkpoints, continue the run's SGD with the e1
component of every step removed, isolated, frozen or rescaled, tracking the loss and λ_max.

The paper's variants: "remove-top" is ``remove`` and "only-top" is ``isolate``, both with e1
recomputed after every iteration (``refresh_every: 1``, warm-started Lanczos on the run's Hessian
subset); "constant-top" is ``freeze``, which always keeps the checkpoint's e1 and holds θ's
coordinate along it. ``refresh_every: 0`` keeps the checkpoint's e1 in every mode (then "remove"
and "freeze" are the same dynamics).

The continuation follows the run: its mini-batches in its own data order from the checkpoint's
step on (augmented as in training), the learning rate in force at the checkpoint, its momentum
(a buffer starting at zero) and weight decay. It is plain SGD even for a Nudged-SGD run (γ is not
applied), and the model is in eval mode (BatchNorm's running statistics, no dropout).

Table ``runs/{run}/escape/step*.parquet`` (step = the checkpoint started from): one
:func:`sharpflow.analyses.escape_kernel.escape_ablation` per mode. Rows: step (iterations from the
checkpoint), loss (on a fixed subset), lambda_max, mode, factor, lr, e1_coord, dist_from_start,
diverged, refresh_every (0: never), momentum, weight_decay, plus run, start_step (the
checkpoint), epoch, status.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt

from ..configbase import Strict
from .base import Analysis

if TYPE_CHECKING:
    import pandas as pd

    from .context import CheckpointContext


class EscapeConfig(Strict):
    """The escape ablation (optional): from chosen checkpoints, continue SGD with the e1 component of
    every step removed, isolated, frozen or rescaled, tracking the loss and λ_max."""

    checkpoints: dict[str, list[NonNegativeInt]] = Field(
        default_factory=dict, description="Run id -> checkpoint steps to start from (each in the run's schedule)."
    )
    iterations: PositiveInt = Field(1000, description="SGD iterations per mode.")
    modes: list[Literal["none", "remove", "isolate", "freeze", "rescale"]] = Field(
        default_factory=lambda: ["none", "remove", "isolate", "freeze", "rescale"]
    )
    factor: float = Field(0.5, description="'rescale': multiplier of the e1 component.")
    eval_every: PositiveInt = Field(50, description="Iterations between loss / λ_max evaluations.")
    subset: PositiveInt = Field(1000, description="Examples of the fixed loss-evaluation subset.")
    lambda_tol: PositiveFloat = Field(1e-2, description="Relative residual of the tracked λ_max and refreshed e1.")
    refresh_every: NonNegativeInt = Field(
        1, description="Iterations between recomputations of e1 for remove, isolate and rescale (the paper: 1, "
        "after every iteration); 0 keeps the checkpoint's e1. 'freeze' always keeps it."
    )


def select(cfg: EscapeConfig, run: str, steps: Sequence[int]) -> list[int]:
    """The checkpoints listed for ``run`` (the config validator checks that they exist)."""
    return sorted(set(cfg.checkpoints.get(run, [])))


def check(cfg: EscapeConfig, plans: dict[str, list[int]], analysed: set[str]) -> None:
    """Every listed run exists and is analysed, and every listed step is one of its checkpoints."""
    for run, wanted in cfg.checkpoints.items():
        if run not in plans:
            raise ValueError(f"escape.checkpoints: unknown run {run!r}")
        missing = sorted(set(wanted) - set(plans[run]))
        if missing:
            raise ValueError(f"escape.checkpoints.{run}: steps {missing} are not checkpoints of the run")
        if run not in analysed:
            raise ValueError(f"escape.checkpoints.{run}: the run's study has analyse: false (no eigenvectors)")


def compute(ctx: CheckpointContext, cfg: EscapeConfig) -> dict[str, pd.DataFrame]:
    """The escape table of one checkpoint (see the module docstring)."""
    import copy

    import pandas as pd
    import torch

    from ..data import hessian_batches
    from ..hessian import HessianOperator, top_eigenpairs
    from ..params import flat_params, set_flat_params
    from ..train import DataOrder
    from .context import add_ident
    from .escape_kernel import escape_ablation
    from .gradients import batches_of

    assert ctx.eigvecs is not None, "escape needs the checkpoint's eigenvectors"
    device, run = ctx.device, ctx.run
    model = ctx.model()
    loss_fn = ctx.loss_fn
    model.eval()
    ev = ctx.eigvecs
    theta = flat_params(model)
    step = ctx.step
    view = ctx.view
    x, y, n_train = view.x, view.y, view.n
    gen = torch.Generator(device="cpu").manual_seed(step)
    subset_idx = torch.randperm(n_train, generator=gen)[: min(cfg.subset, n_train)].to(device)
    subset = batches_of(x[subset_idx], y[subset_idx], 1000)
    hbatches = hessian_batches(ctx.data, len(ctx.data.hessian_idx))
    probe = copy.deepcopy(model)
    warm: dict[str, Any] = {"v": None}
    opt = run.optimizer

    def top1(th: torch.Tensor) -> tuple[float, torch.Tensor]:
        set_flat_params(probe, th)
        op = HessianOperator(probe, loss_fn, hbatches, weight_decay=opt.weight_decay)
        res = top_eigenpairs(op, k=1, tol=cfg.lambda_tol, v0=warm["v"], seed=step)
        warm["v"] = res.eigenvectors
        return float(res.eigenvalues[0]), res.eigenvectors[0]

    ok = bool(torch.isfinite(theta).all()) and len(ev["eigenvectors"]) > 0
    refresh = cfg.refresh_every if ok and cfg.refresh_every > 0 else None
    frames = []
    t0 = time.perf_counter()
    for mode in cfg.modes:
        e1 = ev["eigenvectors"][0].to(device=device, dtype=theta.dtype) if ok else torch.full_like(theta, math.nan)
        warm["v"] = None
        order = DataOrder(view, run.seed, view.steps_per_epoch, device, augment=run.augment)
        df = escape_ablation(model, loss_fn, theta, e1, order.batches(step), lr=ctx.lr, steps=cfg.iterations,
                             mode=mode, factor=cfg.factor, eval_batches=subset, eval_every=cfg.eval_every,
                             lambda_max_fn=(lambda th: top1(th)[0]) if ok else None,
                             e1_fn=(lambda th: top1(th)[1]) if refresh else None, refresh_every=refresh,
                             momentum=opt.momentum, weight_decay=opt.weight_decay)
        df["refresh_every"] = 0 if refresh is None or mode == "freeze" else refresh
        df["momentum"], df["weight_decay"] = opt.momentum, opt.weight_decay
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    add_ident(out, {"run": ctx.run_name, "start_step": step, "epoch": ctx.epoch, "status": ctx.status})
    ctx.log(f"[{ctx.run_name}] step {step}: escape ablation ({len(cfg.modes)} modes) in "
            f"{time.perf_counter() - t0:.1f} s")
    return {"escape": out}


ANALYSIS = Analysis(
    name="escape",
    config=EscapeConfig,
    compute=compute,
    select=select,
    check=check,
    format_version=2,
    summary="escape ablation: SGD with the e1 component edited, from chosen checkpoints",
)
