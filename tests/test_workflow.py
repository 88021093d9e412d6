"""End to end through Snakemake on a tiny config: outputs, caching and invalidation, report, resume.

One tiny workflow (two runs of an η "grid", three checkpoints each, every stage, every figure
kind that needs no NSGD) is run once per session; the invalidation tests then dry-run changed
configs against that finished tree and check exactly which jobs Snakemake would rerun.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def tiny_config(results: Path) -> dict:
    return {
        "results": str(results),
        "datasets": {"tiny": {"source": "mnist1d", "mnist1d_samples": 500, "valid_size": 80,
                              "hessian_subset": 64}},
        "defaults": {"dataset": "tiny", "model": {"name": "mlp", "kwargs": {"hidden": [12]}},
                     "optimizer": {"lr": 0.1, "batch_size": 20}, "steps": 32,
                     "checkpoints": {"zoom_every": 0, "every_epochs": 1}, "device": "cpu"},
        "studies": {
            "eta": {"sweep": {"optimizer.lr": [0.05, 0.1]}},
            "other": {"base": {"optimizer": {"lr": 0.2}, "checkpoints": {"zoom_every": 0, "every_epochs": 1,
                                                                          "best": True}},
                      "project": {"enabled": False}},
        },
        "spectrum": {"k": 3, "frobenius_probes": 2},
        "project": {"k": 2, "alignment_batches": 3, "grad_batches": 2, "subset": 64,
                    "cross_directions": [1, 2], "multipliers": [0.5, 1, 2]},
        "escape": {"checkpoints": {"eta-lr0.1": [16]}, "iterations": 20, "eval_every": 10, "subset": 64,
                   "modes": ["none", "remove"]},
        "figures": {"eta_grid": {"kind": "grid", "studies": ["eta"]},
                    "escape": {"kind": "escape", "studies": ["eta"]},
                    "other_grid": {"kind": "grid", "studies": ["other"]},
                    "alignment": {"kind": "alignment", "studies": ["eta"]}},
        "tables": {"peak": {"kind": "peak", "studies": ["eta", "other"]}},
    }


#: A private copy of the workflow and the package (Snakemake imports the package from the
#: Snakefile's directory), used by every Snakemake run here, so a test can edit plotting code
#: without touching the repository.
PKG: dict[str, Path] = {}


def _env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    if "root" in PKG:
        env["PYTHONPATH"] = str(PKG["root"])
    return env


@pytest.fixture(scope="module", autouse=True)
def package_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    for name in ("sharpflow", "workflow", "config"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "Snakefile", root / "Snakefile")
    (root / "profiles").symlink_to("workflow/profiles")
    PKG["root"] = root
    yield root
    PKG.clear()


def snakemake(workdir: Path, config: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cfg = workdir / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = _env()
    cmd = [str(BIN / "snakemake"), "-s", str(PKG["root"] / "Snakefile"), "-d", str(workdir), "--configfile", str(cfg),
           "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=workdir)


def analyse_jobs(jobs: dict[str, int]) -> dict[str, int]:
    return {rule: n for rule, n in jobs.items() if rule.startswith("analyse_")}


def planned(workdir: Path, config: dict) -> dict[str, int]:
    """Rule -> number of jobs a dry run would execute."""
    proc = snakemake(workdir, config, "-n", "--quiet", "rules")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    counts: dict[str, int] = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.fullmatch(r"(\w+)\s+(\d+)", line.strip())
        if m and m.group(1) not in ("total", "job", "count"):
            counts[m.group(1)] = int(m.group(2))
    return counts


def planned_items(workdir: Path, config: dict) -> set[str]:
    """The figures and tables a dry run would make, as "figure eta_grid" or "table peak" (one rule
    draws every figure and one writes every table: the item is the job's ``name`` wildcard)."""
    proc = snakemake(workdir, config, "-n")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    jobs = re.findall(r"^(?:local)?rule (figure|table):\n(?:[ \t]+.*\n)*?[ \t]+wildcards: name=(\S+)",
                      proc.stdout + proc.stderr, re.M)
    return {f"{rule} {name}" for rule, name in jobs}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    work = tmp_path_factory.mktemp("wf")
    cfg = tiny_config(work / "results")
    t0 = time.perf_counter()
    proc = snakemake(work, cfg)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"tiny workflow: {time.perf_counter() - t0:.1f} s")
    return work, cfg


