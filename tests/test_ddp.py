"""Data-parallel training (``world_size`` > 1) on the CPU with gloo, against one process.

Jobs of 2 and 3 ranks are started by a ``multiprocessing`` fork server on a free local port (as in
``tests/test_distributed.py``); every rank calls :func:`sharpflow.train.train` on the tiny MNIST-1D
dataset with the same ``out_dir``. Mini-batches of 24 over 320 examples: 14 steps per epoch, the last
batch of 8 examples, so 3 ranks hold unequal slices (8, 8, 8 and 3, 3, 2). The test process trains
the same runs with ``world_size`` 1 and compares the checkpoints (relative difference of all the
weights, 1e-5) and the metrics. Then a crash and a resume at 2 ranks (bitwise against the
uninterrupted 2-rank run), ranks that find different resume states, the launch checks of
``sharpflow train`` (torchrun with the wrong number of processes, a plain start, SLURM's variables)
and the commands the workflow gives a run of several ranks.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from sharpflow import cli
from sharpflow.checkpoints import load_checkpoint
from sharpflow.config import RunConfig
from sharpflow.errors import SharpflowError
from sharpflow.hessian.distributed import init_distributed
from sharpflow.train import _check_slices, train

from .conftest import TINY_DATASET, free_port, tiny_run, tiny_workflow_config

ROOT = Path(__file__).resolve().parents[1]
SPAWN = mp.get_context("forkserver")
SPAWN.set_forkserver_preload(["torch", "sharpflow.train", __name__])

STEPS, CRASH_AFTER = 40, 13  # checkpoints at 0, 5, 10, 14 (zoom to epoch 1), 28, 40: a crash between 10 and 14


def _run(kind: str, world: int) -> RunConfig:
    """The runs compared with one process: SGD with momentum and weight decay, AdamW with clipping, SAM,
    NSGD with its top-2 Hessian subspace refreshed every 10 steps."""
    over: dict[str, Any] = {"sgd": {"optimizer__momentum": 0.9, "optimizer__weight_decay": 1e-3},
                            "adamw": {"optimizer__name": "adamw", "optimizer__lr": 0.01, "optimizer__grad_clip": 0.5,
                                      "optimizer__weight_decay": 1e-2},
                            "sam": {"optimizer__name": "sam", "optimizer__momentum": 0.9},
                            "nsgd": {"optimizer__name": "nsgd", "optimizer__momentum": 0.9,
                                     "optimizer__nsgd": {"gamma": 0.5, "k": 2, "refresh_every_steps": 10,
                                                         "tol": 1e-3, "hessian_examples": 64}}}[kind]
    return tiny_run(optimizer__batch_size=24, steps=STEPS, world_size=world, **over)


# ------------------------------------------------------------------------------------------------
# What a rank runs
# ------------------------------------------------------------------------------------------------


def _train(run: RunConfig, data: str, out: str, logs: list[str], **kw: Any) -> pd.DataFrame:
    from sharpflow.config import DatasetConfig

    return train(run, DatasetConfig.model_validate(TINY_DATASET), run_name="r", data_dir=data, out_dir=out,
                 progress=False, log=logs.append, **kw)


def _job(rank: int, world: int, data: str, base: str, kinds: list[str], resume: bool) -> dict[str, Any]:
    import sharpflow.train as training

    out: dict[str, Any] = {"logs": {}, "errors": {}, "shards": []}
    build = training.distributed_hessian

    def recording(*args: Any, **kwargs: Any) -> Any:  # the Hessian operators NSGD's refreshes build
        op = build(*args, **kwargs)
        out["shards"].append(op.counts)
        return op

    training.distributed_hessian = recording
    for kind in kinds:  # ranks other than 0 get a directory of their own, which must stay empty
        out["logs"][kind] = logs = []
        _train(_run(kind, world), data, f"{base}/{kind}" + (f"_rank{rank}" if rank else ""), logs)
    if resume:  # a crash after CRASH_AFTER steps, Snakemake deleting the declared outputs, the rerun
        run, crash = _run("sgd", world), f"{base}/crash"
        out["logs"]["crash"] = logs = []
        _train(run, data, crash, logs, stop_after=CRASH_AFTER)
        if rank == 0:
            for p in Path(crash, "checkpoints").glob("step*.pt"):
                p.unlink()
        dist.barrier()
        # rank 1 looks into an empty directory while rank 0 finds the resume state: both must refuse
        elsewhere = crash if rank == 0 else f"{base}/empty"
        try:
            _train(run, data, elsewhere, [])
        except SharpflowError as err:
            out["errors"]["different_dirs"] = str(err)
        dist.barrier()
        out["logs"]["resume"] = logs = []
        _train(run, data, crash, logs)
    return out


def _worker(rank: int, world: int, port: int, data: str, base: str, kinds: list[str], resume: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        init_distributed(backend="gloo", timeout_s=60)
        result = _job(rank, world, data, base, kinds, resume)
        Path(base, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
        dist.destroy_process_group()
    except BaseException:
        Path(base, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    os._exit(0)



def _spawn(world: int, data: Path, base: Path, kinds: list[str], resume: bool, wait_s: float = 120) -> list[dict]:
    port = free_port()
    procs = [SPAWN.Process(target=_worker, args=(r, world, port, str(data), str(base), kinds, resume))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + wait_s
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    results = []
    for r in range(world):
        path = base / f"rank{r}.pkl"
        if not path.exists():
            err = base / f"rank{r}.err"
            pytest.fail(f"rank {r} left no result:\n{err.read_text() if err.exists() else '(no traceback)'}")
        results.append(pickle.loads(path.read_bytes()))
    assert [p.exitcode for p in procs] == [0] * world
    return results


#: the runs each job trains (2 ranks: then the crash and the resume)
KINDS = {2: ["sgd", "sam", "nsgd"], 3: ["sgd", "adamw"]}
_JOBS: dict[int, tuple[Path, list[dict]]] = {}


def _job_of(world: int, tiny_data: Path, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The job of ``world`` ranks, run once per module: its directory and every rank's result."""
    if world not in _JOBS:
        base = tmp_path_factory.mktemp(f"ddp{world}")
        _JOBS[world] = base, _spawn(world, tiny_data, base, KINDS[world], resume=world == 2)
    return _JOBS[world]


