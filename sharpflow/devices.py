"""Device choice and the local GPU lease.

Snakemake counts ``gpu`` resources but never says *which* GPU a job gets. Locally, a job that
wants a GPU therefore leases one: every visible device has a lock file in a lease directory,
and a job takes the first one it can lock with ``flock(LOCK_EX | LOCK_NB)``. The lock is held
through an open file descriptor kept for the life of the process; the kernel drops it when the
process ends in any way (SIGKILL included), so a crashed job never leaks its GPU. The job then
pins itself to the device with ``CUDA_VISIBLE_DEVICES`` (when CUDA has not started yet), so
``snakemake --cores all --resources gpu=4`` puts four jobs on four different GPUs.

Under SLURM (``SLURM_JOB_ID`` set) the allocation SLURM gives is used as is: no lease.

Environment:
    SHARPFLOW_LEASE_DIR      lease directory (default ``<tmpdir>/sharpflow-gpu-leases-<uid>``);
                             jobs share GPUs safely only if they share this directory
    SHARPFLOW_LEASE_TIMEOUT  seconds to wait for a free GPU (default 600)
    SHARPFLOW_FAKE_GPUS      N: pretend N GPUs exist, for tests. Leases and
                             ``CUDA_VISIBLE_DEVICES`` behave as with real GPUs, CUDA is never
                             touched, and ``choose_device`` returns the CPU.

Lock files are never deleted: deleting one while it is held would let a second job lock a new
file under the same name. A lock is shared with children created by ``fork`` (e.g. DataLoader
workers) until they exit too.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

LEASE_DIR_ENV = "SHARPFLOW_LEASE_DIR"
LEASE_TIMEOUT_ENV = "SHARPFLOW_LEASE_TIMEOUT"
FAKE_GPUS_ENV = "SHARPFLOW_FAKE_GPUS"
DEFAULT_LEASE_TIMEOUT_S = 600.0

Log = Callable[[str], object]


class LeaseTimeout(RuntimeError):
    """Every GPU stayed leased by other processes for the whole timeout."""


@dataclass(frozen=True)
class Lease:
    """A GPU held by this process: its position in the visible list, its CUDA id, its lock."""

    index: int
    device_id: str
    path: Path
    fd: int


# Lease directory (resolved) → this process's lease and the device choose_device returned.
# Holding the descriptor here is what holds the lock.
_LEASES: dict[Path, Lease] = {}
_CHOSEN: dict[Path, torch.device] = {}
_said_cpu = False


def default_lease_dir() -> Path:
    """``$SHARPFLOW_LEASE_DIR``, else ``<tmpdir>/sharpflow-gpu-leases-<uid>``."""
    env = os.environ.get(LEASE_DIR_ENV)
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"sharpflow-gpu-leases-{os.getuid()}"


def visible_device_ids(count: int) -> list[str]:
    """The ``count`` CUDA ids a process sees: the entries of ``CUDA_VISIBLE_DEVICES`` when it is
    set (ordinals or UUIDs, so a lock names a physical device), else ``"0"``..``"count-1"``."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return [str(i) for i in range(count)]
    ids = [s.strip() for s in env.split(",") if s.strip()]
    return ids[:count]


