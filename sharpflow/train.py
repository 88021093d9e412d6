"""Training with checkpoint dumps, resumable and deterministic.

One function, :func:`train`, runs SGD (or Nudged-SGD) for one run and writes

- ``checkpoints/step{step:08d}.pt`` at every step of :func:`sharpflow.config.checkpoint_steps`;
- ``metrics.parquet`` (schema in :data:`METRICS_COLUMNS`).

Determinism: the data order of epoch ``e`` and all randomness of step ``t`` (augmentation,
dropout) come from generators seeded by ``(seed, e)`` and ``(seed, t)``, so a run resumed from
any checkpoint is bitwise identical to one that never stopped (on the same device).

Resume: checkpoints are first written into ``.resume/`` (outside Snakemake's declared outputs,
which Snakemake deletes when a job fails) together with the optimiser state and the metrics so
far, then hard-linked to their declared place. A rerun after a crash starts from the newest
complete resume state and relinks the checkpoints before it.

Divergence: a non-finite mini-batch loss ends training; the remaining scheduled checkpoints
are written with ``status="diverged"`` so every downstream stage still has its inputs and
marks its rows instead of crashing. Early stopping does the same with ``status="stopped"``
(the stopped weights, unchanged).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from .config import FORMAT_VERSION, DatasetConfig, RunConfig, checkpoint_steps, steps_per_epoch, total_steps
from .io import SharpflowError, load_torch, save_torch, write_parquet

#: metrics.parquet: one row per (step, split). ``split`` is "batch" (the mini-batch of that
#: step, every step) or "train"/"valid"/"test" (full evaluations, at checkpoints and, under a
#: plateau schedule, at epoch ends). ``loss`` is mean cross-entropy (nats), ``accuracy`` a
#: fraction in [0, 1], ``lr`` the learning rate used for that step, ``wall_s`` seconds since
#: the run started (summed over resumed sessions), ``dist_init`` ‖θ_t − θ_0‖₂ and
#: ``param_norm`` ‖θ_t‖₂ (evaluation rows only), ``refresh_s``/``refresh_matvecs`` the cost of
#: an NSGD subspace refresh done before that step (batch rows only, NaN otherwise), ``status``
#: "ok" | "diverged" | "stopped".
METRICS_COLUMNS = [
    "run", "step", "epoch", "split", "loss", "accuracy", "lr", "wall_s",
    "dist_init", "param_norm", "refresh_s", "refresh_matvecs", "status",
]

CKPT_KEYS = ("model", "step", "epoch", "status", "run", "format")


def ckpt_name(step: int) -> str:
    return f"step{step:08d}.pt"


def config_digest(run: RunConfig, dataset: DatasetConfig) -> str:
    blob = json.dumps(
        {"run": run.model_dump(mode="json"), "dataset": dataset.model_dump(mode="json"),
         "format": FORMAT_VERSION["train"]},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    h = hashlib.blake2b(repr(xs).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _seed_step(seed: int, device: torch.device) -> None:
    """Seed the generators a step may use (dropout). Cheaper than ``torch.manual_seed``, which
    also queues a lazy CUDA seeding call that records a Python traceback on every call."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)


class _Schedule:
    """Learning-rate schedule and early stopping; its state is a small dict saved on resume."""

    def __init__(self, run: RunConfig):
        self.cfg = run.optimizer.schedule
        self.base_lr = run.optimizer.lr
        self.state: dict[str, float] = {
            "lr": self.base_lr, "best_val_loss": math.inf, "best_val_acc": -math.inf,
            "since_loss": 0, "since_acc": 0,
        }

    @property
    def needs_validation(self) -> bool:
        return self.cfg.kind == "plateau" or self.cfg.early_stop is not None

    def lr_at(self, epoch: float) -> float:
        if self.cfg.kind == "step":
            drops = sum(1 for m in self.cfg.milestones if epoch >= m)
            return self.base_lr * self.cfg.factor**drops
        return self.state["lr"]

    def end_of_epoch(self, val_loss: float, val_acc: float) -> bool:
        """Update on a validation result; True means stop early."""
        s = self.state
        if val_loss < s["best_val_loss"]:
            s["best_val_loss"], s["since_loss"] = val_loss, 0
        else:
            s["since_loss"] += 1
            if self.cfg.kind == "plateau" and s["since_loss"] >= self.cfg.patience:
                s["lr"] *= self.cfg.factor
                s["since_loss"] = 0
        if val_acc > s["best_val_acc"]:
            s["best_val_acc"], s["since_acc"] = val_acc, 0
        else:
            s["since_acc"] += 1
        return self.cfg.early_stop is not None and s["since_acc"] >= self.cfg.early_stop


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> tuple[float, float]:
    """Mean loss (nats) and accuracy of ``model`` in eval mode on (x, y)."""
    from .models import count_correct, loss_fn

    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0.0, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        out = model(xb)
        n_targets = yb.numel()
        total_loss += float(loss_fn(out, yb)) * n_targets
        correct += float(count_correct(out, yb))
        count += n_targets
    model.train(was_training)
    if count == 0:
        return math.nan, math.nan
    return total_loss / count, correct / count


