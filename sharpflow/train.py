"""Training with checkpoint dumps, resumable and deterministic.

One function, :func:`train`, runs SGD (or Nudged-SGD) for one run and writes

- ``checkpoints/step{step:08d}.pt`` at every step of :func:`sharpflow.config.checkpoint_steps`
  (names, loading and writing in :mod:`sharpflow.checkpoints`), each reached by an update with that
  update Δθ = θ_t − θ_{t−1} (``last_update``: a copy of θ is kept before an update that leads to a
  checkpoint; nothing else changes);
- ``metrics.parquet`` (schema in :data:`METRICS_COLUMNS`).

Determinism: the data order of epoch ``e`` and all randomness of step ``t`` (augmentation,
dropout) come from generators seeded by ``(seed, e)`` and ``(seed, t)``, so a run resumed from
any checkpoint is bitwise identical to one that never stopped (on the same device). A model
without dropout draws nothing at random in a step, and its steps skip the seeding.

Resume: each dump also writes the optimiser state and the metrics since the previous dump into
``.resume/`` (outside Snakemake's declared outputs, see :class:`~sharpflow.checkpoints.CheckpointWriter`);
a rerun after a crash starts from the newest complete resume state.

Cost: the dumps are serialised on the training thread and written by a background thread, so
disk latency overlaps the next steps; the per-step bookkeeping is a few tensor ops whose values
are read back in batches of 256 steps (:class:`_Metrics`). ``bench/train_overhead.py`` measures
the total against a bare PyTorch loop.

Divergence: a non-finite mini-batch loss ends training; the remaining scheduled checkpoints
are written with ``status="diverged"`` so every downstream stage still has its inputs and
marks its rows instead of crashing. Early stopping does the same with ``status="stopped"``
(the stopped weights, unchanged).

Several processes (``world_size`` > 1, started by torchrun or srun; :func:`join_world` joins the
process group): every rank draws the same mini-batches in the same order as one process would
(:class:`DataOrder`, unchanged) and takes a contiguous slice of each (:func:`~sharpflow.hessian.distributed.shard`:
sizes differ by at most one). It computes the gradient of the *sum* of its slice's losses; one
all-reduce (sum) of the flat gradient, which also carries the slice's loss sum, its correct count
and BatchNorm's running statistics, then a division by the batch's size give every rank the whole
batch's mean gradient (:class:`_DataParallel`). Clipping, weight decay, momentum, Adam, SAM (both
of its gradients are reduced) and NSGD see that gradient, so an update is one process's up to the
order of the floating-point sums. NSGD's subspace refresh multiplies by the distributed Hessian
(:func:`~sharpflow.hessian.distributed.distributed_hessian`), the same seed on every rank.
Evaluations are sharded (each rank evaluates a contiguous part of the split; one all-reduce of
loss sum, correct count and count), so every rank knows every number and makes the same
decisions (divergence, plateau, early stopping, the best checkpoint). Only rank 0 writes
(checkpoints, resume state, metrics, log lines); every rank reads the same resume state, and
the ranks check that they resume from the same step. Dropout draws its masks per rank (seeded
by step and rank) and BatchNorm normalises by its slice's statistics: for such models an update
is not one process's (the running statistics are averaged, weighted by slice size).

Layout: :func:`train` builds a :class:`_Run` and calls :meth:`_Run.begin` (resume or start),
:meth:`_Run.loop` (each step :meth:`_Run.update`, then :meth:`_Run.after_update`) and
:meth:`_Run.finish`. The parts: :class:`_Schedule` (learning rate, early stopping),
:class:`DataOrder` (mini-batches), :class:`_Metrics` (the rows), :func:`_refresh_subspace`
(NSGD), :class:`_DataParallel` (several ranks) and :class:`~sharpflow.checkpoints.CheckpointWriter`
(dumps and resume state).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .checkpoints import CheckpointWriter
from .config import (
    FORMAT_VERSION,
    DatasetConfig,
    RunConfig,
    ScheduleConfig,
    checkpoint_steps,
    steps_per_epoch,
    total_steps,
)
from .data import Dataset, TrainView, augment, hessian_batches, load_prepared, train_view
from .errors import SharpflowError
from .hessian import HessianOperator, top_eigenpairs
from .hessian.distributed import DistInfo, _all_reduce, distributed_hessian, group_rank_world, init_distributed, shard
from .io import write_parquet
from .models import build_model, count_correct, count_correct_each, draws_randomness, loss_fn, loss_for
from .nsgd import NudgedSGD
from .params import flat_params
from .sam import SAM

#: metrics.parquet: one row per (step, split). ``split`` is "batch" (the mini-batch of that
#: step, every step) or "train"/"valid"/"test" (full evaluations at checkpoints; "valid" also at
#: every epoch end unless ``eval.valid_every_epoch`` is false; with ``checkpoints.best``, "train"
#: and "test" also at the best-validation step, evaluated on the saved best weights). ``loss`` is
#: the run's loss (mean cross-entropy in nats, or the square loss for ``loss: mse``), ``accuracy``
#: a fraction in [0, 1], ``lr`` the learning rate used for
#: that step, ``wall_s`` seconds since the run started (summed over resumed sessions), ``dist_init`` ‖θ_t − θ_0‖₂ and
#: ``param_norm`` ‖θ_t‖₂ (evaluation rows only), ``refresh_s``/``refresh_matvecs`` the cost of
#: an NSGD subspace refresh done before that step (batch rows only, NaN otherwise), ``status``
#: "ok" | "diverged" | "stopped".
METRICS_COLUMNS = [
    "run", "step", "epoch", "split", "loss", "accuracy", "lr", "wall_s",
    "dist_init", "param_norm", "refresh_s", "refresh_matvecs", "status",
]


def config_digest(run: RunConfig, dataset: DatasetConfig) -> str:
    blob = json.dumps(
        {"run": run.model_dump(mode="json"), "dataset": dataset.model_dump(mode="json"),
         "format": FORMAT_VERSION["train"]},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def mix_seed(*xs: int) -> int:
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

    def __init__(self, run: RunConfig, steps_per_epoch: int, total: int):
        self.cfg = run.optimizer.schedule
        self.base_lr = run.optimizer.lr
        self.spe, self.total = steps_per_epoch, total
        self.state: dict[str, float] = {
            "lr": self.base_lr, "best_val_loss": math.inf, "best_val_acc": -math.inf,
            "since_loss": 0, "since_acc": 0,
        }

    @property
    def needs_validation(self) -> bool:
        return self.cfg.kind == "plateau" or self.cfg.early_stop is not None

    def lr_at(self, step: int) -> float:
        """η for update ``step`` (and recorded with the checkpoint at ``step``)."""
        kind = self.cfg.kind
        if kind == "step":
            drops = sum(1 for m in self.cfg.milestones if step / self.spe >= m)
            return self.base_lr * self.cfg.factor**drops
        if kind.startswith("warmup"):
            return self.base_lr * warmup_factor(self.cfg, step, self.total)
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


def warmup_factor(cfg: ScheduleConfig, step: int, total: int) -> float:
    """η(step)/η of a warmup schedule: linear from ``warmup_start`` at step 0 to 1 at step W, then 1
    (``warmup_constant``) or a half cosine from 1 at W to ``final_factor`` at ``total``."""
    w = cfg.warmup_steps
    if step < w:
        return cfg.warmup_start + (1.0 - cfg.warmup_start) * step / w
    if cfg.kind == "warmup_constant":
        return 1.0
    progress = min(1.0, (step - w) / max(1, total - w))
    return cfg.final_factor + (1.0 - cfg.final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int,
             loss: Callable[[Tensor, Tensor], Tensor] = loss_fn) -> tuple[float, float]:
    """Mean loss (``loss``: cross-entropy in nats by default) and accuracy of ``model`` in eval mode on (x, y)."""
    total_loss, correct, count = _evaluation_sums(model, x, y, batch_size, loss)
    if count == 0:
        return math.nan, math.nan
    return total_loss / count, correct / count


@torch.no_grad()
def _evaluation_sums(model: nn.Module, x: Tensor, y: Tensor, batch_size: int,
                     loss: Callable[[Tensor, Tensor], Tensor]) -> tuple[float, float, int]:
    """(summed loss, correct predictions, targets) of ``model`` in eval mode on (x, y)."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0.0, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        out = model(xb)
        n_targets = yb.numel()
        total_loss += float(loss(out, yb)) * n_targets
        correct += float(count_correct(out, yb))
        count += n_targets
    model.train(was_training)
    return total_loss, correct, count


