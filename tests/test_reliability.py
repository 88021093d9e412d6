"""Faults and bad input, stage by stage: one clear error naming the file or field, exit status
non-zero, nothing half-written; diverged runs flow through every stage."""

from __future__ import annotations

import errno
import json
import math
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sharpflow.analyses.project import ProjectConfig
from sharpflow.analyses.stage import analysis_stage, spectrum_stage
from sharpflow.cli import main
from sharpflow.config import SpectrumConfig, dump_json
from sharpflow.errors import ConfigError
from sharpflow.study import parse_config
from sharpflow.train import train

from .conftest import tiny_run

BIN = Path(sys.executable).parent
SPEC = SpectrumConfig(k=3, frobenius_probes=2)
PROJ = ProjectConfig(k=2, alignment_batches=3, grad_batches=2, subset=64, cross_directions=[1, 2],
                     multipliers=[0.5, 1, 2])


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data, tiny_dataset):
    out = tmp_path_factory.mktemp("run")
    run = tiny_run()
    train(run, tiny_dataset, run_name="r", data_dir=tiny_data, out_dir=out, progress=False, log=_quiet)
    return run, out


def _spectrum_args(run, data, ck, out: Path) -> list[str]:
    return ["spectrum", "--no-progress", "--spectrum", dump_json(SPEC), "--run", dump_json(run), "--run-name", "r",
            "--data", str(data), "--checkpoint", str(ck), "--out-table", str(out / "s.parquet"),
            "--out-eigvecs", str(out / "e.pt"), "--device", "cpu"]


def _expect_error(capsys, args, *needles) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(r"^sharpflow \w+: error: ", err, re.M), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_truncated_checkpoint_is_named_and_nothing_written(trained, tiny_data, tmp_path, capsys):
    run, out = trained
    ck = tmp_path / "step00000016.pt"
    data = (out / "checkpoints" / "step00000016.pt").read_bytes()
    ck.write_bytes(data[: len(data) // 3])
    _expect_error(capsys, _spectrum_args(run, tiny_data, ck, tmp_path), str(ck), "truncated")
    assert not (tmp_path / "s.parquet").exists() and not (tmp_path / "e.pt").exists()


def test_missing_checkpoint(trained, tiny_data, tmp_path, capsys):
    run, _ = trained
    _expect_error(capsys, _spectrum_args(run, tiny_data, tmp_path / "nope.pt", tmp_path), "nope.pt", "not found")


def test_checkpoint_with_wrong_keys(trained, tiny_data, tmp_path, capsys):
    run, out = trained
    ck = torch.load(out / "checkpoints" / "step00000016.pt", weights_only=True)
    bad = tmp_path / "extra.pt"
    model = dict(ck["model"])
    model["intruder.weight"] = torch.zeros(3)
    torch.save({**ck, "model": model}, bad)
    _expect_error(capsys, _spectrum_args(run, tiny_data, bad, tmp_path), "extra.pt", "does not match model")
    missing = tmp_path / "missing.pt"
    torch.save({k: v for k, v in ck.items() if k != "step"}, missing)
    _expect_error(capsys, _spectrum_args(run, tiny_data, missing, tmp_path), "missing.pt", "'step'")


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/sharpflow-hostile-ran",))


def test_hostile_pickle_is_refused(trained, tiny_data, tmp_path, capsys):
    run, _ = trained
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Payload(), "step": 0}, evil)
    _expect_error(capsys, _spectrum_args(run, tiny_data, evil, tmp_path), "evil.pt", "refused")
    assert not Path("/tmp/sharpflow-hostile-ran").exists()


def test_dataset_with_bad_checksum(trained, tiny_data, tmp_path, capsys):
    import shutil

    run, out = trained
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    meta = json.loads((data / "meta.json").read_text())
    (data / "test.npz").write_bytes((data / "test.npz").read_bytes()[:-10] + b"0123456789")
    _expect_error(capsys, _spectrum_args(run, data, out / "checkpoints" / "step00000000.pt", tmp_path), "test.npz")
    assert meta  # the meta was there: the failure is the checksum, not a missing directory


def test_aggregate_refuses_a_wrong_schema(tmp_path, capsys):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pd.DataFrame({"step": [0], "x": [1.0]}).to_parquet(a)
    pd.DataFrame({"step": [1], "y": [1.0]}).to_parquet(b)
    _expect_error(capsys, ["aggregate", "--out", str(tmp_path / "o.parquet"), str(a), str(b)], "b.parquet", "columns")
    assert not (tmp_path / "o.parquet").exists()


