"""Estimate the disk use and job counts of a study from its config (no training).

Disk is exact up to file-format overhead: parameter counts come from building each model, and
every scheduled checkpoint (float32 state dict) and eigenvector file (k × D in the configured
dtype) is counted. GPU time is a rough model: ``--epoch-seconds`` per model (measured or assumed
per-epoch training time on your GPU) times epochs, plus ``--analysis-seconds`` per spectrum or
project analysis of one checkpoint. Jobs: one train job per run, one analysis job per analysed run
(``resources.chains_per_job: 0``) or per ``chains_per_job`` warm-start chains of it.

    python bench/study_cost.py config/paper.yaml
    python bench/study_cost.py config/config.yaml --epoch-seconds cnn1d=0.2
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import torch

from sharpflow.config import checkpoint_steps, study_of, total_steps
from sharpflow.models import build_model
from sharpflow.params import num_params as num_parameters
from sharpflow.study import analysis_config, expand_runs, load_config, spectrum_config

SHAPES = {  # (input shape, classes) per dataset source
    "mnist1d": ((40,), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "mnist": ((1, 28, 28), 10),
    "fashion_mnist": ((1, 28, 28), 10),
}
#: assumed seconds per training epoch on one A100-class GPU with device-resident data
DEFAULT_EPOCH_SECONDS = {"simplecnn": 3.0, "simplecnn_medium": 10.0, "resnet32": 8.0, "vgg11_bn": 6.0,
                         "lstm_lm": 30.0, "cnn1d": 0.2, "mlp": 0.1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path)
    ap.add_argument("--epoch-seconds", nargs="*", default=[], metavar="MODEL=S",
                    help="override the assumed seconds per epoch of a model")
    ap.add_argument("--analysis-seconds", type=float, default=10.0,
                    help="assumed GPU seconds per spectrum or project analysis of one checkpoint")
    a = ap.parse_args()
    epoch_s = dict(DEFAULT_EPOCH_SECONDS)
    for item in a.epoch_seconds:
        name, value = item.split("=")
        epoch_s[name] = float(value)
    cfg = load_config(a.config)
    runs = expand_runs(cfg)
    dims: dict[tuple[str, str], int] = {}
    disk = defaultdict(float)
    jobs = defaultdict(int)
    work = defaultdict(int)  # per-checkpoint analyses
    gpu_s = defaultdict(float)
    for name, run in runs.items():
        ds = cfg.datasets[run.dataset]
        if ds.source == "ptb":
            shape, classes = (ds.bptt,), ds.vocab_size
        else:
            shape, classes = SHAPES[ds.source]
        key = (run.model.name, ds.source)
        if key not in dims:
            torch.manual_seed(0)
            dims[key] = num_parameters(build_model(run.model, shape, classes))
        d = dims[key]
        steps = checkpoint_steps(run, ds)
        study = study_of(name)
        disk["checkpoints"] += len(steps) * d * 4
        jobs["train"] += 1
        n_train = run.train_subset or ds.train_size()
        per_step = n_train if run.optimizer.batch_size == "full" else min(run.optimizer.batch_size, n_train)
        # seconds per epoch are quoted for a CIFAR-sized epoch (45,000 examples)
        gpu_s[f"train {study}"] += total_steps(run, ds) * per_step / 45000 * epoch_s.get(run.model.name, 10.0)
        if cfg.studies[study].analyse:
            sp = spectrum_config(cfg, name)
            disk["eigenvectors"] += len(steps) * sp.k * d * (2 if sp.eigvec_dtype == "float16" else 4)
            work["spectrum"] += len(steps)
            chains = math.ceil(len(steps) / max(1, sp.warm_chain))
            jobs["analyse"] += math.ceil(chains / (cfg.resources.chains_per_job or chains))
            gpu_s[f"spectrum {study}"] += len(steps) * a.analysis_seconds
            if analysis_config(cfg, "project", name).enabled:
                work["project"] += len(steps)
                gpu_s[f"project {study}"] += len(steps) * a.analysis_seconds
    print(f"{a.config}: {len(runs)} runs; parameters: " + ", ".join(f"{m}/{s} {d:,}" for (m, s), d in dims.items()))
    print("jobs: " + ", ".join(f"{k} {v:,}" for k, v in jobs.items()))
    print("checkpoint analyses: " + ", ".join(f"{k} {v:,}" for k, v in work.items()))
    for k, v in disk.items():
        print(f"disk {k:13s} {v / 2**30:8.1f} GiB")
    print(f"disk total         {sum(disk.values()) / 2**30:8.1f} GiB"
          + ("  (prune_checkpoints: intermediate checkpoints deleted once analysed)" if cfg.prune_checkpoints else ""))
    total = 0.0
    for k, v in sorted(gpu_s.items()):
        total += v
        print(f"GPU hours {k:28s} {v / 3600:8.1f}")
    print(f"GPU hours total (rough model)     {total / 3600:8.1f}   (training at the configured epochs: "
          "early stopping only shortens it)")


if __name__ == "__main__":
    main()
