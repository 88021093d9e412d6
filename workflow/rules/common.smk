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
    merge_config,
    parse_config,
    read_yaml,
    project_config,
    spectrum_config,
    steps_per_epoch,
)
import json


def dump_json_dict(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# No `configfile:` directive: Snakemake would merge it with a --configfile, mixing the
# default study into the paper's. Without --configfile the embedded default is loaded and
# any --config key=value overrides are merged into it.
DEFAULT_CONFIG = Path(workflow.basedir) / "config" / "config.yaml"
try:
    if workflow.configfiles:
        CFG = parse_config(config, " + ".join(map(str, workflow.configfiles)))
    else:
        CFG = parse_config(merge_config(read_yaml(DEFAULT_CONFIG), config), str(DEFAULT_CONFIG))
except ConfigError as err:
    raise WorkflowError(f"invalid sharpflow config: {err}")

R = CFG.results
RUNS = expand_runs(CFG)
STEPS = {run: checkpoint_steps(rc, CFG.datasets[rc.dataset]) for run, rc in RUNS.items()}
ANALYSED = [run for run in RUNS if CFG.studies[run.split("-", 1)[0]].analyse]
RES = CFG.resources
# Per-run lookups computed once: input functions run for every job of the DAG (thousands).
RUN_JSON = {run: dump_json(rc) for run, rc in RUNS.items()}
SPEC = {run: spectrum_config(CFG, run) for run in RUNS}
SPEC_JSON = {run: dump_json(cfg) for run, cfg in SPEC.items()}
PROJ = {run: project_config(CFG, run) for run in RUNS}
PROJ_JSON = {run: dump_json(cfg) for run, cfg in PROJ.items()}
STEP_INDEX = {run: {step: i for i, step in enumerate(steps)} for run, steps in STEPS.items()}
ESCAPE = {run: sorted(set(steps)) for run, steps in CFG.escape.checkpoints.items() if steps}


def data_files(dataset):
    d = f"{R}/data/{dataset}"
    return [f"{d}/{f}" for f in ("train.npz", "valid.npz", "test.npz", "hessian.npz", "meta.json")]


def run_data(wildcards):
    return data_files(RUNS[wildcards.run].dataset)


def ckpt_path(run, step):
    return f"{R}/runs/{run}/checkpoints/step{step:08d}.pt"


def checkpoint_output(run, step):
    """A checkpoint as a train output: temp() when pruning, except the first and the last."""
    path = ckpt_path(run, step)
    if CFG.prune_checkpoints and step not in (STEPS[run][0], STEPS[run][-1]):
        return temp(path)
    return path


def run_json(wildcards):
    return RUN_JSON[wildcards.run]


def previous_eigvecs(wildcards):
    """The previous checkpoint's eigenvectors, within a warm-start chain (else nothing)."""
    chain = SPEC[wildcards.run].warm_chain
    steps = STEPS[wildcards.run]
    i = STEP_INDEX[wildcards.run][int(wildcards.step)]
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


# ------------------------------------------------------------------------ figures and tables
from sharpflow.figures import KINDS as FIGURE_KINDS
from sharpflow.tables import KINDS as TABLE_KINDS


def run_outputs(run):
    """The final outputs of one run: metrics, plus its aggregated analyses if analysed."""
    out = [f"{R}/runs/{run}/metrics.parquet"]
    if run in ANALYSED:
        out.append(f"{R}/runs/{run}/spectrum.parquet")
        if PROJ[run].enabled:
            out += [f"{R}/runs/{run}/{kind}.parquet" for kind in PROJECT_KINDS]
    if run in ESCAPE:
        out.append(f"{R}/runs/{run}/escape.parquet")
    return out


def study_runs(studies):
    return [run for run in RUNS if run.split("-", 1)[0] in studies]


def presentation_inputs(item, table_kinds):
    """The aggregated tables a figure or table reads: exactly its studies' runs' files."""
    runs = study_runs(item.studies)
    if "escape" in table_kinds:  # only the runs the escape ablation was configured for
        runs = [run for run in runs if run in ESCAPE]
    return [f"{R}/runs/{run}/{t}.parquet" for run in runs for t in table_kinds]


def code_inputs(package, kind):
    """The plotting code a figure or table depends on: its own module and the shared ones."""
    mod = __import__(f"sharpflow.{package}", fromlist=["MODULES"])
    names = [mod.MODULES[kind], *mod.SHARED_MODULES]
    # absolute: the working directory (-d) need not be the repository
    return [os.path.normpath(os.path.join(mod.DIRECTORY, n)) for n in names]


def caption(package, kind):
    mod = __import__(f"sharpflow.{package}", fromlist=["CAPTIONS"])
    return os.path.join(workflow.basedir, mod.CAPTIONS[kind])


def presentation_spec(item):
    """The figure/table spec passed as params: its own config plus what it needs of each run."""
    runs = {}
    for run in study_runs(item.studies):
        rc = RUNS[run]
        ns = rc.optimizer.nsgd
        runs[run] = {
            "study": run.split("-", 1)[0],
            "lr": rc.optimizer.lr,
            "batch_size": rc.optimizer.batch_size,
            "momentum": rc.optimizer.momentum,
            "optimizer": rc.optimizer.name,
            "gamma": ns.gamma if ns else None,
            "k": ns.k if ns else None,
            "subspace": ns.subspace if ns else None,
            "seed": rc.seed,
            "steps_per_epoch": steps_per_epoch(rc, CFG.datasets[rc.dataset]),
        }
    return dump_json_dict({**item.model_dump(mode="json"), "runs": runs})
