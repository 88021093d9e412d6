"""Shared fixtures: a tiny MNIST-1D dataset prepared once per test session."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from sharpflow.config import DatasetConfig, RunConfig

TINY_DATASET = {"source": "mnist1d", "mnist1d_samples": 500, "valid_size": 80, "hessian_subset": 64, "seed": 0}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_workflow_config(results: Path, defaults: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """A workflow config on TINY_DATASET: an MLP with 12 hidden units, 32 SGD steps in batches of 20, a
    checkpoint every epoch, no figures or tables; ``defaults`` updates the defaults section, ``sections``
    add or replace top-level sections."""
    base = {"dataset": "tiny", "model": {"name": "mlp", "kwargs": {"hidden": [12]}},
            "optimizer": {"lr": 0.1, "batch_size": 20}, "steps": 32,
            "checkpoints": {"zoom_every": 0, "every_epochs": 1}, "device": "cpu"}
    return {"results": str(results), "datasets": {"tiny": TINY_DATASET}, "defaults": {**base, **(defaults or {})},
            "figures": {}, "tables": {}, **sections}


def tiny_run(**over) -> RunConfig:
    raw = {
        "dataset": "tiny",
        "model": {"name": "mlp", "kwargs": {"hidden": [12]}},
        "optimizer": {"lr": 0.1, "batch_size": 20},
        "steps": 40,
        "checkpoints": {"zoom_every": 5, "zoom_until": 1, "every_epochs": 1},
        "device": "cpu",
    }
    for key, value in over.items():
        node = raw
        *path, last = key.split("__")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return RunConfig.model_validate(raw)


@pytest.fixture(scope="session")
def tiny_dataset() -> DatasetConfig:
    return DatasetConfig.model_validate(TINY_DATASET)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_dataset) -> Path:
    from sharpflow.data import prepare

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(tiny_dataset, out, progress=False, log=lambda *_: None)
    return out
