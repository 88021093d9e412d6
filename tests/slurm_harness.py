"""A throwaway single-node SLURM cluster on this machine, for the SLURM tests.

``LocalSlurm(state_dir).start()`` makes a real one-node cluster:

1. installs ``slurm-wlm`` and ``munge`` with apt-get when a daemon or client is missing (only as
   root; ``SHARPFLOW_SLURM_INSTALL=0`` forbids installing);
2. writes ``slurm.conf`` into ``state_dir`` (free ports, no accounting database, one partition
   ``debug`` holding one node ``localhost``) and links ``/etc/slurm/slurm.conf`` to it;
3. starts ``munged`` unless one already answers, then ``slurmctld`` and ``slurmd``, and waits until
   the node is ``idle``.

``stop()`` cancels the cluster's jobs and stops exactly the daemons ``start()`` started, by PID
(SIGTERM, then SIGKILL after a grace period), and removes the ``/etc`` link. It is idempotent and
also runs at interpreter exit; daemons of a test run killed outright (no teardown) are stopped by
the next ``start()``, from a registry of PIDs and start times.

Whenever the cluster cannot come up (not root, no apt-get, apt fails, a foreign ``slurm.conf``,
another test cluster running, a daemon dies or never gets ready) ``start()`` cleans up and raises
:class:`SlurmUnavailable`, whose message is the reason a test reports when it skips.

Every external command runs with a timeout: with ``slurmctld`` down, a bare ``sinfo`` retries for
minutes. Use it as a context manager or call ``stop()`` in a ``finally``.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

#: Written as the first line of our slurm.conf; how a leftover /etc link is recognised as ours.
MARKER = "# sharpflow test cluster (tests/slurm_harness.py); safe to delete"
#: Where srun looks when SLURM_CONF is unset. The executor plugin's jobstep strips every SLURM_*
#: variable (SLURM_CONF included) before it calls srun inside a job, so our config must be here.
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
PARTITION = "debug"
NODE = "localhost"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel", "munge", "unmunge", "runuser")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")
#: Daemons of the running test cluster ("pid start-time name" lines): a later start() stops those
#: that a killed test run (SIGKILL, no teardown) left behind.
REGISTRY = Path(tempfile.gettempdir()) / "sharpflow-local-slurm.pids"


class SlurmUnavailable(RuntimeError):
    """The local cluster cannot be installed or started here; the message says why."""


def _run(cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None,
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, never longer than ``timeout`` seconds; a timeout or a missing binary → rc 124/127."""
    try:
        return subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, timeout=timeout,
                              env=env or _with_sbin(dict(os.environ)),
                              stdin=None if stdin is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        stderr = _text(err.stderr) + "\n(timed out)"
        return subprocess.CompletedProcess(list(cmd), 124, _text(err.stdout), stderr)
    except FileNotFoundError as err:
        return subprocess.CompletedProcess(list(cmd), 127, "", str(err))


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _with_sbin(env: dict[str, str]) -> dict[str, str]:
    """``env`` with /usr/sbin and /sbin on PATH (the daemons live there; a non-login shell may lack them)."""
    parts = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join([*parts, *(d for d in ("/usr/sbin", "/sbin") if d not in parts)])
    return env


def _missing_commands() -> list[str]:
    path = _with_sbin(dict(os.environ))["PATH"]
    return [c for c in (*DAEMONS, *CLIENTS) if shutil.which(c, path=path) is None]


