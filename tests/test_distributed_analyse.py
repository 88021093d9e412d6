"""``sharpflow analyse`` over several processes: the spectrum of a warm-start chain, each rank on its shard.

A tiny MLP is trained for 10 steps (checkpoints at 0, 5 and 10: one warm-start chain). ``sharpflow analyse``
runs it once as one process and once under ``torchrun`` as 2 gloo ranks (``--world-size 2``); the
spectrum tables (top-3 eigenvalues, converged flags, Frobenius norm and trace estimates) must agree to 1e-5
relative, and the 2-rank job must leave exactly the files of the one-process job (rank 1 writes nothing).
A rerun of the 2-rank job reuses rank 0's stash (rank 0 decides and sends its eigenvectors). Then the
one-line refusals (another analysis over several processes, a wrong number of processes) and the
commands the workflow gives an analysis job of several processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from sharpflow import cli
from sharpflow.config import DatasetConfig, SpectrumConfig
from sharpflow.train import train

from .conftest import TINY_DATASET, tiny_run, tiny_workflow_config

ROOT = Path(__file__).resolve().parents[1]
SHARPFLOW = str(Path(sys.executable).parent / "sharpflow")
SPECTRUM = SpectrumConfig(k=3, tol=1e-4, frobenius_probes=4, trace_probes=4)
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
               "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_LAUNCH_NODE_IPADDR")


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> tuple[Path, list[Path]]:
    """A run of 10 steps with weight decay (added once, after the all-reduce): checkpoints at 0, 5, 10."""
    out = tmp_path_factory.mktemp("run") / "r"
    train(tiny_run(steps=10, optimizer__weight_decay=1e-3), DatasetConfig.model_validate(TINY_DATASET),
          run_name="r", data_dir=tiny_data, out_dir=out, progress=False, log=lambda *_: None)
    checkpoints = sorted((out / "checkpoints").glob("step*.pt"))
    assert [p.name for p in checkpoints] == [f"step{s:08d}.pt" for s in (0, 5, 10)]
    return tiny_data, checkpoints


def _args(data: Path, checkpoints: list[Path], results: Path, analyses: dict | None = None) -> list[str]:
    return ["analyse", "--no-progress", "--threads", "2", "--device", "cpu",
            "--spectrum", json.dumps(SPECTRUM.model_dump(mode="json")),
            "--analyses", json.dumps(analyses or {}),
            "--run", json.dumps(tiny_run(steps=10, optimizer__weight_decay=1e-3).model_dump(mode="json")),
            "--run-name", "r", "--data", str(data), "--results", str(results), "--aggregate",
            "--timing", str(results / "timing.json"), *map(str, checkpoints)]


#: ``sharpflow`` with its file writers spied on: each rank lists the files it wrote in {SPY_DIR}/rank{RANK}.json.
SPY = """
import json, os, sys
import sharpflow.analyses.stage as stage, sharpflow.io as io
from sharpflow import cli
calls = []
def spy(mod, name):
    real = getattr(mod, name)
    def wrapped(*args, **kwargs):
        calls.append([name, str(args[1] if name in ("publish", "concat") else args[0])])
        return real(*args, **kwargs)
    setattr(mod, name, wrapped)
for name in ("save_torch", "write_parquet", "write_text", "publish", "concat"):
    spy(stage, name)
