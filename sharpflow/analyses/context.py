"""What an analysis gets: one checkpoint, its run, its data and its eigenvectors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..checkpoints import load_checkpoint, restore_model
from ..config import RunConfig
from ..data import Dataset, TrainView, hessian_batches, train_view
from ..errors import SharpflowError
from ..hessian import HessianOperator
from ..hessian.distributed import distributed_hessian, group_rank_world
from ..io import load_torch
from ..models import loss_for

#: keys of an eigenvector file (``eigvecs/step*.pt``), written by :mod:`.spectrum`.
EIGVEC_KEYS = ("eigenvalues", "eigenvectors", "residuals", "step", "run", "status", "format")


def load_eigvecs(path: str | Path) -> dict[str, Any]:
    return load_torch(path, required=EIGVEC_KEYS, what="eigenvectors")


@dataclass
class CheckpointContext:
    """One checkpoint of one run, with everything loaded (on ``device``).

    ``model()`` restores a fresh copy of the checkpoint's model each time it is called (an
    analysis may change its mode or buffers); ``eigvecs`` is the checkpoint's eigenvector file
    (``None`` before the spectrum has run).
    """

    run: RunConfig
    run_name: str
    data: Dataset
    checkpoint: dict[str, Any]
    checkpoint_path: Path
    device: torch.device
    eigvecs: dict[str, Any] | None = None
    eigvecs_path: Path | None = None
    log: Callable[[str], None] = print
    #: the eigenvector file of the checkpoint just before this one in the same job (None at a job's
    #: first checkpoint, and in a one-checkpoint ``sharpflow <analysis>`` call).
    previous_eigvecs: dict[str, Any] | None = None
    _view: TrainView | None = field(default=None, repr=False)

    @property
    def step(self) -> int:
        return int(self.checkpoint["step"])

    @property
    def epoch(self) -> float:
        return float(self.checkpoint["epoch"])

    @property
    def status(self) -> str:
        return str(self.checkpoint["status"])

    @property
    def lr(self) -> float:
        """η in force at the checkpoint (the rate the next update uses, after any schedule drop)."""
        return float(self.checkpoint["lr"])

    @property
    def ident(self) -> dict[str, Any]:
        """The identifying columns of the checkpoint's table rows (:func:`add_ident`)."""
        return {"run": self.run_name, "step": self.step, "epoch": self.epoch, "status": self.status}

    def hessian(self, model: nn.Module, n: int | None = None, *, weight_decay: float | None = None) -> Any:
        """The Hessian operator of the run's loss at ``model`` over the first ``n`` examples of the
        Hessian subset (None: all of it), with the run's weight decay (or ``weight_decay``). Inside a
        process group of several ranks, this rank's shard of it, its products summed over the ranks
        (:func:`~sharpflow.hessian.distributed.distributed_hessian`): the same operator on every rank."""
        n = n or len(self.data.hessian_idx)
        wd = self.run.optimizer.weight_decay if weight_decay is None else weight_decay
        if group_rank_world()[1] > 1:  # inside an analysis job of several processes: this rank's shard
            return distributed_hessian(model, self.loss_fn, hessian_batches(self.data, n), weight_decay=wd)
        return HessianOperator(model, self.loss_fn, hessian_batches(self.data, n), weight_decay=wd)

    @property
    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The run's training loss (``loss``), the one its Hessians are taken of."""
        return loss_for(self.run.loss)

    @property
    def gamma(self) -> float:
        """Nudged-SGD's γ along its top subspace; 1 for SGD and for the random-subspace control."""
        ns = self.run.optimizer.nsgd
        return ns.gamma if self.run.optimizer.name == "nsgd" and ns is not None and ns.subspace == "top" else 1.0

    def direction_lrs(self, k: int) -> list[float]:
        """The learning rate along each of the checkpoint's top ``k`` eigenvectors: γη for the
        first nsgd.k of a Nudged-SGD run with the top subspace (the optimizer's subspace is the
        top-k at its last refresh; the checkpoint's own eigenvectors stand in for it), η otherwise."""
        ns = self.run.optimizer.nsgd
        nudged = ns.k if ns is not None and self.gamma != 1.0 else 0
        return [self.lr * self.gamma if i < nudged else self.lr for i in range(k)]

    @property
    def view(self) -> TrainView:
        """The examples the run trains on, and its batch size."""
        if self._view is None:
            self._view = train_view(self.run, self.data)
        return self._view

    def model(self) -> nn.Module:
        """The checkpoint's model, freshly restored on the device."""
        return restore_model(self.checkpoint, self.run, self.data, self.checkpoint_path).to(self.device)

    def with_eigvecs(self, path: str | Path) -> CheckpointContext:
        ev = load_eigvecs(path)
        if int(ev["step"]) != self.step:
            raise SharpflowError(f"{path}: eigenvectors are for step {ev['step']}, the checkpoint is step {self.step}")
        self.eigvecs, self.eigvecs_path = ev, Path(path)
        return self


def open_checkpoint(run: RunConfig, run_name: str, data: Dataset, path: str | Path, device: torch.device,
                    log: Callable[[str], None] = print) -> CheckpointContext:
    """Load the checkpoint at ``path`` (a clear error if it is missing or corrupt)."""
    return CheckpointContext(run=run, run_name=run_name, data=data, checkpoint=load_checkpoint(path),
                             checkpoint_path=Path(path), device=device, log=log)


def add_ident(df: pd.DataFrame, ident: dict[str, Any]) -> None:
    """Put the identifying columns (run, step, ...) first, in order, overwriting same-named ones."""
    for col, val in reversed(ident.items()):
        if col in df.columns:
            df[col] = val
        else:
            df.insert(0, col, val)


def finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
