"""The spectrum of one checkpoint: top-k eigenpairs of the training-loss Hessian, certified.

Tables (Parquet, one row per observation; ``run``, ``step``, ``epoch`` and ``status`` = "ok" |
"diverged" | "stopped" copied from the checkpoint):

``spectrum/step*.parquet``: one row per eigenpair —
    rank (1 = largest), eigenvalue (signed), residual ‖Hv−λv‖₂, rel_residual (residual/|λ|),
    converged (rel_residual ≤ tol), matvecs and seconds (of the whole solve), n (examples),
    k, tol, which ("LA"|"LM"), backend, augment ("none": the raw Hessian subset; "fixed": one
    augmented copy of it drawn for this checkpoint, ``spectrum.augment``), warm (warm-started?), and
    per-checkpoint summaries
    repeated on each row: loss (Hessian-subset loss, nats), grad_norm, frobenius (‖H‖_F
    estimate), frobenius_se (delta-method, the probes' spread), frobenius_lo and frobenius_hi (a 95 %
    interval with honest coverage, :func:`~sharpflow.hessian.estimators.frobenius_interval`), trace
    and trace_se (NaN when not asked for).

``eigvecs/step*.pt``: {"eigenvalues": (k,), "eigenvectors": (k, D), "residuals": (k,),
    "step", "run", "status", "format"} — eigenvectors in the flat parameter order of
    :mod:`sharpflow.params`; (0, D) for a diverged checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch

from ..config import FORMAT_VERSION, SpectrumConfig
from ..data import augment, hessian_batches
from ..hessian import HessianOperator, frobenius_norm, top_eigenpairs, trace
from ..hessian.distributed import distributed_hessian, group_rank_world
from ..params import num_params
from ..train import mix_seed
from .context import CheckpointContext, finite


def warm_start(previous: dict[str, Any] | None, dim: int, device: torch.device) -> torch.Tensor | None:
    """The previous checkpoint's eigenvectors as a start block, if usable (right shape, finite)."""
    if previous is None:
        return None
    vecs = previous["eigenvectors"]
    if vecs.ndim == 2 and vecs.shape[1] == dim and len(vecs) > 0 and bool(torch.isfinite(vecs).all()):
        return vecs.to(device=device, dtype=torch.float32)
    return None


def augmented(cfg: SpectrumConfig, ctx: CheckpointContext) -> bool:
    """Whether this checkpoint's Hessian is over an augmented copy of the subset."""
    return cfg.augment == "fixed" and ctx.run.augment


Batches = list[tuple[torch.Tensor, torch.Tensor]]


def augment_batches(batches: Batches, step: int) -> Batches:
    """One augmented copy of the Hessian subset's images (training's shifts and flips), drawn from a
    generator seeded by the checkpoint's step: the same images for every product of the checkpoint."""
    out = []
    for i, (x, y) in enumerate(batches):
        gen = torch.Generator(device=x.device).manual_seed(mix_seed(step, i, 6))
        out.append((augment(x, gen), y))
    return out


