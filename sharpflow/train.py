"""Training with checkpoint dumps, resumable and deterministic.

One function, :func:`train`, runs SGD (or Nudged-SGD) for one run and writes

- ``checkpoints/step{step:08d}.pt`` at every step of :func:`sharpflow.config.checkpoint_steps`;
- ``metrics.parquet`` (schema in :data:`METRICS_COLUMNS`).

Determinism: the data order of epoch ``e`` and all randomness of step ``t`` (augmentation,
dropout) come from generators seeded by ``(seed, e)`` and ``(seed, t)``, so a run resumed from
any checkpoint is bitwise identical to one that never stopped (on the same device). A model
without dropout draws nothing at random in a step, and its steps skip the seeding.

Resume: checkpoints are first written into ``.resume/`` (outside Snakemake's declared outputs,
which Snakemake deletes when a job fails) together with the optimiser state and the metrics
since the previous checkpoint, then hard-linked to their declared place. A rerun after a crash
starts from the newest complete resume state and relinks the checkpoints before it.

Cost: the files are serialised on the training thread (a snapshot) and written, fsynced and
published in order by one background thread, so disk latency overlaps the next steps; the
per-step bookkeeping is a few tensor ops whose values are read back in batches of 256 steps.
``bench/train_overhead.py`` measures the total against a bare PyTorch loop.

Divergence: a non-finite mini-batch loss ends training; the remaining scheduled checkpoints
are written with ``status="diverged"`` so every downstream stage still has its inputs and
marks its rows instead of crashing. Early stopping does the same with ``status="stopped"``
(the stopped weights, unchanged).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from .config import FORMAT_VERSION, DatasetConfig, RunConfig, checkpoint_steps, steps_per_epoch, total_steps
from .io import SharpflowError, load_torch, write_bytes, write_parquet

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
    """Checkpoints and resume state under ``{run_dir}/.resume`` (not a Snakemake output).

    ``state.pt`` (optimizer, schedule, wall clock, status at the newest dump) points at a stashed
    checkpoint, which holds the weights; ``rows/step{N}.json`` hold the metrics rows recorded up
    to dump N since the dump before it, so a dump costs the same at step 100 as at step 100,000.
    """

    def __init__(self, run_dir: Path, digest: str):
        self.dir = run_dir / ".resume"
        self.digest = digest

    def checkpoint(self, step: int) -> Path:
        return self.dir / "checkpoints" / ckpt_name(step)

    def rows(self, step: int) -> Path:
        return self.dir / "rows" / f"step{step:08d}.json"

    def state(self) -> Path:
        return self.dir / "state.pt"

    def load(self) -> dict[str, Any] | None:
        path = self.state()
        if not path.exists():
            return None
        try:
            state = load_torch(path, required=("digest", "step", "optimizer", "dumps"), what="resume state")
            if state["digest"] != self.digest:
                return None  # the run's config changed: start afresh
            # the weights live in the stashed checkpoints, not twice on disk
            state["model"] = load_torch(self.checkpoint(int(state["step"])), required=("model",))["model"]
            state["model0"] = load_torch(self.checkpoint(0), required=("model",))["model"]
            rows: list[dict[str, Any]] = []
            for s in state["dumps"]:
                chunk = self.rows(int(s))
                try:
                    rows.extend(json.loads(chunk.read_text()))
                except (OSError, ValueError):
                    return None  # a lost or torn chunk only costs a restart
            state["rows"] = rows
        except SharpflowError:
            return None  # an unreadable resume state only costs a restart
        return state

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class _Writer:
    """One background thread that runs file writes in the order they were submitted.

    Training submits a dump as closures over bytes already serialised (a snapshot of the
    weights), so it goes on with the next steps while the files are written and fsynced. A
    failed write is re-raised on the training thread at the next submit or at :meth:`close`;
    the jobs after it are skipped, so nothing is published that rests on a missing file.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._failed = False  # sticky: once a write failed, every later job is skipped
        self._raised = False
        self._thread: threading.Thread | None = None

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if not self._failed:
                try:
                    job()
                except BaseException as err:  # handed to the training thread
                    self._error = err
                    self._failed = True

    def _raise(self) -> None:
        if self._failed and not self._raised:
            self._raised = True
            assert self._error is not None
            raise self._error

    def submit(self, job: Callable[[], None]) -> None:
        self._raise()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="sharpflow-checkpoints", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait for every submitted write; raise the first failure unless ``raise_errors`` is False."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        if raise_errors:
            self._raise()


