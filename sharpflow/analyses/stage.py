"""Running the spectrum and the analyses: one checkpoint, or a whole warm-start chain in one process.

A Snakemake analysis job covers one warm-start chain of a run (``spectrum.warm_chain``
consecutive checkpoints): for each checkpoint in order it computes the spectrum (warm-started
from the previous checkpoint's eigenvectors, as separate jobs did) and then every analysis
selected at that checkpoint, on the eigenvectors just computed. Each checkpoint keeps its own
output files, so figures, tables and the aggregate rules are unchanged.

Resume and reuse: every result is first written to the run's *analysis stash*
``runs/{run}/.analysis/`` (outside Snakemake's declared outputs, which it deletes when a job
fails or is rerun) together with a key: a digest of what the result depends on (its config
section and format version, the checkpoint file's bytes and, for an analysis or a warm-started
spectrum, the key of the eigenvectors it used). It is then hard-linked to its declared place. A
rerun publishes every stashed result whose key still matches and computes the rest, so a killed
job loses at most the checkpoint it was on, and a job rerun because one analysis's config changed
recomputes only that analysis (the same numbers either way: a reused result is the file that
computing it again would write, bit for bit, on the same machine).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from pydantic import BaseModel

from ..config import FORMAT_VERSION, RunConfig, SpectrumConfig, dump_json
from ..data import load_prepared
from ..errors import SharpflowError
from ..hessian.distributed import RankFailure, group_rank_world
from ..io import load_torch, publish, save_torch, sha256_file, write_parquet, write_text
from ..results import aggregate as concat
from . import REGISTRY, distributed_names
from . import spectrum as spectrum_mod
from .base import Analysis
from .context import EIGVEC_KEYS, CheckpointContext, open_checkpoint

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------- file layout
def spectrum_paths(results: str | Path, run: str, step: int | None) -> tuple[Path, Path]:
    """The spectrum table and the eigenvector file of one checkpoint (``step`` None: the run's
    best-validation checkpoint, ``spectrum_best/best.parquet`` and ``eigvecs/best.pt``)."""
    root = Path(results) / "runs" / run
    if step is None:
        return root / "spectrum_best" / "best.parquet", root / "eigvecs" / "best.pt"
    return root / "spectrum" / f"step{step:08d}.parquet", root / "eigvecs" / f"step{step:08d}.pt"


def analysis_paths(results: str | Path, run: str, analysis: Analysis, step: int) -> dict[str, Path]:
    return {kind: Path(analysis.path(str(results), run, kind, step)) for kind in analysis.tables}


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class _Stash:
    """One result slot per (what, step) under ``runs/{run}/.analysis``; a key file validates it.

    The key file holds the key on its first line and, on the next, the SHA-256 of every file of the
    slot: an entry whose files were truncated or corrupted (a full disk, a crash mid-copy, a stray
    edit) is recomputed, with one log line, instead of being published or failing the job."""

    root: Path
    log: Log = print

    def files(self, what: str, names: Sequence[str], step: int | str) -> dict[str, Path]:
        """The stashed tables ``names`` of ``what`` at ``step`` (an int, or "best")."""
        return {n: self.root / what / n / f"{_label(step)}.parquet" for n in names}

    def key_file(self, what: str, step: int | str) -> Path:
        return self.root / what / f"{_label(step)}.key"

    def valid(self, what: str, step: int | str, key: str, files: Sequence[Path]) -> bool:
        kf = self.key_file(what, step)
        try:
            lines = kf.read_text().split("\n")
            if lines[0] != key or not all(f.exists() for f in files):
                return False
            digests = json.loads(lines[1]) if len(lines) > 1 and lines[1] else {}
            bad = [self._rel(f) for f in files if self._rel(f) in digests and sha256_file(f) != digests[self._rel(f)]]
        except (OSError, json.JSONDecodeError):
            return False
        if bad:
            self.log(f"{kf.parent}: stashed {what} of {_label(step)} is corrupt ({', '.join(bad)}: checksum "
                     "differs); recomputing it")
            return False
        return True

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def seal(self, what: str, step: int | str, key: str, files: Sequence[Path]) -> None:
        digests = {self._rel(f): sha256_file(f) for f in files}
        write_text(self.key_file(what, step), key + "\n" + json.dumps(digests, sort_keys=True))


def _label(step: int | str) -> str:
    return step if isinstance(step, str) else f"step{step:08d}"


# ------------------------------------------------------------------------------------ the chain
@dataclass
class Planned:
    """An analysis of the chain: its config section and the steps it runs at."""

    analysis: Analysis
    config: BaseModel
    steps: set[int]


def run_chain(
    run: RunConfig,
    *,
    run_name: str,
    data_dir: str | Path,
    checkpoints: Sequence[str | Path],
    spectrum: SpectrumConfig,
    analyses: Sequence[Planned],
    results: str | Path,
    chain_starts: Sequence[int] | None = None,
    best: str | Path | None = None,
    aggregate: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = False,
    log: Log = print,
) -> float:
    """Spectrum, then the planned analyses, of each checkpoint of one or more warm-start chains, in
    order; returns the seconds spent on the checkpoints (loading, computing, writing).

    ``checkpoints``: the checkpoint files in step order. ``chain_starts``: the steps at which a new
    warm-start chain begins (solved cold); None: only the first. ``aggregate``: the checkpoints are
    all of the run's, so also write its aggregated tables ``runs/{run}/{kind}.parquet``. ``best``:
    the run's best-validation checkpoint, whose spectrum (solved cold, no other analysis) goes to
    ``spectrum_paths(results, run, None)`` and, aggregated, ``runs/{run}/spectrum_best.parquet``.
    Outputs go to the paths of :func:`spectrum_paths` and :func:`analysis_paths` under ``results``.
    """

    refuse_distributed_analyses(analyses, group_rank_world()[1])
    device = torch.device(device)
    data = load_prepared(data_dir, device=device)
    stash = _Stash(Path(results) / "runs" / run_name / ".analysis", log)
    spec_json = dump_json(spectrum)
    starts = set(chain_starts or [])
    previous: dict[str, Any] | None = None
    previous_key: str | None = None
    last: dict[str, Any] | None = None  # the eigenvectors of the checkpoint before, whatever the chain
    last_key: str | None = None
    written: dict[str, list[Path]] = {}
    t0 = time.perf_counter()
    for i, path in enumerate(checkpoints):
        ctx = open_checkpoint(run, run_name, data, path, device, log=log)
        step = ctx.step
        if i == 0 or step in starts:
            previous, previous_key = None, None
        ck_sha = sha256_file(path)
        ctx.previous_eigvecs, before_key = last, last_key
        previous, previous_key = _spectrum(ctx, spectrum, spec_json, previous, previous_key, stash, ck_sha,
                                           results, progress)
        last, last_key = previous, previous_key
        written.setdefault("spectrum", []).append(spectrum_paths(results, run_name, step)[0])
        for plan in analyses:
            if step in plan.steps:
                outs = _run_analysis(ctx, plan, stash, previous_key, ck_sha, results,
                                     before_key if plan.analysis.previous else None)
                for kind, out in outs.items():
                    written.setdefault(kind, []).append(out)
        log(f"[{run_name}] checkpoint {i + 1} of {len(checkpoints)} (step {step}) done, "
            f"{time.perf_counter() - t0:.1f} s so far")
    if best is not None:
        ctx = open_checkpoint(run, run_name, data, best, device, log=log)
        _spectrum(ctx, spectrum, spec_json, None, None, stash, sha256_file(best), results, progress, label="best")
        written["spectrum_best"] = [spectrum_paths(results, run_name, None)[0]]
        log(f"[{run_name}] best-validation checkpoint (step {ctx.step}) done")
    if aggregate and _writer():
        for kind, files in written.items():
            concat(files, Path(results) / "runs" / run_name / f"{kind}.parquet")
    return time.perf_counter() - t0


def _spectrum(ctx: CheckpointContext, cfg: SpectrumConfig, spec_json: str, previous: dict[str, Any] | None,
              previous_key: str | None, stash: _Stash, ck_sha: str, results: str | Path,
              progress: bool, label: str | None = None) -> tuple[dict[str, Any], str]:
    """The spectrum of one checkpoint, from the stash or computed; its eigenvectors and key.
    ``label`` "best": the best-validation checkpoint (its own stash slot and output paths)."""
    step = ctx.step
    slot: int | str = label or step
    key = _key("spectrum", spec_json, FORMAT_VERSION["spectrum"], ck_sha, previous_key)
    files = {**stash.files("spectrum", ["spectrum"], slot),
             "eigvecs": stash.root / "spectrum" / "eigvecs" / f"{_label(slot)}.pt"}
    rank, world = group_rank_world()
    # several ranks: rank 0 alone reads the stash and decides; the others compute with it or take its vectors
    reuse = _from_rank0(rank == 0 and stash.valid("spectrum", slot, key, list(files.values())), world)
    vecs: dict[str, Any] | None = None
    if not reuse:
        table, vecs = spectrum_mod.compute(ctx, cfg, previous, progress=progress, log=ctx.log)
        if rank == 0:
            save_torch(files["eigvecs"], vecs)
            write_parquet(files["spectrum"], table)
            stash.seal("spectrum", slot, key, list(files.values()))
    else:
        ctx.log(f"[{ctx.run_name}] step {step}: spectrum reused from the stash")
    if rank == 0:
        out_table, out_vecs = spectrum_paths(results, ctx.run_name, None if label else step)
        publish(files["spectrum"], out_table, touch=True)
        publish(files["eigvecs"], out_vecs, touch=True)
        ctx.with_eigvecs(out_vecs)
        if reuse:
            _from_rank0(ctx.eigvecs, world)
    else:  # the same vectors as rank 0's file: computed in lockstep, or sent by rank 0 (the next warm start)
        ctx.eigvecs = vecs if not reuse else _from_rank0(None, world)
    assert ctx.eigvecs is not None
    return ctx.eigvecs, key


# ------------------------------------------------------------------------------ several processes
def _writer() -> bool:
    """Whether this process writes the job's files: always, but for ranks other than 0 of a process group."""
    return group_rank_world()[0] == 0