def lease_gpu(
    devices: int | Sequence[str],
    lease_dir: str | Path | None = None,
    *,
    timeout: float | None = None,
    log: Log | None = None,
) -> int:
    """Lease one free GPU for the life of this process; return its index in ``devices``.

    Args:
        devices: the number of GPUs (ids ``"0"``..``"n-1"``) or their CUDA ids.
        lease_dir: directory of lock files (default :func:`default_lease_dir`).
        timeout: seconds to wait while all are leased (default ``$SHARPFLOW_LEASE_TIMEOUT`` or
            600); 0 tries once.
        log: called once with a message if the wait begins.

    A process holds at most one lease per directory: asking again returns the same device.

    Raises:
        LeaseTimeout: no device came free within ``timeout``.
    """
    ids = [str(i) for i in range(devices)] if isinstance(devices, int) else [str(d) for d in devices]
    if not ids:
        raise ValueError("no GPU to lease: the device list is empty")
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate GPU ids in {ids}")
    root = _prepare_dir(lease_dir)
    held = _LEASES.get(root)
    if held is not None:
        if held.device_id not in ids:
            raise RuntimeError(f"this process already leases GPU {held.device_id} in {root}, which is not among {ids}")
        return ids.index(held.device_id)

    timeout = _timeout(timeout)
    deadline = time.monotonic() + timeout
    delay = 0.05
    waiting_said = False
    while True:
        for i, dev in enumerate(ids):
            path = root / f"gpu-{_safe(dev)}.lock"
            fd = _try_lock(path)
            if fd is not None:
                _LEASES[root] = Lease(index=i, device_id=dev, path=path, fd=fd)
                return i
        now = time.monotonic()
        if now >= deadline:
            holders = ", ".join(f"GPU {d}: pid {_holder(root / f'gpu-{_safe(d)}.lock')}" for d in ids)
            raise LeaseTimeout(
                f"all {len(ids)} GPU(s) stayed leased for {timeout:g} s (lease dir {root}; {holders}). "
                f"Run fewer GPU jobs at once (snakemake --resources gpu=N), raise "
                f"{LEASE_TIMEOUT_ENV}, or stop the holders."
            )
        if log is not None and not waiting_said:
            log(f"all {len(ids)} GPU(s) in {root} are leased; waiting up to {timeout:g} s for one")
            waiting_said = True
        # Backoff with jitter: waiting jobs neither spin nor retry in lockstep.
        time.sleep(min(delay * (1.0 + 0.25 * random.random()), deadline - now))
        delay = min(delay * 1.5, 2.0)


def release_gpu(lease_dir: str | Path | None = None) -> None:
    """Give back this process's lease in ``lease_dir`` (None: every lease it holds).

    Not needed at exit (the kernel releases the lock); for tests and hand-overs. Does not undo
    ``CUDA_VISIBLE_DEVICES``.
    """
    roots = list(_LEASES) if lease_dir is None else [Path(lease_dir).resolve()]
    for root in roots:
        lease = _LEASES.pop(root, None)
        _CHOSEN.pop(root, None)
        if lease is not None:
            # close, never LOCK_UN: a forked child closing its inherited copy must not drop the
            # parent's lock, and the flock goes when the last copy of the descriptor closes.
            os.close(lease.fd)


def choose_device(
    requested: str = "auto",
    *,
    lease_dir: str | Path | None = None,
    log: Log = print,
    timeout: float | None = None,
) -> torch.device:
    """The device this process should compute on, leasing and pinning a GPU when needed.

    Args:
        requested: ``"cpu"``; ``"cuda"`` (a GPU or an error); ``"auto"`` (a GPU if there is
            one, else the CPU); or ``"cuda:N"`` (that device, no lease: the caller's choice).
        lease_dir: lock-file directory (default :func:`default_lease_dir`).
        log: receives one-line messages (the CPU fallback is said once per process).
        timeout: seconds to wait for a free GPU (see :func:`lease_gpu`).

    Call it before anything starts CUDA (``torch.cuda.is_available()`` does): then the job is
    pinned with ``CUDA_VISIBLE_DEVICES`` and gets ``cuda:0``. If CUDA has started already, the
    variable is left alone and the leased device is returned as ``cuda:<index>``.

    Raises:
        ValueError: an unknown ``requested``.
        RuntimeError: ``"cuda"`` requested without CUDA.
        LeaseTimeout: no GPU came free in time.
    """
    global _said_cpu
    req = requested.strip().lower()
    if req == "cpu":
        return torch.device("cpu")
    if req not in ("auto", "cuda") and not re.fullmatch(r"cuda:\d+", req):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {requested!r}")

    fake = _fake_gpus()
    # device_count() asks NVML before CUDA is initialised, so counting does not start CUDA
    # and a CUDA_VISIBLE_DEVICES set afterwards still takes effect.
    count = fake if fake is not None else torch.cuda.device_count()
    if count == 0:
        if req != "auto":
            raise RuntimeError(
                f"device {requested!r} requested but CUDA is not available (no GPU visible; "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use 'auto' or 'cpu'"
            )
        if not _said_cpu:
            log("no CUDA device available: running on the CPU")
            _said_cpu = True
        return torch.device("cpu")

    if req.startswith("cuda:"):
        index = int(req.split(":")[1])
        if index >= count:
            raise RuntimeError(f"device {requested!r} requested but only {count} GPU(s) are visible")
        return torch.device("cpu") if fake is not None else torch.device(req)

    if os.environ.get("SLURM_JOB_ID"):
        # SLURM has already restricted CUDA_VISIBLE_DEVICES to this job's allocation.
        device = torch.device("cpu") if fake is not None else torch.device("cuda:0")
        log(f"SLURM job {os.environ['SLURM_JOB_ID']}: using its allocation as is, no lease; on {device}")
        return device

    root = _prepare_dir(lease_dir)
    if root in _CHOSEN:
        return _CHOSEN[root]
    ids = visible_device_ids(count)
    index = lease_gpu(ids, root, timeout=timeout, log=log)
    device = _pin(ids, index, fake=fake is not None, log=log)
    log(f"leased GPU {ids[index]} ({_LEASES[root].path}); computing on {device}")
    _CHOSEN[root] = device
    return device


