"""SLURM: the workflow profiles, and a tiny study run end to end through a real SLURM.

The dry-run tests check what the profiles promise without a cluster: the SLURM profile reads the
partition and account from sbatch's own environment variables and submits a run's warm-start chain
(its spectra and project analyses) as one analysis job.

The ``slurm`` test starts a throwaway single-node SLURM (tests/slurm_harness.py: apt-get install as
root if needed, slurmctld + slurmd + munged, stopped again at the end), runs a tiny study through
workflow/profiles/slurm and, at the same time, locally. It checks that every non-local job went
through sbatch (SLURM's own job list, not Snakemake's word) and that the two runs' results agree
number for number: same code, same seeds, same single thread, so anything else is a bug in how the
jobs were shipped. It skips, naming the reason, where no such cluster can be had.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.slurm_harness import LocalSlurm, SlurmUnavailable

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SLURM_PROFILE = ROOT / "workflow" / "profiles" / "slurm"
DEFAULT_PROFILE = ROOT / "workflow" / "profiles" / "default"
TABLES = ("metrics", "spectrum", "alignment", "cross_sections", "widths", "decomposed")
CHECKPOINTS = [0, 40]
RUNTIME = 5  # minutes asked for per job


def tiny_config(gpu: int = 0, threads: int = 1) -> dict:
    """One run, two checkpoints, every heavy stage, no figures: prepare, train, one analysis job (a chain of
    two checkpoints: 2 spectra, 2 project analyses)."""
    stage = {"gpu": gpu, "threads": threads, "mem_mb": 500, "runtime": RUNTIME}
    return {
        "results": "results",  # relative to --directory
        "datasets": {"tiny": {"source": "mnist1d", "mnist1d_samples": 500, "valid_size": 80,
                              "hessian_subset": 64}},
        "defaults": {"dataset": "tiny", "model": {"name": "mlp", "kwargs": {"hidden": [12]}},
                     "optimizer": {"lr": 0.1, "batch_size": 20}, "steps": CHECKPOINTS[-1], "seed": 0,
                     "checkpoints": {"zoom_every": 0, "every_epochs": None}, "device": "cpu"},
        "studies": {"tiny": {}},
        "spectrum": {"k": 3},
        "project": {"k": 2, "alignment_batches": 2, "grad_batches": 2, "subset": 64, "random_directions": 1,
                    "cross_directions": [1], "cross_ks": [0, 1, -1], "width_thresholds": [1.1],
                    "multipliers": [1]},
        # The test cluster has no GPU: a job asking for one would never be scheduled.
        "resources": {"train": stage, "spectrum": stage, "project": stage},
    }


def snakemake_cmd(workdir: Path, config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(config), *args]


def with_venv(env: dict[str, str]) -> dict[str, str]:
    """The rules call the `sharpflow` console script: this venv's bin must come first, also in SLURM jobs."""
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}


def write_config(tmp_path: Path, name: str = "tiny.yaml", **kwargs: int) -> Path:
    cfg = tmp_path / name
    cfg.write_text(yaml.safe_dump(tiny_config(**kwargs)))
    return cfg


def dry_run(tmp_path: Path, env: dict[str, str]) -> str:
    cfg = write_config(tmp_path)
    cmd = snakemake_cmd(tmp_path / "work", cfg, "-n", "--workflow-profile", str(SLURM_PROFILE))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=with_venv(env), cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"Using workflow specific profile {SLURM_PROFILE}" in out
    return out


