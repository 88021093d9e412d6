"""Stage glue: load a stage's inputs, call the pure computations, write its outputs atomically.

Table schemas (Parquet, one row per observation; every table has ``run``, ``step``, ``epoch``
and ``status`` = "ok" | "diverged" | "stopped" copied from the checkpoint):

``spectrum/step*.parquet``: one row per eigenpair —
    rank (1 = largest), eigenvalue (signed), residual ‖Hv−λv‖₂, rel_residual (residual/|λ|),
    converged (rel_residual ≤ tol), matvecs and seconds (of the whole solve), n (examples),
    k, tol, which ("LA"|"LM"), backend, warm (warm-started?), and per-checkpoint summaries
    repeated on each row: loss (Hessian-subset loss, nats), grad_norm, frobenius (‖H‖_F
    estimate) and frobenius_se, trace and trace_se (NaN when not asked for).

``eigvecs/step*.pt``: {"eigenvalues": (k,), "eigenvectors": (k, D), "residuals": (k,),
    "step", "run", "status", "format"} — eigenvectors in the flat parameter order of
    :mod:`sharpflow.params`; (0, D) for a diverged checkpoint.

The project tables are documented in :func:`project_stage`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch

from .config import FORMAT_VERSION, EscapeConfig, ProjectConfig, RunConfig, SpectrumConfig
from .io import SharpflowError, load_torch, read_parquet, save_torch, write_parquet

EIGVEC_KEYS = ("eigenvalues", "eigenvectors", "residuals", "step", "run", "status", "format")


def _context(run: RunConfig, data_dir: str | Path, checkpoint: str | Path, device: torch.device):
    """Data, the checkpoint and the model restored from it, all on ``device``."""
    from .data import load_prepared
    from .train import load_checkpoint, restore_model

    ck = load_checkpoint(checkpoint)
    data = load_prepared(data_dir, device=device)
    model = restore_model(ck, run, data, checkpoint).to(device)
    return data, ck, model


def _finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def spectrum_stage(
    cfg: SpectrumConfig,
    run: RunConfig,
    *,
    run_name: str,
    data_dir: str | Path,
    checkpoint: str | Path,
    previous: str | Path | None,
    out_table: str | Path,
    out_eigvecs: str | Path,
    device: torch.device | str = "cpu",
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Top-k eigenpairs of one checkpoint's training-loss Hessian, with their residuals."""
    from .hessian import HessianOperator, frobenius_norm, top_eigenpairs, trace
    from .models import loss_fn
    from .params import num_params
    from .train import hessian_batches

    device = torch.device(device)
    data, ck, model = _context(run, data_dir, checkpoint, device)
    step, epoch, status = int(ck["step"]), float(ck["epoch"]), str(ck["status"])
    n = cfg.n or len(data.hessian_idx)
    dim = num_params(model)
    base = {"run": run_name, "step": step, "epoch": epoch, "status": status, "n": n, "k": cfg.k,
            "tol": cfg.tol, "which": cfg.which, "backend": cfg.backend}
    if status == "diverged" or not _finite(model):
        status = "diverged"
        base["status"] = status
        nan = math.nan
        df = pd.DataFrame([{**base, "rank": r + 1, "eigenvalue": nan, "residual": nan, "rel_residual": nan,
                            "converged": False, "matvecs": 0, "seconds": 0.0, "warm": False, "loss": nan,
                            "grad_norm": nan, "frobenius": nan, "frobenius_se": nan, "trace": nan,
                            "trace_se": nan} for r in range(cfg.k)])
        save_torch(out_eigvecs, {"eigenvalues": torch.full((0,), nan), "eigenvectors": torch.zeros(0, dim),
                                 "residuals": torch.zeros(0), "step": step, "run": run_name,
                                 "status": status, "format": FORMAT_VERSION["spectrum"]})
        write_parquet(out_table, df)
        log(f"[{run_name}] step {step}: diverged checkpoint, no spectrum")
        return df

    v0 = None
    if previous is not None and Path(previous).exists():
        prev = load_torch(previous, required=EIGVEC_KEYS, what="eigenvectors")
        vecs = prev["eigenvectors"]
        if vecs.ndim == 2 and vecs.shape[1] == dim and len(vecs) > 0 and bool(torch.isfinite(vecs).all()):
            v0 = vecs.to(device=device, dtype=torch.float32)
    op = HessianOperator(model, loss_fn, hessian_batches(data, n), weight_decay=run.optimizer.weight_decay,
                         eval_mode=cfg.eval_mode, chunk_size=cfg.chunk_size)
    t0 = time.perf_counter()
    res = top_eigenpairs(op, k=cfg.k, tol=cfg.tol, v0=v0, which=cfg.which, backend=cfg.backend,
                         max_matvecs=cfg.max_matvecs, seed=step, progress=progress)
    seconds = time.perf_counter() - t0
    n_conv = int(res.converged.sum())
    if n_conv < cfg.k:
        log(f"[{run_name}] step {step}: only {n_conv} of {cfg.k} pairs reached rel. residual ≤ {cfg.tol} "
            f"(worst {float(res.rel_residuals.max()):.2e}); reported as not converged")
    grad = op.gradient()
    summary = {"loss": op.loss(), "grad_norm": float(grad.norm()), "frobenius": math.nan,
               "frobenius_se": math.nan, "trace": math.nan, "trace_se": math.nan}
    if cfg.frobenius_probes:
        summary["frobenius"], summary["frobenius_se"] = frobenius_norm(op, cfg.frobenius_probes, seed=step)
    if cfg.trace_probes:
        summary["trace"], summary["trace_se"] = trace(op, cfg.trace_probes, seed=step)
    rows = []
    for r in range(len(res.eigenvalues)):
        rows.append({**base, "rank": r + 1, "eigenvalue": float(res.eigenvalues[r]),
                     "residual": float(res.residuals[r]), "rel_residual": float(res.rel_residuals[r]),
                     "converged": bool(res.converged[r]), "matvecs": int(res.matvecs), "seconds": seconds,
                     "warm": v0 is not None, **summary})
    df = pd.DataFrame(rows)
    dtype = torch.float16 if cfg.eigvec_dtype == "float16" else torch.float32
    save_torch(out_eigvecs, {"eigenvalues": res.eigenvalues.float().cpu(),
                             "eigenvectors": res.eigenvectors.to(dtype).cpu(),
                             "residuals": res.residuals.float().cpu(), "step": step, "run": run_name,
                             "status": status, "format": FORMAT_VERSION["spectrum"]})
    write_parquet(out_table, df)
    log(f"[{run_name}] step {step}: λ1={float(res.eigenvalues[0]):.4g}, {res.matvecs} HVPs, {seconds:.2f} s"
        f"{' (warm)' if v0 is not None else ''}")
    return df