def build_optimizer(model: nn.Module, run: RunConfig) -> torch.optim.Optimizer:
    opt = run.optimizer
    if opt.name == "sam":
        assert opt.sam is not None
        return SAM(model.parameters(), lr=opt.lr, rho=opt.sam.rho, adaptive=opt.sam.adaptive, eta=opt.sam.eta,
                   momentum=opt.momentum, weight_decay=opt.weight_decay)
    if opt.name == "nsgd":
        assert opt.nsgd is not None
        return NudgedSGD(
            model.parameters(), lr=opt.lr, gamma=opt.nsgd.gamma, k=opt.nsgd.k,
            momentum=opt.momentum, weight_decay=opt.weight_decay, variant=opt.nsgd.variant,
        )
    if opt.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=opt.lr, betas=opt.betas, eps=opt.eps,
                                weight_decay=opt.weight_decay)
    if opt.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=opt.betas, eps=opt.eps,
                                 weight_decay=opt.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)


def adam_preconditioner(model: nn.Module, opt: torch.optim.Optimizer) -> Tensor | None:
    """Adam's diagonal preconditioner sqrt(v̂) + ε at this point of training, flat in the order of the
    trainable parameters (v̂ = v / (1 − β2^t), as torch's Adam and AdamW divide by it); None before
    the first step (no state yet)."""
    group = opt.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    parts = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        st = opt.state.get(p)
        if not st or "exp_avg_sq" not in st:
            return None
        t = float(st["step"])
        parts.append((st["exp_avg_sq"] / (1 - beta2**t)).sqrt().reshape(-1) + eps)
    return torch.cat(parts).detach().cpu() if parts else None