def _pin(ids: list[str], index: int, *, fake: bool, log: Log) -> torch.device:
    """Make the leased GPU this process's only visible one if CUDA has not started yet."""
    if fake:
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[index]
        return torch.device("cpu")
    if not torch.cuda.is_initialized():
        previous = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[index]
        # Start CUDA now and check it saw the variable: a driver started earlier (e.g. by
        # torch.cuda.is_available()) keeps the devices it saw then, and cuda:0 would be wrong.
        torch.cuda.init()
        if torch.cuda.device_count() == 1:
            return torch.device("cuda:0")
        if previous is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous
        log("CUDA had started before the GPU was leased: CUDA_VISIBLE_DEVICES not applied")
    return torch.device(f"cuda:{index}")


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive flock on ``path``, or None if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    # Informational only: who holds it (the lock, not this text, is the lease).
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(path: Path) -> str:
    """The pid written in a lock file, or '?'."""
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


def _prepare_dir(lease_dir: str | Path | None) -> Path:
    """Create the lease directory; refuse a default one owned by another user."""
    root = Path(lease_dir) if lease_dir is not None else default_lease_dir()
    root.mkdir(parents=True, exist_ok=True, mode=0o700 if lease_dir is None else 0o777)
    root = root.resolve()
    if lease_dir is None and os.environ.get(LEASE_DIR_ENV) is None and root.stat().st_uid != os.getuid():
        raise RuntimeError(f"lease dir {root} belongs to another user; set {LEASE_DIR_ENV}")
    return root


def _safe(device_id: str) -> str:
    """A file-name-safe form of a CUDA id (ordinal, GPU-/MIG- UUID)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", device_id)


def _timeout(timeout: float | None) -> float:
    if timeout is None:
        env = os.environ.get(LEASE_TIMEOUT_ENV)
        try:
            timeout = float(env) if env else DEFAULT_LEASE_TIMEOUT_S
        except ValueError:
            raise ValueError(f"{LEASE_TIMEOUT_ENV} must be a number of seconds, got {env!r}") from None
    if not timeout >= 0:  # also rejects nan
        raise ValueError(f"lease timeout must be >= 0 seconds, got {timeout!r}")
    return timeout


def _fake_gpus() -> int | None:
    """``$SHARPFLOW_FAKE_GPUS`` as a count, or None when unset."""
    env = os.environ.get(FAKE_GPUS_ENV)
    if env is None or env == "":
        return None
    if not env.isdigit():
        raise ValueError(f"{FAKE_GPUS_ENV} must be a non-negative integer, got {env!r}")
    return int(env)