def _from_rank0(obj: Any, world: int) -> Any:
    """Rank 0's ``obj`` on every rank (``world`` 1: ``obj``); every rank must call it at the same point."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    try:
        dist.broadcast_object_list(box, src=0)
    except RuntimeError as err:
        raise RankFailure.of(err, dist.get_rank(), world, "the broadcast of rank 0's stash decision") from err
    return box[0]


def refuse_distributed_analyses(analyses: Sequence[Planned], world: int) -> None:
    """Over several processes only the spectrum and the analyses marked ``distributed`` run: one line
    naming any other analysis planned."""
    names = [p.analysis.name for p in analyses if p.steps and not p.analysis.distributed]
    if world > 1 and names:
        what, it = ((f"analysis '{names[0]}' does", "it") if len(names) == 1
                    else (f"analyses {', '.join(map(repr, names))} do", "them"))
        raise SharpflowError(f"{what} not run over several processes yet: run {it} with "
                             f"resources.spectrum.world_size 1 (this job has {world}; only {distributed_names()} "
                             "run over several)")


def _run_analysis(ctx: CheckpointContext, plan: Planned, stash: _Stash, spectrum_key: str, ck_sha: str,
                  results: str | Path, before_key: str | None = None) -> dict[str, Path]:
    """One analysis of one checkpoint, from the stash or computed; its published tables by kind.
    ``before_key``: for an analysis that reads the previous checkpoint's eigenvectors, their key."""
    a, step = plan.analysis, ctx.step
    parts: tuple[Any, ...] = (a.name, dump_json(plan.config), a.format_version, ck_sha, spectrum_key)
    key = _key(*parts, before_key) if a.previous else _key(*parts)
    files = stash.files(a.name, a.tables, step)
    rank, world = group_rank_world()
    # several ranks (a distributed analysis): rank 0 alone reads the stash and decides; all compute in lockstep
    reuse = _from_rank0(rank == 0 and stash.valid(a.name, step, key, list(files.values())), world)
    if not reuse:
        tables = compute_tables(a, ctx, plan.config)
        if rank == 0:
            for kind, df in tables.items():
                write_parquet(files[kind], df)
            stash.seal(a.name, step, key, list(files.values()))
    else:
        ctx.log(f"[{ctx.run_name}] step {step}: {a.name} reused from the stash")
    published = analysis_paths(results, ctx.run_name, a, step)
    if rank == 0:
        for kind, dst in published.items():
            publish(files[kind], dst, touch=True)
    return published


