"""Where a study's time went: a per-rule table built from Snakemake's benchmark files.

Every rule of the workflow has a ``benchmark:`` file under ``results/benchmarks/{stage}/…tsv``
(Snakemake's own measurement of the job: wall seconds ``s``, ``cpu_time``, ``max_rss`` in MB, …)
and the ``sharpflow`` command of the job writes ``…json`` beside it with ``compute_s``, the
seconds it spent on its work after its imports (training steps, spectra and analyses, drawing).
The rest of a job's wall time is start-up: the interpreter, imports (torch alone takes seconds),
loading the data.

Table ``results/tables/cost.{md,csv}``, one row per stage (train, analyse, aggregate, figure,
table, prepare) and a total row: ``jobs``, ``wall_s`` (sum over jobs), ``cpu_s``,
``max_rss_mb`` (largest job), ``share`` (of the total wall, %), ``compute_s`` (sum of the jobs'
own timing, where they report one), ``overhead`` ((wall − compute) / wall, %, over the jobs that
report one). Jobs that ran in an earlier invocation keep their benchmark file, so the table
describes the whole results tree, not only the last ``snakemake`` call.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from .io import atomic_path, write_text

STAGES = ("prepare", "train", "analyse", "aggregate", "figure", "table")


def _jobs(results: Path) -> pd.DataFrame:
    rows = []
    root = results / "benchmarks"
    for tsv in sorted(root.rglob("*.tsv")) if root.exists() else []:
        stage = tsv.relative_to(root).parts[0]
        try:
            bench = pd.read_csv(tsv, sep="\t")
        except (OSError, ValueError, pd.errors.ParserError):
            continue  # a job killed while writing it: no measurement
        if len(bench) == 0:
            continue
        last = bench.iloc[-1]
        timing = tsv.with_suffix(".json")
        compute = math.nan
        if timing.exists():
            try:
                compute = float(json.loads(timing.read_text())["compute_s"])
            except (OSError, ValueError, KeyError, TypeError):
                compute = math.nan
        rows.append({"stage": stage, "job": str(tsv.relative_to(root).with_suffix("")),
                     "wall_s": float(last.get("s", math.nan)), "cpu_s": float(last.get("cpu_time", math.nan)),
                     "max_rss_mb": float(last.get("max_rss", math.nan)), "compute_s": compute})
    return pd.DataFrame(rows, columns=["stage", "job", "wall_s", "cpu_s", "max_rss_mb", "compute_s"])


def _summary(jobs: pd.DataFrame) -> pd.DataFrame:
    total_wall = float(jobs["wall_s"].sum()) if len(jobs) else 0.0
    order = [s for s in STAGES if s in set(jobs["stage"])] + sorted(set(jobs["stage"]) - set(STAGES))
    rows = []
    for name, part in [*((s, jobs[jobs["stage"] == s]) for s in order), ("total", jobs)]:
        timed = part[part["compute_s"].notna()]
        wall_timed = float(timed["wall_s"].sum())
        rows.append({
            "stage": name,
            "jobs": len(part),
            "wall_s": float(part["wall_s"].sum()),
            "cpu_s": float(part["cpu_s"].sum()),
            "max_rss_mb": float(part["max_rss_mb"].max()) if len(part) else math.nan,
            "share": 100 * float(part["wall_s"].sum()) / total_wall if total_wall else math.nan,
            "compute_s": float(timed["compute_s"].sum()) if len(timed) else math.nan,
            "overhead": 100 * (wall_timed - float(timed["compute_s"].sum())) / wall_timed if wall_timed else math.nan,
        })
    return pd.DataFrame(rows)


def _num(v: float, fmt: str, unit: str = "") -> str:
    return "–" if not math.isfinite(v) else f"{v:{fmt}}{unit}"


def _markdown(df: pd.DataFrame) -> str:
    head = ["stage", "jobs", "wall (s)", "CPU (s)", "max RSS (MB)", "share of wall", "compute (s)", "overhead"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in df.itertuples(index=False):
        cells = [f"**{r.stage}**" if r.stage == "total" else r.stage, str(r.jobs), _num(r.wall_s, ".1f"),
                 _num(r.cpu_s, ".1f"), _num(r.max_rss_mb, ".0f"), _num(r.share, ".1f", " %"),
                 _num(r.compute_s, ".1f"), _num(r.overhead, ".1f", " %")]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\ncompute: the seconds the jobs spent on their work after start-up (their own timing); "
            "overhead: (wall − compute) / wall over those jobs.\n")
    return "\n".join(lines) + "\n" + note


def cost_table(results: str | Path, *, out_md: str | Path, out_csv: str | Path) -> pd.DataFrame:
    """Write the per-stage cost table of the results tree (Markdown + CSV, atomically)."""
    df = _summary(_jobs(Path(results)))
    write_text(out_md, _markdown(df))
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False, float_format="%.3f")
    return df


__all__ = ["STAGES", "cost_table"]
