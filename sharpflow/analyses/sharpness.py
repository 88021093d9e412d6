"""Sharpness as the generalisation literature measures it, beside the Hessian's spectrum (off by default).

At a checkpoint, on the training loss without weight decay (the kernels: :mod:`.sharpness_kernels`):

- **worst-case m-sharpness** (Foret et al. 2021; Andriushchenko & Flammarion 2022): on each of
  ``batches`` random training batches of size ``m``, max over ‖δ‖ ≤ ρ (L2 or L∞; ``adaptive``:
  ‖δ/|w|‖ ≤ ρ) of L_B(w + δ) − L_B(w) by ``ascent_steps`` of projected ascent; averaged over the
  batches with its standard error, and the ascent's value after each step (its convergence);
- **average-case sharpness**: E_δ[L(w + δ)] − L(w) over the Hessian subset, δ ~ N(0, σ²) (or σ·|w|
  with ``magnitude_aware``), ``samples`` Monte-Carlo draws, with the standard error;
- **PAC-Bayes flatness** σ′ (Jiang et al. 2019), with ``pac_bayes``: the largest σ whose expected
  training-accuracy drop on the Hessian subset stays below ``pac_target``, by bisection on log σ to
  ``pac_tol`` (the same draws for every σ).

Table ``runs/{run}/sharpness/step*.parquet``, tidy: ``measure`` (``worst_case``, ``worst_case_ascent``,
``average_case``, ``pac_bayes_sigma``), ``iteration`` (the ascent step for ``worst_case_ascent``, else
−1), ``value``, ``se`` (standard error over batches or draws; for σ′ the bracket's relative width),
``units`` (batches, draws or evaluations), ``radius`` (ρ, σ or the accuracy-drop target), plus run,
step, epoch, status.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt

from ..configbase import Strict
from .base import Analysis, strided

if TYPE_CHECKING:
    import pandas as pd

    from .context import CheckpointContext


class SharpnessConfig(Strict):
    """Worst-case, average-case and PAC-Bayes sharpness at chosen checkpoints."""

    omit_at_default = ("last_only",)

    enabled: bool = Field(False, description="Compute it.")
    stride: PositiveInt = Field(1, description="Every stride-th checkpoint, plus the last.")
    last_only: bool = Field(False, description="Only the last checkpoint (stride ignored): enough for claim 13, "
                            "which reads the measures at the end of training.")
    rho: PositiveFloat = Field(0.05, description="Worst case: the radius ρ.")
    norm: Literal["l2", "linf"] = Field("l2", description="Worst case: the ball's norm.")
    adaptive: bool = Field(False, description="Worst case: the magnitude-aware ball ‖δ/|w|‖ ≤ ρ.")
    m: PositiveInt = Field(128, description="Worst case: the batch size of m-sharpness.")
    batches: PositiveInt = Field(4, description="Worst case: batches averaged over.")
    ascent_steps: PositiveInt = Field(10, description="Worst case: projected ascent steps per batch.")
    step_size: PositiveFloat = Field(0.5, description="Worst case: an ascent step, as a fraction of ρ.")
    sigma: PositiveFloat = Field(0.01, description="Average case: the Gaussian scale σ.")
    magnitude_aware: bool = Field(False, description="Average case: δ ~ N(0, σ²|w|²) per coordinate.")
    samples: PositiveInt = Field(16, description="Average case and PAC-Bayes: Monte-Carlo draws.")
    pac_bayes: bool = Field(False, description="Also σ′, the PAC-Bayes flatness (a bisection of forward passes).")
    pac_target: float = Field(0.1, gt=0, lt=1, description="PAC-Bayes: the largest accuracy drop allowed.")
    pac_tol: PositiveFloat = Field(0.05, description="PAC-Bayes: the bisection's relative tolerance on σ.")
    n: PositiveInt | None = Field(None, description="Hessian-subset examples (None: all of it).")
    seed: int = 0


def _rows(measure: str, values: list[float], radius: float, iteration: int = -1,
          se: float = math.nan) -> dict[str, float | int | str]:
    return {"measure": measure, "iteration": iteration, "value": values[0], "se": se, "units": values[1],
            "radius": radius}


def compute(ctx: CheckpointContext, cfg: SharpnessConfig) -> dict[str, pd.DataFrame]:
    import dataclasses

    import numpy as np
    import pandas as pd
    import torch

    from ..data import hessian_batches
    from ..models import count_correct
    from ..params import flat_params, loss_of_params, unflatten
    from ..train import mix_seed
    from . import sharpness_kernels as K
    from .context import add_ident, finite

    model = ctx.model()
    if ctx.status == "diverged" or not finite(model):
        df = pd.DataFrame([_rows(m, [math.nan, 0], math.nan) for m in ("worst_case", "average_case")])
        add_ident(df, {**ctx.ident, "status": "diverged"})
        return {"sharpness": df}
    model.eval()
    f = loss_of_params(model, ctx.loss_fn)
    theta = flat_params(model).detach()
    like = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    scale = theta.abs() if cfg.adaptive else None
    rows = []

    def batch_loss(x: torch.Tensor, y: torch.Tensor) -> K.FlatLoss:
        return lambda th: f(unflatten(th, like), x, y)

    # worst case, on random batches of size m
    gen = torch.Generator().manual_seed(mix_seed(ctx.step, 11, cfg.seed))
    view = dataclasses.replace(ctx.view, batch_size=min(cfg.m, ctx.view.n))
    traces = np.array([K.worst_case(batch_loss(x, y), theta, cfg.rho, norm=cfg.norm, scale=scale,
                                    steps=cfg.ascent_steps, step_size=cfg.step_size, generator=gen)
                       for x, y in view.random_batches(cfg.batches, gen)])
    best = traces.max(axis=1)
    se = float(best.std(ddof=1) / math.sqrt(len(best))) if len(best) > 1 else math.nan
    rows.append(_rows("worst_case", [float(best.mean()), len(best)], cfg.rho, se=se))
    rows += [_rows("worst_case_ascent", [float(traces[:, t].mean()), len(best)], cfg.rho, iteration=t)
             for t in range(traces.shape[1])]

    # average case and PAC-Bayes, on the Hessian subset
    chunks = hessian_batches(ctx.data, cfg.n or len(ctx.data.hessian_idx))
    total = sum(len(y) for _, y in chunks)

    def subset_loss(th: torch.Tensor) -> torch.Tensor:
        return sum(f(unflatten(th, like), x, y) * len(y) for x, y in chunks) / total

    s_avg = theta.abs() if cfg.magnitude_aware else None
    mean, se = K.average_case(subset_loss, theta, cfg.sigma, scale=s_avg, samples=cfg.samples,
                              generator=torch.Generator().manual_seed(mix_seed(ctx.step, 12, cfg.seed)))
    rows.append(_rows("average_case", [mean, cfg.samples], cfg.sigma, se=se))
    if cfg.pac_bayes:
        rows.append(_pac_bayes(model, theta, like, chunks, cfg, mix_seed(ctx.step, 13, cfg.seed), count_correct))
    df = pd.DataFrame(rows)
    add_ident(df, ctx.ident)
    return {"sharpness": df}


def _pac_bayes(model: Any, theta: Any, like: dict[str, Any], chunks: list[Any], cfg: SharpnessConfig, seed: int,
               count_correct: Any) -> dict[str, Any]:
    """σ′: the same ``samples`` draws z for every σ (common random numbers keep the drop monotone)."""
    import torch
    from torch.func import functional_call

    from ..params import buffers, unflatten
    from . import sharpness_kernels as K

    bufs = buffers(model)
    total = sum(y.numel() for _, y in chunks)
    gen = torch.Generator().manual_seed(seed)
    draws = [torch.randn(theta.shape, generator=gen, dtype=theta.dtype).to(theta.device) for _ in range(cfg.samples)]
    s = theta.abs() if cfg.magnitude_aware else torch.ones_like(theta)

    @torch.no_grad()
    def accuracy(th: torch.Tensor) -> float:
        params = unflatten(th, like)
        return sum(float(count_correct(functional_call(model, (params, bufs), (x,)), y)) for x, y in chunks) / total

    base = accuracy(theta)
    sigma, width, evals = K.pac_bayes_sigma(
        lambda sig: base - sum(accuracy(theta + sig * s * z) for z in draws) / len(draws),
        cfg.pac_target, tol=cfg.pac_tol)
    return _rows("pac_bayes_sigma", [sigma, evals], cfg.pac_target, se=width)


ANALYSIS = Analysis(
    name="sharpness",
    config=SharpnessConfig,
    compute=compute,
    select=strided,
    format_version=1,
    summary="worst-case (m-), average-case and PAC-Bayes sharpness of the training loss (off by default)",
)
