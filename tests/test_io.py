"""Atomic writes and safe loads: partial files never appear; hostile or corrupt files are refused."""

from __future__ import annotations

import os
import pickle
import threading

import numpy as np
import pandas as pd
import pytest
import torch

from sharpflow.io import (
    SharpflowError,
    atomic_path,
    load_torch,
    read_npz,
    read_parquet,
    save_torch,
    write_npz,
    write_parquet,
)


def test_atomic_write_failure_keeps_previous(tmp_path):
    target = tmp_path / "t.parquet"
    write_parquet(target, pd.DataFrame({"a": [1, 2]}))
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert read_parquet(target)["a"].tolist() == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]  # no temp file left


def test_permission_denied_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        # root ignores directory permissions: simulate with a read-only target directory via a file
        blocker = tmp_path / "notadir"
        blocker.write_text("x")
        with pytest.raises(SharpflowError, match="cannot write"):
            write_parquet(blocker / "t.parquet", pd.DataFrame({"a": [1]}))
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(SharpflowError, match="permission denied"):
        write_parquet(ro / "t.parquet", pd.DataFrame({"a": [1]}))


def test_disk_full_is_a_clear_error_and_previous_intact(tmp_path, monkeypatch):
    import errno

    target = tmp_path / "x.npz"
    write_npz(target, a=np.arange(3))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(SharpflowError, match="disk is full"):
        write_npz(target, a=np.arange(5))
    monkeypatch.undo()
    assert read_npz(target)["a"].tolist() == [0, 1, 2]
    assert len(list(tmp_path.iterdir())) == 1


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/sharpflow_pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"model": _Evil()}, fh)
    with pytest.raises(SharpflowError, match=r"refused|corrupt"):
        load_torch(path, what="checkpoint")
    torch.save({"model": _Evil()}, path)
    with pytest.raises(SharpflowError, match="refused"):
        load_torch(path, what="checkpoint")
    assert not os.path.exists("/tmp/sharpflow_pwned")


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "c.pt"
    save_torch(path, {"model": {"w": torch.ones(1000)}, "step": 1})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SharpflowError, match=r"c\.pt.*corrupt or truncated"):
        load_torch(path, what="checkpoint")
    with pytest.raises(SharpflowError, match="not found"):
        load_torch(tmp_path / "none.pt")
    save_torch(path, {"model": {}})
    with pytest.raises(SharpflowError, match=r"lacks the keys \['step'\]"):
        load_torch(path, required=("model", "step"))
    pq = tmp_path / "t.parquet"
    pq.write_bytes(b"PAR1 not really")
    with pytest.raises(SharpflowError, match="not a readable Parquet"):
        read_parquet(pq)
    write_parquet(pq, pd.DataFrame({"a": [1]}))
    with pytest.raises(SharpflowError, match=r"missing columns \['b'\]"):
        read_parquet(pq, columns=["a", "b"])


def test_reader_racing_a_writer_never_sees_partial_file(tmp_path):
    target = tmp_path / "race.parquet"
    frames = [pd.DataFrame({"x": np.full(20000, i)}) for i in range(2)]
    write_parquet(target, frames[0])
    stop = threading.Event()
    seen: list[int] = []
    errors: list[Exception] = []

    def reader():
        while not stop.is_set():
            try:
                df = pd.read_parquet(target)
                assert len(df) == 20000
                seen.append(int(df["x"].iloc[0]))
            except Exception as err:  # any failure is a partial read
                errors.append(err)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(30):
        write_parquet(target, frames[i % 2])
    stop.set()
    t.join()
    assert not errors
    assert seen


def test_write_npz_is_byte_reproducible(tmp_path, monkeypatch):
    """Prepared data relies on it: the same arrays give the same bytes whenever they are written."""
    import time
    import zipfile

    arrays = {"x": np.arange(6.0, dtype=np.float32).reshape(2, 3), "y": np.arange(2), "s": np.asarray(1.5)}
    write_npz(tmp_path / "a.npz", **arrays)
    monkeypatch.setattr(time, "time", lambda: 2.0e9)  # written on another day
    write_npz(tmp_path / "b.npz", **arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.npz") as zf:
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_outputs_get_the_permissions_of_a_plain_open(tmp_path):
    (tmp_path / "plain").write_bytes(b"")
    write_npz(tmp_path / "a.npz", a=np.arange(3))
    write_parquet(tmp_path / "t.parquet", pd.DataFrame({"a": [1]}))
    mode = (tmp_path / "plain").stat().st_mode
    assert (tmp_path / "a.npz").stat().st_mode == mode
    assert (tmp_path / "t.parquet").stat().st_mode == mode