def compute_tables(a: Analysis, ctx: CheckpointContext, cfg: BaseModel) -> dict[str, pd.DataFrame]:
    """``a.compute``, checked: exactly the declared table kinds, each a DataFrame."""
    tables = a.compute(ctx, cfg)
    if set(tables) != set(a.tables) or not all(isinstance(t, pd.DataFrame) for t in tables.values()):
        raise SharpflowError(f"analysis {a.name!r} returned tables {sorted(tables)}; it declares {list(a.tables)}")
    return tables


# ------------------------------------------------------------------------- one checkpoint, by hand
def spectrum_stage(
    cfg: SpectrumConfig,
    run: RunConfig,
    *,
    run_name: str,
    data_dir: str | Path,
    checkpoint: str | Path,
    previous: str | Path | None,
    out_table: str | Path,
    out_eigvecs: str | Path,
    device: torch.device | str = "cpu",
    progress: bool = False,
    log: Log = print,
) -> pd.DataFrame:
    """The spectrum of one checkpoint (``sharpflow spectrum``), warm-started from ``previous``
    (an eigenvector file) when it exists."""
    device = torch.device(device)
    data = load_prepared(data_dir, device=device)
    ctx = open_checkpoint(run, run_name, data, checkpoint, device, log=log)
    prev = None
    if previous is not None and Path(previous).exists():
        prev = load_torch(previous, required=EIGVEC_KEYS, what="eigenvectors")
    table, vecs = spectrum_mod.compute(ctx, cfg, prev, progress=progress, log=log)
    save_torch(out_eigvecs, vecs)
    write_parquet(out_table, table)
    return table


def analysis_stage(
    name: str,
    cfg: BaseModel,
    run: RunConfig,
    *,
    run_name: str,
    data_dir: str | Path,
    checkpoint: str | Path,
    eigvecs: str | Path,
    out_dir: str | Path,
    device: torch.device | str = "cpu",
    log: Log = print,
) -> dict[str, pd.DataFrame]:
    """One registered analysis of one checkpoint (``sharpflow <name>``): its tables go to
    ``{out_dir}/step*.parquet`` (one table) or ``{out_dir}/{kind}/step*.parquet``."""

    a = REGISTRY[name]
    device = torch.device(device)
    data = load_prepared(data_dir, device=device)
    ctx = open_checkpoint(run, run_name, data, checkpoint, device, log=log).with_eigvecs(eigvecs)
    tables = compute_tables(a, ctx, cfg)
    for kind, df in tables.items():
        write_parquet(Path(out_dir) / a.relpath(kind, ctx.step), df)
    return tables