_SINGLE: dict[str, Path] = {}


def _single(kind: str, tiny_data: Path, tmp_path_factory) -> Path:
    """The one-process run of ``kind`` (trained once per module, on one thread as a rank is)."""
    if kind not in _SINGLE:
        out = tmp_path_factory.mktemp(f"one_{kind}")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _train(_run(kind, 1), str(tiny_data), str(out), [])
        finally:
            torch.set_num_threads(threads)
        _SINGLE[kind] = out
    return _SINGLE[kind]


# ------------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------------


def _checkpoints(out: Path) -> dict[str, dict[str, Any]]:
    return {p.name: load_checkpoint(p) for p in sorted((out / "checkpoints").glob("step*.pt"))}


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a)
    den = sum(float(b[k].double().square().sum()) for k in b)
    return (num / den) ** 0.5


def _compare(out: Path, ref: Path, tol: float) -> float:
    """The largest relative difference of the weights over the two runs' checkpoints (at most ``tol``)."""
    ca, cb = _checkpoints(out), _checkpoints(ref)
    assert list(ca) == list(cb) and len(ca) == 6
    worst = 0.0
    for name in ca:
        assert (ca[name]["step"], ca[name]["status"]) == (cb[name]["step"], cb[name]["status"]) == (
            int(name[4:12]), "ok")
        worst = max(worst, _rel(ca[name]["model"], cb[name]["model"]))
    assert worst <= tol, worst
    return worst


def _metrics(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "metrics.parquet").drop(columns=["wall_s", "refresh_s"])


def _same_metrics(a: pd.DataFrame, b: pd.DataFrame, rtol: float) -> None:
    pd.testing.assert_frame_equal(a.drop(columns=["loss", "accuracy"]), b.drop(columns=["loss", "accuracy"]),
                                  check_exact=False, rtol=1e-5)
    pd.testing.assert_series_equal(a.loss, b.loss, check_exact=False, rtol=rtol)
    assert (a.accuracy - b.accuracy).abs().max() <= 0.01  # an argmax may flip on a near tie, no more


# ------------------------------------------------------------------------------------------------
# Training over 2 and 3 ranks against one process
# ------------------------------------------------------------------------------------------------


def test_slices_cover_each_batch_contiguously_and_unequally_at_three_ranks(tiny_data):
    from sharpflow.data import load_prepared, train_view
    from sharpflow.train import DataOrder

    view = train_view(_run("sgd", 3), load_prepared(tiny_data))
    order = DataOrder(view, 0, 14, torch.device("cpu"))
    for step in (0, 13):  # a full batch of 24 and the last one of the epoch, 8
        xb, yb = order.examples(step)
        parts = [order.share(step, r, 3) for r in range(3)]
        assert [len(p[0]) for p in parts] == ([8, 8, 8] if step == 0 else [3, 3, 2])
        assert all(n == len(xb) for *_, n in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), xb) and torch.equal(torch.cat([p[1] for p in parts]), yb)


