# Config loading and validation (pydantic), sweep expansion, checkpoint plans, path helpers.
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from sharpflow.config import (
    FORMAT_VERSION,
    ConfigError,
    checkpoint_steps,
    dump_json,
    expand_runs,
    load_config,
    parse_config,
    project_config,
    spectrum_config,
)

# No `configfile:` directive: Snakemake would merge it with a --configfile, mixing the
# default study into the paper's. An empty config means the embedded default.
DEFAULT_CONFIG = Path(workflow.basedir) / "config" / "config.yaml"
try:
    CFG = parse_config(config, "--configfile") if config else load_config(DEFAULT_CONFIG)
except ConfigError as err:
    raise WorkflowError(f"invalid sharpflow config: {err}")

R = CFG.results
RUNS = expand_runs(CFG)
STEPS = {run: checkpoint_steps(rc, CFG.datasets[rc.dataset]) for run, rc in RUNS.items()}
ANALYSED = [run for run in RUNS if CFG.studies[run.split("-", 1)[0]].analyse]
RES = CFG.resources


wildcard_constraints:
    run=r"[A-Za-z][A-Za-z0-9_.\-]*",
    step=r"\d{8}",
    dataset=r"[A-Za-z][A-Za-z0-9_]*",
    kind=r"[a-z_]+",


def data_files(dataset):
    d = f"{R}/data/{dataset}"
    return [f"{d}/{f}" for f in ("train.npz", "valid.npz", "test.npz", "hessian.npz", "meta.json")]


def run_data(wildcards):
    return data_files(RUNS[wildcards.run].dataset)


def ckpt_path(run, step):
    return f"{R}/runs/{run}/checkpoints/step{step:08d}.pt"


def run_json(wildcards):
    return dump_json(RUNS[wildcards.run])


def previous_eigvecs(wildcards):
    """The previous checkpoint's eigenvectors, within a warm-start chain (else nothing)."""
    chain = spectrum_config(CFG, wildcards.run).warm_chain
    steps = STEPS[wildcards.run]
    i = steps.index(int(wildcards.step))
    if chain <= 1 or i % chain == 0:
        return []
    return [f"{R}/runs/{wildcards.run}/eigvecs/step{steps[i - 1]:08d}.pt"]


def rule_name(prefix, run):
    safe = run.replace("-", "__").replace(".", "p")
    return f"{prefix}_{safe}"


def per_checkpoint(kind):
    """Input function: a run's per-checkpoint tables of one kind, in step order."""

    def inputs(wildcards):
        steps = STEPS[wildcards.run]
        if kind == "spectrum":
            return [f"{R}/runs/{wildcards.run}/spectrum/step{s:08d}.parquet" for s in steps]
        return [f"{R}/runs/{wildcards.run}/project/{kind}/step{s:08d}.parquet" for s in steps]

    return inputs


def parent(path, levels=1):
    """Parameter helper: a directory derived from an input or output path (lint-friendly)."""
    for _ in range(levels):
        path = os.path.dirname(path)
    return path


ENV = "../envs/sharpflow.yaml"


PROJECT_KINDS = ["alignment", "cross_sections", "widths", "decomposed"]
