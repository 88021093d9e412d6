"""Atomic writes and safe loads: no reader ever sees half a file, no load runs code.

Every output goes through :func:`atomic_path`: it is written to a temporary file in the same
directory, flushed and fsync'ed, then renamed over the target (``os.replace`` is atomic on
POSIX), and the directory entry is fsync'ed. On any error the temporary file is removed and
the previous target, if any, is left as it was. Files get the permissions a plain ``open``
would give them (the umask decides).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import SharpflowError


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _explain_oserror(err: OSError, path: Path) -> SharpflowError:
    if err.errno == errno.ENOSPC:
        why = "the disk is full"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied"
    else:
        why = err.strerror or str(err)
    return SharpflowError(f"cannot write {path}: {why}; the previous version (if any) is untouched")


def _new_temp(path: Path) -> Path:
    """An empty new file ``.{name}.{random}.tmp`` next to ``path``, created as ``open`` would
    (mode 0o666 less the umask; ``tempfile.mkstemp`` would make it 0o600)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | Path, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    ``durable`` also fsyncs the file and its directory, so the new version survives a power
    loss, not only a crash of the process; state that is cheap to recompute skips it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temp(path)
    except OSError as err:
        raise _explain_oserror(err, path) from None
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _explain_oserror(err, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> None:
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_parquet(path: str | Path, df: pd.DataFrame) -> None:
    """Write a DataFrame (index dropped) atomically."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a table; a missing, corrupt or wrongly-shaped file raises SharpflowError naming it."""
    path = Path(path)
    if not path.exists():
        raise SharpflowError(f"{path}: file not found")
    try:
        df = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise SharpflowError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from None
    if columns is not None:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise SharpflowError(f"{path}: missing columns {missing}; has {list(df.columns)}")
    return df


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """``np.savez`` atomically: uncompressed, byte-reproducible (zipfile stamps every member it
    opens by name with its fixed default date, 1980-01-01)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise SharpflowError(f"{path}: file not found") from None
    except Exception as err:
        raise SharpflowError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") from None


def save_torch(path: str | Path, obj: Any, *, durable: bool = True) -> None:
    """``torch.save`` atomically (state dicts, checkpoints, eigenvectors)."""
    import torch

    with atomic_path(path, durable=durable) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def load_torch(path: str | Path, *, required: tuple[str, ...] = (), what: str = "file") -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code.

    A missing, truncated or hostile file, or one without the ``required`` keys, raises
    SharpflowError naming the file.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.exists():
        raise SharpflowError(f"{path}: {what} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise SharpflowError(
            f"{path}: refused to load {what}: it holds objects other than tensors and plain data "
            f"(only weights_only=True loads are allowed) [{str(err).splitlines()[0]}]"
        ) from None
    except Exception as err:
        raise SharpflowError(
            f"{path}: {what} is corrupt or truncated ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    if not isinstance(obj, dict):
        raise SharpflowError(f"{path}: {what} should hold a dict, found {type(obj).__name__}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise SharpflowError(f"{path}: {what} lacks the keys {missing}")
    return obj


def publish(src: str | Path, dst: str | Path, *, touch: bool = False) -> None:
    """Make the file ``src`` appear at ``dst`` atomically: a hard link (no second copy on disk),
    else a copy. ``touch``: date it now (a result reused from a stash must look newer than the
    inputs it was computed from, as Snakemake expects of an output)."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    if touch:
        os.utime(tmp)
    os.replace(tmp, dst)


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
