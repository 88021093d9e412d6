"""The GPU check: what a CUDA device does with sharpflow's heavy parts, in one command (≤ 5 min).

Run: ``python bench/gpu.py`` (``--quick`` for a shorter check). On a machine without CUDA it says
so and exits with status 0 having measured nothing. On a CUDA device it prints:

1. **One ResNet-32 epoch** on the CIFAR-shaped stand-in (``synthetic_images``: 45,000 training
   images, S = 128, augmentation on), through ``sharpflow.train.train``: seconds and steps/s.
2. **One top-10 spectrum of ResNet-32 at N = 2560** (20 batches of 128), at relative residual
   1e-3: products, seconds and pairs converged; the cost of one Hessian-vector product against
   one gradient over the same N (the HVP/gradient ratio); and a block of 10 products done at once
   (batched, ``torch.func.vmap`` over the tangents for ``fwd_rev``, one batched second backward for
   ``double_backward``) against 10 single products in a loop, for both product methods.
3. **The default suite's slowest analysis** (run ``eta-lr0.05`` of ``config/config.yaml``: its
   spectrum at every checkpoint and the project analyses), trained and analysed on the GPU and
   analysed again on the CPU: seconds on each and their ratio.

Every ratio is against an anchor measured in the same run. Put the figures in docs/measured/benchmarks.md with
the device named.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeat: int = 1) -> float:
    """Mean seconds of ``fn()`` over ``repeat`` calls, after one warm-up call."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeat


def resnet_epoch(tmp: Path, device: torch.device, quick: bool) -> Path:
    """Prepare the stand-in, train ResNet-32 one epoch; returns the prepared data directory."""
    from sharpflow.config import DatasetConfig, RunConfig
    from sharpflow.data import prepare
    from sharpflow.train import train

    n_train = 1280 if quick else 50000
    ds = DatasetConfig(source="synthetic_images", synthetic_train=n_train, synthetic_test=1000,
                       valid_size=256 if quick else 5000, hessian_subset=512 if quick else 2560)
    data_dir = tmp / "images"
    t0 = time.perf_counter()
    prepare(ds, data_dir, progress=False, log=lambda _m: None)
    print(f"  stand-in data prepared in {time.perf_counter() - t0:.1f} s (CPU, numpy)")
    run = RunConfig.model_validate({
        "dataset": "images", "model": {"name": "resnet32"}, "epochs": 1, "augment": True, "seed": 0,
        "optimizer": {"lr": 0.1, "batch_size": 128}, "checkpoints": {"every_epochs": 1},
        "eval": {"max_examples": 1000},
    })
    t0 = time.perf_counter()
    metrics = train(run, ds, run_name="resnet32", data_dir=data_dir, out_dir=tmp / "resnet32",
                    device=device, progress=False, log=lambda _m: None)
    seconds = time.perf_counter() - t0
    steps = int(metrics["step"].max())
    print(f"  ResNet-32, one epoch ({steps} steps of 128, with checkpoints and evaluation): "
          f"{seconds:.1f} s, {steps / seconds:.1f} steps/s")
    return data_dir


def spectrum(data_dir: Path, device: torch.device, quick: bool) -> None:
    from sharpflow.config import ModelConfig
    from sharpflow.data import hessian_batches, load_prepared
    from sharpflow.hessian import HessianOperator, top_eigenpairs
    from sharpflow.models import build_model, loss_fn

    data = load_prepared(data_dir, device=device)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet32"), data.input_shape, data.num_classes).to(device)
    n = 32 if quick else 2560
    batches = hessian_batches(data, n, batch_size=128)
    op = HessianOperator(model, loss_fn, batches)
    res = top_eigenpairs(op, k=10, tol=1e-3, seed=0)
    print(f"  top-10 spectrum of ResNet-32 at N = {n}: {res.matvecs} products, {res.seconds:.1f} s, "
          f"{int(res.converged.sum())}/10 converged, λ1 = {float(res.eigenvalues[0]):.4g}")
    grad_s = _timed(op.gradient, device, repeat=3)
    v = torch.randn(op.dim, device=device, dtype=op.dtype)
    hvp_s = _timed(lambda: op.matvec(v), device, repeat=3)
    print(f"  one product {hvp_s * 1e3:.0f} ms, one gradient {grad_s * 1e3:.0f} ms: "
          f"HVP/gradient = {hvp_s / grad_s:.2f} (method {op.method})")
    block = torch.randn(op.dim, 10, device=device, dtype=op.dtype)
    for method in ("double_backward", "fwd_rev"):
        for cached in (True, False):
            o = HessianOperator(model, loss_fn, batches, method=method, cache_graph=cached)
            batched = _timed(lambda o=o: o.matvec(block), device)
            looped = _timed(lambda o=o: [o.matvec(block[:, j]) for j in range(10)], device)
            print(f"  {method:15s} cache {'on ' if cached else 'off'}: 10 products as a block "
                  f"{batched:.2f} s, in a loop {looped:.2f} s: block/loop = {batched / looped:.2f}")
            del o