spy(io, "write_text")  # the timing file
code = cli.main(sys.argv[1:])
with open(os.path.join(os.environ["SPY_DIR"], "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump(calls, f)
sys.exit(code)
"""


def _torchrun(args: list[str], nproc: int = 2, spy: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node 2 --no-python -- sharpflow ...`` (``spy``: a directory, the
    same command with the file writers spied on)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    start = ["--no-python", "--", SHARPFLOW]
    if spy is not None:
        spy.mkdir()
        (spy / "sharpflow_spied.py").write_text(SPY)
        env["SPY_DIR"], start = str(spy), ["--", str(spy / "sharpflow_spied.py")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *start,
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


def _files(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_two_ranks_give_the_one_process_spectrum_written_once(trained, tmp_path, clean_env, capsys):
    data, checkpoints = trained
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(_args(data, checkpoints, one)) == 0
    capsys.readouterr()

    spy = tmp_path / "spy"
    proc = _torchrun(["analyse", "--world-size", "2", *_args(data, checkpoints, two)[1:]], spy=spy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((spy / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank1 == [], rank1  # rank 1 computed, and wrote nothing
    wrote = {Path(p).relative_to(two).as_posix() for _, p in rank0}
    assert {"timing.json", "runs/r/spectrum.parquet", "runs/r/eigvecs/step00000010.pt"} <= wrote
    a = pd.read_parquet(one / "runs" / "r" / "spectrum.parquet")
    b = pd.read_parquet(two / "runs" / "r" / "spectrum.parquet")
    assert len(a) == len(b) == 9 and list(a.columns) == list(b.columns)
    assert a["converged"].all() and list(a["converged"]) == list(b["converged"])
    assert list(a["warm"]) == list(b["warm"]) == [False] * 3 + [True] * 6  # the chain's warm starts, on both ranks
    for col in ("eigenvalue", "loss", "grad_norm", "frobenius", "trace"):
        rel = ((a[col] - b[col]).abs() / a[col].abs()).max()
        assert rel <= 1e-5, (col, rel, a[col].tolist(), b[col].tolist())
    for step in (0, 5, 10):
        ea = torch.load(one / "runs" / "r" / "eigvecs" / f"step{step:08d}.pt")
        eb = torch.load(two / "runs" / "r" / "eigvecs" / f"step{step:08d}.pt")
        assert torch.allclose(ea["eigenvalues"], eb["eigenvalues"], rtol=1e-5, atol=0)
        cos = (ea["eigenvectors"] * eb["eigenvectors"]).sum(1).abs()
        assert bool((cos > 0.999).all()), cos
    # rank 0's files are the one process's (no copies, no temporary or partial files)
    assert _files(two).keys() == _files(one).keys()
    assert json.loads((two / "timing.json").read_text())["compute_s"] > 0
    done = [line for line in proc.stderr.splitlines() if "[r] checkpoint " in line and " done" in line]
    assert len(done) == 3, proc.stderr[-3000:]  # rank 0 logs; rank 1 is silent
    assert sum(", 2 ranks" in line for line in proc.stderr.splitlines()) == 3  # each solve was sharded

    # a rerun: rank 0 finds every spectrum in the stash and sends its eigenvectors (the warm starts) to rank 1
    before = {p: (two / p).read_bytes() for p in _files(two) if p.endswith((".parquet", ".pt"))}
    proc = _torchrun(["analyse", "--world-size", "2", *_args(data, checkpoints, two)[1:]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum("spectrum reused from the stash" in line for line in proc.stderr.splitlines()) == 3
    assert {p: (two / p).read_bytes() for p in before} == before


def test_density_ggn_and_batch_sharpness_over_two_ranks_match_one_process(trained, tmp_path, clean_env, capsys):
    """The analyses marked distributed: the SLQ density (same probes on every rank, each product summed over
    the shards), the Gauss-Newton analysis (G and H − G) and batch sharpness (the batches shared out and
    gathered) of a 2-rank job agree with one process's; rank 1 writes nothing; a rerun reuses rank 0's
    stash for all three."""
    data, checkpoints = trained
    analyses = {"density": {"config": {"enabled": True, "probes": 3, "steps": 12}, "steps": [5, 10]},
                "ggn": {"config": {"enabled": True, "k": 3, "tol": 1e-4}, "steps": [10]},
                "batch_sharpness": {"config": {"enabled": True, "batches": 5}, "steps": [0, 10]}}
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(_args(data, checkpoints, one, analyses)) == 0
    capsys.readouterr()
    spy = tmp_path / "spy"
    proc = _torchrun(["analyse", "--world-size", "2", *_args(data, checkpoints, two, analyses)[1:]], spy=spy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((spy / "rank1.json").read_text()) == []  # rank 1 computed, and wrote nothing
    assert _files(two).keys() == _files(one).keys()
    da, db = (pd.read_parquet(root / "runs" / "r" / "density.parquet") for root in (one, two))
    assert len(da) == len(db) == 2 * 3 * 12 and list(da["step"]) == list(db["step"])
    for col in ("node", "weight"):
        assert (da[col] - db[col]).abs().max() <= 1e-5 * da["node"].abs().max(), col
    ga, gb = (pd.read_parquet(root / "runs" / "r" / "ggn.parquet") for root in (one, two))
    assert list(ga["matrix"]) == list(gb["matrix"]) == ["ggn"] * 3 + ["residual"] * 3
    assert ga["converged"].all() and list(ga["converged"]) == list(gb["converged"])
    rel = ((ga["eigenvalue"] - gb["eigenvalue"]).abs() / ga["eigenvalue"].abs()).max()
    assert rel <= 1e-5, (ga["eigenvalue"].tolist(), gb["eigenvalue"].tolist())
    assert abs(float(ga["overlap"].iloc[0]) - float(gb["overlap"].iloc[0])) <= 1e-5
    ba, bb = (pd.read_parquet(root / "runs" / "r" / "batch_sharpness.parquet") for root in (one, two))
    assert list(ba["batches"]) == list(bb["batches"]) == [5, 5]  # 3 batches on rank 0, 2 on rank 1, all gathered
    for col in ("batch_sharpness", "batch_sharpness_se", "batch_sharpness_median"):
        assert ((ba[col] - bb[col]).abs() <= 1e-6 * ba[col].abs()).all(), (col, ba[col].tolist(), bb[col].tolist())

    before = {p: (two / p).read_bytes() for p in _files(two) if p.endswith(".parquet")}
    proc = _torchrun(["analyse", "--world-size", "2", *_args(data, checkpoints, two, analyses)[1:]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert sum("density reused from the stash" in x for x in lines) == 2
    assert sum("ggn reused from the stash" in x for x in lines) == 1
    assert sum("batch_sharpness reused from the stash" in x for x in lines) == 2
    assert {p: (two / p).read_bytes() for p in before} == before


def test_split_and_gather_work_without_a_process_group():
    """One process: every item is its own, and gathering gives its results back in order."""
    from sharpflow.hessian import gather_work, split_work

    assert list(split_work(5)) == [0, 1, 2, 3, 4]
    assert gather_work(["a", "b"], 2) == ["a", "b"]


def test_another_analysis_over_several_processes_fails_in_one_line(trained, tmp_path, clean_env, capsys):
    data, checkpoints = trained
    project = {"project": {"config": {"enabled": True}, "steps": [5]}}
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")  # as torchrun starts rank 0 of 2: refused before joining anything
    assert cli.main(["analyse", "--world-size", "2", *_args(data, checkpoints, tmp_path / "res", project)[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("sharpflow analyse: error: analysis 'project' does not run over several processes yet: run it "
                   "with resources.spectrum.world_size 1 (this job has 2; only the spectrum, density, ggn and "
                   "batch_sharpness run over several)")
    assert not (tmp_path / "res").exists()


def test_a_wrong_number_of_processes_fails_in_one_line(trained, tmp_path, clean_env, capsys):
    data, checkpoints = trained
    assert cli.main(["analyse", "--world-size", "2", *_args(data, checkpoints, tmp_path / "res")[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("sharpflow analyse: error: --world-size 2 (resources.spectrum.world_size) but started as 1 "
                   "process: start it with `torchrun --standalone --nproc-per-node 2 --no-python -- sharpflow "
                   "analyse ...` or `srun --ntasks=2 sharpflow analyse ...`")
    assert not (tmp_path / "res").exists()


def _dry_run(tmp_path: Path, resources: dict, project: bool = False) -> subprocess.CompletedProcess[str]:
    cfg = tiny_workflow_config(tmp_path / "results", studies={"one": {}}, project={"enabled": project},
                               resources=resources)
    (tmp_path / "config.yaml").write_text(json.dumps(cfg))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    return subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d",
                           str(tmp_path), "--configfile", str(tmp_path / "config.yaml"), "--cores", "8", "-n", "-p"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


def _analyse_job(text: str) -> tuple[dict[str, str], str]:
    block = text.split("rule analyse_")[1].splitlines()
    resources = next(x for x in block if x.strip().startswith("resources:")).split(":", 1)[1]
    pairs = dict(p.strip().split("=", 1) for p in resources.split(", "))
    keep = ("gpu", "mem_mb", "mpi", "tasks", "cpus_per_task", "tasks_per_gpu")
    shell = next(x for x in block if x.startswith("Shell command: ")).removeprefix("Shell command: ")
    return {k: v for k, v in pairs.items() if k in keep}, shell


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_workflow_starts_an_analysis_job_of_several_processes(tmp_path, launcher):
    base = {"spectrum": {"threads": 2, "gpu": 1, "mem_mb": 1000, "launcher": launcher}}
    one = _dry_run(tmp_path, base)
    assert one.returncode == 0, one.stderr[-3000:]
    res, shell = _analyse_job(one.stdout + one.stderr)
    assert shell.startswith("sharpflow analyse --no-progress --threads 2 --spectrum ") and res == {"gpu": "1",
                                                                                                   "mem_mb": "1000"}
    two = _dry_run(tmp_path, {"spectrum": {**base["spectrum"], "world_size": 2}})
    assert two.returncode == 0, two.stderr[-3000:]
    res, shell = _analyse_job(two.stdout + two.stderr)
    prefix = {"torchrun": "torchrun --standalone --nproc-per-node 2 --no-python -- ",
              "srun": "srun --ntasks=2 --kill-on-bad-exit=1 "}[launcher]
    assert shell.startswith(prefix + "sharpflow analyse --world-size 2 --no-progress --threads 4 --spectrum "), shell
    expected = {"gpu": "2", "mem_mb": "2000"}
    if launcher == "srun":
        expected |= {"mpi": "srun", "tasks": "2", "cpus_per_task": "2", "tasks_per_gpu": "1"}
    assert res == expected


@pytest.mark.parametrize(("resources", "project", "says"), [
    ({"spectrum": {"world_size": 2}, "runs_per_job": 2}, False,
     "resources.spectrum.world_size 2 with resources.runs_per_job 2: a grouped analysis job runs as one process"),
    ({"spectrum": {"world_size": 2}}, True, "analysis 'project' does not run over several processes yet"),
    ({"train": {"world_size": 2}}, False, "resources.train.world_size: only resources.spectrum.world_size is used"),
])
def test_workflow_refuses_what_does_not_run_over_several_processes(tmp_path, resources, project, says):
    proc = _dry_run(tmp_path, resources, project)
    assert proc.returncode != 0 and says in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