def test_every_output_exists_and_is_consistent(finished):
    work, cfg = finished
    res = Path(cfg["results"])
    for run in ("eta-lr0.05", "eta-lr0.1"):
        spec = pd.read_parquet(res / "runs" / run / "spectrum.parquet")
        assert sorted(spec.step.unique()) == [0, 16, 32]
        assert set(spec["rank"]) == {1, 2, 3}
        assert spec.converged.all()
        assert (spec.rel_residual <= 1e-3).all()
        for kind in ("alignment", "cross_sections", "widths", "decomposed"):
            assert len(pd.read_parquet(res / "runs" / run / f"{kind}.parquet"))
    assert not (res / "runs" / "other" / "alignment.parquet").exists()  # project disabled there
    # the run that keeps its best-validation checkpoint: its spectrum, at the best epoch end
    met = pd.read_parquet(res / "runs" / "other" / "metrics.parquet")
    valid = met[met.split == "valid"].sort_values("step")
    best = pd.read_parquet(res / "runs" / "other" / "spectrum_best.parquet")
    assert best.step.unique().tolist() == [int(valid.step.iloc[int(valid.accuracy.to_numpy().argmax())])]
    assert best.converged.all() and len(best) == 3
    assert not (res / "runs" / "eta-lr0.1" / "spectrum_best.parquet").exists()
    esc = pd.read_parquet(res / "runs" / "eta-lr0.1" / "escape.parquet")
    assert set(esc["mode"]) == {"none", "remove"} and esc.lambda_max.notna().all()
    for name in ("eta_grid", "other_grid", "alignment", "escape"):
        png = res / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (res / "figures" / f"{name}.pdf").stat().st_size > 1000
    assert "lr0.05" in (res / "tables" / "peak.md").read_text() or "0.05" in (res / "tables" / "peak.md").read_text()
    # nothing left to do, and no stray temporary files
    assert planned(work, cfg) == {}
    assert not [p for p in res.rglob("*.tmp")]


def test_figure_style_change_reruns_that_figure_alone(finished):
    work, cfg = finished
    cfg = copy.deepcopy(cfg)
    cfg["figures"]["eta_grid"]["style"] = {"dpi": 90}
    assert planned(work, cfg) == {"figure": 1, "cost": 1, "all": 1}  # cost: the new benchmark
    assert planned_items(work, cfg) == {"figure eta_grid"}


def test_editing_a_plotting_module_reruns_the_figures_it_draws(finished):
    work, cfg = finished
    module = PKG["root"] / "sharpflow" / "figures" / "alignment.py"
    original = module.read_text()
    try:
        module.write_text(original + "\n# an edit to the plotting code\n")
        assert planned(work, cfg) == {"figure": 1, "cost": 1, "all": 1}
        assert planned_items(work, cfg) == {"figure alignment"}
    finally:
        module.write_text(original)


def test_changing_lanczos_k_reruns_analysis_not_training(finished):
    work, cfg = finished
    cfg = copy.deepcopy(cfg)
    cfg["spectrum"]["k"] = 4
    jobs = planned(work, cfg)
    assert not any(rule.startswith("train_") or rule == "prepare" for rule in jobs)
    # one analysis job per run: its 3 checkpoints (spectra, then project/escape) and its aggregated tables
    assert analyse_jobs(jobs) == {"analyse_eta__lr0p05": 1, "analyse_eta__lr0p1": 1, "analyse_other": 1}
    assert planned_items(work, cfg) == {"figure eta_grid", "figure other_grid", "figure alignment",
                                        "figure escape", "table peak"}