def _serialise(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


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
    from .models import build_model, count_correct_each, draws_randomness, loss_fn

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
    dumps: list[int] = []  # the steps dumped so far, each with its rows chunk in the stash
    start, wall_offset, status = 0, 0.0, "ok"
    state = stash.load()
    if state is not None:
        model.load_state_dict(state["model0"])
        theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.state = dict(state["schedule"])
        rows = state["rows"]
        dumps = [int(s) for s in state["dumps"]]
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
    writer = _Writer()
    saved_rows = len(rows)

    def dump(step: int) -> None:
        """Checkpoint + resume state for ``step`` (weights after ``step`` updates).

        Serialised here, written by ``writer``: the checkpoint (fsynced), the rows since the
        previous dump, the resume state that names both, then the published link.
        """
        nonlocal last_dumped, saved_rows
        last_dumped = step
        eval_rows(step)
        dumps.append(step)
        ck = _serialise({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "step": step,
                         "epoch": step / spe, "status": status, "run": run_name,
                         "format": FORMAT_VERSION["train"]})
        chunk = json.dumps(rows[saved_rows:]).encode()
        saved_rows = len(rows)
        st = _serialise({"digest": stash.digest, "step": step, "optimizer": opt.state_dict(),
                         "schedule": dict(sched.state), "dumps": list(dumps), "wall_s": wall(), "status": status})
        ck_path, rows_path, st_path = stash.checkpoint(step), stash.rows(step), stash.state()

        def write() -> None:
            write_bytes(ck_path, ck)
            write_bytes(rows_path, chunk, durable=False)
            write_bytes(st_path, st, durable=False)
            _publish(ck_path, ckpt_dir / ckpt_name(step))

        writer.submit(write)

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
    seed_steps = draws_randomness(model)
    # Per step: the loss stays on the device and the logits are kept (detached) while they are
    # small; their argmax is taken for many steps at once and read back every 256 steps.
    losses: list[Tensor] = []
    held: list[tuple[Tensor, Tensor]] = []  # (logits, targets) of steps not yet counted
    held_size = 0
    correct: list[Tensor] = []  # counts of steps already counted, on the device
    counted: list[int] = []  # targets of those steps (a last batch may be short; tokens for an LM)
    pending: list[dict[str, Any]] = []

    def count_held() -> None:
        nonlocal held, held_size
        if held:
            correct.append(count_correct_each(held))
            counted.extend(t.numel() for _, t in held)
            held, held_size = [], 0

    def flush_losses() -> bool:
        """Record the pending mini-batch rows; False if a loss was not finite."""
        nonlocal losses, correct, counted, pending
        if not pending:
            return True
        count_held()
        loss_v = torch.stack(losses).double().cpu().tolist()
        acc_v = (torch.cat(correct).cpu().double() / torch.tensor(counted, dtype=torch.float64)).tolist()
        ok = True
        for r, lv, av in zip(pending, loss_v, acc_v, strict=True):
            r["loss"], r["accuracy"] = lv, av
            if not math.isfinite(lv):
                ok = False
                r["status"] = "diverged"
        rows.extend(pending)
        losses, correct, counted, pending = [], [], [], []
        return ok

    step = start
    lr_set = math.nan  # the learning rate in opt.param_groups
    augment, grad_clip = run.augment, run.optimizer.grad_clip
    try:
        while step < last and status == "ok":
            if stop_after is not None and step - start >= stop_after:
                writer.close()
                return pd.DataFrame(rows)
            epoch_i, within = divmod(step, spe)
            if epoch_i != perm_epoch:
                g = torch.Generator(device="cpu").manual_seed(_mix(run.seed, epoch_i, 1))
                perm = torch.randperm(n_train, generator=g).to(device)
                perm_epoch = epoch_i
            assert perm is not None
            lr = sched.lr_at(step / spe)
            if lr != lr_set:
                for group in opt.param_groups:
                    group["lr"] = lr
                lr_set = lr
            refresh_s, refresh_mv = math.nan, math.nan
            if nsgd and step % refresh_every == 0:
                refresh_s, refresh_mv = _refresh_subspace(model, opt, run, data, _mix(run.seed, step, 3))
                model.train()
            idx = perm[within * bs : (within + 1) * bs]
            xb, yb = x_train[idx], y_train[idx]
            if seed_steps:
                _seed_step(_mix(run.seed, step, 2), device)
            if augment:
                from .data import augment as augment_batch

                gen = torch.Generator(device=xb.device).manual_seed(_mix(run.seed, step, 4))
                xb = augment_batch(xb, gen)
            out = model(xb)
            loss = loss_fn(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            held.append((out.detach(), yb))
            held_size += out.numel()
            if held_size > 1 << 22:  # 16 MB of float32 logits at most
                count_held()
            losses.append(loss.detach())
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
        writer.close()  # every checkpoint is on disk and published before the metrics appear
    finally:
        # On an error or an interrupt, still finish the writes already submitted: the resume
        # state then holds every step trained before it (the error itself is what propagates).
        writer.close(raise_errors=False)
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
