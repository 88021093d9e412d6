"""Training overhead of ``sharpflow.train`` against a bare PyTorch loop on the same model and data.

Both loops do the same SGD steps on the same device-resident data. sharpflow adds its schedule,
per-step seeding (models with dropout only), the per-step metrics, checkpoint + resume-state
writes, and the train/valid/test evaluation at each checkpoint. The evaluation is measurement,
not bookkeeping, and it costs more than its own run time (its large activations evict the
training step's working set), so it is isolated by a third variant: ``sharpflow.train`` with the
evaluation replaced by a no-op. The target (≤ 5 %) is on that variant against the bare loop; the
evaluation's cost is the difference between the two sharpflow variants. The three are
interleaved, ``--repeats`` times; the fastest of each is reported.

    python bench/train_overhead.py            # cnn1d on MNIST-1D, 3000 steps, S=32, 24 checkpoints
    python bench/train_overhead.py --quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import sharpflow.train as T
from sharpflow.config import DatasetConfig, RunConfig, checkpoint_steps
from sharpflow.data import load_prepared, prepare
from sharpflow.models import build_model, loss_fn


def bare_loop(run: RunConfig, data_dir: Path, steps: int) -> float:
    data = load_prepared(data_dir)
    torch.manual_seed(0)
    model = build_model(run.model, tuple(data.input_shape), data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=run.optimizer.lr)
    x, y = data.train.x, data.train.y
    n, bs = len(x), int(run.optimizer.batch_size)
    spe = -(-n // bs)
    t0 = time.perf_counter()
    perm = torch.randperm(n)
    for step in range(steps):
        i = step % spe
        if i == 0:
            perm = torch.randperm(n)
        idx = perm[i * bs : (i + 1) * bs]
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def sharpflow_loop(run: RunConfig, ds: DatasetConfig, data_dir: Path, out: Path, evaluate: bool = True) -> float:
    """Seconds for one ``sharpflow.train`` call; ``evaluate=False`` stubs out the evaluation."""
    original = T.evaluate
    if not evaluate:
        T.evaluate = lambda *args, **kwargs: (0.0, 0.0)
    try:
        t0 = time.perf_counter()
        T.train(run, ds, run_name="bench", data_dir=data_dir, out_dir=out, progress=False, log=lambda *_: None)
        return time.perf_counter() - t0
    finally:
        T.evaluate = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", default="cnn1d")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the minimum is reported")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="500 steps, 1 repeat")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.repeats = 500, 1
    torch.set_num_threads(a.threads)
    ds = DatasetConfig(source="mnist1d", hessian_subset=512)
    run = RunConfig.model_validate({
        "dataset": "d", "model": {"name": a.model}, "optimizer": {"lr": 0.05, "batch_size": a.batch_size},
        "steps": a.steps, "checkpoints": {"zoom_every": 25, "zoom_until": 2, "every_epochs": 2}, "device": "cpu",
    })
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        prepare(ds, data_dir, progress=False, log=lambda *_: None)
        bare, full, book = [], [], []
        for r in range(a.repeats):
            bare.append(bare_loop(run, data_dir, a.steps))
            full.append(sharpflow_loop(run, ds, data_dir, Path(tmp) / f"full{r}"))
            book.append(sharpflow_loop(run, ds, data_dir, Path(tmp) / f"book{r}", evaluate=False))
    b, f, k = min(bare), min(full), min(book)
    n_ck = len(checkpoint_steps(run, ds))
    print(f"model {a.model}, {a.steps} steps at S={a.batch_size}, {n_ck} checkpoints, {a.threads} thread(s), "
          f"fastest of {a.repeats}")
    print(f"bare PyTorch loop              {b:8.2f} s   (anchor, {b / a.steps * 1e3:.2f} ms/step)")
    print(f"sharpflow.train                {f:8.2f} s   ratio {f / b:.3f}")
    print(f"  the same, evaluation stubbed {k:8.2f} s   ratio {k / b:.3f}")
    print(f"  evaluation (train/valid/test at each checkpoint) {f - k:6.2f} s   {(f - k) / b:+.1%}")
    print(f"  bookkeeping overhead (schedule, metrics, checkpoint I/O) {k / b - 1:+.1%}   (target <= +5 %)")

if __name__ == "__main__":
    main()