def test_changing_project_reruns_its_chains_and_reuses_their_spectra(finished, tmp_path):
    """A project change reruns the analysis jobs of the runs it concerns (and the light jobs after
    them); those jobs take the spectra and the escape ablation from the run's analysis stash (same
    bytes) and recompute only the project tables."""
    work, cfg = finished
    cfg = copy.deepcopy(cfg)
    cfg["project"]["grad_batches"] = 3
    jobs = planned(work, cfg)
    assert analyse_jobs(jobs) == {"analyse_eta__lr0p05": 1, "analyse_eta__lr0p1": 1}
    assert not any(rule.startswith("train_") for rule in jobs)
    assert "figure other_grid" not in planned_items(work, cfg)
    # Run it on the finished tree, then restore that tree's config for the tests after this one.
    res = Path(cfg["results"])
    spectra = sorted((res / "runs" / "eta-lr0.1" / "spectrum").glob("*.parquet"))
    before = {p.name: p.read_bytes() for p in spectra}
    old_sections = pd.read_parquet(res / "runs" / "eta-lr0.1" / "cross_sections.parquet")
    try:
        proc = snakemake(work, cfg)
        assert proc.returncode == 0, proc.stderr[-3000:]
        log = (res / "logs" / "analyse" / "eta-lr0.1" / "job000.log").read_text()
        assert log.count("spectrum reused from the stash") == 3 and "escape reused from the stash" in log
        assert "project reused" not in log
        assert {p.name: p.read_bytes() for p in spectra} == before
        new_sections = pd.read_parquet(res / "runs" / "eta-lr0.1" / "cross_sections.parquet")
        assert len(new_sections) == len(old_sections) and not new_sections.equals(old_sections)
    finally:
        assert snakemake(work, finished[1]).returncode == 0


def test_adding_an_eta_reruns_only_that_run_and_the_eta_figures(finished):
    work, cfg = finished
    cfg = copy.deepcopy(cfg)
    cfg["studies"]["eta"]["sweep"]["optimizer.lr"].append(0.02)
    jobs = planned(work, cfg)
    assert [r for r in jobs if r.startswith("train_")] == ["train_eta__lr0p02"]
    assert analyse_jobs(jobs) == {"analyse_eta__lr0p02": 1}
    items = planned_items(work, cfg)
    assert "figure other_grid" not in items
    assert {"figure eta_grid", "figure alignment", "table peak"} <= items


def test_splitting_a_run_over_analysis_jobs_changes_no_number(tmp_path):
    """resources.chains_per_job is scheduling only: a run analysed by several jobs (one per warm-start
    chain, then an aggregate job) gives the same tables and eigenvectors as one job for the run."""
    from sharpflow.analyses.stage import spectrum_paths

    def config(results: Path, per_job: int) -> dict:
        cfg = tiny_config(results)
        cfg["studies"] = {"eta": {"sweep": {"optimizer.lr": [0.1]}}}
        cfg["spectrum"]["warm_chain"] = 2  # checkpoints 0, 16, 32: chains [0, 16] and [32]
        cfg["resources"] = {"chains_per_job": per_job}
        cfg["figures"], cfg["tables"] = {}, {}
        return cfg

    trees = {}
    for per_job in (0, 1):
        work = tmp_path / f"per_job{per_job}"
        work.mkdir()
        cfg = config(work / "results", per_job)
        jobs = planned(work, cfg)
        if per_job:
            assert analyse_jobs(jobs) == {"analyse_eta__lr0p1_j0": 1, "analyse_eta__lr0p1_j1": 1}
            assert jobs["aggregate_eta__lr0p1"] == 1
        else:
            assert analyse_jobs(jobs) == {"analyse_eta__lr0p1": 1} and not any(r.startswith("aggregate") for r in jobs)
        proc = snakemake(work, cfg)
        assert proc.returncode == 0, proc.stderr[-3000:]
        trees[per_job] = Path(cfg["results"]) / "runs" / "eta-lr0.1"
    for kind in ("spectrum", "alignment", "cross_sections", "widths", "decomposed", "escape"):
        a, b = (pd.read_parquet(trees[j] / f"{kind}.parquet") for j in (0, 1))
        pd.testing.assert_frame_equal(a.drop(columns=["seconds"], errors="ignore"),
                                      b.drop(columns=["seconds"], errors="ignore"), check_exact=True, obj=kind)
    assert pd.read_parquet(trees[1] / "spectrum.parquet").groupby("step").warm.first().tolist() == [False, True, False]
    for step in (0, 16, 32):
        rel = spectrum_paths("", "eta-lr0.1", step)[1].relative_to("runs/eta-lr0.1")
        assert (trees[0] / rel).read_bytes() == (trees[1] / rel).read_bytes()


