"""End to end through Snakemake with the user's own model and data, all defined in the test itself:
a model class by import path, and the sources arrays (.npz), text (a file) and python (a function)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sharpflow.data import load_prepared

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

USER_CODE = """
import numpy as np
import torch
from torch import nn


class TinyNet(nn.Module):
    '''A user's model: flatten, one hidden tanh layer, logits.'''

    def __init__(self, input_shape, num_classes, hidden=8):
        super().__init__()
        n = int(np.prod(input_shape))
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(n, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x.float())


def make():
    '''A user's "simulator": two Gaussian blobs in 5 dimensions.'''
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 130)
    x = rng.normal(size=(130, 5)) + 2.0 * y[:, None]
    return {"x_train": x[:100], "y_train": y[:100], "x_test": x[100:], "y_test": y[100:]}
"""


def _write_inputs(tmp: Path) -> None:
    (tmp / "sf_e2e_user.py").write_text(textwrap.dedent(USER_CODE))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    x = rng.normal(size=(120, 2, 3)) + y[:, None, None]
    np.savez(tmp / "mine.npz", x_train=x[:90], y_train=y[:90], x_test=x[90:], y_test=y[90:])
    words = [f"w{int(i)}" for i in rng.integers(0, 12, 900)]
    lines = [" ".join(words[i : i + 9]) for i in range(0, 900, 9)]
    (tmp / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _config(tmp: Path) -> dict:
    common = {"steps": 12, "checkpoints": {"zoom_every": 0, "every_epochs": 1}, "device": "cpu"}
    return {
        "results": str(tmp / "results"),
        "datasets": {
            "arr": {"source": "arrays", "path": str(tmp / "mine.npz"), "hessian_subset": 16},
            "txt": {"source": "text", "path": str(tmp / "corpus.txt"), "bptt": 8, "vocab_size": 10,
                    "hessian_subset": 8},
            "py": {"source": "python", "function": "sf_e2e_user:make", "train_examples": 100, "hessian_subset": 16},
        },
        "defaults": {"model": {"name": "sf_e2e_user:TinyNet"}, "optimizer": {"lr": 0.1, "batch_size": 16}, **common},
        "studies": {
            "arr": {"base": {"dataset": "arr"}},
            "py": {"base": {"dataset": "py"}},
            "txt": {"base": {"dataset": "txt", "model": {"name": "gpt", "kwargs": {"layers": 1, "width": 8,
                                                                                 "heads": 2}},
                             "optimizer": {"name": "adamw", "lr": 0.01, "batch_size": 8,
                                           "schedule": {"kind": "warmup_cosine", "warmup_steps": 4}}},
                    "precond": {"enabled": True}},
        },
        "spectrum": {"k": 2, "frobenius_probes": 0},
        "project": {"enabled": False},
        "figures": {"warmup": {"kind": "warmup", "studies": ["txt"]}},
    }


def test_own_model_and_data_end_to_end(tmp_path):
    _write_inputs(tmp_path)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(_config(tmp_path)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    cmd = [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path), "--configfile", str(cfg),
           "--cores", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = tmp_path / "results"
    # arrays: 90 examples, 10 % to validation; the user's model trained and analysed
    arr = load_prepared(res / "data" / "arr")
    assert (len(arr.train), len(arr.valid), len(arr.test)) == (81, 9, 30)
    assert arr.kind == "vector" and arr.num_classes == 3 and arr.input_shape == (2, 3)
    spec = pd.read_parquet(res / "runs" / "arr" / "spectrum.parquet")
    assert spec["converged"].all() and (spec["eigenvalue"] > 0).any()
    # python: the function's 100 examples
    assert len(load_prepared(res / "data" / "py").train) == 90
    assert pd.read_parquet(res / "runs" / "py" / "metrics.parquet")["loss"].notna().any()
    # text: windows of 8 next-token targets, a vocabulary of at most 10 with <unk>; a GPT with warmup
    txt = load_prepared(res / "data" / "txt")
    assert txt.kind == "tokens" and txt.num_classes == 10 and txt.input_shape == (8,)
    assert txt.meta["vocab"][-1] == "<unk>"
    met = pd.read_parquet(res / "runs" / "txt" / "metrics.parquet")
    lr = met[met["split"] == "batch"].set_index("step")["lr"]
    assert lr[0] == pytest.approx(0.01 * 0.01) and lr[4] == pytest.approx(0.01)
    assert (res / "runs" / "txt" / "precond.parquet").is_file()
    assert (res / "figures" / "warmup.png").stat().st_size > 1000


def test_a_bad_own_dataset_fails_before_any_job_naming_it(tmp_path):
    _write_inputs(tmp_path)
    cfg = _config(tmp_path)
    (tmp_path / "mine.npz").write_bytes(b"truncated")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path), "--configfile",
           str(tmp_path / "config.yaml"), "-n"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "datasets.arr" in err and "mine.npz: not a readable .npz file (not a zip archive" in err
    assert "Traceback" not in err
