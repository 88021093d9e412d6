"""A study's results, as figures and tables read them: one public module for presentation.

:func:`load` reads aggregated tables (``…/runs/{run}/{kind}.parquet``) into a :class:`Data`
with the run bookkeeping every figure and table needs; :func:`aggregate` makes those files from
the per-checkpoint tables. Pure pandas: no torch and no matplotlib here, so the light commands
(aggregate, figure, table) start fast.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import ADAPTIVE_OPTIMIZERS, study_of
from .errors import SharpflowError
from .io import read_parquet, write_parquet

#: run fields of ``spec["runs"][run]`` that can distinguish runs, in the order in which a figure
#: prefers to colour by them.
SWEEP_KEYS: tuple[str, ...] = ("lr", "batch_size", "gamma", "k", "momentum", "optimizer", "loss", "seed",
                               "warmup_steps")


@dataclass
class Data:
    """A figure's inputs: one concatenated DataFrame per table kind, and the runs' settings.

    Every table has a ``run`` column (the run directory's name) and a ``status`` column
    ("ok" | "diverged" | "stopped"); rows from an analysis's own ``diverged`` flag count as
    diverged too.
    """

    tables: dict[str, pd.DataFrame]
    runs: list[str]
    meta: dict[str, dict[str, Any]]
    studies: list[str]

    @property
    def empty(self) -> bool:
        return all(len(df) == 0 for df in self.tables.values())

    def table(self, kind: str) -> pd.DataFrame:
        """Every loaded row of table ``kind`` (an empty frame when none was loaded)."""
        return self.tables.get(kind, pd.DataFrame())

    def rows(self, kind: str, run: str) -> pd.DataFrame:
        """The rows of table ``kind`` that belong to ``run``."""
        df = self.table(kind)
        if len(df) == 0:
            return df
        return df[df["run"] == run]

    def runs_with(self, kind: str) -> list[str]:
        """The runs with rows in table ``kind``, in the spec's order."""
        df = self.table(kind)
        present = set(df["run"]) if len(df) else set()
        return [r for r in self.runs if r in present]

    def value(self, run: str, key: str) -> Any:
        """A run setting from the spec, with ``lr`` falling back to the metrics table."""
        v = self.meta.get(run, {}).get(key)
        if v is None and key == "lr":
            met = self.rows("metrics", run)
            if len(met) and "lr" in met and met["lr"].notna().any():
                v = float(met["lr"].dropna().iloc[0])
        return v

    def study(self, run: str) -> str:
        """The study ``run`` belongs to (from the spec, else from its id)."""
        return str(self.meta.get(run, {}).get("study") or study_of(run))

    def divergence(self, run: str) -> tuple[float, float] | None:
        """(step, epoch) of the first diverged row of ``run`` in any table, or None."""
        best: tuple[float, float] | None = None
        for df in self.tables.values():
            if len(df) == 0 or "step" not in df:
                continue
            d = df[(df["run"] == run) & (df["status"] == "diverged")]
            if len(d):
                i = d["step"].idxmin()
                cand = (float(d.at[i, "step"]), float(d.at[i, "epoch"]) if "epoch" in d else math.nan)
                if best is None or cand[0] < best[0]:
                    best = cand
        return best


def sort_value(v: Any) -> tuple[int, float, str]:
    """Sort key for mixed settings: numbers by value, "full" batch after every number, None last."""
    if v is None:
        return (2, 0.0, "")
    if isinstance(v, bool):
        return (0, float(v), "")
    if isinstance(v, int | float):
        return (0, float(v), "")
    if v == "full":
        return (0, math.inf, "")
    return (1, 0.0, str(v))


def load(inputs: Iterable[str | Path], kinds: Sequence[str], spec: dict[str, Any]) -> Data:
    """Read ``…/runs/{run}/{kind}.parquet`` files into a :class:`Data`.

    Raises SharpflowError for a file whose stem is not one of ``kinds`` (a wiring mistake that
    would otherwise show up as a silently empty panel).
    """
    frames: dict[str, list[pd.DataFrame]] = {k: [] for k in kinds}
    for p in map(Path, inputs):
        if p.stem not in frames:
            raise SharpflowError(
                f"{p}: a {p.stem!r} table is not one of the tables read here ({', '.join(kinds)})"
            )
        df = read_parquet(p)
        # The directory names the run; a table's own 'run' column may be missing or stale.
        df = df.assign(run=p.parent.name)
        if "status" not in df:
            df["status"] = "ok"
        df["status"] = df["status"].fillna("ok").astype(str)
        if "diverged" in df:
            flag = df["diverged"].astype("boolean").fillna(False).to_numpy(dtype=bool)
            df.loc[flag, "status"] = "diverged"
        frames[p.stem].append(df)
    tables = {}
    for k, fs in frames.items():
        nonempty = [f for f in fs if len(f)]
        tables[k] = pd.concat(nonempty, ignore_index=True) if nonempty else pd.DataFrame()
    meta: dict[str, dict[str, Any]] = {str(r): dict(m or {}) for r, m in (spec.get("runs") or {}).items()}
    studies = [str(s) for s in spec.get("studies") or []]
    present = sorted({r for df in tables.values() if len(df) for r in df["run"].unique()})

    def order(run: str) -> tuple:
        m = meta.get(run, {})
        study = str(m.get("study") or study_of(run))
        s_idx = studies.index(study) if study in studies else len(studies)
        return (s_idx, study, *(sort_value(m.get(k)) for k in SWEEP_KEYS), run)

    return Data(tables=tables, runs=sorted(present, key=order), meta=meta, studies=studies)


def varying(data: Data, runs: Sequence[str], keys: Sequence[str] = SWEEP_KEYS) -> list[str]:
    """The settings in ``keys`` that take more than one value among ``runs``."""
    out = []
    for k in keys:
        vals = {repr(data.value(r, k)) for r in runs}
        if len(vals) > 1:
            out.append(k)
    return out


def lambda_max_rows(sp: pd.DataFrame) -> pd.DataFrame:
    """One row per checkpoint of a spectrum table, in step order, whose ``eigenvalue`` is λ_max: the
    largest *algebraic* eigenvalue returned. That is rank 1 for ``which: LA``, but with ``which: LM``
    a negative eigenvalue of larger magnitude can come first. Other columns: the rank-1 row's."""
    if len(sp) == 0:
        return sp
    first = sp.sort_values(["step", "rank"], kind="stable").drop_duplicates("step").set_index("step")
    first["eigenvalue"] = sp.groupby("step")["eigenvalue"].max()  # NaN only if every rank is NaN
    return first.reset_index()


#: The sharpness measures read at a run's last checkpoint (claim 13, figure kind ``gap``): key, label.
#: ``pac_bayes`` is Jiang et al.'s flatness measure 1/σ′² (larger is sharper), from the ``pac_bayes_sigma``
#: rows of the sharpness table.
END_MEASURES: tuple[tuple[str, str], ...] = (("lambda_max", "λ_max"), ("worst_case", "worst-case sharpness"),
                                             ("average_case", "average-case sharpness"),
                                             ("pac_bayes", "PAC-Bayes 1/σ′²"))


def end_of_run(data: Data, run: str) -> dict[str, float]:
    """A run's sharpness measures (:data:`END_MEASURES`) and its train − test accuracy gap (``gap``, in
    percentage points) at its last checkpoint, the spectrum's last step (``step``); NaN where missing or
    diverged there."""
    out = dict.fromkeys([key for key, _ in END_MEASURES] + ["gap", "step"], math.nan)
    lam = lambda_max_rows(data.rows("spectrum", run))
    if len(lam) == 0:
        return out
    last = float(lam["step"].max())
    at = lam[lam["step"] == last]
    out["step"] = last
    if "status" in at and str(at["status"].iloc[0]) == "diverged":
        return out
    out["lambda_max"] = float(at["eigenvalue"].iloc[0])
    sh = data.rows("sharpness", run)
    if len(sh):
        sh = sh[(sh["step"] == last) & (sh["status"] != "diverged")]
        for key, measure in (("worst_case", "worst_case"), ("average_case", "average_case"),
                             ("pac_bayes", "pac_bayes_sigma")):
            v = sh.loc[sh["measure"] == measure, "value"]
            if len(v):
                x = float(v.iloc[0])
                out[key] = (1.0 / x**2 if x > 0 else math.nan) if key == "pac_bayes" else x
    met = data.rows("metrics", run)
    if len(met):
        m = met[met["step"] == last]
        acc = [m.loc[m["split"] == split, "accuracy"] for split in ("train", "test")]
        if all(len(a) for a in acc):
            out["gap"] = 100 * (float(acc[0].iloc[0]) - float(acc[1].iloc[0]))
    return out


def steps_per_epoch(df: pd.DataFrame) -> float:
    """Steps per epoch from a table's (step, epoch) pairs (NaN if it cannot be told)."""
    if len(df) == 0 or "epoch" not in df:
        return math.nan
    d = df[(df["epoch"] > 0) & np.isfinite(df["epoch"])]
    if len(d) == 0:
        return math.nan
    return float(np.median(d["step"].to_numpy(float) / d["epoch"].to_numpy(float)))


def last_finite(x: np.ndarray, y: np.ndarray, before: float | None = None) -> tuple[float, float] | None:
    """The last point with finite y (and x ≤ ``before`` if given), or None."""
    ok = np.isfinite(x) & np.isfinite(y)
    if before is not None:
        ok &= x <= before
    if not ok.any():
        return None
    i = np.flatnonzero(ok)[-1]
    return float(x[i]), float(y[i])


def second_half_median(x: np.ndarray, y: np.ndarray) -> float:
    """The median of the finite y at x ≥ max(x)/2: over the second half of training when x is the
    step (NaN if there is none)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) == 0 or not np.isfinite(x).any():
        return math.nan
    sel = (x >= np.nanmax(x) / 2) & np.isfinite(y)
    return float(np.median(y[sel])) if sel.any() else math.nan


def style_list(opts: dict[str, Any], key: str, default: Sequence[Any]) -> list[Any]:
    """A list-valued style option (a scalar is taken as a one-element list)."""
    v = opts.get(key, default)
    if isinstance(v, str | int | float):
        return [v]
    return list(v)


# ------------------------------------------------------------------- runs by their settings
#: the run settings that tell runs apart besides the seed ("study": the one a replicate study repeats).
REPLICATE_KEYS = ("study", "lr", "batch_size", "momentum", "optimizer", "gamma", "k", "subspace", "loss",
                  "warmup_steps", "rho", "adaptive")


def group_by_settings(data: Data, runs: Sequence[str], keys: Sequence[str]) -> list[list[str]]:
    """``runs`` grouped by their values of ``keys`` (the study as :meth:`Data.study` gives it), the groups
    and their runs in order of first appearance."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for r in runs:
        groups.setdefault(tuple(repr(data.study(r) if k == "study" else data.value(r, k)) for k in keys),
                          []).append(r)
    return list(groups.values())


def replicate_groups(data: Data, runs: Sequence[str]) -> list[list[str]]:
    """``runs`` grouped into replicates: runs equal in every setting of :data:`REPLICATE_KEYS`, so that
    they differ at most by the seed."""
    return group_by_settings(data, runs, REPLICATE_KEYS)


# ------------------------------------------------------------------- NSGD vs SGD groups
#: ("nsgd", γ, K), ("sgd", η, None) or ("sam", ρ, η): the runs of a group differ only in seed.
Group = tuple[str, float | None, float | None]


def optimizer_of(data: Data, run: str) -> str:
    """The run's optimizer name, lower case (from the spec; older specs without it: nsgd if it has a γ)."""
    opt = data.value(run, "optimizer")
    if opt is None:
        opt = "nsgd" if data.value(run, "gamma") is not None else "sgd"
    return str(opt).lower()


def adaptive(data: Data, run: str) -> bool:
    """Whether ``run`` uses Adam or AdamW (its stability threshold is not 2/η on H)."""
    return optimizer_of(data, run) in ADAPTIVE_OPTIMIZERS


def group_runs(data: Data, runs: list[str]) -> dict[Group, list[str]]:
    """Runs that differ only in seed share a group: NSGD by (γ, K), SGD by η, SAM by (ρ, η)."""
    groups: dict[Group, list[str]] = {}
    for r in runs:
        if optimizer_of(data, r) == "sam":
            rho, lr = data.value(r, "rho"), data.value(r, "lr")
            key: Group = ("sam", None if rho is None else float(rho), None if lr is None else float(lr))
        elif optimizer_of(data, r) == "nsgd":
            g = data.value(r, "gamma")
            k = data.value(r, "k")
            key = ("nsgd", None if g is None else float(g), None if k is None else float(k))
        else:
            lr = data.value(r, "lr")
            key = ("sgd", None if lr is None else float(lr), None)
        groups.setdefault(key, []).append(r)
    return groups


def group_order(key: Group) -> tuple:
    """NSGD by γ then K ascending, then SGD baselines by η descending, then SAM by ρ then η."""
    kind, a, b = key
    if kind == "nsgd":
        return (0, math.inf if a is None else a, math.inf if b is None else b)
    if kind == "sam":
        return (2, math.inf if a is None else a, math.inf if b is None else -b)
    return (1, math.inf if a is None else -a, 0.0)


def group_label(key: Group, by: list[str]) -> str:
    """A legend or table label of a run group: ``SGD(η=…)``, or the NSGD settings named in ``by``."""
    kind, a, b = key
    if kind == "sgd":
        return f"SGD(η={a:g})" if a is not None else "SGD"
    if kind == "sam":
        return "SAM(" + ", ".join(x for x in (f"ρ={a:g}" if a is not None else "", f"η={b:g}" if b is not None else "")
                                  if x) + ")"
    named = {"gamma": f"γ={a:g}" if a is not None else "γ=–", "k": f"K={b:g}" if b is not None else "K=–"}
    parts = [named[k] for k in by if k in named]
    return ", ".join(parts) if parts else (f"NSGD γ={a:g}" if a is not None else "NSGD")


def label_keys(groups: dict[Group, list[str]], by: str | None) -> list[str]:
    """Which of γ and K name the NSGD lines: the ones that vary (γ when neither does)."""
    nsgd = [g for g in groups if g[0] == "nsgd"]
    gammas, ks = {g[1] for g in nsgd}, {g[2] for g in nsgd}
    keys = [k for k, vals in (("gamma", gammas), ("k", ks)) if len(vals) > 1]
    if by in ("gamma", "k"):  # the requested one first, named even if it does not vary
        keys = [by, *(k for k in keys if k != by)]
    return keys or ["gamma"]


def aggregate(inputs: Sequence[str | Path], out: str | Path) -> pd.DataFrame:
    """Concatenate per-checkpoint tables (same schema) into one, sorted by step, written atomically."""
    frames = [read_parquet(p) for p in inputs]
    if not frames:
        raise SharpflowError(f"{out}: nothing to aggregate")
    cols = list(frames[0].columns)
    for p, f in zip(inputs, frames, strict=True):
        if list(f.columns) != cols:
            raise SharpflowError(f"{p}: columns {list(f.columns)} differ from {inputs[0]}: {cols}")
    df = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else frames[0]
    if "step" in df.columns:
        df = df.sort_values("step", kind="stable").reset_index(drop=True)
    write_parquet(out, df)
    return df