def _diverged(ctx: CheckpointContext, cfg: SpectrumConfig, base: dict[str, Any],
              dim: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    nan = math.nan
    df = pd.DataFrame([{**base, "rank": r + 1, "eigenvalue": nan, "residual": nan, "rel_residual": nan,
                        "converged": False, "matvecs": 0, "seconds": 0.0, "warm": False, "loss": nan,
                        "grad_norm": nan, "frobenius": nan, "frobenius_se": nan, "frobenius_lo": nan,
                        "frobenius_hi": nan, "trace": nan, "trace_se": nan} for r in range(cfg.k)])
    vecs = {"eigenvalues": torch.full((0,), nan), "eigenvectors": torch.zeros(0, dim),
            "residuals": torch.zeros(0), "step": ctx.step, "run": ctx.run_name,
            "status": "diverged", "format": FORMAT_VERSION["spectrum"]}
    return df, vecs


def compute(
    ctx: CheckpointContext,
    cfg: SpectrumConfig,
    previous: dict[str, Any] | None = None,
    *,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The spectrum table and the eigenvector file's contents of one checkpoint.

    ``previous``: the eigenvector file of the checkpoint before it in its warm-start chain.

    Inside a process group of several ranks (``sharpflow analyse`` under torchrun or srun), every
    rank calls this with the same checkpoint, subset and ``previous``: each builds the Hessian of
    its shard of the subset (:func:`~sharpflow.hessian.distributed.distributed_hessian`, weight
    decay added once after the all-reduce), and the solver and the estimators run unchanged on
    every rank with the same seeds, so every rank returns the same table and eigenvectors.
    """

    model = ctx.model()
    loss_fn = ctx.loss_fn
    data, step = ctx.data, ctx.step
    n = cfg.n or len(data.hessian_idx)
    dim = num_params(model)
    base = {"run": ctx.run_name, "step": step, "epoch": ctx.epoch, "status": ctx.status, "n": n, "k": cfg.k,
            "tol": cfg.tol, "which": cfg.which, "backend": cfg.backend,
            "augment": "fixed" if augmented(cfg, ctx) else "none"}
    if ctx.status == "diverged" or not finite(model):
        base["status"] = "diverged"
        log(f"[{ctx.run_name}] step {step}: diverged checkpoint, no spectrum")
        return _diverged(ctx, cfg, base, dim)

    v0 = warm_start(previous, dim, ctx.device)
    batches = hessian_batches(data, n)
    if augmented(cfg, ctx):
        batches = augment_batches(batches, step)
    wd = ctx.run.optimizer.weight_decay
    rank, world = group_rank_world()
    if world > 1:  # this rank's shard of the subset, λ added once after the all-reduce; the rest in lockstep
        op: Any = distributed_hessian(model, loss_fn, batches, weight_decay=wd, eval_mode=cfg.eval_mode,
                                      chunk_size=cfg.chunk_size)
    else:
        op = HessianOperator(model, loss_fn, batches, weight_decay=wd, eval_mode=cfg.eval_mode,
                             chunk_size=cfg.chunk_size)
    t0 = time.perf_counter()
    res = top_eigenpairs(op, k=cfg.k, tol=cfg.tol, v0=v0, which=cfg.which, backend=cfg.backend,
                         max_matvecs=cfg.max_matvecs, seed=step, progress=progress and rank == 0)
    seconds = time.perf_counter() - t0
    n_conv = int(res.converged.sum())
    if n_conv < cfg.k:
        log(f"[{ctx.run_name}] step {step}: only {n_conv} of {cfg.k} pairs reached rel. residual ≤ {cfg.tol} "
            f"(worst {float(res.rel_residuals.max()):.2e}); reported as not converged")
    grad = op.gradient()
    summary = {"loss": op.loss(), "grad_norm": float(grad.norm()), "frobenius": math.nan,
               "frobenius_se": math.nan, "frobenius_lo": math.nan, "frobenius_hi": math.nan,
               "trace": math.nan, "trace_se": math.nan}
    if cfg.frobenius_probes:
        fro = frobenius_norm(op, cfg.frobenius_probes, seed=step)
        summary.update(frobenius=fro.estimate, frobenius_se=fro.se, frobenius_lo=fro.lower, frobenius_hi=fro.upper)
    if cfg.trace_probes:
        summary["trace"], summary["trace_se"] = trace(op, cfg.trace_probes, seed=step)
    rows = [{**base, "rank": r + 1, "eigenvalue": float(res.eigenvalues[r]),
             "residual": float(res.residuals[r]), "rel_residual": float(res.rel_residuals[r]),
             "converged": bool(res.converged[r]), "matvecs": int(res.matvecs), "seconds": seconds,
             "warm": v0 is not None, **summary} for r in range(len(res.eigenvalues))]
    dtype = torch.float16 if cfg.eigvec_dtype == "float16" else torch.float32
    vecs = {"eigenvalues": res.eigenvalues.float().cpu(), "eigenvectors": res.eigenvectors.to(dtype).cpu(),
            "residuals": res.residuals.float().cpu(), "step": step, "run": ctx.run_name,
            "status": ctx.status, "format": FORMAT_VERSION["spectrum"]}
    log(f"[{ctx.run_name}] step {step}: λ1={float(res.eigenvalues[0]):.4g}, {res.matvecs} HVPs, {seconds:.2f} s"
        f"{' (warm)' if v0 is not None else ''}{f', {world} ranks' if world > 1 else ''}")
    return pd.DataFrame(rows), vecs
