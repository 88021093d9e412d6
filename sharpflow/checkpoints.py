"""Checkpoints: their names, their loading, and the writer that dumps them during training.

A checkpoint ``checkpoints/step{step:08d}.pt`` holds the weights after ``step`` updates and
:data:`CKPT_KEYS`; every stage after training reads it with :func:`load_checkpoint` and
:func:`restore_model`. Optional keys (a reader uses ``.get``; older checkpoints lack the newer ones):

- ``precond``: Adam's and AdamW's preconditioner sqrt(v̂) + ε, flat (the ``precond`` analysis);
- ``last_update``: Δθ = θ_step − θ_{step−1}, the update that produced these weights, a flat float32
  CPU tensor in the order of :func:`sharpflow.params.flat_params` (the trainable parameters). Present
  only where an update led to the step: not at step 0, nor in the checkpoints that training writes
  after a divergence or an early stop for steps it never reached, nor in ``best.pt`` (the
  ``selfstab`` analysis reads it). Checkpoints written before it existed lack it.

:class:`CheckpointWriter` is training's side: each dump is first written into ``.resume/``
(outside Snakemake's declared outputs, which Snakemake deletes when a job fails) together with
the optimiser state and the metrics rows since the previous dump, then hard-linked to its
declared place. A rerun after a crash starts from the newest complete resume state and relinks
the checkpoints before it. The files are serialised on the training thread (a snapshot) and
written, fsynced and published in order by one background thread, so disk latency overlaps the
next steps.
"""

from __future__ import annotations

import io
import json
import queue
import shutil
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import BEST_NAME, FORMAT_VERSION, RunConfig
from .errors import SharpflowError
from .io import load_torch, publish, write_bytes
from .models import build_model

CKPT_KEYS = ("model", "step", "epoch", "status", "run", "format", "lr")


def ckpt_name(step: int) -> str:
    return f"step{step:08d}.pt"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`sharpflow.train.train` (weights only; a clear error if unusable)."""
    return load_torch(path, required=CKPT_KEYS, what="checkpoint")


def restore_model(ckpt: dict[str, Any], run: RunConfig, data: Any, path: str | Path) -> nn.Module:
    """Build the run's model and load the checkpoint's weights into it."""
    torch.manual_seed(0)
    model = build_model(run.model, tuple(data.input_shape), data.num_classes)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SharpflowError(f"{path}: the checkpoint does not match model {run.model.name!r}: {first}") from None
    return model


# --------------------------------------------------------------------------- training's writer
class _Stash:
    """Checkpoints and resume state under ``{run_dir}/.resume`` (not a Snakemake output).

    ``state.pt`` (optimizer, schedule, wall clock, status at the newest dump) points at a stashed
    checkpoint, which holds the weights; ``rows/step{N}.json`` hold the metrics rows recorded up
    to dump N since the dump before it, so a dump costs the same at step 100 as at step 100,000.
    """

    def __init__(self, run_dir: Path, digest: str):
        self.dir = run_dir / ".resume"
        self.digest = digest

    def checkpoint(self, step: int) -> Path:
        return self.dir / "checkpoints" / ckpt_name(step)

    def rows(self, step: int) -> Path:
        return self.dir / "rows" / f"step{step:08d}.json"

    def state(self) -> Path:
        return self.dir / "state.pt"

    def load(self) -> dict[str, Any] | None:
        path = self.state()
        if not path.exists():
            return None
        try:
            state = load_torch(path, required=("digest", "step", "optimizer", "dumps"), what="resume state")
            if state["digest"] != self.digest:
                return None  # the run's config changed: start afresh
            # the weights live in the stashed checkpoints, not twice on disk
            state["model"] = load_torch(self.checkpoint(int(state["step"])), required=("model",))["model"]
            state["model0"] = load_torch(self.checkpoint(0), required=("model",))["model"]
            rows: list[dict[str, Any]] = []
            for s in state["dumps"]:
                chunk = self.rows(int(s))
                try:
                    rows.extend(json.loads(chunk.read_text()))
                except (OSError, ValueError):
                    return None  # a lost or torn chunk only costs a restart
            state["rows"] = rows
        except SharpflowError:
            return None  # an unreadable resume state only costs a restart
        return state

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class _Writer:
    """One background thread that runs file writes in the order they were submitted.

    Training submits a dump as closures over bytes already serialised (a snapshot of the
    weights), so it goes on with the next steps while the files are written and fsynced. A
    failed write is re-raised on the training thread at the next submit or at :meth:`close`;
    the jobs after it are skipped, so nothing is published that rests on a missing file.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._failed = False  # sticky: once a write failed, every later job is skipped
        self._raised = False
        self._thread: threading.Thread | None = None

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if not self._failed:
                try:
                    job()
                except BaseException as err:  # handed to the training thread
                    self._error = err
                    self._failed = True

    def _raise(self) -> None:
        if self._failed and not self._raised:
            self._raised = True
            assert self._error is not None
            raise self._error

    def submit(self, job: Callable[[], None]) -> None:
        self._raise()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="sharpflow-checkpoints", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait for every submitted write; raise the first failure unless ``raise_errors`` is False."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        if raise_errors:
            self._raise()


