"""Cost of one `project` job against one `spectrum` job on the same checkpoint of the default suite.

The target (issue: projected-gradient analyses) is a project job cheaper than its spectrum job.
Both stages run in-process on checkpoints of a freshly trained default-suite run (cnn1d on
MNIST-1D, η=0.05, S=32), with the default config's spectrum and project sections; process
start-up (the same for both) is left out.

    python bench/project_vs_spectrum.py
    python bench/project_vs_spectrum.py --quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sharpflow.analyses.stage import analysis_stage, spectrum_stage
from sharpflow.data import prepare
from sharpflow.study import analysis_config, expand_runs, load_config, spectrum_config
from sharpflow.train import train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml")
    ap.add_argument("--run", default="eta-lr0.05")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="train 600 steps and time 2 checkpoints")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(a.config)
    run = expand_runs(cfg)[a.run]
    if a.quick:
        run = run.model_copy(update={"steps": 600})
    ds = cfg.datasets[run.dataset]
    spec, proj = spectrum_config(cfg, a.run), analysis_config(cfg, "project", a.run)
    quiet = lambda *_: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        prepare(ds, t / "data", progress=False, log=quiet)
        train(run, ds, run_name=a.run, data_dir=t / "data", out_dir=t / "run", progress=False, log=quiet)
        cks = sorted((t / "run" / "checkpoints").glob("step*.pt"))
        picks = [cks[len(cks) // 3], cks[-1]] if a.quick else cks[1::max(1, len(cks) // 4)]
        print(f"run {a.run}: spectrum k={spec.k} tol={spec.tol} N={spec.n or ds.hessian_subset}, "
              f"‖H‖_F probes {spec.frobenius_probes}; project k={proj.k} B={proj.alignment_batches} "
              f"M={proj.grad_batches} subset={proj.subset} multipliers={proj.multipliers}")
        print(f"{'checkpoint':>12} {'spectrum s':>11} {'project s':>10} {'ratio':>7}")
        ratios = []
        for ck in picks:
            t0 = time.perf_counter()
            spectrum_stage(spec, run, run_name=a.run, data_dir=t / "data", checkpoint=ck, previous=None,
                           out_table=t / "s.parquet", out_eigvecs=t / "e.pt", log=quiet)
            t1 = time.perf_counter()
            analysis_stage("project", proj, run, run_name=a.run, data_dir=t / "data", checkpoint=ck, eigvecs=t / "e.pt",
                          out_dir=t / "p", log=quiet)
            t2 = time.perf_counter()
            ratios.append((t2 - t1) / (t1 - t0))
            print(f"{ck.stem:>12} {t1 - t0:11.2f} {t2 - t1:10.2f} {ratios[-1]:7.2f}")
        print(f"project / spectrum (median): {sorted(ratios)[len(ratios) // 2]:.2f}   (target < 1)")


if __name__ == "__main__":
    main()
