"""The local GPU lease: exclusive under contention, freed by SIGKILL, skipped under SLURM.

GPUs are simulated with SHARPFLOW_FAKE_GPUS (or by calling lease_gpu directly); the locks are
real flocks taken by real concurrent processes.
"""

from __future__ import annotations

import fcntl
import itertools
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from sharpflow import devices
from sharpflow.devices import LeaseTimeout, choose_device, lease_gpu, release_gpu

ENV = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SHARPFLOW_FAKE_GPUS", "SHARPFLOW_LEASE_DIR", "SHARPFLOW_LEASE_TIMEOUT")
FORK = mp.get_context("fork")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch):
    """Each test starts without device variables (restored after) and without leases."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(devices, "_said_cpu", False)
    release_gpu()
    yield
    release_gpu()


# ---------------------------------------------------------------- exclusivity under contention


def _hold_for_a_while(lease_dir: str, n: int, out: str, go, seed: int) -> None:
    """Child: lease one of n devices, hold it briefly, record (device, start, end, pid in lock file)."""
    random.seed(seed)
    go.wait(10)
    i = lease_gpu(n, lease_dir, timeout=20)
    t0 = time.monotonic()
    written = (Path(lease_dir) / f"gpu-{i}.lock").read_text().strip()
    time.sleep(random.uniform(0.05, 0.2))
    t1 = time.monotonic()
    Path(out).write_text(f"{i} {t0!r} {t1!r} {written} {os.getpid()}")
    # Exit without releasing: the end of the process is what frees the device.


def test_concurrent_leases_never_share_a_device(tmp_path: Path) -> None:
    n_devices, n_procs = 3, 12
    go = FORK.Event()
    procs = [
        FORK.Process(target=_hold_for_a_while, args=(str(tmp_path), n_devices, str(tmp_path / f"r{j}"), go, j))
        for j in range(n_procs)
    ]
    for p in procs:
        p.start()
    go.set()  # all contend at once
    for p in procs:
        p.join(25)
    assert [p.exitcode for p in procs] == [0] * n_procs

    records = []
    for j in range(n_procs):
        dev, t0, t1, written, pid = (tmp_path / f"r{j}").read_text().split()
        assert written == pid  # the lock file names its holder
        records.append((int(dev), float(t0), float(t1)))
    assert {r[0] for r in records} == set(range(n_devices))
    for dev in range(n_devices):
        spans = sorted((t0, t1) for d, t0, t1 in records if d == dev)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, f"device {dev} held twice at once: {spans}"
    # The processes really overlapped in time (else exclusivity would be trivial).
    peak = max(sum(t0 <= s < t1 for _, t0, t1 in records) for _, s, _ in records)
    assert peak >= 2


# ---------------------------------------------------------------- SIGKILL frees, timeout is clear


HOLDER = """
import sys, time
from sharpflow.devices import lease_gpu
i = lease_gpu(1, sys.argv[1], timeout=10)
open(sys.argv[2], "w").write(str(i))
time.sleep(120)
"""


def test_sigkilled_holder_frees_its_device_and_timeout_names_it(tmp_path: Path) -> None:
    marker = tmp_path / "holding"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), str(marker)])
    try:
        deadline = time.monotonic() + 30
        while not marker.exists() or not marker.read_text():
            assert proc.poll() is None, "holder died"
            assert time.monotonic() < deadline, "holder never took the lease"
            time.sleep(0.05)

        t0 = time.monotonic()
        with pytest.raises(LeaseTimeout, match=rf"all 1 GPU\(s\) stayed leased for 0.3 s.*GPU 0: pid {proc.pid}"):
            lease_gpu(1, tmp_path, timeout=0.3)
        assert time.monotonic() - t0 >= 0.3

        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert lease_gpu(1, tmp_path, timeout=0) == 0  # free at once: no leak
        assert (tmp_path / "gpu-0.lock").read_text().strip() == str(os.getpid())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_waiter_gets_the_device_when_it_is_freed(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "gpu-0.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another "holder" (its own open file)
    threading.Timer(0.3, os.close, [fd]).start()
    said: list[str] = []
    t0 = time.monotonic()
    assert lease_gpu(1, tmp_path, timeout=10, log=said.append) == 0
    assert time.monotonic() - t0 >= 0.25
    assert len(said) == 1
    assert "waiting up to 10 s" in said[0]


# ---------------------------------------------------------------- choose_device


def _second_job(lease_dir: str, out: str) -> None:
    """Child (forked from a process that holds a lease): forget the inherited lease, choose."""
    release_gpu()  # closes only this child's copy of the descriptor: the parent keeps its lock
    os.environ["CUDA_VISIBLE_DEVICES"] = "5,7"
    choose_device("auto", lease_dir=lease_dir, log=lambda _: None)
    Path(out).write_text(os.environ["CUDA_VISIBLE_DEVICES"])


def test_choose_device_leases_pins_and_respects_visible_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHARPFLOW_FAKE_GPUS", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    said: list[str] = []
    assert choose_device("auto", lease_dir=tmp_path, log=said.append) == torch.device("cpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert (tmp_path / "gpu-5.lock").read_text().strip() == str(os.getpid())
    # Asking again returns the same lease; no second lock, no second message.
    assert choose_device("cuda", lease_dir=tmp_path, log=said.append) == torch.device("cpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert len(said) == 1
    assert "leased GPU 5" in said[0]

    child = FORK.Process(target=_second_job, args=(str(tmp_path), str(tmp_path / "child")))
    child.start()
    child.join(20)
    assert child.exitcode == 0
    assert (tmp_path / "child").read_text() == "7"
    # The parent still holds 5: another open file of the lock cannot take it.
    fd = os.open(tmp_path / "gpu-5.lock", os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_slurm_takes_no_lease(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARPFLOW_FAKE_GPUS", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    said: list[str] = []
    lease_dir = tmp_path / "leases"
    assert choose_device("cuda", lease_dir=lease_dir, log=said.append) == torch.device("cpu")
    assert not lease_dir.exists()
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert devices._LEASES == {}
    assert "SLURM job 4242" in said[0]


def test_cpu_requested_takes_no_lease(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARPFLOW_FAKE_GPUS", "2")
    assert choose_device("cpu", lease_dir=tmp_path / "leases") == torch.device("cpu")
    assert not (tmp_path / "leases").exists()


def test_auto_without_cuda_falls_back_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARPFLOW_FAKE_GPUS", "0")
    said: list[str] = []
    for _ in range(3):
        assert choose_device("auto", log=said.append) == torch.device("cpu")
    assert len(said) == 1
    assert "CPU" in said[0]


def test_cuda_without_cuda_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARPFLOW_FAKE_GPUS", "0")
    with pytest.raises(RuntimeError, match="'cuda' requested but CUDA is not available"):
        choose_device("cuda")
    with pytest.raises(ValueError, match="'auto', 'cpu', 'cuda' or 'cuda:N'"):
        choose_device("tpu")


def test_lease_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARPFLOW_FAKE_GPUS", "1")
    monkeypatch.setenv("SHARPFLOW_LEASE_DIR", str(tmp_path / "shared"))
    choose_device("auto", log=lambda _: None)
    assert (tmp_path / "shared" / "gpu-0.lock").read_text().strip() == str(os.getpid())


class FakeCuda:
    """torch.cuda as this module relies on it: an NVML count that follows CUDA_VISIBLE_DEVICES
    until CUDA starts, after which the driver keeps the devices it saw when it started."""

    def __init__(self, n: int, driver_started_with: str | None = None) -> None:
        self.n = n
        self.initialized = False
        self.seen = driver_started_with

    def _count(self, visible: str | None) -> int:
        return self.n if visible is None else len([s for s in visible.split(",") if s])

    def device_count(self) -> int:
        if self.initialized:
            return self._count(self.seen)
        return self._count(os.environ.get("CUDA_VISIBLE_DEVICES"))

    def init(self) -> None:
        if self.seen is None:
            self.seen = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(self.n))))
        self.initialized = True


@pytest.mark.parametrize("driver_started_early", [False, True])
def test_pinning_logic_with_a_simulated_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, driver_started_early: bool
) -> None:
    """Second GPU leased (the first is held elsewhere). Pinned → cuda:0 and CUDA_VISIBLE_DEVICES=1;
    driver already started (e.g. by is_available()) → cuda:1 and the variable left unset."""
    cuda = FakeCuda(2, driver_started_with="0,1" if driver_started_early else None)
    monkeypatch.setattr(torch.cuda, "device_count", cuda.device_count)
    monkeypatch.setattr(torch.cuda, "init", cuda.init)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: cuda.initialized)
    fd = os.open(tmp_path / "gpu-0.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        device = choose_device("auto", lease_dir=tmp_path, log=lambda _: None)
    finally:
        os.close(fd)
    if driver_started_early:
        assert device == torch.device("cuda:1")
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    else:
        assert device == torch.device("cuda:0")
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