def build_optimizer(model: nn.Module, run: RunConfig) -> torch.optim.Optimizer:
    opt = run.optimizer
    if opt.name == "nsgd":
        from .nsgd import NudgedSGD

        assert opt.nsgd is not None
        return NudgedSGD(
            model.parameters(), lr=opt.lr, gamma=opt.nsgd.gamma, k=opt.nsgd.k,
            momentum=opt.momentum, weight_decay=opt.weight_decay, variant=opt.nsgd.variant,
        )
    return torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)


def hessian_batches(data: Any, n: int, batch_size: int = 512) -> list[tuple[Tensor, Tensor]]:
    """The first ``n`` examples of the prepared Hessian subset, as batches."""
    idx = data.hessian_idx[:n]
    if len(idx) < n:
        raise SharpflowError(f"the Hessian subset has {len(idx)} examples, {n} were asked for")
    x, y = data.train.x[idx], data.train.y[idx]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def _refresh_subspace(model: nn.Module, opt: Any, run: RunConfig, data: Any, gen_seed: int) -> tuple[float, int]:
    """Recompute NSGD's top-k subspace (warm-started); return (seconds, matvecs)."""
    from .hessian import HessianOperator, top_eigenpairs
    from .models import loss_fn

    ns = run.optimizer.nsgd
    assert ns is not None
    t0 = time.perf_counter()
    if ns.subspace == "random":
        g = torch.Generator(device="cpu").manual_seed(gen_seed)
        opt.set_random_subspace(ns.k, generator=g)
        return time.perf_counter() - t0, 0
    n = ns.hessian_examples or len(data.hessian_idx)
    op = HessianOperator(model, loss_fn, hessian_batches(data, n), weight_decay=run.optimizer.weight_decay)
    res = top_eigenpairs(op, k=ns.k, tol=ns.tol, v0=opt.subspace, seed=gen_seed)
    opt.set_subspace(res.eigenvectors)
    return time.perf_counter() - t0, int(res.matvecs)