def _serialise(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _checkpoint(model: nn.Module, step: int, epoch: float, status: str, run_name: str, lr: float) -> dict[str, Any]:
    """The contents of a checkpoint file (:data:`CKPT_KEYS`)."""
    return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "step": step, "epoch": epoch,
            "status": status, "run": run_name, "format": FORMAT_VERSION["train"], "lr": float(lr)}


class CheckpointWriter:
    """The checkpoints and resume state of one run in ``run_dir`` (see the module docstring).

    :meth:`resume` or :meth:`start_afresh` first; then :meth:`dump` at each scheduled step;
    :meth:`close` waits for the writes (always call it, also on errors); :meth:`clear` drops the
    resume state once the run's outputs are complete.
    """

    def __init__(self, run_dir: Path, digest: str):
        self.dir = run_dir / "checkpoints"
        self.stash = _Stash(run_dir, digest)
        self.dumps: list[int] = []  # the steps dumped so far, each with its rows chunk in the stash
        self._writer = _Writer()

    @property
    def last_dumped(self) -> int:
        """The step of the newest dump, -1 before the first."""
        return self.dumps[-1] if self.dumps else -1

    def resume(self, steps: Iterable[int]) -> dict[str, Any] | None:
        """The newest complete resume state, or None; its stashed checkpoints among ``steps``
        are published again (Snakemake deleted them when the job failed)."""
        state = self.stash.load()
        if state is None:
            return None
        self.dumps = [int(s) for s in state["dumps"]]
        start = int(state["step"])
        for s in steps:
            if s <= start and self.stash.checkpoint(s).exists():
                publish(self.stash.checkpoint(s), self.dir / ckpt_name(s))
        return state

    def start_afresh(self) -> None:
        """Remove the checkpoints of an earlier attempt."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def dump(
        self, step: int, *, model: nn.Module, epoch: float, status: str, run_name: str,
        optimizer: torch.optim.Optimizer, schedule: dict[str, float], rows: list[dict[str, Any]], wall_s: float,
        lr: float, best: dict[str, Any] | None = None, precond: torch.Tensor | None = None,
        last_update: torch.Tensor | None = None,
    ) -> None:
        """Checkpoint + resume state for ``step`` (weights after ``step`` updates; ``lr`` is the
        learning rate in force there, the one the next update uses). ``precond`` and ``last_update``
        (optional keys of the checkpoint, see the module docstring) are stored as given.

        ``rows`` are the metrics rows since the previous dump. Serialised here, written by the
        background thread: the checkpoint (fsynced), the rows, the resume state that names both,
        then the published link.
        """
        self.dumps.append(step)
        content = _checkpoint(model, step, epoch, status, run_name, lr)
        if precond is not None:
            content["precond"] = precond  # Adam's sqrt(v̂) + ε, flat (the precond analysis reads it)
        if last_update is not None:
            content["last_update"] = last_update  # θ_step − θ_{step−1}, flat (the selfstab analysis reads it)
        ck = _serialise(content)
        chunk = json.dumps(rows).encode()
        st = _serialise({"digest": self.stash.digest, "step": step, "optimizer": optimizer.state_dict(),
                         "schedule": dict(schedule), "dumps": list(self.dumps), "wall_s": wall_s, "status": status,
                         "best": best})
        ck_path, rows_path, st_path = self.stash.checkpoint(step), self.stash.rows(step), self.stash.state()
        published = self.dir / ckpt_name(step)

        def write() -> None:
            write_bytes(ck_path, ck)
            write_bytes(rows_path, chunk, durable=False)
            write_bytes(st_path, st, durable=False)
            publish(ck_path, published)

        self._writer.submit(write)

    def dump_best(self, step: int, *, model: nn.Module, epoch: float, run_name: str, lr: float) -> None:
        """``checkpoints/best.pt``: the best-validation weights (a checkpoint of ``step``, status "ok"),
        written once at the end of training, atomically."""
        ck = _serialise({**_checkpoint(model, step, epoch, "ok", run_name, lr), "best": True})
        self._writer.submit(lambda: write_bytes(self.dir / BEST_NAME, ck))

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait for every submitted write; raise the first failure unless ``raise_errors`` is False."""
        self._writer.close(raise_errors=raise_errors)

    def clear(self) -> None:
        """Drop the resume state."""
        self.stash.clear()


__all__ = ["BEST_NAME", "CKPT_KEYS", "CheckpointWriter", "ckpt_name", "load_checkpoint", "restore_model"]