# ------------------------------------------------------------------------------- dry runs
@pytest.mark.slow
def test_slurm_profile_submits_a_run_as_one_analysis_job(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SBATCH_")}
    out = dry_run(tmp_path, env)
    assert out.count("rule analyse_tiny:") == 1 and "Group job" not in out
    job = out.split("rule analyse_tiny:", 1)[1].split("\n\n", 1)[0]
    assert "runs/tiny/spectrum.parquet" in job and "runs/tiny/alignment.parquet" in job
    assert "--chain-starts 0 " in job or "checkpoints/step00000040.pt" in job
    # Nothing site-specific leaks in when the environment does not ask for it.
    assert "slurm_partition=" not in out and "slurm_account=" not in out


@pytest.mark.slow
def test_slurm_profile_takes_partition_and_account_from_sbatch_variables(tmp_path):
    env = {**os.environ, "SBATCH_PARTITION": "gpu_h200", "SBATCH_ACCOUNT": "proj42"}
    out = dry_run(tmp_path, env)
    resources = [line for line in out.splitlines() if line.strip().startswith("resources:")]
    assert resources
    for line in resources:
        assert "slurm_partition=gpu_h200" in line and "slurm_account=proj42" in line, line


@pytest.mark.slow
def test_default_profile_runs_a_dry_run(tmp_path):
    cfg = write_config(tmp_path)
    cmd = snakemake_cmd(tmp_path / "work", cfg, "-n", "--workflow-profile", str(DEFAULT_PROFILE))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=with_venv(dict(os.environ)),
                          cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"Using workflow specific profile {DEFAULT_PROFILE}" in out


# --------------------------------------------------------------------------- real SLURM
@pytest.fixture
def slurm_cluster(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm-state"))
    try:
        cluster.start()
    except SlurmUnavailable as err:
        pytest.skip(f"no local SLURM cluster: {err}")
    try:
        yield cluster
    finally:
        cluster.stop()


def _timing_free(frame: pd.DataFrame) -> pd.DataFrame:
    """Drop wall-clock columns (``*_s`` seconds, ``seconds``): the only ones allowed to differ."""
    return frame.drop(columns=[c for c in frame.columns if c.endswith("_s") or c == "seconds"])


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_tiny_study_through_slurm_matches_a_local_run(slurm_cluster, tmp_path):
    cfg = write_config(tmp_path)
    slurm_dir, local_dir = tmp_path / "slurm", tmp_path / "local"
    env = with_venv(slurm_cluster.env)
    env["SBATCH_PARTITION"] = slurm_cluster.partition  # exercised through the profile's YTE block
    env.pop("SBATCH_ACCOUNT", None)
    slurm_cmd = snakemake_cmd(
        slurm_dir, cfg, "--workflow-profile", str(SLURM_PROFILE),
        # A tiny workflow: first status check after 2 s, not 40 (each check then backs off by 10 s).
        "--slurm-init-seconds-before-status-checks", "2",
        "--slurm-keep-successful-logs", "--retries", "0", "--jobs", "4",
    )
    local_cmd = snakemake_cmd(local_dir, cfg, "--workflow-profile", str(DEFAULT_PROFILE), "--cores", "2")

    t0 = time.monotonic()
    slurm_log = tmp_path / "slurm-snakemake.log"
    with open(slurm_log, "w") as log:
        # Its own session, so a timeout can kill Snakemake with its children (it ignores SIGTERM while
        # SLURM jobs run); the fixture cancels the SLURM jobs themselves.
        proc = subprocess.Popen(slurm_cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                start_new_session=True)
        try:
            # The SLURM run mostly waits between status checks: run the local reference meanwhile.
            local = subprocess.run(local_cmd, capture_output=True, text=True, timeout=240,
                                   env=with_venv(dict(os.environ)), cwd=tmp_path)
            assert local.returncode == 0, local.stdout + local.stderr
            local_wall = time.monotonic() - t0
            rc = proc.wait(timeout=max(1.0, 360 - (time.monotonic() - t0)))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    wall = time.monotonic() - t0
    out = slurm_log.read_text()
    assert rc == 0, f"{out[-6000:]}\n{slurm_cluster.log_tail()}"

    # SLURM's own record: exactly train and one analysis submission, all completed; prepare (which may
    # download) and the aggregate rules are local rules and never reached the cluster.
    run_id = re.search(r"SLURM run ID: (\S+)", out)
    assert run_id, out[-3000:]
    jobs = [j for j in slurm_cluster.jobs() if j["name"] == run_id.group(1)]
    comments = sorted(j["comment"] for j in jobs)
    assert len(jobs) == 2, jobs
    assert comments[0] == "rule_analyse_tiny", comments
    assert comments[1] == "rule_train_tiny", comments
    assert {j["state"] for j in jobs} == {"COMPLETED"}, jobs
    for job in jobs:  # gpu: 0 in the config means no GPU request at all
        shown = slurm_cluster.client(["scontrol", "show", "job", job["id"]]).stdout
        assert f"Partition={slurm_cluster.partition}" in shown and "gpu" not in shown.lower(), shown
    logs = slurm_dir / ".snakemake" / "slurm_logs"
    assert {p.name.split("_")[0] for p in logs.iterdir()} == {"rule"}
    assert len(list(logs.rglob("*.log"))) == 2

    # The same numbers as the local run: every aggregated table (timings aside) and the eigenvectors.
    for name in TABLES:
        got = pd.read_parquet(slurm_dir / "results" / "runs" / "tiny" / f"{name}.parquet")
        want = pd.read_parquet(local_dir / "results" / "runs" / "tiny" / f"{name}.parquet")
        assert {*CHECKPOINTS} <= set(want["step"]), name
        pd.testing.assert_frame_equal(_timing_free(got), _timing_free(want), check_exact=True, obj=name)
    spectrum = pd.read_parquet(slurm_dir / "results" / "runs" / "tiny" / "spectrum.parquet")
    assert len(spectrum) == 3 * len(CHECKPOINTS) and spectrum["eigenvalue"].notna().all()
    for step in CHECKPOINTS:
        rel = Path("results") / "runs" / "tiny" / "eigvecs" / f"step{step:08d}.pt"
        got = torch.load(slurm_dir / rel, weights_only=True)
        want = torch.load(local_dir / rel, weights_only=True)
        assert torch.equal(got["eigenvalues"], want["eigenvalues"])
        assert torch.equal(got["eigenvectors"], want["eigenvectors"])
    print(f"SLURM test: {len(jobs)} sbatch submissions; local run {local_wall:.0f} s, SLURM run {wall:.0f} s")

    # What a GPU cluster gets: the analysis job of the same study with gpu: 1 and 2 threads asks for
    # one GPU and the runtimes of its checkpoints' spectra and analyses added up (threads and memory
    # not), GPUs through --gpus. This cluster has no GPU, so sbatch refuses at once; its logged call is checked.
    gpu_cfg = write_config(tmp_path, "gpu.yaml", gpu=1, threads=2)
    gpu_cmd = snakemake_cmd(slurm_dir, gpu_cfg, "--workflow-profile", str(SLURM_PROFILE), "--verbose",
                            "--forcerun", "analyse_tiny", "--until", "analyse_tiny",
                            "--retries", "0", "--slurm-init-seconds-before-status-checks", "2")
    proc = subprocess.run(gpu_cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    calls = [line for line in out.splitlines() if line.startswith("sbatch call:")]
    assert proc.returncode != 0 and len(calls) == 1, out[-6000:]
    flags = calls[0].split(" --wrap=", 1)[0].split()
    assert "analyse_tiny" in calls[0] and "--gpus=1" in flags and "--cpus-per-task=2" in flags, flags
    n_sections = 2 * len(CHECKPOINTS)  # a spectrum and a project analysis per checkpoint
    assert flags[flags.index("-t") + 1] == str(n_sections * RUNTIME) and flags[flags.index("--mem") + 1] == "500"
    assert len(slurm_cluster.jobs()) == len(jobs)  # refused by sbatch: nothing queued


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_two_ranks_under_srun_match_one_process(slurm_cluster, tmp_path):
    """``launcher: srun`` for real: a run of world_size 2 and its spectrum solved on 2 ranks, each a SLURM
    job of 2 tasks started by the rule's srun prefix (gloo on the CPU), against the same study on one
    local process. The checkpoints agree to float tolerance, the eigenvalues to 1e-5 relative with the
    same converged flags; SLURM's record shows both jobs with 2 tasks."""

    def config(name: str, world: int) -> Path:
        cfg = tiny_config()
        cfg["project"] = {"enabled": False}
        cfg["spectrum"] = {"k": 3, "tol": 1.0e-4, "frobenius_probes": 0}
        cfg["claims"] = {"enabled": False}
        if world > 1:
            cfg["defaults"]["world_size"] = world
            # tiny_config's stages share one dict: give each its own
            cfg["resources"]["train"] = {**cfg["resources"]["train"], "launcher": "srun"}
            cfg["resources"]["spectrum"] = {**cfg["resources"]["spectrum"], "launcher": "srun", "world_size": world}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg))
        return path

    srun_dir, local_dir = tmp_path / "srun", tmp_path / "local"
    env = with_venv(slurm_cluster.env)
    env["SBATCH_PARTITION"] = slurm_cluster.partition
    env.pop("SBATCH_ACCOUNT", None)
    cmd = snakemake_cmd(srun_dir, config("two.yaml", 2), "--workflow-profile", str(SLURM_PROFILE),
                        "--slurm-init-seconds-before-status-checks", "2", "--slurm-keep-successful-logs",
                        "--retries", "0", "--jobs", "2")
    local = snakemake_cmd(local_dir, config("one.yaml", 1), "--workflow-profile", str(DEFAULT_PROFILE), "--cores", "2")
    log = tmp_path / "srun-snakemake.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                start_new_session=True)
        try:
            ref = subprocess.run(local, capture_output=True, text=True, timeout=240, env=with_venv(dict(os.environ)),
                                 cwd=tmp_path)
            assert ref.returncode == 0, ref.stdout + ref.stderr
            rc = proc.wait(timeout=360)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    text = log.read_text()
    assert rc == 0, f"{text[-6000:]}\n{slurm_cluster.log_tail()}"
    run_id = re.search(r"SLURM run ID: (\S+)", text)
    assert run_id, text[-3000:]
    jobs = [j for j in slurm_cluster.jobs() if j["name"] == run_id.group(1)]
    assert sorted(j["comment"] for j in jobs) == ["rule_analyse_tiny", "rule_train_tiny"], jobs
    assert {j["state"] for j in jobs} == {"COMPLETED"}, jobs
    for job in jobs:
        shown = slurm_cluster.client(["scontrol", "show", "job", job["id"]]).stdout
        assert re.search(r"\bNumTasks=2\b", shown), shown

    two, one = srun_dir / "results" / "runs" / "tiny", local_dir / "results" / "runs" / "tiny"
    for step in CHECKPOINTS:
        name = f"step{step:08d}.pt"
        a = torch.load(one / "checkpoints" / name, weights_only=True)["model"]
        b = torch.load(two / "checkpoints" / name, weights_only=True)["model"]
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    s1, s2 = pd.read_parquet(one / "spectrum.parquet"), pd.read_parquet(two / "spectrum.parquet")
    assert len(s1) == len(s2) == 3 * len(CHECKPOINTS)
    assert list(s1["converged"]) == list(s2["converged"]) and s1["converged"].all()
    torch.testing.assert_close(torch.tensor(s2["eigenvalue"].to_numpy()), torch.tensor(s1["eigenvalue"].to_numpy()),
                               rtol=1e-5, atol=1e-7)
    analyse_log = "\n".join(p.read_text() for p in (srun_dir / "results" / "logs" / "analyse").rglob("*.log"))
    assert "2 ranks" in analyse_log