def ensure_installed(timeout_s: float = 600) -> None:
    """Install slurm-wlm and munge with apt-get if anything is missing; SlurmUnavailable if that fails."""
    missing = _missing_commands()
    if not missing:
        return
    what = f"SLURM/munge commands missing ({', '.join(missing)})"
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"{what} and not root, so they cannot be installed")
    if os.environ.get("SHARPFLOW_SLURM_INSTALL", "1") == "0":
        raise SlurmUnavailable(f"{what} and SHARPFLOW_SLURM_INSTALL=0 forbids installing them")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{what} and there is no apt-get to install slurm-wlm and munge")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + timeout_s
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"]):
        res = _run(cmd, max(1.0, deadline - time.monotonic()), env=env)
        if res.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed (rc {res.returncode}):\n"
                                   f"{_tail(res.stdout + res.stderr)}")
    if missing := _missing_commands():
        raise SlurmUnavailable(f"still missing after apt-get install: {', '.join(missing)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node_hardware() -> str:
    """The node's hardware as slurm.conf wants it (CPUs, sockets, cores, threads, RealMemory in MB).

    From ``slurmd -C``, so that slurmd agrees with the config and the node does not drain as
    "Low CPUs"; memory is declared 10 % under the physical size for the same reason.
    """
    res = _run(["slurmd", "-C"], 20)
    fields: dict[str, str] = {}
    for line in res.stdout.splitlines():
        if line.startswith("NodeName="):
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    hw = {k: fields[k] for k in keep if k in fields}
    if "CPUs" not in hw:
        hw = {"CPUs": str(os.cpu_count() or 1)}
    mem_mb = int(fields.get("RealMemory", 0))
    if mem_mb <= 0:
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    hw["RealMemory"] = str(max(500, int(mem_mb * 0.9)))
    return " ".join(f"{k}={v}" for k, v in hw.items())


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie counts as dead (PID 1 here may never reap stopped daemons)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot: with the PID, it names one process for good."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19]
    except (OSError, IndexError):
        return ""


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class LocalSlurm:
    """A single-node SLURM cluster whose config, state and logs live in ``state_dir``."""

    def __init__(self, state_dir: str | Path, *, partition: str = PARTITION) -> None:
        self.state = Path(state_dir).resolve()
        self.partition = partition
        self.conf = self.state / "slurm.conf"
        self.logs = self.state / "log"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._munged_pid: int | None = None
        self._linked = False
        self._lock: int | None = None
        self._stopped = True

    # ------------------------------------------------------------------------------ public
    @property
    def env(self) -> dict[str, str]:
        """The environment for SLURM clients (sbatch, squeue, snakemake's executor) on this cluster."""
        return _with_sbin({**os.environ, "SLURM_CONF": str(self.conf)})

    def start(self, timeout_s: float = 60, install_timeout_s: float = 600) -> LocalSlurm:
        """Install if needed, start the daemons, wait for an idle node. Raises SlurmUnavailable."""
        if os.geteuid() != 0:
            raise SlurmUnavailable("a local SLURM needs root (slurmd and munged run as system users)")
        ensure_installed(install_timeout_s)
        self._stopped = False
        atexit.register(self.stop)
        try:
            self._take_lock()
            self._stop_leftovers(grace_s=10)
            self._write_conf()
            self._start_munge(timeout_s)
            deadline = time.monotonic() + timeout_s
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._wait(deadline, "slurmctld to answer `scontrol ping`", "slurmctld",
                       lambda: "UP" in self.client(["scontrol", "ping"], 3).stdout)
            self._spawn("slurmd", ["slurmd", "-D", "-N", NODE, "-f", str(self.conf)])
            self._wait(deadline, "the node to become idle", "slurmd",
                       lambda: self.client(["sinfo", "-h", "-o", "%T"], 3).stdout.strip() == "idle")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace_s: float = 10) -> None:
        """Cancel all jobs, stop the daemons this object started, unlink /etc/slurm/slurm.conf."""
        if self._stopped:
            return
        self._stopped = True
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            ids = self.client(["squeue", "-h", "-o", "%i"], 5).stdout.split()
            if ids:
                self.client(["scancel", *ids], 5)
                end = time.monotonic() + 5
                busy = ["squeue", "-h", "-t", "R,CG", "-o", "%i"]
                while time.monotonic() < end and self.client(busy, 3).stdout.strip():
                    time.sleep(0.2)
        # slurmd first: a slurmd whose controller is gone sits in a registration back-off.
        for name in ("slurmd", "slurmctld"):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    proc.kill()  # observed: slurmd in its registration back-off ignores SIGTERM
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(5)
        if self._munged_pid is not None:
            _terminate(self._munged_pid, _start_time(self._munged_pid), grace_s)
            self._munged_pid = None
        if self._linked:
            with contextlib.suppress(OSError):
                if SYSTEM_CONF.is_symlink() and Path(os.readlink(SYSTEM_CONF)) == self.conf:
                    SYSTEM_CONF.unlink()
            self._linked = False
        if self._lock is not None:  # only the lock holder owns the registry
            with contextlib.suppress(OSError):
                REGISTRY.unlink()
            os.close(self._lock)  # releases the flock
            self._lock = None
        atexit.unregister(self.stop)

    def client(self, cmd: Sequence[str], timeout: float = 10) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command against this cluster (bounded by ``timeout`` seconds)."""
        return _run(cmd, timeout, env=self.env)

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld remembers (finished ones for MinJobAge = 300 s): id, name, comment, state."""
        out = self.client(["squeue", "--states=all", "-h", "-o", "%i|%j|%k|%T"], 10).stdout
        keys = ("id", "name", "comment", "state")
        rows = [line.split("|", 3) for line in out.splitlines() if line.count("|") == 3]
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for path in sorted(self.logs.glob("*")):
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name}\n{_tail(path.read_text(errors='replace'), lines)}")
        return "\n".join(parts)

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------------------- private
    def _take_lock(self) -> None:
        # /etc/slurm/slurm.conf is machine-wide, so only one test cluster may run at a time.
        lock = Path(tempfile.gettempdir()) / "sharpflow-local-slurm.lock"
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SlurmUnavailable("another local SLURM test cluster is running on this machine") from None
        self._lock = fd

    def _write_conf(self) -> None:
        if SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink():
            if not self._leftover_link():
                raise SlurmUnavailable(f"{SYSTEM_CONF} exists and is not ours (a real SLURM install?); "
                                       "not touching it")
            SYSTEM_CONF.unlink()  # a leftover of an earlier run that could not clean up
        for sub in ("ctld", "d", "log"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        s = self.state
        self.conf.write_text(f"""{MARKER}
ClusterName=sharpflowtest
SlurmctldHost={NODE}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without it a job that gives no --mem gets the whole node, and jobs run one at a time.
DefMemPerCPU=100
SchedulerType=sched/backfill
ReturnToService=2
# Finished jobs stay visible to `squeue --states=all` this long (seconds): the plugin's squeue
# status checks and the tests rely on it, as there is no accounting database for sacct.
MinJobAge=300
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation={s}/ctld
SlurmdSpoolDir={s}/d
SlurmctldPidFile={s}/slurmctld.pid
SlurmdPidFile={s}/slurmd.pid
SlurmctldLogFile={s}/log/slurmctld.log
SlurmdLogFile={s}/log/slurmd.log
NodeName={NODE} NodeAddr=127.0.0.1 {_node_hardware()} State=UNKNOWN
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_CONF.symlink_to(self.conf)
        self._linked = True

    @staticmethod
    def _leftover_link() -> bool:
        """Whether /etc/slurm/slurm.conf is a link an earlier test cluster left behind (safe to replace)."""
        if not SYSTEM_CONF.is_symlink():
            return False
        if SYSTEM_CONF.exists():
            return SYSTEM_CONF.read_text(errors="replace").startswith(MARKER)
        # Dangling: ours only if it pointed into the temp dir (a real site's link may be an unmounted share).
        target = Path(os.readlink(SYSTEM_CONF))
        return target.name == "slurm.conf" and target.is_relative_to(tempfile.gettempdir())

    def _munge_ok(self) -> bool:
        cred = _run(["munge", "-n"], 5)
        return cred.returncode == 0 and _run(["unmunge"], 5, stdin=cred.stdout).returncode == 0

    def _start_munge(self, timeout_s: float) -> None:
        if self._munge_ok():
            return  # a running munged (the system's or another test's) serves us; leave it alone
        if not MUNGE_KEY.exists():
            res = _run(["mungekey", "--create", f"--keyfile={MUNGE_KEY}"], 20)
            if res.returncode != 0:
                raise SlurmUnavailable(f"cannot create {MUNGE_KEY}: {_tail(res.stderr)}")
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        MUNGE_RUN.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_RUN, "munge", "munge")
        MUNGE_RUN.chmod(0o755)
        pidfile = MUNGE_RUN / "munged.pid"
        with contextlib.suppress(OSError):
            pidfile.unlink()
        res = _run(["runuser", "-u", "munge", "--", "munged"], 20)  # forks into the background
        if res.returncode != 0:
            raise SlurmUnavailable(f"munged failed to start: {_tail(res.stdout + res.stderr)}")
        deadline = time.monotonic() + timeout_s
        while not self._munge_ok():
            if time.monotonic() > deadline:
                raise SlurmUnavailable("munged started but `munge -n | unmunge` never succeeded")
            time.sleep(0.2)
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            if _comm(pid) == "munged":
                self._munged_pid = pid
                self._register()

    def _spawn(self, name: str, cmd: list[str]) -> None:
        # A plain Popen of the daemon itself (no shell in between), so we hold its real PID.
        with open(self.logs / f"{name}.out", "ab") as out:
            self._procs[name] = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True)
        self._register()

    def _wait(self, deadline: float, what: str, daemon: str, ready: Callable[[], bool]) -> None:
        while not ready():
            proc = self._procs[daemon]
            if proc.poll() is not None:
                raise SlurmUnavailable(f"{daemon} exited (rc {proc.returncode}) while waiting for {what}:\n"
                                       f"{self.log_tail()}")
            if time.monotonic() > deadline:
                state = self.client(["sinfo", "-h", "-o", "%T %E"], 3).stdout.strip()
                raise SlurmUnavailable(f"timed out waiting for {what} (sinfo: {state!r}):\n{self.log_tail()}")
            time.sleep(0.2)

    def _register(self) -> None:
        lines = [f"{p.pid} {_start_time(p.pid)} {name}" for name, p in self._procs.items()]
        if self._munged_pid is not None:
            lines.append(f"{self._munged_pid} {_start_time(self._munged_pid)} munged")
        REGISTRY.write_text("\n".join(lines) + "\n")

    @staticmethod
    def _stop_leftovers(grace_s: float) -> None:
        """Stop the daemons of an earlier test cluster whose run died without teardown (we hold the lock)."""
        with contextlib.suppress(OSError, ValueError):
            for line in REGISTRY.read_text().splitlines():
                pid, start, name = line.split()
                if name in DAEMONS and _comm(int(pid)) == name:
                    _terminate(int(pid), start, grace_s)
            REGISTRY.unlink()


def _terminate(pid: int, start: str, grace_s: float) -> None:
    """SIGTERM a daemon we started but may not parent (munged forks), SIGKILL it after ``grace_s``.

    ``start`` (its start time) guards against a recycled PID: another process is never signalled.
    """
    if not start or _start_time(pid) != start or not _alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + grace_s
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.1)
    if _alive(pid) and _start_time(pid) == start:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