def aggregate(inputs: Sequence[str | Path], out: str | Path) -> pd.DataFrame:
    """Concatenate per-checkpoint tables (same schema) into one, sorted by step."""
    frames = [read_parquet(p) for p in inputs]
    if not frames:
        raise SharpflowError(f"{out}: nothing to aggregate")
    cols = list(frames[0].columns)
    for p, f in zip(inputs, frames, strict=True):
        if list(f.columns) != cols:
            raise SharpflowError(f"{p}: columns {list(f.columns)} differ from {inputs[0]}: {cols}")
    df = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else frames[0]
    if "step" in df.columns:
        df = df.sort_values("step", kind="stable").reset_index(drop=True)
    write_parquet(out, df)
    return df


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def project_stage(
    cfg: ProjectConfig,
    run: RunConfig,
    *,
    run_name: str,
    data_dir: str | Path,
    checkpoint: str | Path,
    eigvecs: str | Path,
    out_dir: str | Path,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> dict[str, pd.DataFrame]:
    """The projected-gradient analyses of one checkpoint (paper-notes, "Analyses").

    Writes ``{out_dir}/{kind}/step{step:08d}.parquet`` for kind in

    - ``alignment``: :func:`sharpflow.analysis.alignment` over ``cfg.alignment_batches``
      random mini-batches at the run's batch size and the full-batch gradient (whole training
      set), against the top ``cfg.k`` eigenvectors and ``cfg.random_directions`` random ones;
      extra columns ``dim`` (D) and ``random_baseline`` (sqrt(2/(πD)));
    - ``cross_sections``: :func:`sharpflow.analysis.cross_sections` along e_i for i in
      ``cfg.cross_directions`` (those ≤ k) and one random direction, k in ``cfg.cross_ks`` in units
      of the typical projected step s_i = η·mean|gᵀe_i| over ``cfg.grad_batches`` mini-batches,
      loss on a fixed seeded subset of ``cfg.subset`` training examples;
    - ``widths``: :func:`sharpflow.analysis.cross_section_widths` of those sections;
    - ``decomposed``: :func:`sharpflow.analysis.decomposed_step` (one row per gradient, direction
      and multiplier) on the same subset and gradients.

    Every table also has ``run``, ``step``, ``epoch``, ``status``, ``lr``. A diverged checkpoint
    gives the same tables with NaN values and ``diverged`` = True.
    """
    from . import analysis as A
    from .models import loss_fn
    from .params import flat_params

    device = torch.device(device)
    data, ck, model = _context(run, data_dir, checkpoint, device)
    model.eval()
    ev = load_torch(eigvecs, required=EIGVEC_KEYS, what="eigenvectors")
    step, epoch, status = int(ck["step"]), float(ck["epoch"]), str(ck["status"])
    if int(ev["step"]) != step:
        raise SharpflowError(f"{eigvecs}: eigenvectors are for step {ev['step']}, the checkpoint is step {step}")
    theta = flat_params(model)
    dim = theta.numel()
    k = min(cfg.k, len(ev["eigenvectors"]))
    finite = bool(torch.isfinite(theta).all()) and k > 0
    if not finite:
        status = "diverged" if status == "ok" else status
        theta = torch.full_like(theta, math.nan)
        k = cfg.k
        E = torch.full((k, dim), math.nan, device=device)
        lam = torch.full((k,), math.nan)
    else:
        E = ev["eigenvectors"][:k].to(device=device, dtype=theta.dtype)
        lam = ev["eigenvalues"][:k].double()
    lr = run.optimizer.lr
    n_train = run.train_subset or len(data.train.x)
    x, y = data.train.x[:n_train], data.train.y[:n_train]
    bs = n_train if run.optimizer.batch_size == "full" else min(run.optimizer.batch_size, n_train)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + step)

    def sample_batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.stack([torch.randperm(n_train, generator=gen)[:bs] for _ in range(count)]).to(device)
        return [(x[i], y[i]) for i in idx]

    subset_idx = torch.randperm(n_train, generator=gen)[: min(cfg.subset, n_train)].to(device)
    subset = _batches(x[subset_idx], y[subset_idx], 1000)
    t0 = time.perf_counter()

    grads_align = A.batch_gradients(model, loss_fn, theta, sample_batches(cfg.alignment_batches))
    full = A.full_gradient(model, loss_fn, theta, _batches(x, y, 1000))
    align = A.alignment(grads_align, E, full, n_random=cfg.random_directions, generator=cfg.seed + step)
    align["dim"] = dim
    align["random_baseline"] = A.random_cos_baseline(dim)

    grads = grads_align[: cfg.grad_batches] if cfg.grad_batches <= len(grads_align) else A.batch_gradients(
        model, loss_fn, theta, sample_batches(cfg.grad_batches))
    dirs: dict[str, torch.Tensor] = {}
    for i in cfg.cross_directions:
        if i <= k:
            dirs[f"e{i}"] = E[i - 1]
    rnd = torch.randn(dim, generator=gen).to(device=device, dtype=theta.dtype)
    dirs["rand"] = rnd / rnd.norm()
    steps_ = {name: A.typical_step(grads, d, lr) if finite else math.nan for name, d in dirs.items()}
    cross = A.cross_sections(model, loss_fn, theta, dirs, steps_, subset, ks=cfg.cross_ks)
    widths = A.cross_section_widths(cross, cfg.width_thresholds)
    decomp = A.decomposed_step(model, loss_fn, theta, grads, E, lam, lr, subset, multipliers=cfg.multipliers,
                               generator=cfg.seed + step + 1)
    tables = {"alignment": align, "cross_sections": cross, "widths": widths, "decomposed": decomp}
    ident = {"run": run_name, "step": step, "epoch": epoch, "status": status, "lr": lr}
    for kind, df in tables.items():
        for col, val in reversed(ident.items()):
            if col in df.columns:
                df[col] = val
            else:
                df.insert(0, col, val)
        write_parquet(Path(out_dir) / kind / f"step{step:08d}.parquet", df)
    log(f"[{run_name}] step {step}: project done in {time.perf_counter() - t0:.2f} s")
    return tables