@pytest.mark.parametrize(("world", "kind"), [(2, "sgd"), (3, "sgd"), (2, "sam"), (3, "adamw")])
def test_updates_equal_one_process(world, kind, tiny_data, tmp_path_factory):
    """Checkpoints within 1e-5 (relative, all the weights) of one process's; the same metrics rows, the
    losses (mini-batch and sharded evaluations) within 1e-5."""
    base, ranks = _job_of(world, tiny_data, tmp_path_factory)
    ref = _single(kind, tiny_data, tmp_path_factory)
    worst = _compare(base / kind, ref, 1e-5)
    print(f"{kind} at {world} ranks: largest relative difference {worst:.2e}")
    _same_metrics(_metrics(base / kind), _metrics(ref), rtol=1e-5)
    assert not (base / kind / ".resume").exists()
    assert all(rank["logs"][kind] == [] for rank in ranks)  # nothing to say, on any rank
    assert not any(base.glob(f"{kind}_rank*"))  # only rank 0 writes


def test_nsgd_refreshes_with_the_distributed_hessian(tiny_data, tmp_path_factory):
    world = 2
    base, ranks = _job_of(world, tiny_data, tmp_path_factory)
    ref = _single("nsgd", tiny_data, tmp_path_factory)
    batch = pd.read_parquet(base / "nsgd" / "metrics.parquet").query("split == 'batch'")
    refreshed = batch[batch.refresh_matvecs.notna()]
    assert refreshed.step.tolist() == [0, 10, 20, 30] and (refreshed.refresh_matvecs > 0).all()
    assert all(rank["shards"] == [(32, 32)] * 4 for rank in ranks)  # every refresh: 64 examples, 32 per rank
    # The refreshed subspace is certified to a residual of 1e-3, not to the last bit, and a product reduced
    # in another order could change when Lanczos stops: 1e-4 leaves room for that (measured: 1.6e-7).
    worst = _compare(base / "nsgd", ref, 1e-4)
    print(f"nsgd at {world} ranks: largest relative difference {worst:.2e}")


def test_resume_mid_run_at_two_ranks_equals_the_uninterrupted_run(tiny_data, tmp_path_factory):
    """Bitwise: the same reductions in the same order. Only rank 0 logs; ranks that find different
    resume states all refuse, and the rank shown an empty directory leaves it empty."""
    base, ranks = _job_of(2, tiny_data, tmp_path_factory)
    a, b = _checkpoints(base / "crash"), _checkpoints(base / "sgd")
    assert list(a) == list(b)
    for name in a:
        for key in a[name]["model"]:
            assert torch.equal(a[name]["model"][key], b[name]["model"][key]), (name, key)
    pd.testing.assert_frame_equal(_metrics(base / "crash"), _metrics(base / "sgd"))
    assert ranks[0]["logs"]["resume"] == [f"[r] resuming from step 10 of {STEPS}"]  # the newest dump
    assert ranks[1]["logs"]["resume"] == []  # only rank 0 speaks
    for rank in ranks:
        msg = rank["errors"]["different_dirs"]
        assert "the ranks found different resume states (a fresh start to step 10)" in msg, msg
    assert not (base / "empty").exists() or not any((base / "empty").rglob("*"))  # rank 1 wrote nothing


def test_a_rank_needs_an_example_of_every_batch(tiny_data):
    from sharpflow.data import load_prepared, train_view
    from sharpflow.models import build_model

    data = load_prepared(tiny_data)
    run = tiny_run(optimizer__batch_size=30)  # 320 = 10 × 30 + 20: batches of 30 and of 20
    model = build_model(run.model, tuple(data.input_shape), data.num_classes)
    _check_slices("r", train_view(run, data), 20, model)  # one example each of the batch of 20
    with pytest.raises(SharpflowError, match="world_size 21 leaves a rank without examples in a mini-batch of 20"):
        _check_slices("r", train_view(run, data), 21, model)


# ------------------------------------------------------------------------------------------------
# Launching: sharpflow train's checks, the workflow's command
# ------------------------------------------------------------------------------------------------


def _train_args(run: RunConfig, data: Path, out: Path) -> list[str]:
    return ["train", "--no-progress", "--run", json.dumps(run.model_dump(mode="json")), "--run-name", "r",
            "--dataset", json.dumps(TINY_DATASET), "--data", str(data), "--out", str(out)]