class _Stash:
    """Checkpoints and resume state under ``{run_dir}/.resume`` (not a Snakemake output)."""

    def __init__(self, run_dir: Path, digest: str):
        self.dir = run_dir / ".resume"
        self.digest = digest

    def checkpoint(self, step: int) -> Path:
        return self.dir / "checkpoints" / ckpt_name(step)

    def state(self) -> Path:
        return self.dir / "state.pt"

    def load(self) -> dict[str, Any] | None:
        path = self.state()
        if not path.exists():
            return None
        try:
            state = load_torch(path, required=("digest", "step", "optimizer"), what="resume state")
            if state["digest"] != self.digest:
                return None  # the run's config changed: start afresh
            # the weights live in the stashed checkpoints, not twice on disk
            state["model"] = load_torch(self.checkpoint(int(state["step"])), required=("model",))["model"]
            state["model0"] = load_torch(self.checkpoint(0), required=("model",))["model"]
        except SharpflowError:
            return None  # an unreadable resume state only costs a restart
        return state

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _publish(src: Path, dst: Path) -> None:
    """Make the stashed checkpoint appear at its declared path, atomically."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def train(
    run: RunConfig,
    dataset: DatasetConfig,
    *,
    run_name: str,
    data_dir: str | Path,
    out_dir: str | Path,
    device: torch.device | str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
) -> pd.DataFrame:
    """Train one run; returns the metrics table (also written to ``metrics.parquet``).

    ``stop_after`` (tests only) simulates a crash: return after that many steps without
    finishing, leaving the resume state behind.
    """
    from .data import load_prepared
    from .models import build_model, loss_fn

    out_dir = Path(out_dir)
    device = torch.device(device)
    data = load_prepared(data_dir, device=device)
    steps = checkpoint_steps(run, dataset)
    ck_set = set(steps)
    last = total_steps(run, dataset)
    spe = steps_per_epoch(run, dataset)
    n_train = run.train_subset or len(data.train.x)
    x_train, y_train = data.train.x[:n_train], data.train.y[:n_train]
    bs = n_train if run.optimizer.batch_size == "full" else min(run.optimizer.batch_size, n_train)
    if run.augment and data.kind != "image":
        raise SharpflowError(f"augment: true needs an image dataset; {run.dataset} is {data.kind}")
    eval_cap = run.eval.max_examples

    def eval_split(x: Tensor, y: Tensor) -> tuple[float, float]:
        if eval_cap is not None:
            x, y = x[:eval_cap], y[:eval_cap]
        return evaluate(model, x, y, run.eval.batch_size)

    torch.manual_seed(_mix(run.seed, -1))
    model = build_model(run.model, tuple(data.input_shape), data.num_classes).to(device)
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    opt = build_optimizer(model, run)
    sched = _Schedule(run)
    stash = _Stash(out_dir, config_digest(run, dataset))
    ckpt_dir = out_dir / "checkpoints"

    rows: list[dict[str, Any]] = []
    start, wall_offset, status = 0, 0.0, "ok"
    state = stash.load()
    if state is not None:
        model.load_state_dict(state["model0"])
        theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.state = dict(state["schedule"])
        rows = json.loads(state["rows"])
        start, wall_offset, status = int(state["step"]), float(state["wall_s"]), str(state["status"])
        for s in steps:
            if s <= start and stash.checkpoint(s).exists():
                _publish(stash.checkpoint(s), ckpt_dir / ckpt_name(s))
        log(f"[{run_name}] resuming from step {start} of {last}")

    t_start = time.perf_counter()

    def wall() -> float:
        return wall_offset + time.perf_counter() - t_start

    def eval_rows(step: int) -> None:
        epoch = step / spe
        theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        extra = {
            "dist_init": float((theta - theta0).norm()), "param_norm": float(theta.norm()),
        }
        for split, (x, y) in (("train", (x_train, y_train)), ("valid", (data.valid.x, data.valid.y)),
                              ("test", (data.test.x, data.test.y))):
            loss, acc = eval_split(x, y) if status != "diverged" else (math.nan, math.nan)
            rows.append({"run": run_name, "step": step, "epoch": epoch, "split": split, "loss": loss,
                         "accuracy": acc, "lr": sched.lr_at(epoch), "wall_s": wall(), **extra,
                         "refresh_s": math.nan, "refresh_matvecs": math.nan, "status": status})

    last_dumped = start if state is not None else -1

    def dump(step: int) -> None:
        """Checkpoint + resume state for ``step`` (weights after ``step`` updates)."""
        nonlocal last_dumped
        last_dumped = step
        eval_rows(step)
        ck = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "step": step,
              "epoch": step / spe, "status": status, "run": run_name, "format": FORMAT_VERSION["train"]}
        save_torch(stash.checkpoint(step), ck)
        save_torch(stash.state(), durable=False, obj={
            "digest": stash.digest, "step": step, "optimizer": opt.state_dict(),
            "schedule": sched.state, "rows": json.dumps(rows), "wall_s": wall(),
            "status": status,
        })
        _publish(stash.checkpoint(step), ckpt_dir / ckpt_name(step))

    if state is None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        if 0 in ck_set:
            dump(0)

    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=last, initial=start, desc=run_name, unit="step", leave=False, mininterval=1.0)
    nsgd = run.optimizer.nsgd if run.optimizer.name == "nsgd" else None
    refresh_every = (nsgd.refresh_every_steps or spe) if nsgd else 0
    perm: Tensor | None = None
    perm_epoch = -1
    losses: list[Tensor] = []
    pending: list[dict[str, Any]] = []

    def flush_losses() -> bool:
        """Record the pending mini-batch rows; False if a loss was not finite."""
        nonlocal losses, pending
        if not pending:
            return True
        vals = torch.stack(losses).float().cpu().numpy()
        ok = True
        for r, (loss_v, acc_v) in zip(pending, vals, strict=True):
            r["loss"], r["accuracy"] = float(loss_v), float(acc_v)
            if not math.isfinite(r["loss"]):
                ok = False
                r["status"] = "diverged"
        rows.extend(pending)
        losses, pending = [], []
        return ok

    step = start
    try:
        while step < last and status == "ok":
            if stop_after is not None and step - start >= stop_after:
                return pd.DataFrame(rows)
            epoch_i, within = divmod(step, spe)
            if epoch_i != perm_epoch:
                g = torch.Generator(device="cpu").manual_seed(_mix(run.seed, epoch_i, 1))
                perm = torch.randperm(n_train, generator=g).to(device)
                perm_epoch = epoch_i
            assert perm is not None
            lr = sched.lr_at(step / spe)
            for group in opt.param_groups:
                group["lr"] = lr
            refresh_s, refresh_mv = math.nan, math.nan
            if nsgd and step % refresh_every == 0:
                refresh_s, refresh_mv = _refresh_subspace(model, opt, run, data, _mix(run.seed, step, 3))
                model.train()
            idx = perm[within * bs : (within + 1) * bs]
            xb, yb = x_train[idx], y_train[idx]
            _seed_step(_mix(run.seed, step, 2), device)
            if run.augment:
                from .data import augment

                gen = torch.Generator(device=xb.device).manual_seed(_mix(run.seed, step, 4))
                xb = augment(xb, gen)
            out = model(xb)
            loss = loss_fn(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if run.optimizer.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), run.optimizer.grad_clip)
            opt.step()
            with torch.no_grad():
                from .models import count_correct

                acc = count_correct(out, yb).float() / yb.numel()
            losses.append(torch.stack([loss.detach(), acc]))
            pending.append({"run": run_name, "step": step, "epoch": step / spe, "split": "batch",
                            "loss": math.nan, "accuracy": math.nan, "lr": lr, "wall_s": wall(),
                            "dist_init": math.nan, "param_norm": math.nan, "refresh_s": refresh_s,
                            "refresh_matvecs": refresh_mv, "status": "ok"})
            step += 1
            if bar is not None:
                bar.update(1)
            at_ckpt = step in ck_set
            epoch_end = step % spe == 0
            if (at_ckpt or len(pending) >= 256 or (epoch_end and sched.needs_validation)) and not flush_losses():
                status = "diverged"
                log(f"[{run_name}] non-finite loss before step {step}: the run diverged")
            if status == "ok" and epoch_end and sched.needs_validation:
                vl, va = eval_split(data.valid.x, data.valid.y)
                if sched.end_of_epoch(vl, va):
                    status = "stopped"
                    log(f"[{run_name}] early stop at epoch {step // spe}: no val-accuracy gain "
                        f"in {sched.cfg.early_stop} epochs")
            if at_ckpt:
                dump(step)
        if not flush_losses() and status == "ok":
            status = "diverged"
        # After divergence or early stopping the remaining scheduled checkpoints hold the
        # final weights, marked, so downstream stages always find their inputs.
        for s in steps:
            if s > last_dumped:
                dump(s)
    finally:
        if bar is not None:
            bar.close()

    df = pd.DataFrame(rows, columns=METRICS_COLUMNS)
    df = df.sort_values(["step", "split"], kind="stable").reset_index(drop=True)
    write_parquet(out_dir / "metrics.parquet", df)
    stash.clear()
    return df


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`train` (weights only; a clear error if unusable)."""
    return load_torch(path, required=CKPT_KEYS, what="checkpoint")


def restore_model(ckpt: dict[str, Any], run: RunConfig, data: Any, path: str | Path) -> nn.Module:
    """Build the run's model and load the checkpoint's weights into it."""
    from .models import build_model

    torch.manual_seed(0)
    model = build_model(run.model, tuple(data.input_shape), data.num_classes)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SharpflowError(f"{path}: the checkpoint does not match model {run.model.name!r}: {first}") from None
    return model


def params_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


__all__ = ["METRICS_COLUMNS", "evaluate", "load_checkpoint", "restore_model", "train"]