def _refresh_subspace(model: nn.Module, opt: Any, run: RunConfig, data: Dataset, gen_seed: int,
                      distributed: bool = False) -> tuple[float, int]:
    """Recompute NSGD's top-k subspace (warm-started); return (seconds, matvecs). ``distributed``: every
    rank of the process group calls it alike and multiplies by its shard of the Hessian subset (one
    all-reduce per product); the same seed and warm start give every rank the same subspace."""
    ns = run.optimizer.nsgd
    assert ns is not None
    t0 = time.perf_counter()
    if ns.subspace == "random":
        g = torch.Generator(device="cpu").manual_seed(gen_seed)
        opt.set_random_subspace(ns.k, generator=g)
        return time.perf_counter() - t0, 0
    n = ns.hessian_examples or len(data.hessian_idx)
    batches, wd = hessian_batches(data, n), run.optimizer.weight_decay
    if distributed:
        op: Any = distributed_hessian(model, loss_for(run.loss), batches, weight_decay=wd)
    else:
        op = HessianOperator(model, loss_for(run.loss), batches, weight_decay=wd)
    res = top_eigenpairs(op, k=ns.k, tol=ns.tol, v0=opt.subspace, seed=gen_seed)
    opt.set_subspace(res.eigenvectors)
    return time.perf_counter() - t0, int(res.matvecs)


def _flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class DataOrder:
    """The examples of each step: epoch ``e`` is a permutation of the training view seeded by
    ``(seed, e)``, cut into consecutive mini-batches."""

    def __init__(self, view: TrainView, seed: int, steps_per_epoch: int, device: torch.device,
                 augment: bool = False):
        self.view, self.seed, self.spe, self.device, self.augment = view, seed, steps_per_epoch, device, augment
        self._perm: Tensor | None = None
        self._epoch = -1

    def batch(self, step: int) -> Tensor:
        """Indices into the view of mini-batch ``step`` (its epoch's order is drawn at its first step)."""
        epoch, within = divmod(step, self.spe)
        if epoch != self._epoch:
            g = torch.Generator(device="cpu").manual_seed(mix_seed(self.seed, epoch, 1))
            self._perm = torch.randperm(self.view.n, generator=g).to(self.device)
            self._epoch = epoch
        assert self._perm is not None
        bs = self.view.batch_size
        return self._perm[within * bs : (within + 1) * bs]

    def examples(self, step: int) -> tuple[Tensor, Tensor]:
        """Mini-batch ``step`` as (x, y), augmented (with ``augment``) from a generator seeded by the step."""
        idx = self.batch(step)
        xb, yb = self.view.x[idx], self.view.y[idx]
        if self.augment:
            xb = augment(xb, torch.Generator(device=xb.device).manual_seed(mix_seed(self.seed, step, 4)))
        return xb, yb

    def batches(self, start: int) -> Any:
        """The mini-batches (x, y) from update ``start`` on, exactly as training takes them."""
        step = start
        while True:
            yield self.examples(step)
            step += 1

    def share(self, step: int, rank: int, world: int) -> tuple[Tensor, Tensor, int]:
        """Rank ``rank``'s contiguous slice (:func:`~sharpflow.hessian.distributed.shard`) of mini-batch
        ``step`` as (x, y), and the mini-batch's size: the examples of :meth:`examples`, augmented alike."""
        idx = self.batch(step)
        part = shard(len(idx), rank, world)
        if self.augment:  # the whole batch's augmentation, drawn as one process draws it
            xb, yb = self.examples(step)
            return xb[part.start : part.stop], yb[part.start : part.stop], len(idx)
        mine = idx[part.start : part.stop]
        return self.view.x[mine], self.view.y[mine], len(idx)