def escape_stage(
    cfg: EscapeConfig,
    run: RunConfig,
    *,
    run_name: str,
    data_dir: str | Path,
    checkpoint: str | Path,
    eigvecs: str | Path,
    out_table: str | Path,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """The escape ablation from one checkpoint: one :func:`sharpflow.analysis.escape_ablation` per
    mode, on the run's data order and learning rate, λ_max tracked by a warm-started Lanczos solve
    on the run's Hessian subset. Rows: step (iterations from the checkpoint), loss (on a fixed
    subset), lambda_max, mode, factor, lr, e1_coord, dist_from_start, diverged, plus run,
    start_step (the checkpoint), epoch, status."""
    from .analysis import escape_ablation
    from .hessian import HessianOperator, top_eigenpairs
    from .models import loss_fn
    from .params import flat_params, set_flat_params
    from .train import hessian_batches

    device = torch.device(device)
    data, ck, model = _context(run, data_dir, checkpoint, device)
    model.eval()
    ev = load_torch(eigvecs, required=EIGVEC_KEYS, what="eigenvectors")
    theta = flat_params(model)
    step = int(ck["step"])
    n_train = run.train_subset or len(data.train.x)
    x, y = data.train.x[:n_train], data.train.y[:n_train]
    bs = n_train if run.optimizer.batch_size == "full" else min(run.optimizer.batch_size, n_train)
    gen = torch.Generator(device="cpu").manual_seed(step)
    subset_idx = torch.randperm(n_train, generator=gen)[: min(cfg.subset, n_train)].to(device)
    subset = _batches(x[subset_idx], y[subset_idx], 1000)
    hbatches = hessian_batches(data, len(data.hessian_idx))
    probe = copy.deepcopy(model)
    warm: dict[str, torch.Tensor | None] = {"v": None}

    def lambda_max(th: torch.Tensor) -> float:
        set_flat_params(probe, th)
        op = HessianOperator(probe, loss_fn, hbatches, weight_decay=run.optimizer.weight_decay)
        res = top_eigenpairs(op, k=1, tol=cfg.lambda_tol, v0=warm["v"], seed=step)
        warm["v"] = res.eigenvectors
        return float(res.eigenvalues[0])

    def batches():
        epoch = 0
        while True:
            perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(step * 7919 + epoch)).to(device)
            for i in range(0, n_train, bs):
                idx = perm[i : i + bs]
                yield x[idx], y[idx]
            epoch += 1

    finite = bool(torch.isfinite(theta).all()) and len(ev["eigenvectors"]) > 0
    frames = []
    t0 = time.perf_counter()
    for mode in cfg.modes:
        e1 = ev["eigenvectors"][0].to(device=device, dtype=theta.dtype) if finite else torch.full_like(theta, math.nan)
        warm["v"] = None
        df = escape_ablation(model, loss_fn, theta, e1, batches(), lr=run.optimizer.lr, steps=cfg.iterations,
                             mode=mode, factor=cfg.factor, eval_batches=subset, eval_every=cfg.eval_every,
                             lambda_max_fn=lambda_max if finite else None)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    ident = {"run": run_name, "start_step": step, "epoch": float(ck["epoch"]), "status": str(ck["status"])}
    for col, val in reversed(ident.items()):
        out.insert(0, col, val)
    write_parquet(out_table, out)
    log(f"[{run_name}] step {step}: escape ablation ({len(cfg.modes)} modes) in {time.perf_counter() - t0:.1f} s")
    return out
