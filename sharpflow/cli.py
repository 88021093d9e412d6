"""``sharpflow <stage>``: the command-line entry points that Snakemake rules call.

Every stage takes its own config section as JSON (``model_dump(mode="json")`` of the pydantic
model, validated again here) and explicit input/output paths. Problems the user can act on
(a bad config, a missing or corrupt file, a dataset that cannot be fetched) print one line
naming the problem and exit with status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from . import figures, tables
from .analyses import REGISTRY
from .config import DatasetConfig, RunConfig, SpectrumConfig, checkpoint_steps, format_errors
from .errors import SharpflowError
from .study import claim_plan, claim_tables, claims_spec, expand_runs, json_schema, load_config

M = TypeVar("M", bound=BaseModel)


def _model_arg(model: type[M], flag: str) -> Callable[[str], M]:
    """argparse type: JSON text (or @file) validated as ``model``."""

    def parse(text: str) -> M:
        return _validated(model, _json_arg(text, flag), flag)

    parse.__name__ = model.__name__
    return parse


def _json_arg(text: str, flag: str) -> Any:
    """The JSON of an argument, given inline or as @file."""
    try:
        return json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)
    except (OSError, json.JSONDecodeError) as err:
        raise argparse.ArgumentTypeError(f"{flag}: not valid JSON ({err})") from None


def _validated(model: type[M], raw: Any, flag: str) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise argparse.ArgumentTypeError(f"{flag}: {format_errors(err)}") from None


def _setup_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ commands
def cmd_prepare(a: argparse.Namespace) -> None:
    from .data import prepare

    meta = prepare(a.dataset, a.out, progress=not a.no_progress, log=_log)
    _log(f"prepared {meta.get('source')} into {a.out}")


def cmd_train(a: argparse.Namespace) -> None:
    """One run. With ``world_size`` > 1 this is one rank of a job that torchrun or srun started: it
    checks the launched world size against the run's (one line, before joining anything), joins the
    process group and trains its share; ``--threads`` is the job's, shared among its ranks."""
    from .devices import choose_device
    from .train import join_world, train, world_size_mismatch

    world = a.run.world_size
    launched = _launched_world(world)
    if launched != world:
        raise SharpflowError(world_size_mismatch(a.run_name, world, launched))
    threads = a.threads or a.run.threads
    _setup_threads(max(1, threads // world) if threads else None)
    if world > 1:
        rank, _, device = join_world(a.run.device)
    else:
        rank, device = 0, choose_device(a.run.device, log=_log)
    t0 = time.perf_counter()
    train(a.run, a.dataset, run_name=a.run_name, data_dir=a.data, out_dir=a.out, device=device,
          progress=not a.no_progress, log=_log)
    if rank == 0:
        _write_timing(a.timing, time.perf_counter() - t0)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def _launched_world(wanted: int) -> int:
    """How many processes this one was started among: torchrun's ``WORLD_SIZE`` (with ``RANK``); else,
    for a run of several ranks, srun's ``SLURM_NTASKS``, whose ``SLURM_PROCID`` and ``SLURM_LOCALID``
    then become ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (modulo the visible GPUs: srun may show a
    task its GPU alone), with ``MASTER_ADDR`` the node srun ran on and ``MASTER_PORT`` derived from
    the job id unless they are set; 1 for a plain start. A run of one rank ignores SLURM's variables:
    it is one process of whatever job it is in."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    if wanted > 1 and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        import torch

        local = int(env.get("SLURM_LOCALID", "0"))
        gpus = torch.cuda.device_count()
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"],
                   LOCAL_RANK=str(local % gpus if gpus else local))
        env.setdefault("MASTER_ADDR", env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 40000))
        return int(env["SLURM_NTASKS"])
    return 1


def cmd_spectrum(a: argparse.Namespace) -> None:
    from .analyses.stage import spectrum_stage
    from .devices import choose_device

    _setup_threads(a.threads)
    device = choose_device(a.device, log=_log)
    spectrum_stage(a.spectrum, a.run, run_name=a.run_name, data_dir=a.data, checkpoint=a.checkpoint,
                   previous=a.previous, out_table=a.out_table, out_eigvecs=a.out_eigvecs, device=device,
                   progress=not a.no_progress, log=_log)


def _cmd_analysis(name: str) -> Callable[[argparse.Namespace], None]:
    def run(a: argparse.Namespace) -> None:
        from .analyses.stage import analysis_stage
        from .devices import choose_device

        _setup_threads(a.threads)
        device = choose_device(a.device, log=_log)
        analysis_stage(name, getattr(a, name), a.run, run_name=a.run_name, data_dir=a.data,
                       checkpoint=a.checkpoint, eigvecs=a.eigvecs, out_dir=a.out_dir, device=device, log=_log)

    return run


def _parse_plan(text: str) -> dict[str, Any]:
    """--analyses: {name: {"config": {...}, "steps": [...]}} for registered analyses, validated."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--analyses: not valid JSON ({err})") from None
    return _plan_from(raw, "--analyses")


def _plan_from(raw: Any, flag: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise argparse.ArgumentTypeError(f"{flag}: expected a JSON object {{name: {{config, steps}}}}")
    plan = {}
    for name, entry in raw.items():
        if name not in REGISTRY:
            raise argparse.ArgumentTypeError(f"{flag}: unknown analysis {name!r}; known: {', '.join(REGISTRY)}")
        if not isinstance(entry, dict) or set(entry) != {"config", "steps"}:
            raise argparse.ArgumentTypeError(f"{flag}.{name}: expected {{\"config\": ..., \"steps\": [...]}}")
        try:
            cfg = REGISTRY[name].config.model_validate(entry["config"])
        except ValidationError as err:
            raise argparse.ArgumentTypeError(f"{flag}.{name}: {format_errors(err)}") from None
        plan[name] = (cfg, [int(s) for s in entry["steps"]])
    return plan


#: The keys of one run in ``sharpflow analyse-runs --runs``.
RUN_ENTRY_KEYS = {"run", "run_name", "spectrum", "analyses", "data", "chain_starts", "checkpoints"}
#: Optional keys: ``best``, the run's best-validation checkpoint (``checkpoints.best``).
RUN_ENTRY_OPTIONAL = {"best"}


def _parse_runs(text: str) -> list[dict[str, Any]]:
    """--runs: a JSON list (or @file) of runs to analyse one after another, each validated."""
    raw = _json_arg(text, "--runs")
    if not isinstance(raw, list) or not raw:
        raise argparse.ArgumentTypeError("--runs: expected a non-empty JSON list of runs")
    runs = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or not RUN_ENTRY_KEYS <= set(entry) <= RUN_ENTRY_KEYS | RUN_ENTRY_OPTIONAL:
            raise argparse.ArgumentTypeError(f"--runs[{i}]: expected an object with keys {sorted(RUN_ENTRY_KEYS)} "
                                             f"(and optionally {sorted(RUN_ENTRY_OPTIONAL)})")
        name = entry["run_name"]
        runs.append({
            "run": _validated(RunConfig, entry["run"], f"--runs[{name}].run"),
            "run_name": str(name),
            "spectrum": _validated(SpectrumConfig, entry["spectrum"], f"--runs[{name}].spectrum"),
            "analyses": _plan_from(entry["analyses"], f"--runs[{name}].analyses"),
            "data": Path(entry["data"]),
            "chain_starts": [int(s) for s in entry["chain_starts"]],
            "checkpoints": [Path(c) for c in entry["checkpoints"]],
            "best": Path(entry["best"]) if entry.get("best") else None,
        })
    return runs


def _planned(plan: dict[str, Any]) -> list[Any]:
    """A parsed --analyses plan as the ``Planned`` entries ``run_chain`` takes."""
    from .analyses.stage import Planned

    return [Planned(REGISTRY[name], cfg, set(steps)) for name, (cfg, steps) in plan.items()]


def cmd_analyse(a: argparse.Namespace) -> None:
    """One analysis job. Started by torchrun or srun as N processes (``--world-size N``, the workflow's
    resources.spectrum.world_size), each is one rank: it checks the launched world size (one line, before
    joining anything), refuses any analysis but the spectrum, joins the process group and computes the
    spectrum on its shard of the Hessian subset; rank 0 alone writes files and logs. ``--threads`` is the
    job's, shared among its ranks."""
    from .analyses.stage import refuse_distributed_analyses, run_chain
    from .devices import choose_device

    wanted = a.world_size
    if wanted is not None and wanted < 1:
        raise SharpflowError(f"--world-size must be at least 1, got {wanted}")
    world = _launched_world(wanted or 1)
    if wanted is not None and world != wanted:
        from .train import launch_mismatch

        raise SharpflowError(launch_mismatch(f"--world-size {wanted} (resources.spectrum.world_size) but",
                                             "sharpflow analyse", wanted, world))
    planned = _planned(a.analyses)
    refuse_distributed_analyses(planned, world)
    _setup_threads(max(1, a.threads // world) if a.threads else None)
    if world > 1:
        from .train import join_world

        rank, _, device = join_world(a.device)
    else:
        rank, device = 0, choose_device(a.device, log=_log)
    try:
        compute = run_chain(a.run, run_name=a.run_name, data_dir=a.data, checkpoints=a.checkpoints,
                            spectrum=a.spectrum, analyses=planned, results=a.results,
                            chain_starts=a.chain_starts, best=a.best, aggregate=a.aggregate, device=device,
                            progress=not a.no_progress and rank == 0, log=_log if rank == 0 else _quiet)
        if rank == 0:
            _write_timing(a.timing, compute)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _quiet(msg: str) -> None:
    """The log of a rank other than 0: rank 0 says it all."""


def cmd_analyse_runs(a: argparse.Namespace) -> None:
    """Several whole runs in one process, one after another (what a grouped Snakemake job runs):
    each as ``sharpflow analyse --aggregate`` would, with its own stash and outputs. One process only."""
    from .analyses.stage import run_chain
    from .devices import choose_device

    launched = _launched_world(1)
    if launched != 1:
        raise SharpflowError(f"analyse-runs runs as one process, but was started as {launched}: analyse over "
                             "several processes with `sharpflow analyse` (resources.runs_per_job 1)")
    _setup_threads(a.threads)
    device = choose_device(a.device, log=_log)
    compute = 0.0
    for r in a.runs:
        compute += run_chain(r["run"], run_name=r["run_name"], data_dir=r["data"], checkpoints=r["checkpoints"],
                             spectrum=r["spectrum"], analyses=_planned(r["analyses"]), results=a.results,
                             chain_starts=r["chain_starts"], best=r["best"], aggregate=True, device=device,
                             progress=not a.no_progress, log=_log)
    _write_timing(a.timing, compute)


def _write_timing(path: Path | None, compute_s: float) -> None:
    """``--timing``: the seconds the stage spent on its work (the rest of a job's wall is start-up)."""
    if path is not None:
        from .io import write_text

        write_text(path, json.dumps({"compute_s": round(compute_s, 3)}) + "\n")


def cmd_aggregate(a: argparse.Namespace) -> None:
    from .results import aggregate

    if (a.out is None) == (a.out_dir is None):
        raise SharpflowError("give exactly one of --out and --out-dir")
    t0 = time.perf_counter()
    outputs: dict[Path, list[Path]] = {}
    for path in a.inputs:  # with --out-dir: …/{kind}/step*.parquet -> {out_dir}/{kind}.parquet
        outputs.setdefault(a.out or a.out_dir / f"{path.parent.name}.parquet", []).append(path)
    for out, paths in outputs.items():
        aggregate(paths, out)
    _write_timing(a.timing, time.perf_counter() - t0)


def cmd_claims(a: argparse.Namespace) -> None:
    """The claims table, from the workflow's --spec and inputs, or from a config file and its results."""
    from .claims.checks import make_claims

    t0 = time.perf_counter()
    if a.compare is not None:
        if a.spec is not None or a.config is not None:
            raise SharpflowError("--compare reads two finished claims tables: give it without --spec or --config")
        from .claims.compare import compare, report
        from .io import write_text

        text = report(compare(*a.compare), *a.compare)
        print(text, end="")
        if a.out_md is not None:
            write_text(a.out_md, text)
        return
    if (a.spec is None) == (a.config is None):
        raise SharpflowError("give exactly one of --spec (with the input tables), --config and --compare")
    if a.config is not None:
        spec, inputs = _claims_from_config(a.config)
        out = Path(a.results or spec.pop("results")) / "tables"
        out_md, out_tex, out_csv = (a.out_md or out / "claims.md", a.out_tex or out / "claims.tex",
                                    a.out_csv or out / "claims.csv")
    else:
        spec, inputs = json.loads(a.spec), a.inputs
        if None in (a.out_md, a.out_tex, a.out_csv):
            raise SharpflowError("with --spec, give --out-md, --out-tex and --out-csv")
        out_md, out_tex, out_csv = a.out_md, a.out_tex, a.out_csv
    rows = make_claims(spec, inputs, out_md, out_tex, out_csv)
    for r in rows:
        _log(f"claim {r['number']}: {r['verdict']}" + (f" ({r['reason']})" if r["reason"] else ""))
    _write_timing(a.timing, time.perf_counter() - t0)


def _claims_from_config(path: Path) -> tuple[dict[str, Any], list[Path]]:
    """The claims spec of a config file, and those of its runs' tables that exist under its results."""

    cfg = load_config(path)
    runs = expand_runs(cfg)
    plan = claim_plan(cfg, runs)
    inputs = [Path(p) for p in claim_tables(plan, cfg.results, lambda run, kind: (
        Path(cfg.results) / "runs" / run / f"{kind}.parquet").exists())]
    return {**claims_spec(cfg, runs, plan), "results": cfg.results}, inputs


def cmd_figure(a: argparse.Namespace) -> None:
    from .figures import style  # noqa: F401  (matplotlib, imported before the clock starts)

    t0 = time.perf_counter()
    figures.draw(a.name, spec=json.loads(a.spec), inputs=a.inputs, out_pdf=a.out_pdf, out_png=a.out_png)
    _write_timing(a.timing, time.perf_counter() - t0)


def cmd_table(a: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    tables.make_table(a.name, spec=json.loads(a.spec), inputs=a.inputs, out_md=a.out_md, out_tex=a.out_tex,
               out_csv=a.out_csv)
    _write_timing(a.timing, time.perf_counter() - t0)


def cmd_cost(a: argparse.Namespace) -> None:
    from .cost import cost_table

    cost_table(a.results, out_md=a.out_md, out_csv=a.out_csv)


def cmd_check(a: argparse.Namespace) -> None:

    cfg = load_config(a.configfile)
    runs = expand_runs(cfg)
    for name, run in runs.items():
        ck = checkpoint_steps(run, cfg.datasets[run.dataset])
        print(f"{name}\t{run.model.name}\tlr={run.optimizer.lr}\tbs={run.optimizer.batch_size}"
              f"\t{len(ck)} checkpoints (last step {ck[-1]})")
    print(f"{a.configfile}: valid, {len(runs)} runs")


def cmd_schema(a: argparse.Namespace) -> None:
    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if a.out:
        from .io import write_text

        write_text(a.out, text)
    else:
        sys.stdout.write(text)


# -------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sharpflow",
        description="Stages of the sharpflow pipeline (normally run by Snakemake; see README.md and the docs site).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, *, run: bool = True) -> None:
        if run:
            sp.add_argument("--run", required=True, type=_model_arg(RunConfig, "--run"),
                            help="the run's config as JSON (or @file)")
            sp.add_argument("--run-name", required=True, help="the run id")
            sp.add_argument("--data", required=True, type=Path, help="prepared dataset directory")
        sp.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")

    sp = sub.add_parser("prepare", help="make results/data/{dataset}/ (arrays, Hessian subset, meta.json)")
    sp.add_argument("--dataset", required=True, type=_model_arg(DatasetConfig, "--dataset"))
    sp.add_argument("--out", required=True, type=Path)
    common(sp, run=False)
    sp.set_defaults(func=cmd_prepare)

    sp = sub.add_parser("train", help="train one run, dumping checkpoints and metrics.parquet",
                        description="Train one run. A run with world_size > 1 is started by torchrun "
                        "(torchrun --standalone --nproc-per-node N --no-python -- sharpflow train ...) or srun "
                        "(srun --ntasks=N sharpflow train ...), N its world_size; --threads is then the job's, "
                        "shared among the ranks.")
    common(sp)
    sp.add_argument("--dataset", required=True, type=_model_arg(DatasetConfig, "--dataset"))
    sp.add_argument("--out", required=True, type=Path, help="the run's directory")
    sp.add_argument("--timing", type=Path, default=None, help="write {compute_s} (JSON) here")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("spectrum", help="top-k Hessian eigenpairs (certified) of one checkpoint")
    common(sp)
    sp.add_argument("--spectrum", required=True, type=_model_arg(SpectrumConfig, "--spectrum"))
    sp.add_argument("--checkpoint", required=True, type=Path)
    sp.add_argument("--previous", type=Path, default=None,
                    help="eigenvectors of an earlier checkpoint to warm-start from (used if present)")
    sp.add_argument("--out-table", required=True, type=Path)
    sp.add_argument("--out-eigvecs", required=True, type=Path)
    sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sp.set_defaults(func=cmd_spectrum)

    for name, analysis in REGISTRY.items():
        sp = sub.add_parser(name, help=f"{analysis.summary} (one checkpoint)")
        common(sp)
        sp.add_argument(f"--{name}", required=True, type=_model_arg(analysis.config, f"--{name}"),
                        help=f"the '{name}' config section as JSON (or @file)")
        sp.add_argument("--checkpoint", required=True, type=Path)
        sp.add_argument("--eigvecs", required=True, type=Path, help="the checkpoint's eigenvectors (spectrum)")
        sp.add_argument("--out-dir", required=True, type=Path,
                        help=f"where the tables go: runs/{{run}}/{name} ({', '.join(analysis.tables)})")
        sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        sp.set_defaults(func=_cmd_analysis(name))

    sp = sub.add_parser("analyse", help="a warm-start chain of checkpoints: spectrum, then every analysis, "
                        "resumable (what the Snakemake analysis jobs run)",
                        description="A warm-start chain of checkpoints: spectrum, then every analysis. The spectrum "
                        "alone may run over N processes: torchrun --standalone --nproc-per-node N --no-python -- "
                        "sharpflow analyse --world-size N ... (or srun --ntasks=N sharpflow analyse --world-size N "
                        "...); --threads is then the job's, shared among the ranks.")
    common(sp)
    sp.add_argument("--spectrum", required=True, type=_model_arg(SpectrumConfig, "--spectrum"))
    sp.add_argument("--analyses", default={}, type=_parse_plan,
                    help='JSON {name: {"config": {...}, "steps": [...]}}: the analyses and where they run')
    sp.add_argument("--results", required=True, type=Path, help="the results root (outputs go to runs/{run}/...)")
    sp.add_argument("--chain-starts", type=int, nargs="*", default=None, metavar="STEP",
                    help="steps at which a new warm-start chain begins (default: only the first checkpoint)")
    sp.add_argument("--aggregate", action="store_true",
                    help="the checkpoints are all of the run's: also write runs/{run}/{kind}.parquet")
    sp.add_argument("--best", type=Path, default=None, metavar="CHECKPOINT",
                    help="the run's best-validation checkpoint (checkpoints.best): its spectrum, solved cold, goes "
                    "to runs/{run}/spectrum_best/best.parquet and eigvecs/best.pt")
    sp.add_argument("--timing", type=Path, default=None, help="write {compute_s} (JSON) here")
    sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sp.add_argument("--world-size", type=int, default=None, metavar="N",
                    help="the processes torchrun or srun started this job as (resources.spectrum.world_size); "
                    "refused if it differs. Default: as launched (torchrun's WORLD_SIZE, else 1). Over several, "
                    "only the spectrum, density, ggn and batch_sharpness run, each rank on its share of the "
                    "work; rank 0 writes")
    sp.add_argument("checkpoints", nargs="+", type=Path, help="the chain's checkpoint files, in step order")
    sp.set_defaults(func=cmd_analyse)

    sp = sub.add_parser("analyse-runs", help="several whole runs, one after another in one process (what a "
                        "grouped Snakemake job runs: resources.runs_per_job)")
    common(sp, run=False)
    sp.add_argument("--runs", required=True, type=_parse_runs,
                    help="JSON list (or @file) of {run, run_name, spectrum, analyses, data, chain_starts, "
                    "checkpoints[, best]}, one per run, as for `sharpflow analyse`")
    sp.add_argument("--results", required=True, type=Path, help="the results root (outputs go to runs/{run}/...)")
    sp.add_argument("--timing", type=Path, default=None, help="write {compute_s} (JSON) here")
    sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sp.set_defaults(func=cmd_analyse_runs)

    sp = sub.add_parser("aggregate", help="concatenate per-checkpoint tables into one Parquet file per kind")
    sp.add_argument("--out", type=Path, default=None, help="the one output (all inputs are of one kind)")
    sp.add_argument("--out-dir", type=Path, default=None,
                    help="write {kind}.parquet here for each kind, the kind being an input's directory name")
    sp.add_argument("inputs", nargs="+", type=Path)
    sp.add_argument("--timing", type=Path, default=None, help="write {compute_s} (JSON) here")
    sp.set_defaults(func=cmd_aggregate)

    sp = sub.add_parser("figure", help="draw one figure (PDF + PNG)")
    sp.add_argument("name", help=f"the figure kind ({', '.join(figures.KINDS)}), or a figure's name when the spec "
                    "names its kind")
    sp.add_argument("--spec", required=True, help="figure spec as JSON (studies, runs, style)")
    sp.add_argument("--out-pdf", required=True, type=Path)
    sp.add_argument("--out-png", required=True, type=Path)
    sp.add_argument("inputs", nargs="+", type=Path, help="the aggregated tables to read")
    sp.add_argument("--timing", type=Path, default=None, help="write {compute_s} (JSON) here")
    sp.set_defaults(func=cmd_figure)

    sp = sub.add_parser("table", help="make one table (Markdown + LaTeX + CSV)")
    sp.add_argument("name", help=f"the table kind ({', '.join(tables.KINDS)}), or a table's name when the spec "
                    "names its kind")
    sp.add_argument("--spec", required=True, help="table spec as JSON (studies, runs, style)")
    sp.add_argument("--out-md", required=True, type=Path)
    sp.add_argument("--out-tex", required=True, type=Path)
    sp.add_argument("--out-csv", required=True, type=Path)
    sp.add_argument("inputs", nargs="+", type=Path, help="the aggregated tables to read")
    sp.add_argument("--timing", type=Path, default=None, help="write {compute_s} (JSON) here")
    sp.set_defaults(func=cmd_table)

    sp = sub.add_parser("claims", help="each claim of the paper checked on the runs: statistic, verdict, evidence "
                        "(Markdown + LaTeX + CSV)",
                        description="From a config: sharpflow claims --config config/config.yaml (reads its results "
                        "tree, writes results/tables/claims.*; runs without tables count as missing). "
                        "The workflow passes --spec and the input tables instead. "
                        "sharpflow claims --compare results_a results_b: do two results trees (two machines, two "
                        "sets of seeds) give the same verdicts, and do their intervals overlap?")
    sp.add_argument("--config", type=Path, default=None, help="a sharpflow config file")
    sp.add_argument("--compare", nargs=2, type=Path, default=None, metavar=("A", "B"),
                    help="two results roots (or claims.csv files) to compare claim by claim; with --out-md, "
                    "also write the comparison there")
    sp.add_argument("--results", type=Path, default=None, help="with --config: the results root (default: its own)")
    sp.add_argument("--spec", default=None, help="JSON {config, claims, runs}, as the workflow writes it")
    sp.add_argument("--out-md", type=Path, default=None)
    sp.add_argument("--out-tex", type=Path, default=None)
    sp.add_argument("--out-csv", type=Path, default=None)
    sp.add_argument("inputs", nargs="*", type=Path, help="with --spec: the runs' aggregated tables")
    sp.add_argument("--timing", type=Path, default=None, help="write {compute_s} (JSON) here")
    sp.set_defaults(func=cmd_claims)

    sp = sub.add_parser("cost", help="where the time went: a per-rule table from the jobs' benchmark files")
    sp.add_argument("--results", required=True, type=Path, help="the results root (reads benchmarks/)")
    sp.add_argument("--out-md", required=True, type=Path)
    sp.add_argument("--out-csv", required=True, type=Path)
    sp.set_defaults(func=cmd_cost)

    sp = sub.add_parser("check", help="validate a config file and list its runs")
    sp.add_argument("configfile", type=Path)
    sp.set_defaults(func=cmd_check)

    sp = sub.add_parser("schema", help="print the config's JSON schema")
    sp.add_argument("--out", type=Path, default=None)
    sp.set_defaults(func=cmd_schema)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except SharpflowError as err:
        print(f"sharpflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sharpflow {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