class _Metrics:
    """The rows of metrics.parquet as training records them.

    Evaluation rows are added as they come. A mini-batch row waits in a buffer with its loss
    (kept on the device) and its logits (detached, while they are small): the argmax of many
    steps is taken at once, and the values are read back at most every ``READ_BACK`` steps.
    """

    READ_BACK = 256  # buffered mini-batch rows that call for a read-back
    HELD_MAX = 1 << 22  # logits held uncounted at most: 16 MB of float32

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows
        self._saved = len(rows)  # rows[:_saved] are already in the resume state
        self._pending: list[dict[str, Any]] = []  # mini-batch rows without their loss and accuracy
        self._losses: list[Tensor] = []
        self._held: list[tuple[Tensor, Tensor]] = []  # (logits, targets) of steps not yet counted
        self._held_size = 0
        self._correct: list[Tensor] = []  # counts of steps already counted, on the device
        self._counted: list[int] = []  # targets of those steps (a last batch may be short; tokens for an LM)

    @property
    def due(self) -> bool:
        """Whether enough mini-batch rows wait to read them back."""
        return len(self._pending) >= self.READ_BACK

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def add_batch(self, logits: Tensor, targets: Tensor, loss: Tensor, row: dict[str, Any]) -> None:
        """Buffer the row of one mini-batch; its loss and accuracy are filled in by :meth:`flush`."""
        self._held.append((logits.detach(), targets))
        self._held_size += logits.numel()
        if self._held_size > self.HELD_MAX:
            self._count_held()
        self._losses.append(loss.detach())
        self._pending.append(row)

    def add_counted(self, loss: Tensor, correct: Tensor, count: int, row: dict[str, Any]) -> None:
        """Buffer the row of a mini-batch whose mean loss and correct count are known already (training
        over several ranks: both reduced over the ranks' slices); ``count``: its targets."""
        self._count_held()
        self._correct.append(correct.reshape(1))
        self._counted.append(count)
        self._losses.append(loss.detach())
        self._pending.append(row)

    def _count_held(self) -> None:
        if self._held:
            self._correct.append(count_correct_each(self._held))
            self._counted.extend(t.numel() for _, t in self._held)
            self._held, self._held_size = [], 0

    def flush(self) -> bool:
        """Record the pending mini-batch rows; False if a loss was not finite."""
        if not self._pending:
            return True
        self._count_held()
        loss_v = torch.stack(self._losses).double().cpu().tolist()
        acc_v = (torch.cat(self._correct).cpu().double() / torch.tensor(self._counted, dtype=torch.float64)).tolist()
        ok = True
        for r, lv, av in zip(self._pending, loss_v, acc_v, strict=True):
            r["loss"], r["accuracy"] = lv, av
            if not math.isfinite(lv):
                ok = False
                r["status"] = "diverged"
        self.rows.extend(self._pending)
        self._losses, self._correct, self._counted, self._pending = [], [], [], []
        return ok

    def unsaved(self) -> list[dict[str, Any]]:
        """The rows recorded since the previous call: the next chunk of the resume state."""
        chunk = self.rows[self._saved :]
        self._saved = len(self.rows)
        return chunk

    def table(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows, columns=METRICS_COLUMNS)
        return df.sort_values(["step", "split"], kind="stable").reset_index(drop=True)


def join_world(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the process group of a run trained by several processes (torchrun's or srun's variables
    set, see :func:`sharpflow.hessian.distributed.init_distributed`): NCCL with rank r on
    ``cuda:LOCAL_RANK`` when the run computes on CUDA (``device`` "cuda", or "auto" with a GPU),
    gloo on the CPU otherwise. Returns (rank, world size, this rank's device)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SharpflowError("device 'cuda' requested but CUDA is not available; use 'auto' or 'cpu'")
    backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
    return init_distributed(backend=backend, timeout_s=timeout_s)


def launch_mismatch(subject: str, command: str, wanted: int, launched: int) -> str:
    """The one line of a job started by another number of processes than it asks for: ``subject`` (what
    asks for ``wanted``), how many were started, and how to start ``command`` ("sharpflow train") right."""
    how = (f"start it with `torchrun --standalone --nproc-per-node {wanted} --no-python -- {command} ...` "
           f"or `srun --ntasks={wanted} {command} ...`" if wanted > 1 else "start it as one process")
    return f"{subject} started as {launched} process{'es' if launched != 1 else ''}: {how}"


def world_size_mismatch(run_name: str, wanted: int, launched: int) -> str:
    """The one line a run says when it was started by another number of processes than its world_size."""
    return launch_mismatch(f"run {run_name} has world_size {wanted} but was", "sharpflow train", wanted, launched)


class _DataParallel:
    """This rank's part in a run trained by ``world`` ranks (the module docstring).

    :meth:`backward` runs the rank's slice forward and backward (the gradient of its losses' sum),
    then one all-reduce (sum) of one flat buffer: every trainable parameter's gradient (zeros where
    it has none), the slice's loss sum and correct count, and BatchNorm's running statistics times
    the slice's size; the gradient and the loss are then divided by the batch's targets and the
    statistics by its examples. An explicit all-reduce rather than DistributedDataParallel: it
    weights unequal slices exactly (DDP averages the ranks' means), reduces any number of
    gradients per step (SAM's two), carries the metrics in the same collective, and leaves the
    model unwrapped (its state_dict unchanged). It forgoes DDP's overlap of the all-reduce with
    the backward pass.
    """

    def __init__(self, model: nn.Module, rank: int, world: int):
        self.rank, self.world = rank, world
        self.params = [p for p in model.parameters() if p.requires_grad]
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise SharpflowError(f"training over several ranks needs one dtype for every trainable parameter, "
                                 f"got {sorted(map(str, dtypes))}")
        (self.dtype,) = dtypes
        self.sizes = [p.numel() for p in self.params]
        self.dim = sum(self.sizes)
        self.stats = [t for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                      for t in (m.running_mean, m.running_var) if t is not None]

    def backward(self, model: nn.Module, loss: Callable[[Tensor, Tensor], Tensor], xb: Tensor, yb: Tensor,
                 batch: int) -> tuple[Tensor, Tensor, int]:
        """The slice (xb, yb) of a mini-batch of ``batch`` examples forward and backward, then the
        all-reduce: each parameter's ``.grad`` becomes the whole batch's mean gradient. Returns the
        batch's mean loss and correct count (device tensors) and its number of targets. The slice
        holds at least one example (:class:`_Run` checks that every slice does)."""
        out = model(xb)
        per_example = yb.numel() // len(yb)
        local_sum = loss(out, yb) * yb.numel()
        local_sum.backward()
        correct = count_correct(out, yb)
        had = [p.grad is not None for p in self.params]
        parts = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in self.params]
        parts.append(torch.stack([local_sum.detach().to(self.dtype), correct.to(self.dtype)]))
        parts += [t.reshape(-1).to(self.dtype) * len(xb) for t in self.stats]
        buf = torch.cat(parts)
        _all_reduce(buf, dist.ReduceOp.SUM, None, self.rank, self.world, "the all-reduce of a mini-batch's gradient")
        targets = batch * per_example
        grads = buf[: self.dim].div_(targets)
        offset = 0
        for p, n, has in zip(self.params, self.sizes, had, strict=True):
            p.grad = grads[offset : offset + n].view_as(p) if has else None
            offset += n
        offset = self.dim + 2
        with torch.no_grad():
            for t in self.stats:
                t.copy_(buf[offset : offset + t.numel()].view_as(t) / batch)
                offset += t.numel()
        return buf[self.dim] / targets, buf[self.dim + 1].round().long(), targets

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: Tensor, y: Tensor, batch_size: int,
                 loss: Callable[[Tensor, Tensor], Tensor]) -> tuple[float, float]:
        """:func:`evaluate` over every rank's contiguous part of (x, y): one all-reduce of the sums."""
        part = shard(len(x), self.rank, self.world)
        sums = _evaluation_sums(model, x[part.start : part.stop], y[part.start : part.stop], batch_size, loss)
        buf = torch.tensor(sums, dtype=torch.float64, device=x.device)
        _all_reduce(buf, dist.ReduceOp.SUM, None, self.rank, self.world, "the all-reduce of an evaluation")
        total_loss, correct, count = buf.tolist()
        if count == 0:
            return math.nan, math.nan
        return total_loss / count, correct / count

    def same_step(self, step: int, device: torch.device) -> None:
        """Every rank resumes from the same step (-1: afresh), or every rank fails in one line."""
        buf = torch.tensor([step, -step], dtype=torch.int64, device=device)
        _all_reduce(buf, dist.ReduceOp.MAX, None, self.rank, self.world, "the check of the resume state")
        newest, oldest = int(buf[0]), -int(buf[1])
        if newest != oldest:
            def say(s: int) -> str:
                return f"step {s}" if s >= 0 else "a fresh start"
            raise SharpflowError(f"rank {self.rank} of {self.world}: the ranks found different resume states "
                                 f"({say(oldest)} to {say(newest)}); every rank must see the run's directory "
                                 "as rank 0 writes it")


