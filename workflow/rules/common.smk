# Config loading and validation (pydantic), sweep expansion, checkpoint plans, the inputs, params and
# resources of every stage, and the workflow's final outputs. Paths to the workflow's own files are taken
# from this file's location (ROOT), not from workflow.basedir, which is the host's directory when another
# project uses sharpflow as a Snakemake module.
import os
import re
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError

from sharpflow.analyses import REGISTRY as ANALYSES, TABLE_OWNERS, distributed_names
from sharpflow.claims import code_files as claims_code_files
from sharpflow.config import BEST_NAME, checkpoint_steps, dump_json, study_of
from sharpflow.errors import ConfigError
from sharpflow.study import (
    FORMAT_VERSION,
    analysis_config,
    claim_plan,
    claim_tables,
    claims_spec,
    expand_runs,
    merge_config,
    parse_config,
    presentation_runs,
    read_yaml,
    spectrum_config,
)
import json

import sharpflow.figures
import sharpflow.tables


def dump_json_dict(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


#: The repository: this file is workflow/rules/common.smk (current_basedir is read while it is parsed).
ROOT = Path(str(workflow.current_basedir)).parents[1]
#: The embedded default study (offline, CPU).
DEFAULT_CONFIG = ROOT / "config" / "config.yaml"


def load_config():
    """The study's config. No `configfile:` directive: Snakemake would merge it with a --configfile,
    mixing the default study into the paper's. A --configfile, or the config a host workflow gives this
    one as a module (``module sharpflow: config: ...``), is the whole config; otherwise the embedded
    default is loaded and any --config key=value overrides are merged into it. ``config`` itself is
    never changed: as a module it is the host's object."""
    if not workflow.modifier.is_main_snakefile():  # the host's config files are not this workflow's
        if config:
            return parse_config(config, "the config given to the sharpflow module")
    elif workflow.configfiles:
        return parse_config(config, " + ".join(map(str, workflow.configfiles)))
    return parse_config(merge_config(read_yaml(DEFAULT_CONFIG), config), str(DEFAULT_CONFIG))


try:
    CFG = load_config()
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


def _jobs(run):
    """The run's chains grouped into analysis jobs of resources.chains_per_job (0: one job)."""
    chains, size = CHAINS[run], RES.chains_per_job or len(CHAINS[run])
    return [chains[i : i + size] for i in range(0, len(chains), size)]


PLAN = {run: _plan(run) for run in ANALYSED}


def _check_analysis_world():
    """resources.spectrum.world_size > 1 (one analysis job over several processes) computes the spectrum
    only, one run per job: say so when the workflow is read, not in every job."""
    n = RES.spectrum.world_size
    others = [name for name in ("train", *ANALYSES) if getattr(RES, name).world_size != 1]
    if others:
        raise WorkflowError(f"invalid sharpflow config: resources.{others[0]}.world_size: only "
                            "resources.spectrum.world_size is used (a run's own world_size trains it over "
                            "several processes)")
    if n == 1:
        return
    if RES.runs_per_job > 1:
        raise WorkflowError(f"invalid sharpflow config: resources.spectrum.world_size {n} with "
                            f"resources.runs_per_job {RES.runs_per_job}: a grouped analysis job runs as one "
                            "process; set runs_per_job 1 to analyse over several processes")
    planned = sorted({name for run in ANALYSED for name in PLAN[run] if not ANALYSES[name].distributed})
    if planned:
        raise WorkflowError(f"invalid sharpflow config: analysis '{planned[0]}' does not run over several "
                            "processes yet: run it with resources.spectrum.world_size 1 (or switch it off: "
                            f"resources.spectrum.world_size {n} computes {distributed_names()} only)")


_check_analysis_world()


def analysis_weight(run):
    """A rough measure of a run's analysis work: its checkpoints (the spectrum) plus, per planned
    analysis, the checkpoints it runs at. The scheduling priority of the run's training job, and
    (plus ANALYSIS_PRIORITY) of its analysis job: the runs with the most analysis behind them train
    first and their analysis starts as soon as it can, so no long analysis job is left running alone
    at the end while the other cores idle. Results never depend on it."""
    if run not in PLAN:
        return 0
    return len(STEPS[run]) + sum(len(steps) for _, steps in PLAN[run].values())


def train_priority(run):
    """The training job's priority: longest first (its steps / 100, a rough proxy of its time, plus
    the analysis work behind it), the usual heuristic for finishing a set of jobs on few cores."""
    steps = STEPS[run]
    return (steps[-1] // 100 if steps else 0) + analysis_weight(run)


#: Analysis jobs go before any training job once their inputs exist.
ANALYSIS_PRIORITY = 100000
CHAINS = {run: _chains(run) for run in ANALYSED}
JOBS = {run: _jobs(run) for run in ANALYSED}
#: runs whose analysis is split over several jobs: their aggregated tables need a job of their own.
SPLIT = [run for run in ANALYSED if len(JOBS[run]) > 1]


def _groups():
    """Whole runs analysed together (resources.runs_per_job): consecutive runs of one study."""
    by_study = {}
    for run in ANALYSED:
        if run not in SPLIT:
            by_study.setdefault(study_of(run), []).append(run)
    size = RES.runs_per_job
    return {
        f"{study}__group{i // size}": runs[i : i + size]
        for study, runs in by_study.items()
        for i in range(0, len(runs), size)
    }


#: group name -> its runs; a group of one is that run's own job (rule analyse_{run}).
GROUPS = _groups()
#: (run, table kind) -> the steps that have that table (spectrum: every checkpoint of an analysed run).
TABLE_STEPS = {}
for _run in ANALYSED:
    TABLE_STEPS[(_run, "spectrum")] = STEPS[_run]
    for _name, (_section, _steps) in PLAN[_run].items():
        for _kind in ANALYSES[_name].tables:
            TABLE_STEPS[(_run, _kind)] = _steps
#: runs that keep their best-validation checkpoint (checkpoints.best): its spectrum is a table of its own.
BEST = [run for run in ANALYSED if RUNS[run].checkpoints.best]
for _run in BEST:
    TABLE_STEPS[(_run, "spectrum_best")] = ["best"]
TABLE_KINDS = ["spectrum", "spectrum_best", *TABLE_OWNERS]
def analyse_version(runs):
    """The result-format versions an analysis job depends on: the spectrum's and those of the analyses
    planned for its runs (an analysis that runs nowhere there, e.g. one switched off, triggers nothing)."""
    names = [name for name in ANALYSES if any(name in PLAN[run] for run in runs)]
    return dump_json_dict({k: FORMAT_VERSION[k] for k in ["spectrum", *names]})


def data_dir(dataset):
    return f"{R}/data/{dataset}"


def data_files(dataset):
    d = data_dir(dataset)
    return [f"{d}/{f}" for f in ("train.npz", "valid.npz", "test.npz", "hessian.npz", "meta.json")]


def ckpt_path(run, step):
    return f"{R}/runs/{run}/checkpoints/step{step:08d}.pt"


def best_path(run):
    return f"{R}/runs/{run}/checkpoints/{BEST_NAME}"


def train_outputs(run):
    """The checkpoints a train job declares: the scheduled ones, and best.pt with checkpoints.best."""
    out = [checkpoint_output(run, s) for s in STEPS[run]]
    return out + [best_path(run)] if RUNS[run].checkpoints.best else out


def best_input(run, job):
    """best.pt for the analysis job that covers the run's last chain (its spectrum is computed there)."""
    return [best_path(run)] if run in BEST and job is JOBS[run][-1] else []


def best_files(run):
    return [f"{R}/runs/{run}/spectrum_best/best.parquet", f"{R}/runs/{run}/eigvecs/best.pt"]


def checkpoint_output(run, step):
    """A checkpoint as a train output: temp() when pruning, except the first and the last."""
    path = ckpt_path(run, step)
    if CFG.prune_checkpoints and step not in (STEPS[run][0], STEPS[run][-1]):
        return temp(path)
    return path


class StageLaunch:
    """How a train or analysis job starts: the command's prefix, the job's threads, GPUs and memory, and the
    resources that make it a multi-task SLURM job (the plugin's MPI mode: sbatch --ntasks, no srun -n1
    wrapper)."""

    def __init__(self, prefix="", threads=1, gpu=0, mem_mb=0, resources=None):
        self.prefix, self.threads, self.gpu, self.mem_mb = prefix, threads, gpu, mem_mb
        self.resources = resources or {}


def train_launch(run):
    """A run's StageLaunch: for world_size 1, the plain command with resources.train as they are; for
    world_size N > 1, N ranks under resources.train.launcher, each with the threads, GPUs and memory of
    resources.train (`sharpflow train --threads` is then the job's, shared by its ranks)."""
    res = RES.train
    return stage_launch(RUNS[run].world_size, res.launcher, res.threads, res.gpu, res.mem_mb)


def stage_launch(n, launcher, threads, gpu, mem_mb):
    """A StageLaunch of n ranks under launcher, each with threads, gpu and mem_mb (n 1: the plain command)."""
    if n == 1:
        return StageLaunch("", threads, gpu, mem_mb)
    if launcher == "srun":
        extra = {"mpi": "srun", "tasks": n, "cpus_per_task": threads}
        if gpu:
            extra["tasks_per_gpu"] = 1
        prefix = f"srun --ntasks={n} --kill-on-bad-exit=1 "
    else:
        extra, prefix = {}, f"torchrun --standalone --nproc-per-node {n} --no-python -- "
    return StageLaunch(prefix, threads * n, gpu * n, mem_mb * n, extra)


def analyse_launch(res):
    """An analysis job's launch from its job_resources: with resources.spectrum.world_size N > 1, N ranks
    under resources.spectrum.launcher (`sharpflow analyse --world-size N`, the job asking for N times the
    threads, GPUs and memory, and under srun for N tasks); N 1: the command and resources as they were.
    Returns (command prefix, threads, the rule's other resources)."""
    n = RES.spectrum.world_size
    launch = stage_launch(n, RES.spectrum.launcher, res["threads"], res["gpu"], res["mem_mb"])
    prefix = launch.prefix + ("sharpflow analyse " if n == 1 else f"sharpflow analyse --world-size {n} ")
    other = {k: v for k, v in res.items() if k != "threads"}
    if n > 1:
        other.update(gpu=launch.gpu, mem_mb=launch.mem_mb, **launch.resources)
    return prefix, launch.threads, other


def rule_name(prefix, run):
    safe = run.replace("-", "__").replace(".", "p")
    return f"{prefix}_{safe}"


def spectrum_files(run, step):
    return [f"{R}/runs/{run}/spectrum/step{step:08d}.parquet", f"{R}/runs/{run}/eigvecs/step{step:08d}.pt"]


def job_steps(job):
    return [step for chain in job for step in chain]


def job_name(run, i):
    return rule_name("analyse", run) + (f"_j{i}" if len(JOBS[run]) > 1 else "")


def aggregated(run):
    """The run's aggregated tables (one per table kind it has)."""
    return [f"{R}/runs/{run}/{kind}.parquet" for kind in TABLE_KINDS if (run, kind) in TABLE_STEPS]


def job_outputs(run, job):
    """The declared outputs of an analysis job: the run's aggregated tables when the job covers the
    run (its per-checkpoint files are written too, but only the job reads them, so the DAG need not
    know them: thousands fewer files to resolve at paper scale); else every per-checkpoint file, for
    the run's aggregate job."""
    if run not in SPLIT:
        return aggregated(run)
    steps = job_steps(job)
    out = [path for step in steps for path in spectrum_files(run, step)] + (best_files(run) if best_input(run, job) else [])
    for name, (_, selected) in PLAN[run].items():
        a = ANALYSES[name]
        out += [a.path(R, run, kind, step) for step in steps if step in selected for kind in a.tables]
    return out


def job_plan_json(run, job):
    """The analyses of one job, as passed to `sharpflow analyse --analyses` (and a params trigger)."""
    steps = job_steps(job)
    plan = {}
    for name, (section, selected) in PLAN[run].items():
        here = [s for s in steps if s in selected]
        if here:
            plan[name] = {"config": section.model_dump(mode="json"), "steps": here}
    return dump_json_dict(plan)


def job_resources(run, job):
    """Most threads, memory and GPUs of the sections a job runs; runtime summed over checkpoints."""
    steps = job_steps(job)
    sections, runtime = [RES.spectrum], len(steps) * RES.spectrum.runtime
    for name, (_, selected) in PLAN[run].items():
        here = sum(1 for s in steps if s in selected)
        if here:
            sections.append(getattr(RES, name))
            runtime += here * getattr(RES, name).runtime
    return {
        "threads": max(r.threads for r in sections),
        "mem_mb": max(r.mem_mb for r in sections),
        "gpu": max(r.gpu for r in sections),
        "gpu_model": RES.spectrum.gpu_model,
        "runtime": runtime,
    }


def group_entry(run):
    """One run of a grouped job, as `sharpflow analyse-runs --runs` takes it."""
    (job,) = JOBS[run]
    return {
        "run": json.loads(RUN_JSON[run]),
        "run_name": run,
        "spectrum": json.loads(SPEC_JSON[run]),
        "analyses": json.loads(job_plan_json(run, job)),
        "data": data_dir(RUNS[run].dataset),
        "chain_starts": [chain[0] for chain in job],
        "checkpoints": [ckpt_path(run, s) for s in job_steps(job)],
        **({"best": best_path(run)} if run in BEST else {}),
    }


def group_resources(runs):
    """A grouped job: the most threads, memory and GPUs of its runs' jobs; their runtimes summed."""
    each = [job_resources(run, JOBS[run][0]) for run in runs]
    out = {k: max(r[k] for r in each) for k in ("threads", "mem_mb", "gpu")}
    return {**out, "gpu_model": RES.spectrum.gpu_model, "runtime": sum(r["runtime"] for r in each)}


def per_checkpoint(run, kind):
    """A run's per-checkpoint tables of one kind, in step order."""
    if kind == "spectrum":
        return [f"{R}/runs/{run}/spectrum/step{s:08d}.parquet" for s in TABLE_STEPS[(run, kind)]]
    if kind == "spectrum_best":
        return best_files(run)[:1]
    a = ANALYSES[TABLE_OWNERS[kind]]
    return [a.path(R, run, kind, s) for s in TABLE_STEPS[(run, kind)]]


def results_root(levels):
    """Parameter function: the results root, ``levels`` directories above a job's first output
    (runs/{run}/{kind}.parquet: 3; runs/{run}/spectrum/step*.parquet: 4)."""
    return lambda w, output: parent(output[0], levels)


def parent(path, levels=1):
    """Parameter helper: a directory derived from an input or output path (lint-friendly)."""
    for _ in range(levels):
        path = os.path.dirname(path)
    return path


ENV = "../envs/sharpflow.yaml"


# ------------------------------------------------------------------------ figures and tables
# One rule draws every figure and one writes every table, with the item's name as their wildcard. The
# item's config picks its inputs (the aggregated tables it reads, its plotting code) and its params.


def figure_path(name, ext):
    return f"{R}/figures/{name}.{ext}"


def table_path(name, ext):
    return f"{R}/tables/{name}.{ext}"


def one_of(names):
    """A wildcard constraint that matches exactly ``names`` (and nothing when there are none)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


def study_runs(studies):
    return [run for run in RUNS if study_of(run) in studies]


def presentation_inputs(item, package):
    """The aggregated tables a figure or table reads: exactly its studies' runs' files (a run
    counts for an analysis's tables only where that analysis ran, e.g. escape's chosen runs; a
    table the kind reads only where a run has it does not exclude the run)."""
    runs = study_runs(item.studies)
    table_kinds = package.KINDS[item.kind]
    optional = package.REGISTRY.optional_for(item.kind)
    analysed = [t for t in table_kinds if t != "metrics" and t not in optional]
    if analysed:
        runs = [run for run in runs if all((run, t) in TABLE_STEPS for t in analysed)]
    return [
        f"{R}/runs/{run}/{t}.parquet"
        for run in runs
        for t in table_kinds
        if t not in optional or (run, t) in TABLE_STEPS
    ]


def code_inputs(package, kind):
    """The plotting code a figure or table depends on: its own module first, then the shared ones
    (absolute: the working directory, -d, need not be the repository). The report caption of the
    figure and table rules finds the kind's caption from the first."""
    return [str(p) for p in package.REGISTRY.code_files(kind)]


def presentation_spec(item):
    """The figure/table spec passed as params: its own config plus what it needs of each run."""
    runs = presentation_runs(CFG, RUNS, study_runs(item.studies))
    return dump_json_dict({**item.model_dump(mode="json"), "runs": runs})


def figure_inputs(wildcards):
    fig = CFG.figures[wildcards.name]
    return {"tables": presentation_inputs(fig, sharpflow.figures), "code": code_inputs(sharpflow.figures, fig.kind)}


def table_inputs(wildcards):
    tab = CFG.tables[wildcards.name]
    return {"tables": presentation_inputs(tab, sharpflow.tables), "code": code_inputs(sharpflow.tables, tab.kind)}


# ------------------------------------------------------------------------------------ claims
CLAIM_PLAN = claim_plan(CFG, RUNS)


def claims_inputs():
    """Every table a claim reads, of the runs it is tested on (where the run has that table)."""
    return claim_tables(CLAIM_PLAN, R, lambda run, kind: kind == "metrics" or (run, kind) in TABLE_STEPS)


def claims_params():
    return dump_json_dict(claims_spec(CFG, RUNS, CLAIM_PLAN))


# ----------------------------------------------------------------------------- final outputs
def run_outputs(run):
    """The final outputs of one run: metrics, plus its aggregated tables if analysed."""
    return [f"{R}/runs/{run}/metrics.parquet", *aggregated(run)]


def final_outputs(wildcards):
    """Everything the study makes but the cost table, which is made from their benchmarks: every run's
    outputs, the claims (when enabled), every figure and every table of the config."""
    out = [path for run in RUNS for path in run_outputs(run)]
    if CFG.claims.enabled:
        out += [table_path("claims", ext) for ext in ("md", "tex", "csv")]
    out += [figure_path(name, ext) for name in CFG.figures for ext in ("pdf", "png")]
    out += [table_path(name, ext) for name in CFG.tables for ext in ("md", "tex", "csv")]
    return out


def all_outputs(wildcards):
    """The default target's inputs: the final outputs and the cost table."""
    return [*final_outputs(wildcards), table_path("cost", "md"), table_path("cost", "csv")]