def test_torchrun_with_another_world_size_fails_in_one_line(tiny_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # as the workflow starts it ("--": torchrun would take sharpflow's --run for an abbreviation of its --run-path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python",
           "--", str(Path(sys.executable).parent / "sharpflow"), *_train_args(tiny_run(world_size=3), tiny_data,
                                                                              tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode != 0
    line = ("sharpflow train: error: run r has world_size 3 but was started as 2 processes: start it with "
            "`torchrun --standalone --nproc-per-node 3 --no-python -- sharpflow train ...` or "
            "`srun --ntasks=3 sharpflow train ...`")
    assert line in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher's variables, and whatever sharpflow train sets in the environment undone afterwards."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_LAUNCH_NODE_IPADDR"):
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    return monkeypatch


def test_plain_start_of_a_run_of_several_ranks_fails_in_one_line(clean_env, tiny_data, tmp_path, capsys):
    assert cli.main(_train_args(tiny_run(world_size=2), tiny_data, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sharpflow train: error: run r has world_size 2 but was started as 1 process: start it "
                          "with `torchrun --standalone --nproc-per-node 2") and "\n" not in err


def test_srun_variables_give_the_world(clean_env, tiny_data, tmp_path, capsys):
    clean_env.setenv("SLURM_PROCID", "1")
    clean_env.setenv("SLURM_NTASKS", "3")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setenv("SLURM_JOB_ID", "4242")
    clean_env.setenv("SLURM_LAUNCH_NODE_IPADDR", "10.0.0.7")
    # a run of one process is one process of whatever SLURM job it runs in
    assert cli._launched_world(1) == 1 and "RANK" not in os.environ
    assert cli.main(_train_args(tiny_run(world_size=2), tiny_data, tmp_path / "out")) == 2
    assert "has world_size 2 but was started as 3 processes" in capsys.readouterr().err
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("1", "3", "10.0.0.7")
    assert os.environ["MASTER_PORT"] == str(20000 + 4242)
    assert os.environ["LOCAL_RANK"] == ("1" if torch.cuda.device_count() != 1 else "0")


def test_world_size_one_is_left_out_of_the_run_config():
    """Existing runs keep their params and config digest: world_size is dumped only when it is not 1."""
    assert "world_size" not in tiny_run().model_dump(mode="json")
    assert tiny_run(world_size=2).model_dump(mode="json")["world_size"] == 2


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_workflow_starts_a_run_of_several_ranks_under_its_launcher(tmp_path, launcher):
    """A dry run: the run of 2 ranks gets the launcher's prefix, twice the threads, GPUs and memory (srun:
    also the SLURM plugin's MPI resources); the run of one process keeps the command it always had."""
    cfg = tiny_workflow_config(
        tmp_path / "results", studies={"one": {}, "two": {"base": {"world_size": 2}}},
        resources={"train": {"threads": 2, "gpu": 1, "mem_mb": 1000, "launcher": launcher}})
    (tmp_path / "config.yaml").write_text(json.dumps(cfg))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d",
                           str(tmp_path), "--configfile", str(tmp_path / "config.yaml"), "--cores", "8", "-n", "-p"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    jobs = {}
    for block in text.split("rule train_")[1:]:
        lines = block.splitlines()
        resources = next(x for x in lines if x.strip().startswith("resources:")).split(":", 1)[1]
        pairs = dict(p.strip().split("=", 1) for p in resources.split(", "))
        keep = ("gpu", "mem_mb", "mpi", "tasks", "cpus_per_task", "tasks_per_gpu")
        shell = next(x for x in lines if x.startswith("Shell command: ")).removeprefix("Shell command: ")
        jobs[lines[0].rstrip(":")] = ({k: v for k, v in pairs.items() if k in keep}, shell)
    assert set(jobs) == {"one", "two"}
    (res_one, one), (res_two, two) = jobs["one"], jobs["two"]
    assert one.startswith("sharpflow train --no-progress --threads 2 --run ") and "world_size" not in one
    prefix = {"torchrun": "torchrun --standalone --nproc-per-node 2 --no-python -- ",
              "srun": "srun --ntasks=2 --kill-on-bad-exit=1 "}[launcher]
    assert two.startswith(prefix + "sharpflow train --no-progress --threads 4 --run ") and '"world_size":2' in two
    assert res_one == {"gpu": "1", "mem_mb": "1000"}
    expected = {"gpu": "2", "mem_mb": "2000"}
    if launcher == "srun":
        expected |= {"mpi": "srun", "tasks": "2", "cpus_per_task": "2", "tasks_per_gpu": "1"}
    assert res_two == expected


def test_a_tiny_study_of_two_ranks_runs_through_snakemake_end_to_end(tmp_path):
    """Snakemake for real, on the CPU with gloo: a study whose run trains on 2 ranks (torchrun) and whose
    spectrum is solved on 2 ranks, beside the same study on one process. The checkpoints agree to float
    tolerance, the eigenvalues to 1e-5 relative with the same converged flags, and the spectrum table
    is written once."""

    def study(root: Path, world: int) -> Path:
        cfg = tiny_workflow_config(
            root / "results",
            defaults={"optimizer": {"lr": 0.1, "batch_size": 20, "weight_decay": 0.001}, "steps": 24,
                      **({"world_size": world} if world > 1 else {})},
            studies={"s": {}}, spectrum={"k": 3, "tol": 1.0e-4, "frobenius_probes": 0}, project={"enabled": False},
            claims={"enabled": False},
            resources={"runs_per_job": 1, "train": {"threads": 1},
                       "spectrum": {"threads": 1, **({"world_size": world} if world > 1 else {})}})
        root.mkdir(parents=True)
        (root / "config.yaml").write_text(json.dumps(cfg))
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        proc = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d",
                               str(root), "--configfile", str(root / "config.yaml"), "--cores", "2"],
                              capture_output=True, text=True, timeout=400, env=env, cwd=root)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return root / "results" / "runs" / "s"

    one, two = study(tmp_path / "one", 1), study(tmp_path / "two", 2)
    ck_one, ck_two = sorted((one / "checkpoints").glob("step*.pt")), sorted((two / "checkpoints").glob("step*.pt"))
    assert [p.name for p in ck_one] == [p.name for p in ck_two] and len(ck_one) >= 3
    for a, b in zip(ck_one, ck_two, strict=True):
        sa, sb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6)
    s1, s2 = pd.read_parquet(one / "spectrum.parquet"), pd.read_parquet(two / "spectrum.parquet")
    assert len(s1) == len(s2) == 3 * len(ck_one)  # every checkpoint once, k = 3 rows each
    assert list(s1["converged"]) == list(s2["converged"]) and s1["converged"].all()
    torch.testing.assert_close(torch.tensor(s2["eigenvalue"].to_numpy()), torch.tensor(s1["eigenvalue"].to_numpy()),
                               rtol=1e-5, atol=1e-7)
    log = "\n".join(p.read_text() for p in (two.parents[1] / "logs" / "analyse").rglob("*.log"))
    assert "2 ranks" in log