def slowest_analysis(tmp: Path, device: torch.device) -> None:
    from sharpflow.analyses import REGISTRY
    from sharpflow.analyses.stage import Planned, run_chain
    from sharpflow.config import checkpoint_steps
    from sharpflow.data import prepare
    from sharpflow.study import analysis_config, expand_runs, parse_config, read_yaml, spectrum_config
    from sharpflow.train import train

    cfg = parse_config(read_yaml(REPO / "config" / "config.yaml"))
    name = "eta-lr0.05"
    run = expand_runs(cfg)[name].model_copy(update={"device": device.type})
    ds = cfg.datasets[run.dataset]
    data_dir = tmp / run.dataset
    prepare(ds, data_dir, progress=False, log=lambda _m: None)
    t0 = time.perf_counter()
    train(run, ds, run_name=name, data_dir=data_dir, out_dir=tmp / "runs" / name, device=device,
          progress=False, log=lambda _m: None)
    print(f"  {name}: trained on {device} in {time.perf_counter() - t0:.1f} s")
    steps = checkpoint_steps(run, ds)
    spec = spectrum_config(cfg, name)
    plans = []
    for aname, analysis in REGISTRY.items():
        section = analysis_config(cfg, aname, name)
        chosen = analysis.select(section, name, steps)
        if chosen:
            plans.append(Planned(analysis, section, set(chosen)))
    ckpts = [tmp / "runs" / name / "checkpoints" / f"step{s:08d}.pt" for s in steps]
    starts = steps[:: max(1, spec.warm_chain)]
    seconds = {}
    # each device its own results tree (and so its own analysis stash: nothing is reused across them)
    for dev in [device] if device.type == "cpu" else [device, torch.device("cpu")]:
        out = tmp / f"results-{dev.type}"
        seconds[dev.type] = run_chain(run, run_name=name, data_dir=data_dir, checkpoints=ckpts, spectrum=spec,
                                      analyses=plans, results=out, chain_starts=starts, aggregate=True,
                                      device=dev, log=lambda _m: None)
    what = f"  {name}: spectrum + {', '.join(p.analysis.name for p in plans)} at {len(steps)} checkpoints: "
    if device.type == "cpu":
        print(f"{what}{seconds['cpu']:.1f} s on the CPU ({torch.get_num_threads()} threads)")
    else:
        print(f"{what}{seconds[device.type]:.1f} s on {device}, {seconds['cpu']:.1f} s on the CPU "
              f"({torch.get_num_threads()} threads): GPU/CPU = {seconds[device.type] / seconds['cpu']:.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller data and N (a shorter check)")
    p.add_argument("--device", default="cuda:0",
                   help="the CUDA device (default cuda:0); 'cpu' runs the same measurements on the CPU")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here (torch.cuda.is_available() is False); nothing measured. "
              "Run it on a GPU machine.")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}")
    else:
        print(f"device: the CPU ({torch.get_num_threads()} threads); torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="sharpflow-gpu-") as d:
        tmp = Path(d)
        print("1. ResNet-32 epoch")
        data_dir = resnet_epoch(tmp, device, args.quick)
        print("2. top-10 spectrum")
        spectrum(data_dir, device, args.quick)
        print("3. the default suite's slowest analysis")
        slowest_analysis(tmp, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