def test_bad_json_config_on_the_command_line(trained, tiny_data, tmp_path, capsys):
    run, out = trained
    args = _spectrum_args(run, tiny_data, out / "checkpoints" / "step00000000.pt", tmp_path)
    args[args.index("--spectrum") + 1] = json.dumps({"k": -1})
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert "--spectrum: k: Input should be greater than 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("runs", "needle"),
    [
        ("[", "--runs: not valid JSON"),
        ("[]", "expected a non-empty JSON list"),
        ('[{"run": {}}]', "--runs[0]: expected an object with keys"),
        ('[{"run": {}, "run_name": "r", "spectrum": {}, "analyses": {}, "data": "d", "chain_starts": [0], '
         '"checkpoints": []}]', "--runs[r].run: "),
    ],
)
def test_bad_runs_list_of_a_grouped_job(tmp_path, capsys, runs, needle):
    with pytest.raises(SystemExit) as info:
        main(["analyse-runs", "--runs", runs, "--results", str(tmp_path)])
    assert info.value.code == 2
    assert needle in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_disk_full_keeps_previous_outputs(trained, tiny_data, tmp_path, capsys, monkeypatch):
    run, out = trained
    args = _spectrum_args(run, tiny_data, out / "checkpoints" / "step00000016.pt", tmp_path)
    assert main(args) == 0
    before = (tmp_path / "s.parquet").read_bytes()
    real_replace = os.replace

    def full(src, dst, *a, **k):
        if str(dst).endswith(".parquet"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full)
    _expect_error(capsys, args, "s.parquet", "disk is full")
    monkeypatch.undo()
    assert (tmp_path / "s.parquet").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_diverged_run_flows_through_spectrum_and_project(tiny_data, tiny_dataset, tmp_path):
    run = tiny_run(optimizer__lr=1e4)
    out = tmp_path / "run"
    train(run, tiny_dataset, run_name="d", data_dir=tiny_data, out_dir=out, progress=False, log=_quiet)
    ck = out / "checkpoints" / "step00000040.pt"
    df = spectrum_stage(SPEC, run, run_name="d", data_dir=tiny_data, checkpoint=ck, previous=None,
                        out_table=tmp_path / "s.parquet", out_eigvecs=tmp_path / "e.pt", log=_quiet)
    assert (df.status == "diverged").all() and df.eigenvalue.isna().all() and len(df) == 3
    tables = analysis_stage("project", PROJ, run, run_name="d", data_dir=tiny_data, checkpoint=ck,
                            eigvecs=tmp_path / "e.pt", out_dir=tmp_path / "p", log=_quiet)
    for kind, t in tables.items():
        assert len(t), kind
        assert (t.status == "diverged").all(), kind
        assert (tmp_path / "p" / kind / "step00000040.parquet").exists()


def test_unconverged_solve_is_reported_not_hidden(trained, tiny_data, tmp_path):
    run, out = trained
    cfg = SpectrumConfig(k=3, tol=1e-9, max_matvecs=6)
    with pytest.warns(RuntimeWarning, match="max_matvecs"):
        df = spectrum_stage(cfg, run, run_name="r", data_dir=tiny_data,
                            checkpoint=out / "checkpoints" / "step00000016.pt", previous=None,
                            out_table=tmp_path / "s.parquet", out_eigvecs=tmp_path / "e.pt", log=_quiet)
    assert not df.converged.all()
    assert df.residual.notna().all() and (df.residual > 0).all()


_STALL = """
import os, time
from pathlib import Path
import sharpflow.hessian as h
_inner, _calls = h.HessianOperator.matvec, [0]
def _matvec(self, v):
    _calls[0] += 1
    if _calls[0] == 5:  # well inside the solve: say so, then hang until killed
        Path(os.environ["SHARPFLOW_TEST_STALLED"]).touch()
        time.sleep(600)
    return _inner(self, v)
h.HessianOperator.matvec = _matvec
"""