def test_grouping_runs_into_one_job_changes_no_number_and_recomputes_nothing(finished):
    """resources.runs_per_job is scheduling only: the eta runs analysed in one process give the same
    tables as one job per run; switching reruns the grouped job, which takes every checkpoint from the
    runs' stashes; a change to one run's analysis then recomputes that run's analysis alone. The
    finished tree is restored to the original config at the end."""
    work, cfg0 = finished
    res = Path(cfg0["results"])
    kinds = ("spectrum", "alignment", "cross_sections", "widths", "decomposed")
    before = {(run, k): pd.read_parquet(res / "runs" / run / f"{k}.parquet")
              for run in ("eta-lr0.05", "eta-lr0.1") for k in kinds}
    cfg = copy.deepcopy(cfg0)
    cfg["resources"] = {"runs_per_job": 2}
    log_path = res / "logs" / "analyse" / "eta__group0" / "job000.log"
    try:
        jobs = planned(work, cfg)
        assert analyse_jobs(jobs) == {"analyse_eta__group0": 1}  # both eta runs; "other" (one run) untouched
        assert not [r for r in jobs if r.startswith("train_")]
        proc = snakemake(work, cfg)
        assert proc.returncode == 0, proc.stderr[-3000:]
        log = log_path.read_text()
        assert "HVPs" not in log and log.count("spectrum reused from the stash") == 6, log
        assert log.count("project reused from the stash") == 6 and log.count("escape reused from the stash") == 1
        for (run, kind), a in before.items():
            b = pd.read_parquet(res / "runs" / run / f"{kind}.parquet")
            pd.testing.assert_frame_equal(a, b, check_exact=True, obj=f"{run} {kind}")
        # escape runs on eta-lr0.1 only: changing it recomputes that run's escape, nothing else
        cfg["escape"] = {**cfg["escape"], "iterations": 10}
        assert analyse_jobs(planned(work, cfg)) == {"analyse_eta__group0": 1}
        proc = snakemake(work, cfg)
        assert proc.returncode == 0, proc.stderr[-3000:]
        log = log_path.read_text()
        assert log.count("spectrum reused from the stash") == 6 and log.count("project reused from the stash") == 6
        assert "escape reused" not in log and "HVPs" not in log
    finally:
        proc = snakemake(work, cfg0)  # back to one job per run (from the stashes), as the other tests expect
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert planned(work, cfg0) == {}


def test_no_change_rerun_is_fast(finished):
    work, cfg = finished
    t0 = time.perf_counter()
    proc = snakemake(work, cfg)
    took = time.perf_counter() - t0
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr
    assert took < 15