def test_sigkill_of_one_rank_then_a_rerun_finishes_as_an_uninterrupted_run(tiny_data, tmp_path):
    """Two ranks under torchrun; rank 1 is killed with SIGKILL once a checkpoint past step 0 exists. The job
    fails (the other rank cannot go on alone); started again, it resumes from the newest checkpoint and
    ends with checkpoints bitwise equal to an uninterrupted two-rank run's."""
    import signal

    import psutil

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    run = tiny_run(world_size=2, steps=1500, checkpoints={"zoom_every": 0, "every_epochs": 15})

    def start(out: Path) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python",
               "--", str(Path(sys.executable).parent / "sharpflow"), *_train_args(run, tiny_data, out)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    whole = start(tmp_path / "whole")
    assert whole.wait(timeout=300) == 0, whole.stderr.read()[-3000:]

    killed = start(tmp_path / "killed")
    deadline = time.monotonic() + 240
    victim = None
    while time.monotonic() < deadline and killed.poll() is None:
        dumps = [p for p in (tmp_path / "killed" / "checkpoints").glob("step*.pt") if p.name != "step00000000.pt"]
        if dumps and victim is None:
            for child in psutil.Process(killed.pid).children(recursive=True):
                try:
                    if child.environ().get("RANK") == "1":
                        victim = child
                        break
                except psutil.Error:
                    continue
            if victim is not None:
                os.kill(victim.pid, signal.SIGKILL)
        time.sleep(0.05)
    assert victim is not None, "rank 1 was not found before the run ended"
    assert killed.wait(timeout=300) != 0  # the job failed; what rank 0 had written is kept
    done = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").glob("step*.pt"))
    final = sorted(p.name for p in (tmp_path / "whole" / "checkpoints").glob("step*.pt"))
    assert done != final  # killed mid-run

    again = start(tmp_path / "killed")
    assert again.wait(timeout=300) == 0, again.stderr.read()[-3000:]
    assert "resuming from step" in again.stderr.read()
    a, b = _checkpoints(tmp_path / "killed"), _checkpoints(tmp_path / "whole")
    assert list(a) == list(b) == final
    for name in a:
        for key in a[name]["model"]:
            assert torch.equal(a[name]["model"][key], b[name]["model"][key]), (name, key)