class _ReadOnlyCheckpoints(CheckpointWriter):
    """A rank other than 0 of a run over several ranks: reads the resume state, writes nothing."""

    def resume(self, steps: Any) -> dict[str, Any] | None:
        state = self.stash.load()
        if state is not None:
            self.dumps = [int(s) for s in state["dumps"]]
        return state

    def start_afresh(self) -> None:
        pass

    def dump(self, step: int, **_: Any) -> None:  # type: ignore[override]
        self.dumps.append(step)

    def dump_best(self, step: int, **_: Any) -> None:  # type: ignore[override]
        pass

    def clear(self) -> None:
        pass


def _check_slices(run_name: str, view: TrainView, world: int, model: nn.Module) -> None:
    """Every rank gets at least one example of every mini-batch (two with BatchNorm in training mode)."""
    sizes = {view.batch_size} | ({view.n % view.batch_size} - {0})
    smallest = min(sizes) // world
    if smallest < 1:
        raise SharpflowError(f"run {run_name}: world_size {world} leaves a rank without examples in a mini-batch "
                             f"of {min(sizes)}; use at most {min(sizes)} ranks")
    if smallest < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise SharpflowError(f"run {run_name}: world_size {world} leaves a rank one example of a mini-batch of "
                             f"{min(sizes)}, which BatchNorm cannot train on; use fewer ranks or change batch_size")


