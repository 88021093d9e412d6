"""The paper's study end to end at smoke scale: ``config/paper.yaml`` + ``config/smoke.yaml``.

Every rule and every model of the paper's config runs on the offline stand-in data: prepare,
train (SimpleCNN, SimpleCNN-medium, ResNet-32, VGG-11 with BatchNorm, the LSTM with gradient
clipping; constant, plateau and step schedules, early stopping), the spectrum and the analyses,
every figure and table, the cost table and the HTML report. The test checks that every output the
DAG promises exists and is well-formed, and that no job warned, fell back or failed to converge.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the whole study: ~9 min here

#: Log lines that are information, not trouble (each job's log is read whole).
BENIGN = re.compile(r"no CUDA device available: running on the CPU")
#: What a job must never print: Python warnings, fallbacks, errors, non-convergence.
TROUBLE = re.compile(r"warn|fall(ing|s)? ?back|traceback|error|not converge|diverged|\bnan\b|\binf\b", re.IGNORECASE)


def _snakemake(work: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d", str(work), "--cores", "2",
           "--configfile", str(ROOT / "config" / "paper.yaml"), str(ROOT / "config" / "smoke.yaml"),
           "--config", f"results={work / 'results_smoke'}", *args]
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(work)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=work)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("smoke")
    t0 = time.perf_counter()
    proc = _snakemake(work, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-6000:]
    print(f"paper smoke run: {time.perf_counter() - t0:.0f} s")
    return work, work / "results_smoke"


def test_every_promised_output_exists_and_nothing_is_left_to_do(smoke):
    work, res = smoke
    proc = _snakemake(work, "-n", "--quiet", "rules", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert not list(res.rglob("*.tmp"))


def test_every_model_and_schedule_trained(smoke):
    _, res = smoke
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    runs = sorted(p.name for p in (res / "runs").iterdir() if p.is_dir())
    assert {r.split("-", 1)[0] for r in runs} == set(paper["studies"])
    statuses = set()
    for run in runs:
        m = pd.read_parquet(res / "runs" / run / "metrics.parquet")
        assert len(m) and m.step.is_monotonic_increasing
        assert set(m.status) <= {"ok", "stopped"}, (run, set(m.status))  # nothing diverged
        assert m.loss.notna().all() and {"batch", "train", "valid", "test"} <= set(m.split), run
        statuses |= set(m.status)
    # the plateau/step schedules changed the learning rate somewhere, and early stopping fired
    wd = pd.read_parquet(res / "runs" / "evolution_resnet_wd" / "metrics.parquet")
    assert wd.lr.nunique() > 1 or "stopped" in set(wd.status)
    assert "stopped" in statuses
    meta = json.loads((res / "data" / "cifar10" / "meta.json").read_text())
    assert meta["source"] == "synthetic_images" and meta["provenance"]["stand_in_for"] == "cifar"


def test_every_spectrum_is_certified_and_every_table_filled(smoke):
    _, res = smoke
    for run_dir in sorted((res / "runs").iterdir()):
        spec = pd.read_parquet(run_dir / "spectrum.parquet")
        assert spec.converged.all(), run_dir.name
        assert spec.eigenvalue.notna().all() and (spec.rel_residual <= spec.tol).all()
        for name in ("alignment", "cross_sections", "widths", "decomposed"):
            path = run_dir / f"{name}.parquet"
            if path.exists():
                assert len(pd.read_parquet(path)), path
    # the eta/bs/evolution studies ran the project analyses; the NSGD/PTB ones did not (as configured)
    assert (res / "runs" / "eta-simplecnn-lr0.1" / "alignment.parquet").exists()
    assert not (res / "runs" / "ptb_eta-lr1" / "alignment.parquet").exists()


def test_every_figure_table_and_the_report(smoke):
    work, res = smoke
    smoke_cfg = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    for name in smoke_cfg["figures"]:
        png = res / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert (res / "figures" / f"{name}.pdf").read_bytes()[:5] == b"%PDF-", name
    for name in smoke_cfg["tables"]:
        rows = [line for line in (res / "tables" / f"{name}.md").read_text().splitlines() if line.startswith("|")]
        assert len(rows) >= 3 and not re.search(r"\bnan\b", " ".join(rows[2:]), re.IGNORECASE), name
        assert len(pd.read_csv(res / "tables" / f"{name}.csv")), name
    cost = pd.read_csv(res / "tables" / "cost.csv")
    assert {"prepare", "train", "analyse", "figure", "table"} <= set(cost.stage)
    report = work / "report.zip"
    proc = _snakemake(work, "--report", str(report), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with zipfile.ZipFile(report) as z:
        names = z.namelist()
    for name in smoke_cfg["figures"]:
        assert any(n.endswith(f"{name}.png") for n in names), name


def test_no_job_warned_or_fell_back(smoke):
    _, res = smoke
    logs = sorted((res / "logs").rglob("*.log"))
    assert len(logs) > 50
    trouble = []
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if TROUBLE.search(line) and not BENIGN.search(line):
                trouble.append(f"{log.relative_to(res)}: {line}")
    assert not trouble, "\n".join(trouble[:40])


def test_smoke_results_stay_apart_from_the_real_study(smoke):
    """The overlay writes to its own results root, so stand-in numbers never mix with real ones."""
    overlay = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    assert overlay["results"] != paper["results"]
    assert shutil.which("snakemake", path=str(BIN))