def test_spectrum_killed_mid_solve_leaves_nothing_and_reruns_identically(trained, tiny_data, tmp_path):
    run, out = trained
    ck = out / "checkpoints" / "step00000016.pt"
    # A sitecustomize in the child makes its 5th Hessian product hang after touching a marker, so
    # the kill lands mid-solve however fast the machine is (a sleep-then-kill test raced on CI).
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_STALL)
    marker = hook / "stalled"
    env = {**os.environ, "PYTHONPATH": str(hook), "SHARPFLOW_TEST_STALLED": str(marker)}
    args = ["spectrum", "--spectrum", dump_json(SpectrumConfig(k=3)), "--run", dump_json(run), "--run-name", "r",
            "--data", str(tiny_data), "--checkpoint", str(ck), "--out-table", str(tmp_path / "s.parquet"),
            "--out-eigvecs", str(tmp_path / "e.pt"), "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen([str(BIN / "sharpflow"), *args], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, f"the stage ended before it was killed: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "the stage never reached its 5th Hessian product"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "s.parquet").exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name not in ("s.parquet", "e.pt", "hook")]
    assert all(p.name.endswith(".tmp") for p in leftovers)  # only ever temp files, never a partial output
    quick = SpectrumConfig(k=3)
    for target in ("a", "b"):
        spectrum_stage(quick, run, run_name="r", data_dir=tiny_data, checkpoint=ck, previous=None,
                       out_table=tmp_path / f"{target}.parquet", out_eigvecs=tmp_path / f"{target}.pt", log=_quiet)
    a, b = pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "b.parquet")
    pd.testing.assert_series_equal(a.eigenvalue, b.eigenvalue)


def test_corrupt_resume_state_restarts_cleanly(tiny_data, tiny_dataset, tmp_path):
    run = tiny_run()
    ref = train(run, tiny_dataset, run_name="r", data_dir=tiny_data, out_dir=tmp_path / "ref", progress=False,
                log=_quiet)
    out = tmp_path / "x"
    train(run, tiny_dataset, run_name="r", data_dir=tiny_data, out_dir=out, progress=False, log=_quiet, stop_after=20)
    state = out / ".resume" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    again = train(run, tiny_dataset, run_name="r", data_dir=tiny_data, out_dir=out, progress=False, log=_quiet)
    cols = ["step", "split", "loss", "accuracy"]
    pd.testing.assert_frame_equal(ref[cols], again[cols])


# ------------------------------------------------------------------------------- config fuzzing
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
_values = st.recursive(_scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                     st.dictionaries(st.text(max_size=8), c, max_size=3)),
                       max_leaves=8)
_FIELDS = ["datasets", "defaults", "studies", "spectrum", "project", "figures", "results", "resources"]


def _valid() -> dict:
    return {
        "datasets": {"d": {"source": "mnist1d"}},
        "defaults": {"dataset": "d", "model": {"name": "mlp"}, "steps": 10},
        "studies": {"s": {"sweep": {"optimizer.lr": [0.1]}}},
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(_FIELDS), value=_values)
def test_fuzzed_top_level_fields_fail_cleanly(field, value):
    raw = _valid()
    raw[field] = value
    try:
        cfg = parse_config(raw, "fuzz.yaml")
    except ConfigError as err:
        msg = str(err)
        assert msg.startswith("fuzz.yaml: ") and "\n" not in msg
    else:
        assert cfg.studies


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(["optimizer.lr", "optimizer.batch_size", "steps", "seed", "model.name",
                             "optimizer.momentum", "checkpoints.zoom_every", "dataset", "model"]),
       value=_values)
def test_fuzzed_sweep_values_fail_cleanly(path, value):
    raw = _valid()
    raw["studies"]["s"]["sweep"] = {path: [value]}
    try:
        cfg = parse_config(raw, "fuzz.yaml")
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).startswith("fuzz.yaml: ")
    else:
        for run in cfg.studies:
            assert run


@settings(max_examples=100, deadline=None)
@given(name=st.text(min_size=1, max_size=20))
def test_fuzzed_study_names_never_escape_results(name):
    raw = _valid()
    raw["studies"] = {name: {}}
    try:
        cfg = parse_config(raw, "fuzz.yaml")
    except ConfigError:
        return
    from sharpflow.study import expand_runs

    for run in expand_runs(cfg):
        assert "/" not in run and ".." not in run and run.isascii()


def test_extreme_numbers_are_rejected_or_kept_finite():
    raw = _valid()
    raw["studies"]["s"]["sweep"] = {"optimizer.lr": [math.inf]}
    with pytest.raises(ConfigError, match=r"optimizer\.lr"):
        parse_config(raw)
    raw["studies"]["s"]["sweep"] = {"optimizer.lr": [math.nan]}
    with pytest.raises(ConfigError, match=r"optimizer\.lr"):
        parse_config(raw)