class _Run:
    """One run in training: its model, optimiser, schedule, data order, metrics and checkpoints.

    ``status`` is "ok" while it trains, then "diverged" or "stopped"; it marks every later row
    and checkpoint.
    """

    def __init__(self, run: RunConfig, dataset: DatasetConfig, data: Dataset, *, run_name: str,
                 out_dir: Path, device: torch.device, log: Callable[[str], None], rank: int = 0, world: int = 1):
        self.run, self.run_name, self.data, self.device, self.log = run, run_name, data, device, log
        self.rank, self.world = rank, world
        self.steps = checkpoint_steps(run, dataset)
        self.ckpt_steps = set(self.steps)
        self.last = total_steps(run, dataset)
        self.spe = steps_per_epoch(run, dataset)
        self.view = train_view(run, data)
        if run.augment and data.kind != "image":
            raise SharpflowError(f"augment: true needs an image dataset; {run.dataset} is {data.kind}")
        torch.manual_seed(mix_seed(run.seed, -1))
        self.model = build_model(run.model, tuple(data.input_shape), data.num_classes).to(device)
        self.theta0 = _flat_params(self.model).clone()
        self.opt = build_optimizer(self.model, run)
        self.sched = _Schedule(run, self.spe, self.last)
        self.dp: _DataParallel | None = None
        if world > 1:
            _check_slices(run_name, self.view, world, self.model)
            self.dp = _DataParallel(self.model, rank, world)
        writer = CheckpointWriter if rank == 0 else _ReadOnlyCheckpoints
        self.ckpts = writer(out_dir, config_digest(run, dataset))
        self.metrics = _Metrics([])
        self.order = DataOrder(self.view, run.seed, self.spe, device, augment=run.augment)
        self.nsgd = run.optimizer.nsgd if run.optimizer.name == "nsgd" else None
        self.refresh_every = (self.nsgd.refresh_every_steps or self.spe) if self.nsgd else 0
        self.seed_steps = draws_randomness(self.model)
        self.start, self.status = 0, "ok"
        self.keep_best = run.checkpoints.best
        self.validate_epochs = self.sched.needs_validation or run.eval.valid_every_epoch or self.keep_best
        #: the best validation so far: {"step", "epoch", "accuracy", "lr", "model" (with keep_best)}
        self.best: dict[str, Any] | None = None
        self._valid_at: tuple[int, float, float] | None = None  # (step, loss, accuracy) just evaluated
        self._lr_set = math.nan  # the learning rate in opt.param_groups
        #: (step it leads to, θ before it) of an update that leads to a checkpoint (rank 0; see _keep_before)
        self._before: tuple[int, Tensor] | None = None
        self._wall_offset, self._t0 = 0.0, time.perf_counter()

    def wall(self) -> float:
        """Seconds of training, summed over resumed sessions."""
        return self._wall_offset + time.perf_counter() - self._t0

    # ------------------------------------------------------------------ start, loop, finish
    def begin(self) -> None:
        """Resume from the newest complete resume state, or start afresh with the dump at step 0."""
        resumed = self._resume()
        if self.dp is not None:
            self.dp.same_step(self.start if resumed else -1, self.device)
        self._t0 = time.perf_counter()
        if not resumed:
            self.ckpts.start_afresh()
            if 0 in self.ckpt_steps:
                self.dump(0)
        self.model.train()

    def _resume(self) -> bool:
        state = self.ckpts.resume(self.steps)
        if state is None:
            return False
        self.model.load_state_dict(state["model0"])
        self.theta0 = _flat_params(self.model).clone()
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.state = dict(state["schedule"])
        self.metrics = _Metrics(state["rows"])
        self.start, self._wall_offset, self.status = int(state["step"]), float(state["wall_s"]), str(state["status"])
        self.best = state.get("best")
        self.log(f"[{self.run_name}] resuming from step {self.start} of {self.last}")
        return True

    def loop(self, stop_after: int | None, bar: Any) -> bool:
        """Train to the last step, divergence or an early stop; False if ``stop_after`` steps ended it."""
        step = self.start
        while step < self.last and self.status == "ok":
            if stop_after is not None and step - self.start >= stop_after:
                return False
            self._keep_before(step)
            self.update(step)
            step += 1
            if bar is not None:
                bar.update(1)
            self.after_update(step)
        return True

    def finish(self) -> None:
        """The last buffered rows, then the scheduled checkpoints not dumped yet: after divergence
        or an early stop they hold the final weights, marked, so downstream stages always find
        their inputs. Returns once every checkpoint is on disk and published."""
        if not self.metrics.flush() and self.status == "ok":
            self.status = "diverged"
        for s in self.steps:
            if s > self.ckpts.last_dumped:
                self.dump(s)
        if self.keep_best:
            self._finish_best()
        self.ckpts.close()

    def _finish_best(self) -> None:
        """checkpoints/best.pt from the best validation's weights, and their train and test rows
        (unless that step is a checkpoint, which has them)."""
        best = self.best
        if best is None or "model" not in best:  # no finite validation at all: the last weights
            last = self.steps[-1]
            best = {"step": last, "epoch": last / self.spe, "lr": self.sched.lr_at(last),
                    "model": self._weights()}
        step = int(best["step"])
        model = copy.deepcopy(self.model)
        model.load_state_dict(best["model"])
        if step not in self.ckpt_steps:
            for split, x, y in (("train", self.view.x, self.view.y), ("test", self.data.test.x, self.data.test.y)):
                loss, acc = self._evaluate(x, y, model)
                self._eval_row(step, split, loss, acc, model=model, status="ok", lr=float(best["lr"]))
        self.ckpts.dump_best(step, model=model, epoch=float(best["epoch"]), run_name=self.run_name,
                             lr=float(best["lr"]))

    # ------------------------------------------------------------------------------- one step
    def update(self, step: int) -> None:
        """One SGD (or NSGD) update on mini-batch ``step``; its row goes to the metrics buffer."""
        lr = self._set_lr(step)
        refresh_s, refresh_mv = self._refresh(step)
        if self.dp is not None:
            self._update_shared(step, lr, refresh_s, refresh_mv)
            return
        xb, yb = self.order.examples(step)
        if self.seed_steps:
            _seed_step(mix_seed(self.run.seed, step, 2), self.device)
        out = self.model(xb)
        loss = loss_for(self.run.loss)(out, yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self._clip()
        if isinstance(self.opt, SAM):
            self.opt.step(lambda: self._gradient(xb, yb))
        else:
            self.opt.step()
        self.metrics.add_batch(out, yb, loss, self._batch_row(step, lr, refresh_s, refresh_mv))

    def _batch_row(self, step: int, lr: float, refresh_s: float, refresh_mv: float) -> dict[str, Any]:
        """The metrics row of a training step (its loss and accuracy filled in by the metrics)."""
        return {
            "run": self.run_name, "step": step, "epoch": step / self.spe, "split": "batch", "loss": math.nan,
            "accuracy": math.nan, "lr": lr, "wall_s": self.wall(), "dist_init": math.nan, "param_norm": math.nan,
            "refresh_s": refresh_s, "refresh_matvecs": refresh_mv, "status": "ok",
        }

    def _update_shared(self, step: int, lr: float, refresh_s: float, refresh_mv: float) -> None:
        """:meth:`update` over several ranks: this rank's slice, the gradient reduced (:class:`_DataParallel`)."""
        assert self.dp is not None
        xb, yb, batch = self.order.share(step, self.rank, self.world)
        if self.seed_steps:
            _seed_step(mix_seed(self.run.seed, step, 2, self.rank), self.device)
        self.opt.zero_grad(set_to_none=True)
        loss, correct, targets = self.dp.backward(self.model, loss_for(self.run.loss), xb, yb, batch)
        self._clip()
        if isinstance(self.opt, SAM):
            self.opt.step(lambda: self._shared_gradient(xb, yb, batch))
        else:
            self.opt.step()
        self.metrics.add_counted(loss, correct, targets, self._batch_row(step, lr, refresh_s, refresh_mv))

    def _shared_gradient(self, xb: Tensor, yb: Tensor, batch: int) -> Tensor:
        """SAM's second gradient over several ranks: recomputed on the slice, reduced and clipped alike."""
        assert self.dp is not None
        self.opt.zero_grad(set_to_none=True)
        loss, _, _ = self.dp.backward(self.model, loss_for(self.run.loss), xb, yb, batch)
        self._clip()
        return loss

    def _clip(self) -> None:
        if self.run.optimizer.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.run.optimizer.grad_clip)

    def _gradient(self, xb: Tensor, yb: Tensor) -> Tensor:
        """SAM's second gradient: loss and gradients recomputed on the same mini-batch (clipped alike)."""
        self.opt.zero_grad(set_to_none=True)
        loss = loss_for(self.run.loss)(self.model(xb), yb)
        loss.backward()
        self._clip()
        return loss

    def _set_lr(self, step: int) -> float:
        lr = self.sched.lr_at(step)
        if lr != self._lr_set:
            for group in self.opt.param_groups:
                group["lr"] = lr
            self._lr_set = lr
        return lr

    def _refresh(self, step: int) -> tuple[float, float]:
        """NSGD's subspace refresh if one is due before ``step``: (seconds, matvecs), else NaNs."""
        if not self.nsgd or step % self.refresh_every != 0:
            return math.nan, math.nan
        cost = _refresh_subspace(self.model, self.opt, self.run, self.data, mix_seed(self.run.seed, step, 3),
                                 distributed=self.dp is not None)
        self.model.train()
        return cost

    def after_update(self, step: int) -> None:
        """Once ``step`` updates are done: read the buffered rows back when due (a non-finite loss
        ends the run as diverged), validate at an epoch's end if the schedule needs it (early
        stopping), dump at a scheduled step."""
        at_ckpt = step in self.ckpt_steps
        validate = step % self.spe == 0 and self.validate_epochs
        if (at_ckpt or self.metrics.due or validate) and not self.metrics.flush():
            self.status = "diverged"
            self.log(f"[{self.run_name}] non-finite loss before step {step}: the run diverged")
        if self.status == "ok" and validate:
            val_loss, val_acc = self._evaluate(self.data.valid.x, self.data.valid.y)
            self._valid_at = (step, val_loss, val_acc)
            if not at_ckpt:  # a checkpoint records it with its train and test rows
                self._eval_row(step, "valid", val_loss, val_acc)
                self._track_best(step, val_acc)
            if self.sched.needs_validation and self.sched.end_of_epoch(val_loss, val_acc):
                self.status = "stopped"
                self.log(f"[{self.run_name}] early stop at epoch {step // self.spe}: no val-accuracy gain "
                         f"in {self.sched.cfg.early_stop} epochs")
        if at_ckpt:
            self.dump(step)

    # ------------------------------------------------------------------------ evaluation, dumps
    def _evaluate(self, x: Tensor, y: Tensor, model: nn.Module | None = None) -> tuple[float, float]:
        """Loss and accuracy of ``model`` (default: the one training) on at most eval.max_examples."""
        cap = self.run.eval.max_examples
        if cap is not None:
            x, y = x[:cap], y[:cap]
        model = self.model if model is None else model
        if self.dp is not None:
            return self.dp.evaluate(model, x, y, self.run.eval.batch_size, loss_for(self.run.loss))
        return evaluate(model, x, y, self.run.eval.batch_size, loss_for(self.run.loss))

    def _eval_row(self, step: int, split: str, loss: float, acc: float, *, model: nn.Module | None = None,
                  status: str | None = None, lr: float | None = None) -> None:
        """One evaluation row at ``step``, with ‖θ−θ₀‖ and ‖θ‖ of ``model`` (default: the one training);
        ``lr`` and ``status`` default to the schedule's rate at that epoch and the run's status."""
        theta = _flat_params(self.model if model is None else model)
        epoch = step / self.spe
        self.metrics.add({"run": self.run_name, "step": step, "epoch": epoch, "split": split, "loss": loss,
                          "accuracy": acc, "lr": self.sched.lr_at(step) if lr is None else lr, "wall_s": self.wall(),
                          "dist_init": float((theta - self.theta0).norm()), "param_norm": float(theta.norm()),
                          "refresh_s": math.nan, "refresh_matvecs": math.nan,
                          "status": self.status if status is None else status})

    def _weights(self) -> dict[str, Tensor]:
        """A CPU copy of the training model's state."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def _eval_rows(self, step: int) -> None:
        """The "train", "valid" and "test" rows at ``step`` (NaN losses once diverged)."""
        d = self.data
        for split, x, y in (("train", self.view.x, self.view.y), ("valid", d.valid.x, d.valid.y),
                            ("test", d.test.x, d.test.y)):
            if self.status == "diverged":
                loss, acc = math.nan, math.nan
            elif split == "valid" and self._valid_at is not None and self._valid_at[0] == step:
                loss, acc = self._valid_at[1:]  # evaluated at this epoch's end already
            else:
                loss, acc = self._evaluate(x, y)
            if split == "valid":
                self._track_best(step, acc)
            self._eval_row(step, split, loss, acc)

    def _track_best(self, step: int, val_acc: float) -> None:
        """Remember ``step`` if its validation accuracy beats every earlier one (ties: the earliest),
        with a copy of the weights when checkpoints.best keeps them."""
        if self.status != "ok" or not math.isfinite(val_acc):
            return
        if self.best is not None and val_acc <= float(self.best["accuracy"]):
            return
        epoch = step / self.spe
        self.best = {"step": step, "epoch": epoch, "accuracy": val_acc, "lr": self.sched.lr_at(step)}
        if self.keep_best:
            self.best["model"] = self._weights()

    def dump(self, step: int) -> None:
        """The evaluation rows at ``step``, then its checkpoint and resume state."""
        self._eval_rows(step)
        self.ckpts.dump(step, model=self.model, epoch=step / self.spe, status=self.status, run_name=self.run_name,
                        optimizer=self.opt, schedule=self.sched.state, rows=self.metrics.unsaved(), wall_s=self.wall(),
                        lr=self.sched.lr_at(step), best=self.best,
                        precond=adam_preconditioner(self.model, self.opt)
                        if self.run.optimizer.adaptive and self.rank == 0 else None,
                        last_update=self._last_update(step))

    def _keep_before(self, step: int) -> None:
        """Before update ``step``: on the writing rank, a copy of the flat trainable θ when the update
        leads to a checkpoint (step + 1 scheduled), for that checkpoint's ``last_update``. A copy only:
        training is unchanged, bit for bit."""
        if self.rank == 0 and step + 1 in self.ckpt_steps:
            self._before = (step + 1, flat_params(self.model))

    def _last_update(self, step: int) -> Tensor | None:
        """Δθ = θ_step − θ_{step−1} (flat float32, CPU, in :func:`~sharpflow.params.flat_params` order) when
        the update just done produced ``step``; None otherwise (step 0, the checkpoints :meth:`finish`
        writes for steps never reached, the other ranks)."""
        before, self._before = self._before, None
        if before is None or before[0] != step:
            return None
        return (flat_params(self.model) - before[1]).float().cpu()


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

    A run with ``world_size`` > 1 is trained by that many processes, each calling this function
    alike once the process group is initialised (:func:`join_world`), with the same ``out_dir``;
    ``device`` is this rank's. Only rank 0 shows progress, logs and writes; every rank returns the
    metrics table.
    """
    out_dir = Path(out_dir)
    device = torch.device(device)
    rank, world = group_rank_world()
    if world != run.world_size:
        raise SharpflowError(world_size_mismatch(run_name, run.world_size, world))
    if rank != 0:
        progress, log = False, _quiet
    data = load_prepared(data_dir, device=device)
    r = _Run(run, dataset, data, run_name=run_name, out_dir=out_dir, device=device, log=log, rank=rank, world=world)
    bar = None
    try:
        r.begin()
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=r.last, initial=r.start, desc=run_name, unit="step", leave=False, mininterval=1.0)
        if not r.loop(stop_after, bar):
            r.ckpts.close()
            return pd.DataFrame(r.metrics.rows)
        r.finish()
    finally:
        # On an error or an interrupt, still finish the writes already submitted: the resume
        # state then holds every step trained before it (the error itself is what propagates).
        r.ckpts.close(raise_errors=False)
        if bar is not None:
            bar.close()
    df = r.metrics.table()
    if rank == 0:
        write_parquet(out_dir / "metrics.parquet", df)
        r.ckpts.clear()
    return df


def _quiet(*_: Any) -> None:
    pass


__all__ = ["METRICS_COLUMNS", "DataOrder", "evaluate", "join_world", "launch_mismatch", "mix_seed", "train",
           "world_size_mismatch"]
