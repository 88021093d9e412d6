"""The projected-gradient analyses of one checkpoint (paper-notes, "Analyses").

Tables, each under ``runs/{run}/project/{kind}/step*.parquet``:

- ``alignment``: :func:`sharpflow.analyses.project_kernels.alignment` over ``alignment_batches`` random
  mini-batches at the run's batch size and the full-batch gradient (whole training set), against
  the top ``k`` eigenvectors and ``random_directions`` random ones; extra columns ``dim`` (D) and
  ``random_baseline`` (sqrt(2/(πD)));
- ``cross_sections``: :func:`~sharpflow.analyses.project_kernels.cross_sections` along e_i for i in
  ``cross_directions`` (those ≤ k) and one random direction, k in ``cross_ks`` in units of the
  typical projected step s_i = η·mean|gᵀe_i| over ``grad_batches`` mini-batches, loss on a fixed
  seeded subset of ``subset`` training examples;
- ``widths``: :func:`~sharpflow.analyses.project_kernels.cross_section_widths` of those sections;
- ``decomposed``: :func:`~sharpflow.analyses.project_kernels.decomposed_step` (one row per gradient,
  direction and multiplier) on the same subset and gradients.

Every table also has ``run``, ``step``, ``epoch``, ``status``, ``lr`` (η in force at the checkpoint,
after any schedule drop) and ``gamma`` (Nudged-SGD's γ along its top subspace, 1 otherwise). The
projected step along e_i uses the learning rate the run really applies there: γη for the first
nsgd.k directions of a Nudged-SGD run (the checkpoint's eigenvectors standing in for the optimizer's
subspace, refreshed at its own schedule), η otherwise; the decomposed step's ``lr_eff`` records it,
and its "full" step is the nudged one. A diverged checkpoint gives the same tables with NaN values
and ``diverged`` = True.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from pydantic import Field, PositiveFloat, PositiveInt

from ..configbase import Strict
from .base import Analysis, every_checkpoint

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from .context import CheckpointContext


class ProjectConfig(Strict):
    """The projected-gradient analyses of each checkpoint (paper-notes, 'Analyses')."""

    enabled: bool = True
    k: PositiveInt = Field(5, description="Top directions analysed (≤ spectrum.k).")
    alignment_batches: PositiveInt = Field(50, description="B mini-batches for the alignment.")
    random_directions: PositiveInt = Field(5, description="Random unit vectors for the baselines.")
    grad_batches: PositiveInt = Field(10, description="M mini-batch gradients for steps and sections.")
    subset: PositiveInt = Field(1000, description="Examples of the fixed loss-evaluation subset.")
    cross_directions: list[PositiveInt] = Field(default_factory=lambda: [1, 3, 5])
    cross_ks: list[float] = Field(
        default_factory=lambda: [0, 0.25, -0.25, 0.5, -0.5, 1, -1, 2, -2, 4, -4, 8, -8, 16, -16]
    )
    width_thresholds: list[PositiveFloat] = Field(default_factory=lambda: [1.01, 1.1, 1.5, 2.0])
    multipliers: list[PositiveFloat] = Field(default_factory=lambda: [0.25, 0.33, 0.5, 1, 2, 3, 4])
    seed: int = 0


def compute(ctx: CheckpointContext, cfg: ProjectConfig) -> dict[str, pd.DataFrame]:
    """The four projected-gradient tables of one checkpoint (see the module docstring)."""
    import torch

    from ..params import flat_params
    from . import gradients as G
    from . import project_kernels as A
    from .context import add_ident

    assert ctx.eigvecs is not None, "project needs the checkpoint's eigenvectors"
    device = ctx.device
    model = ctx.model()
    loss_fn = ctx.loss_fn
    model.eval()
    ev = ctx.eigvecs
    step, status = ctx.step, ctx.status
    theta = flat_params(model)
    dim = theta.numel()
    k = min(cfg.k, len(ev["eigenvectors"]))
    ok = bool(torch.isfinite(theta).all()) and k > 0
    if not ok:
        status = "diverged" if status == "ok" else status
        theta = torch.full_like(theta, math.nan)
        k = cfg.k
        E = torch.full((k, dim), math.nan, device=device)
        lam = torch.full((k,), math.nan)
    else:
        E = ev["eigenvectors"][:k].to(device=device, dtype=theta.dtype)
        lam = ev["eigenvalues"][:k].double()
    lr = ctx.lr
    lr_e = ctx.direction_lrs(k)
    view = ctx.view
    x, y, n_train = view.x, view.y, view.n
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + step)

    subset_idx = torch.randperm(n_train, generator=gen)[: min(cfg.subset, n_train)].to(device)
    subset = G.batches_of(x[subset_idx], y[subset_idx], 1000)
    t0 = time.perf_counter()

    grads_align = G.batch_gradients(model, loss_fn, theta, view.random_batches(cfg.alignment_batches, gen))
    full = G.full_gradient(model, loss_fn, theta, G.batches_of(x, y, 1000))
    align = A.alignment(grads_align, E, full, n_random=cfg.random_directions, generator=cfg.seed + step)
    align["dim"] = dim
    align["random_baseline"] = A.random_cos_baseline(dim)

    grads = grads_align[: cfg.grad_batches] if cfg.grad_batches <= len(grads_align) else G.batch_gradients(
        model, loss_fn, theta, view.random_batches(cfg.grad_batches, gen))
    dirs: dict[str, torch.Tensor] = {f"e{i}": E[i - 1] for i in cfg.cross_directions if i <= k}
    rnd = torch.randn(dim, generator=gen).to(device=device, dtype=theta.dtype)
    dirs["rand"] = rnd / rnd.norm()
    dir_lr = {f"e{i}": lr_e[i - 1] for i in cfg.cross_directions if i <= k}
    steps_ = {name: A.typical_step(grads, d, dir_lr.get(name, lr)) if ok else math.nan for name, d in dirs.items()}
    cross = A.cross_sections(model, loss_fn, theta, dirs, steps_, subset, ks=cfg.cross_ks)
    widths = A.cross_section_widths(cross, cfg.width_thresholds)
    decomp = A.decomposed_step(model, loss_fn, theta, grads, E, lam, lr, subset, multipliers=cfg.multipliers,
                               generator=cfg.seed + step + 1, direction_lr=lr_e,
                               full_steps=_nudged(ctx, grads, ev["eigenvectors"], ok))
    tables = {"alignment": align, "cross_sections": cross, "widths": widths, "decomposed": decomp}
    ident = {"run": ctx.run_name, "step": step, "epoch": ctx.epoch, "status": status, "lr": lr,
             "gamma": ctx.gamma}
    for df in tables.values():
        add_ident(df, ident)
    ctx.log(f"[{ctx.run_name}] step {step}: project done in {time.perf_counter() - t0:.2f} s")
    return tables


def _nudged(ctx: CheckpointContext, grads: torch.Tensor, eigvecs: torch.Tensor, ok: bool) -> torch.Tensor | None:
    """The update directions of a Nudged-SGD run, g − (1−γ)Σ_{i≤K}(gᵀe_i)e_i, with the checkpoint's
    top-K eigenvectors for the optimizer's subspace; None (the plain gradients) for SGD."""
    gamma = ctx.gamma
    if gamma == 1.0 or not ok:
        return None
    nsgd = ctx.run.optimizer.nsgd
    assert nsgd is not None
    e = eigvecs[: nsgd.k].to(device=grads.device, dtype=grads.dtype)
    return grads - (1.0 - gamma) * (grads @ e.T) @ e


ANALYSIS = Analysis(
    name="project",
    config=ProjectConfig,
    tables=("alignment", "cross_sections", "widths", "decomposed"),
    compute=compute,
    select=every_checkpoint,
    format_version=2,
    summary="projected-gradient analyses of one checkpoint (alignment, cross-sections, decomposed step)",
)