def test_a_killed_analysis_job_resumes_where_it_stopped(trained, tiny_data, tmp_path):
    """An analysis job interrupted after its second checkpoint reruns from the stash: the finished
    checkpoints are reused, the rest computed, and every file equals an uninterrupted job's."""
    from sharpflow.analyses import REGISTRY
    from sharpflow.analyses.stage import Planned, run_chain

    run, out = trained
    cks = sorted((out / "checkpoints").glob("*.pt"))[:4]
    steps = [int(p.stem.removeprefix("step")) for p in cks]
    plans = [Planned(REGISTRY["project"], PROJ, set(steps))]
    kw = {"run_name": "r", "data_dir": tiny_data, "checkpoints": cks, "spectrum": SPEC, "analyses": plans,
          "chain_starts": [steps[0], steps[2]], "aggregate": True}

    run_chain(run, results=tmp_path / "ref", log=_quiet, **kw)

    class Killed(Exception):
        pass

    def kill_after_two(msg: str) -> None:
        if msg.startswith("[r] checkpoint 2 of"):
            raise Killed

    with pytest.raises(Killed):
        run_chain(run, results=tmp_path / "got", log=kill_after_two, **kw)
    assert not (tmp_path / "got" / "runs" / "r" / "spectrum.parquet").exists()
    lines: list[str] = []
    run_chain(run, results=tmp_path / "got", log=lines.append, **kw)
    reused = [m for m in lines if "reused from the stash" in m]
    assert len(reused) == 4 and all(f"step {s}:" in " ".join(reused) for s in steps[:2])  # spectrum + project
    assert not any(f"step {s}: spectrum reused" in m for s in steps[2:] for m in lines)
    ref_files = sorted(p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref").rglob("*")
                       if p.is_file() and ".analysis" not in p.parts)
    assert len(ref_files) == 2 * len(steps) + 4 * len(steps) + 5  # spectrum+eigvecs, 4 project, 5 aggregated
    for rel in ref_files:
        a, b = tmp_path / "ref" / rel, tmp_path / "got" / rel
        if rel.suffix == ".parquet":
            pd.testing.assert_frame_equal(pd.read_parquet(a).drop(columns=["seconds"], errors="ignore"),
                                          pd.read_parquet(b).drop(columns=["seconds"], errors="ignore"))
        else:
            assert a.read_bytes() == b.read_bytes(), rel


def test_a_stale_stash_entry_is_recomputed_not_reused(trained, tiny_data, tmp_path):
    """The stash key covers the config: another k recomputes the spectrum; the same config reuses it."""
    from sharpflow.analyses.stage import run_chain

    run, out = trained
    cks = sorted((out / "checkpoints").glob("*.pt"))[:2]
    kw = {"run_name": "r", "data_dir": tiny_data, "checkpoints": cks, "analyses": [], "results": tmp_path}
    run_chain(run, spectrum=SPEC, log=_quiet, **kw)
    lines: list[str] = []
    run_chain(run, spectrum=SPEC.model_copy(update={"k": 2}), log=lines.append, **kw)
    assert not any("reused" in m for m in lines)
    assert len(pd.read_parquet(tmp_path / "runs" / "r" / "spectrum" / cks[0].with_suffix(".parquet").name)) == 2
    lines.clear()
    run_chain(run, spectrum=SPEC.model_copy(update={"k": 2}), log=lines.append, **kw)
    assert sum("spectrum reused" in m for m in lines) == 2


def test_a_corrupt_stash_entry_is_recomputed_with_one_line(trained, tiny_data, tmp_path):
    """A stash file truncated to 7 bytes (the stash and the published table share it: a hard link) is
    caught by its checksum and recomputed, with one log line; the tables end as they were."""
    from sharpflow.analyses import REGISTRY
    from sharpflow.analyses.stage import Planned, run_chain

    run, out = trained
    cks = sorted((out / "checkpoints").glob("*.pt"))[:2]
    steps = [int(p.stem.removeprefix("step")) for p in cks]
    kw = {"run_name": "r", "data_dir": tiny_data, "checkpoints": cks, "spectrum": SPEC, "results": tmp_path,
          "analyses": [Planned(REGISTRY["project"], PROJ, set(steps))], "aggregate": True}
    run_chain(run, log=_quiet, **kw)
    table = tmp_path / "runs" / "r" / "alignment.parquet"
    before = pd.read_parquet(table)
    stashed = tmp_path / "runs" / "r" / ".analysis" / "project" / "alignment" / f"step{steps[1]:08d}.parquet"
    with open(stashed, "wb") as fh:  # in place, as a crash mid-write or a full disk would leave it
        fh.write(b"PAR1xyz")
    lines: list[str] = []
    run_chain(run, log=lines.append, **kw)
    corrupt = [m for m in lines if "corrupt" in m]
    assert len(corrupt) == 1 and f"alignment/step{steps[1]:08d}.parquet: checksum differs" in corrupt[0]
    assert sum("project reused" in m for m in lines) == 1  # the intact checkpoint is still reused
    pd.testing.assert_frame_equal(pd.read_parquet(table).drop(columns=["seconds"], errors="ignore"),
                                  before.drop(columns=["seconds"], errors="ignore"))
