# Config loading and validation (pydantic), sweep expansion, checkpoint plans, path helpers.
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from sharpflow.analyses import REGISTRY as ANALYSES
from sharpflow.config import (
    FORMAT_VERSION,
    ConfigError,
    analysis_config,
    checkpoint_steps,
    dump_json,
    expand_runs,
    merge_config,
    parse_config,
    read_yaml,
    spectrum_config,
    steps_per_epoch,
    study_of,
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
ANALYSED = [run for run in RUNS if CFG.studies[study_of(run)].analyse]
RES = CFG.resources
# Per-run lookups computed once: input functions run for every job of the DAG (thousands).
RUN_JSON = {run: dump_json(rc) for run, rc in RUNS.items()}
SPEC = {run: spectrum_config(CFG, run) for run in RUNS}
SPEC_JSON = {run: dump_json(cfg) for run, cfg in SPEC.items()}


def _plan(run):
    """Each registered analysis's config section for ``run`` and the checkpoints it runs at."""
    plan = {}
    for name, analysis in ANALYSES.items():
        section = analysis_config(CFG, name, run)
        steps = analysis.select(section, run, STEPS[run])
        if steps:
            plan[name] = (section, steps)
    return plan


def _chains(run):
    """The run's checkpoints cut into warm-start chains of spectrum.warm_chain (0 or 1: one each)."""
    steps, size = STEPS[run], max(1, SPEC[run].warm_chain)
    return [steps[i : i + size] for i in range(0, len(steps), size)]


PLAN = {run: _plan(run) for run in ANALYSED}
CHAINS = {run: _chains(run) for run in ANALYSED}
#: (run, table kind) -> the steps that have that table (spectrum: every checkpoint of an analysed run).
TABLE_STEPS = {}
for _run in ANALYSED:
    TABLE_STEPS[(_run, "spectrum")] = STEPS[_run]
    for _name, (_section, _steps) in PLAN[_run].items():
        for _kind in ANALYSES[_name].tables:
            TABLE_STEPS[(_run, _kind)] = _steps
TABLE_KINDS = ["spectrum", *(kind for a in ANALYSES.values() for kind in a.tables)]


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


def rule_name(prefix, run):
    safe = run.replace("-", "__").replace(".", "p")
    return f"{prefix}_{safe}"


def spectrum_files(run, step):
    return [f"{R}/runs/{run}/spectrum/step{step:08d}.parquet", f"{R}/runs/{run}/eigvecs/step{step:08d}.pt"]


def chain_outputs(run, chain):
    """Every per-checkpoint file an analysis job (one warm-start chain) writes."""
    out = [path for step in chain for path in spectrum_files(run, step)]
    for name, (_, steps) in PLAN[run].items():
        a = ANALYSES[name]
        out += [a.path(R, run, kind, step) for step in chain if step in steps for kind in a.tables]
    return out


def chain_plan_json(run, chain):
    """The analyses of one chain, as passed to `sharpflow analyse --analyses` (and a params trigger)."""
    plan = {}
    for name, (section, steps) in PLAN[run].items():
        here = [s for s in chain if s in steps]
        if here:
            plan[name] = {"config": section.model_dump(mode="json"), "steps": here}
    return dump_json_dict(plan)


def chain_resources(run, chain):
    """Most threads, memory and GPUs of the sections a chain runs; runtime summed over checkpoints."""
    sections = [RES.spectrum] + [getattr(RES, name) for name in json.loads(chain_plan_json(run, chain))]
    runtime = len(chain) * RES.spectrum.runtime
    for name, (_, steps) in PLAN[run].items():
        runtime += sum(1 for s in chain if s in steps) * getattr(RES, name).runtime
    return {
        "threads": max(r.threads for r in sections),
        "mem_mb": max(r.mem_mb for r in sections),
        "gpu": max(r.gpu for r in sections),
        "gpu_model": RES.spectrum.gpu_model,
        "runtime": runtime,
    }


def per_checkpoint(kind):
    """Input function: a run's per-checkpoint tables of one kind, in step order."""
    if kind == "spectrum":
        return lambda w: [f"{R}/runs/{w.run}/spectrum/step{s:08d}.parquet" for s in TABLE_STEPS[(w.run, kind)]]
    a = ANALYSES[[name for name, an in ANALYSES.items() if kind in an.tables][0]]
    return lambda w: [a.path(R, w.run, kind, s) for s in TABLE_STEPS[(w.run, kind)]]


def parent(path, levels=1):
    """Parameter helper: a directory derived from an input or output path (lint-friendly)."""
    for _ in range(levels):
        path = os.path.dirname(path)
    return path


ENV = "../envs/sharpflow.yaml"


# ------------------------------------------------------------------------ figures and tables
import sharpflow.figures
import sharpflow.tables


def run_outputs(run):
    """The final outputs of one run: metrics, plus its aggregated tables if analysed."""
    out = [f"{R}/runs/{run}/metrics.parquet"]
    out += [f"{R}/runs/{run}/{kind}.parquet" for kind in TABLE_KINDS if (run, kind) in TABLE_STEPS]
    return out


def study_runs(studies):
    return [run for run in RUNS if study_of(run) in studies]


def presentation_inputs(item, table_kinds):
    """The aggregated tables a figure or table reads: exactly its studies' runs' files (a run
    counts for an analysis's tables only where that analysis ran, e.g. escape's chosen runs)."""
    runs = study_runs(item.studies)
    analysed = [t for t in table_kinds if t != "metrics"]
    if analysed:
        runs = [run for run in runs if all((run, t) in TABLE_STEPS for t in analysed)]
    return [f"{R}/runs/{run}/{t}.parquet" for run in runs for t in table_kinds]


def code_inputs(package, kind):
    """The plotting code a figure or table depends on: its own module and the shared ones
    (absolute: the working directory, -d, need not be the repository)."""
    return [str(p) for p in package.REGISTRY.code_files(kind)]


def caption(package, kind):
    return os.path.join(workflow.basedir, package.REGISTRY.captions[kind])


def presentation_spec(item):
    """The figure/table spec passed as params: its own config plus what it needs of each run."""
    runs = {}
    for run in study_runs(item.studies):
        rc = RUNS[run]
        ns = rc.optimizer.nsgd
        runs[run] = {
            "study": study_of(run),
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
