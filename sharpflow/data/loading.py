"""Loading a prepared directory onto a device, verified against its checksums; the examples a run
trains on and the Hessian subset as batches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sharpflow.config import RunConfig
from sharpflow.errors import DataError, SharpflowError
from sharpflow.io import read_npz, sha256_file

from .sources import DATA_FORMAT_VERSION


# ---------------------------------------------------------------------------------------- load
@dataclass
class Split:
    """One split on a device: x (N, *input_shape), y (N,) class ids or (N, bptt) next-token ids."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    """A prepared dataset, loaded once onto a device."""

    train: Split
    valid: Split
    test: Split
    hessian_idx: Tensor  # (N,) int64 indices into train
    meta: dict[str, Any]
    kind: str  # "image" | "vector" | "tokens"
    input_shape: tuple[int, ...]
    num_classes: int  # classes, or the vocabulary size for tokens


def _redo(data_dir: Path) -> str:
    return f"rerun `sharpflow prepare` (delete {data_dir} first)"


def _read_npz(path: Path, names: tuple[str, ...], data_dir: Path) -> dict[str, np.ndarray]:
    """The arrays ``names`` of a prepared file; a missing or unreadable one says how to redo it."""
    try:
        arrays = read_npz(path)
    except SharpflowError as err:
        if not path.exists():
            raise DataError(f"{path}: missing; {_redo(data_dir)}") from None
        raise DataError(f"{err}; {_redo(data_dir)}") from None
    absent = [n for n in names if n not in arrays]
    if absent:
        raise DataError(f"{path}: unreadable or corrupt (no arrays {absent}); {_redo(data_dir)}")
    return {n: arrays[n] for n in names}


def load_prepared(data_dir: str | Path, device: str | torch.device = "cpu", *, verify: bool = True) -> Dataset:
    """Load a directory written by :func:`prepare` onto ``device``, once, as tensors.

    Images become normalised float32 (N, C, H, W) (``(x - mean) / std`` with the constants of
    ``norm.npz``); MNIST-1D is float32 (N, 40) as stored; tokens are int64 (N, bptt). Labels
    are int64. ``verify`` checks every file's SHA-256 against ``meta.json`` first.
    """
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{data_dir}: not prepared (no meta.json); run `sharpflow prepare` for it")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        files: dict[str, str] = meta["files"]
        kind: str = meta["kind"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{meta_path}: corrupt ({err}); {_redo(data_dir)}") from None
    if meta.get("format_version") != DATA_FORMAT_VERSION:
        raise DataError(
            f"{meta_path}: data format version {meta.get('format_version')}, this sharpflow reads "
            f"{DATA_FORMAT_VERSION}; {_redo(data_dir)}"
        )
    if verify:
        for name, digest in files.items():
            path = data_dir / name
            if not path.is_file():
                raise DataError(f"{path}: missing; {_redo(data_dir)}")
            if sha256_file(path) != digest:
                raise DataError(f"{path}: SHA-256 differs from meta.json (corrupt or changed); {_redo(data_dir)}")

    dev = torch.device(device)
    norm = None
    if kind == "image":
        arr = _read_npz(data_dir / "norm.npz", ("mean", "std"), data_dir)
        norm = (
            torch.from_numpy(arr["mean"]).to(dev, torch.float32),
            torch.from_numpy(arr["std"]).to(dev, torch.float32),
        )

    def split(name: str) -> Split:
        arr = _read_npz(data_dir / f"{name}.npz", ("x", "y"), data_dir)
        if len(arr["x"]) != len(arr["y"]):
            raise DataError(f"{data_dir / name}.npz: x and y lengths differ; {_redo(data_dir)}")
        # Move the compact stored dtype (uint8 for images) and convert on the device.
        x = torch.from_numpy(arr["x"]).to(dev)
        if norm is not None:
            x = x.to(torch.float32).sub_(norm[0]).div_(norm[1])
        return Split(x=x, y=torch.from_numpy(arr["y"]).to(dev, torch.int64))

    train, valid, test = split("train"), split("valid"), split("test")
    idx = _read_npz(data_dir / "hessian.npz", ("idx",), data_dir)["idx"]
    if idx.size and (idx.min() < 0 or idx.max() >= len(train)):
        raise DataError(f"{data_dir / 'hessian.npz'}: indices outside the training set; {_redo(data_dir)}")
    return Dataset(
        train=train,
        valid=valid,
        test=test,
        hessian_idx=torch.from_numpy(idx).to(dev, torch.int64),
        meta=meta,
        kind=kind,
        input_shape=tuple(meta["input_shape"]),
        num_classes=int(meta["num_classes"]),
    )


@dataclass(frozen=True)
class TrainView:
    """The part of the training set a run trains on, and its mini-batch size."""

    x: Tensor  # the examples the run trains on (the first ``run.train_subset``, or all)
    y: Tensor
    n: int  # len(x)
    batch_size: int  # the run's mini-batch size (n for "full", capped at n)

    @property
    def steps_per_epoch(self) -> int:
        """Updates per epoch, as :func:`sharpflow.config.steps_per_epoch` counts them."""
        return max(1, -(-self.n // self.batch_size))

    def random_batches(self, count: int, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
        """``count`` mini-batches of the run's size, each drawn without replacement (one
        ``randperm`` of the examples per batch, from ``generator``)."""
        idx = torch.stack([torch.randperm(self.n, generator=generator)[: self.batch_size] for _ in range(count)])
        idx = idx.to(self.x.device)
        return [(self.x[i], self.y[i]) for i in idx]


def train_view(run: RunConfig, data: Dataset) -> TrainView:
    """The examples ``run`` trains on (``train_subset`` keeps the first n) and its batch size."""
    n = run.train_subset or len(data.train.x)
    bs = run.optimizer.batch_size
    return TrainView(
        x=data.train.x[:n], y=data.train.y[:n], n=n, batch_size=n if bs == "full" else min(bs, n)
    )


def hessian_batches(data: Dataset, n: int, batch_size: int = 512) -> list[tuple[Tensor, Tensor]]:
    """The first ``n`` examples of the prepared Hessian subset, as batches."""
    idx = data.hessian_idx[:n]
    if len(idx) < n:
        raise SharpflowError(f"the Hessian subset has {len(idx)} examples, {n} were asked for")
    x, y = data.train.x[idx], data.train.y[idx]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]