def test_bad_config_fails_before_any_job_naming_the_field(tmp_path):
    cfg = tiny_config(tmp_path / "results")
    cfg["studies"]["eta"]["sweep"]["optimizer.lr"] = [-0.1]
    proc = snakemake(tmp_path, cfg, "-n")
    assert proc.returncode != 0
    assert "optimizer.lr" in proc.stdout + proc.stderr
    assert "Input should be greater than 0" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_snakemake_resumes_a_killed_training_bitwise(tmp_path):
    """SIGKILL the whole Snakemake process group mid-training, several times; then finish."""
    cfg = tiny_config(tmp_path / "results")
    cfg["studies"] = {"long": {"base": {"steps": 400, "checkpoints": {"every_epochs": 2}}, "analyse": False}}
    cfg["figures"], cfg["tables"], cfg["escape"] = {}, {}, {}
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref_cfg = copy.deepcopy(cfg)
    ref_cfg["results"] = str(ref_dir / "results")
    assert snakemake(ref_dir, ref_cfg).returncode == 0

    work = tmp_path / "work"
    work.mkdir()
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = _env()
    cmd = [str(BIN / "snakemake"), "-s", str(PKG["root"] / "Snakefile"), "-d", str(work), "--configfile",
           str(work / "config.yaml"), "--cores", "1"]
    metrics = Path(cfg["results"]) / "runs" / "long" / "metrics.parquet"
    stash = metrics.parent / ".resume" / "checkpoints"

    def stashed() -> int:
        return len(list(stash.glob("*.pt"))) if stash.exists() else 0

    kills = 0
    for _ in range(3):
        # Kill once training has stashed two more checkpoints than before: mid-run on any machine
        # (a fixed sleep let a fast CI machine finish before the first kill).
        target = stashed() + 2
        proc = subprocess.Popen(cmd, cwd=work, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while proc.poll() is None and stashed() < target and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        # a killed Snakemake leaves its lock behind: what a user does next
        subprocess.run([*cmd, "--unlock"], cwd=work, env=env, capture_output=True, check=True)
        if metrics.exists():
            break
    final = subprocess.run([*cmd, "--rerun-incomplete"], cwd=work, env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-3000:]
    assert kills >= 1
    a = pd.read_parquet(metrics).drop(columns=["wall_s", "refresh_s"])
    b = pd.read_parquet(ref_dir / "results" / "runs" / "long" / "metrics.parquet").drop(columns=["wall_s", "refresh_s"])
    pd.testing.assert_frame_equal(a, b)
    import torch

    for ck in sorted((ref_dir / "results" / "runs" / "long" / "checkpoints").glob("*.pt")):
        other = Path(cfg["results"]) / "runs" / "long" / "checkpoints" / ck.name
        sa = torch.load(ck, weights_only=True)["model"]
        sb = torch.load(other, weights_only=True)["model"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_dry_run_of_a_3000_job_sweep_is_fast(tmp_path):
    cfg = tiny_config(tmp_path / "results")
    # 10 x 10 x 2 = 200 runs x 13 checkpoints, each checkpoint its own analysis job (the finest
    # split: warm_chain 1, chains_per_job 1): 2,600 analysis, 200 train and 200 aggregate jobs
    cfg["studies"] = {"big": {"base": {"steps": 192, "checkpoints": {"every_epochs": 1}},
                              "sweep": {"optimizer.lr": [round(0.01 * i, 2) for i in range(1, 11)],
                                        "optimizer.momentum": [round(0.05 * i, 2) for i in range(10)],
                                        "seed": [0, 1]}}}
    cfg["spectrum"]["warm_chain"] = 1
    cfg["resources"] = {"chains_per_job": 1}
    cfg["figures"] = {"grid": {"kind": "grid", "studies": ["big"]}}
    cfg["tables"], cfg["escape"] = {}, {}
    t0 = time.perf_counter()
    jobs = planned(tmp_path, cfg)
    took = time.perf_counter() - t0
    total = sum(jobs.values())
    print(f"dry run: {total} jobs in {took:.1f} s")
    assert sum(n for rule, n in jobs.items() if rule.startswith("analyse_")) == 2600
    assert total >= 3000
    assert took < 60


def test_report_renders_in_headless_chromium(finished, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (.ci/run installs Debian's chromium)")
    work, cfg = finished
    report = tmp_path / "report.html"
    proc = snakemake(work, cfg, "--report", str(report))
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = report.read_text()
    # Every figure and table is embedded with its caption, and every embedded PNG decodes.
    results = json.loads(re.search(r"var results = (\{.*?\});\n", html, re.S).group(1))
    names = {v["filename"] for v in results.values()}
    assert names == {f"{f}.png" for f in cfg["figures"]} | {f"{t}.csv" for t in cfg["tables"]} | {"cost.csv",
                                                                                                  "claims.csv"}
    # the claims lead the report: their category comes first
    categories = json.loads(re.search(r"var categories = (\{.*?\});\n", html, re.S).group(1))
    assert next(iter(categories)) == "1. Claims"
    import matplotlib.image as mpimg

    for entry in results.values():
        assert entry["caption"].strip() and "problematic" not in entry["caption"], entry["filename"]
        if entry["filename"] != "cost.csv":  # the cost table is made from the benchmarks, not a spec
            assert "spec=" in entry["job_properties"]["params"]  # the config the item came from
        if entry["filename"].endswith(".png"):
            raw = base64.b64decode(entry["data_uri"].split("base64,", 1)[1])
            image = mpimg.imread(io.BytesIO(raw), format="png")
            assert image.shape[0] > 100 and image.shape[1] > 100
    shot = tmp_path / "shot.png"
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chrome'}", "--virtual-time-budget=8000", "--dump-dom", report.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<body" in dom.stdout and "Figures" in dom.stdout and "Tables" in dom.stdout
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         f"--user-data-dir={tmp_path / 'chrome2'}", "--window-size=1200,900", f"--screenshot={shot}",
         "--virtual-time-budget=8000", report.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.exists() and shot.stat().st_size > 10_000
