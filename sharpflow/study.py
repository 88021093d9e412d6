"""The study assembly: a whole config file, validated, expanded into its runs.

A config file (YAML) has these parts:

- ``datasets``: named datasets (what ``prepare`` makes under ``results/data/{name}/``);
- ``defaults``: run fields shared by every study (a partial :class:`~sharpflow.config.RunConfig`);
- ``studies``: named groups of runs, each a ``base`` (partial run) and a ``sweep``, a grid over
  any run field given by its dotted path (``optimizer.lr: [0.02, 0.05]``). Every grid point is
  one run with a stable, human-readable id (:func:`sharpflow.config.run_id`);
- ``spectrum`` and one section per registered analysis (:data:`sharpflow.analyses.REGISTRY`): the
  per-checkpoint settings (a study may override them);
- ``figures`` / ``tables``: which studies each figure or table shows, and its style;
- ``claims``: the published claims' thresholds, tested on the runs of the figures of their kind;
- ``resources``: per-stage resources, one section per analysis too.

The run-level models (dataset, model, optimizer, checkpoints, spectrum) and the step arithmetic
live in :mod:`sharpflow.config`, below the analyses; this module sits above the registries it
assembles (analyses, figures, tables, claims). It imports no torch or pandas, so the Snakefile can
load it quickly.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, NonNegativeInt, PositiveInt, ValidationError, create_model, model_validator

from .analyses import REGISTRY as ANALYSES
from .claims import CLAIMS, ClaimsConfig
from .config import FORMAT_VERSION as STAGE_FORMAT_VERSION
from .config import (
    RUN_ID_RE,
    DatasetConfig,
    RunConfig,
    SpectrumConfig,
    StageResources,
    check_batchnorm_batches,
    check_hessian_subset_is_trained_on,
    checkpoint_steps,
    deep_merge,
    format_errors,
    run_id,
    steps_per_epoch,
    study_of,
)
from .configbase import Name, Strict
from .errors import ConfigError, DataError
from .figures import KINDS as FIGURE_KINDS
from .tables import KINDS as TABLE_KINDS

#: Bumped when a stage's results change meaning; part of that stage's Snakemake params, so a
#: refactor reruns nothing while a change of meaning reruns exactly that stage and what follows.
#: The run-level stages' versions and each registered analysis's.
FORMAT_VERSION = {**STAGE_FORMAT_VERSION, **{name: a.format_version for name, a in ANALYSES.items()}}


# -------------------------------------------------------------------------------------- studies
class _StudyBase(Strict):
    """A named group of runs: ``base`` merged over ``defaults``, expanded over ``sweep``."""

    omit_at_default = ("replicates",)

    base: dict[str, Any] = Field(default_factory=dict)
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    analyse: bool = Field(True, description="Run the spectrum and the analyses on this study's checkpoints.")
    spectrum: dict[str, Any] = Field(default_factory=dict, description="Overrides of the top-level spectrum.")
    replicates: str | None = Field(
        None, description="The name of another study whose runs these repeat with other seeds (usually with fewer "
        "analyses): figures draw them as one study with a seed band, and the claims pool them with that study's "
        "runs of the same settings, each seed a unit of the intervals.")

    @model_validator(mode="after")
    def _check(self) -> _StudyBase:
        for key, values in self.sweep.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
                raise ValueError(f"sweep key {key!r} is not a dotted field path")
            if not values:
                raise ValueError(f"sweep {key!r} has no values")
        return self


class _Plans(dict):
    """run id -> checkpoint steps, computed on first use (a config may be valid without them)."""

    def __init__(self, runs: dict[str, RunConfig], datasets: dict[str, DatasetConfig]) -> None:
        super().__init__()
        self._runs, self._datasets = runs, datasets

    def __contains__(self, run: object) -> bool:
        return run in self._runs

    def __missing__(self, run: str) -> list[int]:
        rc = self._runs[run]
        self[run] = steps = checkpoint_steps(rc, self._datasets[rc.dataset])
        return steps


#: A study, with one override section per registered analysis (``project: {...}``).
StudyConfig = create_model(
    "StudyConfig",
    __base__=_StudyBase,
    __doc__=_StudyBase.__doc__,
    **{name: (dict[str, Any], Field(default_factory=dict, description=f"Overrides of the top-level {name}."))
       for name in ANALYSES},
)


class _ResourcesBase(Strict):
    """Per-stage resources passed to Snakemake (a profile's set-resources can override them).

    An analysis job (``chains_per_job`` warm-start chains of a run: their spectra and every analysis
    of those checkpoints) asks for the most threads, memory and GPUs of the sections it runs and the
    sum of their ``runtime`` over its checkpoints (``runtime`` is minutes per checkpoint there).
    """

    train: StageResources = Field(default_factory=StageResources)
    spectrum: StageResources = Field(default_factory=StageResources)
    chains_per_job: NonNegativeInt = Field(
        0,
        description="Warm-start chains per analysis job (0: all of a run's chains in one job, which then "
        "also writes the run's aggregated tables). Scheduling only: the numbers do not depend on it.",
    )
    runs_per_job: PositiveInt = Field(
        1,
        description="Whole runs of one study analysed one after another in one job (in sweep order; with "
        "chains_per_job 0). More than 1 saves a process start-up per run (seconds each on a CPU, most of "
        "a small run's analysis) at the cost of parallelism; each run keeps its own outputs and stash, so "
        "a change to one run recomputes only that run's checkpoints. Scheduling only, like chains_per_job.",
    )

    @model_validator(mode="after")
    def _check(self) -> _ResourcesBase:
        if self.runs_per_job > 1 and self.chains_per_job:
            raise ValueError("runs_per_job > 1 groups whole runs: it needs chains_per_job 0")
        return self


ResourcesConfig = create_model(
    "ResourcesConfig",
    __base__=_ResourcesBase,
    __doc__=_ResourcesBase.__doc__,
    **{name: (StageResources, Field(default_factory=StageResources)) for name in ANALYSES},
)


class FigureConfig(Strict):
    """One figure (or table): its kind (the plotting module), the studies it shows, its style."""

    kind: str = Field(description=f"Figure kind: {', '.join(FIGURE_KINDS)} (tables: {', '.join(TABLE_KINDS)}).")
    studies: list[Name] = Field(min_length=1, description="Studies the figure shows.")
    style: dict[str, Any] = Field(default_factory=dict, description="Style options of this figure.")


class _ConfigBase(Strict):
    """A whole study: datasets, runs, the spectrum and analyses of their checkpoints, figures, tables."""

    results: str = Field("results", description="Root of every output.")
    datasets: dict[Name, DatasetConfig] = Field(min_length=1)
    defaults: dict[str, Any] = Field(default_factory=dict)
    studies: dict[Name, StudyConfig] = Field(min_length=1)  # type: ignore[valid-type]
    spectrum: SpectrumConfig = Field(default_factory=SpectrumConfig)
    figures: dict[Name, FigureConfig] = Field(default_factory=dict)
    tables: dict[Name, FigureConfig] = Field(default_factory=dict)
    claims: ClaimsConfig = Field(default_factory=ClaimsConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)  # type: ignore[valid-type]
    prune_checkpoints: bool = Field(
        False,
        description="Delete intermediate checkpoints once every job that reads them is done (Snakemake "
        "temp()); the first and last are kept. Saves disk at paper scale; re-analysing then retrains.",
    )

    @model_validator(mode="after")
    def _check(self) -> _ConfigBase:
        runs = expand_runs(self)  # validates every run; raises with the field path
        for run, cfg in runs.items():
            if cfg.dataset not in self.datasets:
                raise ValueError(f"run {run}: dataset {cfg.dataset!r} is not defined under 'datasets'")
            try:
                n_train = self.datasets[cfg.dataset].train_size()
            except DataError as err:  # the user's own data, read to size it: name the dataset
                raise ValueError(f"datasets.{cfg.dataset}: {err}") from None
            except ValueError:
                continue  # reported where the sizes are used (prepare, the checkpoint plan)
            check_batchnorm_batches(run, cfg, n_train)
            if self.studies[study_of(run)].analyse or cfg.optimizer.name == "nsgd":
                check_hessian_subset_is_trained_on(run, cfg, n_train)
        for sname in self.studies:  # a study's overrides, validated once, with their path
            for section in ("spectrum", *ANALYSES):
                try:
                    _study_section(self, section, sname)
                except ValidationError as err:
                    why = format_errors(err).replace("(top level): ", "")
                    raise ValueError(f"studies.{sname}.{section}: {why}") from None
        plans = _Plans(runs, self.datasets)
        analysed = {run for run in runs if self.studies[study_of(run)].analyse}
        for name, analysis in ANALYSES.items():
            if analysis.check is not None:
                analysis.check(getattr(self, name), plans, analysed)
        for sname, study in self.studies.items():
            target = study.replicates
            if target is not None and (target not in self.studies or self.studies[target].replicates is not None
                                       or target == sname):
                raise ValueError(f"studies.{sname}.replicates: {target!r} is not another study of this config "
                                 "(that does not itself replicate one)")
        self._check_presentation()
        return self

    def _check_presentation(self) -> None:
        for section, items, known in (("figures", self.figures, FIGURE_KINDS), ("tables", self.tables, TABLE_KINDS)):
            for name, fig in items.items():
                if fig.kind not in known:
                    raise ValueError(f"{section}.{name}.kind: unknown kind {fig.kind!r}; known: {', '.join(known)}")
                for s in fig.studies:
                    if s not in self.studies:
                        raise ValueError(f"{section}.{name}: unknown study {s!r}")
                    needs_analysis = set(known[fig.kind]) - {"metrics"}
                    if needs_analysis and not self.studies[s].analyse:
                        raise ValueError(f"{section}.{name}: {fig.kind} needs the spectrum/analysis tables, but "
                                         f"study {s!r} has analyse: false")


#: The config: the fields above plus one section per registered analysis (``project``, ``escape``).
Config = create_model(
    "Config",
    __base__=_ConfigBase,
    __doc__=_ConfigBase.__doc__,
    **{name: (a.config, Field(default_factory=a.config, description=a.summary)) for name, a in ANALYSES.items()},
)


# ------------------------------------------------------------------------------ expansion
def _set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"sweep {path!r}: {key!r} is not a section")
    node[keys[-1]] = copy.deepcopy(value)


def _study_points(study: StudyConfig) -> list[dict[str, Any]]:
    keys = list(study.sweep)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*study.sweep.values())]


def expand_runs(cfg: Config) -> dict[str, RunConfig]:
    """Every run of every study, by run id, validated."""
    runs: dict[str, RunConfig] = {}
    for sname, study in cfg.studies.items():
        base = deep_merge(cfg.defaults, study.base)
        for point in _study_points(study):
            raw = copy.deepcopy(base)
            for path, value in point.items():
                _set_path(raw, path, value)
            rid = run_id(sname, point)
            try:
                run = RunConfig.model_validate(raw)
            except ValidationError as err:
                raise ValueError(f"studies.{sname} (run {rid}): {format_errors(err)}") from None
            if not RUN_ID_RE.match(rid):
                raise ValueError(f"studies.{sname}: run id {rid!r} is not a safe name")
            if rid in runs:
                raise ValueError(f"studies.{sname}: two sweep points give the same run id {rid!r}")
            runs[rid] = run
    return runs


def _study_section(cfg: _ConfigBase, section: str, study: str) -> BaseModel:
    """Config section ``section`` ("spectrum" or an analysis) for ``study``: the top level, with the
    study's overrides, validated."""
    model = SpectrumConfig if section == "spectrum" else ANALYSES[section].config
    return model.model_validate(deep_merge(getattr(cfg, section).model_dump(), getattr(cfg.studies[study], section)))


def spectrum_config(cfg: Config, run: str) -> SpectrumConfig:
    """The spectrum section for ``run``: the top level, with its study's overrides."""
    return _study_section(cfg, "spectrum", study_of(run))  # type: ignore[return-value]


def analysis_config(cfg: Config, name: str, run: str) -> BaseModel:
    """The config section of analysis ``name`` for ``run``: the top level, with its study's overrides."""
    return _study_section(cfg, name, study_of(run))


# ------------------------------------------------------------------------------ presentation
def presentation_runs(cfg: Config, runs: dict[str, RunConfig], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """What a figure, table or the claims need of each run (its sweep settings), by run id."""
    out = {}
    for run in names:
        rc = runs[run]
        ns = rc.optimizer.nsgd
        study = study_of(run)
        out[run] = {
            "study": cfg.studies[study].replicates or study,
            "lr": rc.optimizer.lr,
            "batch_size": rc.optimizer.batch_size,
            "momentum": rc.optimizer.momentum,
            "optimizer": rc.optimizer.name,
            "gamma": ns.gamma if ns else None,
            "k": ns.k if ns else None,
            "subspace": ns.subspace if ns else None,
            "seed": rc.seed,
            "loss": rc.loss,
            "steps_per_epoch": steps_per_epoch(rc, cfg.datasets[rc.dataset]),
        }
        if rc.optimizer.schedule.kind.startswith("warmup"):  # only then: other runs' specs stay as they were
            out[run]["warmup_steps"] = rc.optimizer.schedule.warmup_steps
        if rc.optimizer.name == "sam":  # likewise
            out[run]["rho"] = rc.optimizer.sam.rho
            out[run]["adaptive"] = rc.optimizer.sam.adaptive
        sharp = analysis_config(cfg, "sharpness", run)
        for key in ("adaptive", "magnitude_aware"):  # only where set: the plain measures leave the spec as it was
            if getattr(sharp, "enabled", False) and getattr(sharp, key, False):
                out[run][f"sharpness_{key}"] = True
    return out


# ---------------------------------------------------------------------------------- claims plan
def claim_plan(cfg: Any, runs: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    """Per claim number: the runs it is tested on (those of the studies of every figure and table of
    its kind) and the names of those figures and tables. ``cfg``: the parsed config; ``runs``: its
    expanded runs (:func:`expand_runs`)."""
    plan = {}
    for claim in CLAIMS:
        studies: list[str] = []
        items: list[str] = []
        for section in ("figures", "tables"):
            for name, item in getattr(cfg, section).items():
                if item.kind == claim.kind:
                    items.append(f"{section}/{name}")
                    studies += [s for s in item.studies if s not in studies]
        plan[str(claim.number)] = {"runs": [r for r in runs if study_of(r) in studies], "figures": items}
    return plan


def claims_spec(cfg: Any, runs: dict[str, Any], plan: dict[str, dict[str, list[str]]]) -> dict[str, Any]:
    """What the claims stage takes besides the tables: the thresholds, the plan and each planned run's
    settings (:func:`presentation_runs`)."""
    names = sorted({r for entry in plan.values() for r in entry["runs"]})
    return {"config": cfg.claims.model_dump(mode="json"), "claims": plan, "runs": presentation_runs(cfg, runs, names)}


def claim_tables(plan: dict[str, dict[str, list[str]]], results: str, has: Callable[[str, str], bool]) -> list[str]:
    """The tables ``{results}/runs/{run}/{kind}.parquet`` the claims read, of the runs ``plan`` tests
    them on, where ``has(run, kind)`` (the run has that table); in claim order, no repeats."""
    paths: list[str] = []
    for claim in CLAIMS:
        for run in plan[str(claim.number)]["runs"]:
            for kind in claim.reads:
                path = f"{results}/runs/{run}/{kind}.parquet"
                if has(run, kind) and path not in paths:
                    paths.append(path)
    return paths


# -------------------------------------------------------------------------------------- loading
def parse_config(raw: Any, source: str = "config") -> Config:
    """Validate a config mapping; any problem raises :class:`ConfigError` naming the field path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {format_errors(err)}") from None


def read_yaml(path: str | Path) -> Any:
    """A YAML file's contents; a missing or malformed file raises :class:`ConfigError` naming it."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None


def merge_config(base: Any, overrides: dict[str, Any]) -> Any:
    """``overrides`` (e.g. Snakemake's ``--config key=value``) merged into a config mapping."""
    return deep_merge(base, overrides) if isinstance(base, dict) else base


def load_config(path: str | Path) -> Config:
    """Read and validate a config file (:func:`read_yaml`, then :func:`parse_config`)."""
    return parse_config(read_yaml(path), str(Path(path)))


def json_schema() -> dict[str, Any]:
    """The JSON schema of the whole config (``workflow/schemas/config.schema.json``, kept in sync by a test)."""
    return Config.model_json_schema()
