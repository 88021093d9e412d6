"""Training: schedule, determinism, resume after a crash, divergence and early stopping."""

from __future__ import annotations

import math
import time

import pandas as pd
import pytest
import torch

from sharpflow.checkpoints import load_checkpoint
from sharpflow.config import checkpoint_steps
from sharpflow.train import METRICS_COLUMNS, train

from .conftest import tiny_run


def _quiet(*_):
    pass


def _train(run, ds, data, out, **kw):
    return train(run, ds, run_name="r", data_dir=data, out_dir=out, progress=False, log=_quiet, **kw)


def _ckpts(out):
    return sorted((out / "checkpoints").glob("step*.pt"))


def _same_checkpoints(a, b):
    fa, fb = _ckpts(a), _ckpts(b)
    assert [p.name for p in fa] == [p.name for p in fb]
    for pa, pb in zip(fa, fb, strict=True):
        ca, cb = load_checkpoint(pa), load_checkpoint(pb)
        assert ca["step"] == cb["step"] and ca["status"] == cb["status"]
        for key in ca["model"]:
            assert torch.equal(ca["model"][key], cb["model"][key]), (pa.name, key)


def _comparable(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=["wall_s", "refresh_s"]).reset_index(drop=True)


def test_checkpoints_follow_the_schedule(tiny_data, tiny_dataset, tmp_path):
    run = tiny_run()
    df = _train(run, tiny_dataset, tiny_data, tmp_path)
    expected = checkpoint_steps(run, tiny_dataset)
    # 320 train / 20 = 16 steps per epoch; zoom every 5 steps to epoch 1; then every epoch; last 40
    assert expected == [0, 5, 10, 15, 16, 32, 40]
    assert [int(p.stem[4:]) for p in _ckpts(tmp_path)] == expected
    assert list(df.columns) == METRICS_COLUMNS
    assert (df[df.split == "batch"].step.tolist()) == list(range(40))
    for split in ("train", "valid", "test"):
        assert df[df.split == split].step.tolist() == expected
    assert not (tmp_path / ".resume").exists()
    ck = load_checkpoint(tmp_path / "checkpoints" / "step00000016.pt")
    assert ck["step"] == 16 and ck["epoch"] == 1.0 and ck["status"] == "ok"
    # the loss goes down and the checkpoint at step 0 is the initialisation
    train_loss = df[df.split == "train"].set_index("step").loss
    assert train_loss[40] < train_loss[0]
    assert df[(df.split == "train") & (df.step == 0)].dist_init.iloc[0] == 0.0


def test_training_is_deterministic_for_a_seed(tiny_data, tiny_dataset, tmp_path):
    run = tiny_run()
    a = _train(run, tiny_dataset, tiny_data, tmp_path / "a")
    b = _train(run, tiny_dataset, tiny_data, tmp_path / "b")
    _same_checkpoints(tmp_path / "a", tmp_path / "b")
    pd.testing.assert_frame_equal(_comparable(a), _comparable(b))
    c = _train(tiny_run(seed=1), tiny_dataset, tiny_data, tmp_path / "c")
    assert not _comparable(a).equals(_comparable(c))


@pytest.mark.parametrize("crash_after", [3, 16, 33])
def test_resume_after_crash_is_bitwise_identical(tiny_data, tiny_dataset, tmp_path, crash_after):
    run = tiny_run(optimizer__momentum=0.9)
    ref = _train(run, tiny_dataset, tiny_data, tmp_path / "ref")
    out = tmp_path / "crash"
    _train(run, tiny_dataset, tiny_data, out, stop_after=crash_after)
    assert (out / ".resume" / "state.pt").exists()
    # Snakemake deletes the declared outputs of a failed job before rerunning it.
    for p in _ckpts(out):
        p.unlink()
    again = _train(run, tiny_dataset, tiny_data, out)
    _same_checkpoints(tmp_path / "ref", out)
    pd.testing.assert_frame_equal(_comparable(ref), _comparable(again))


def _best_run():
    # 16 steps per epoch, 10 epochs, checkpoints every 4 epochs: most epoch ends are not checkpoints
    return tiny_run(optimizer__lr=0.3, optimizer__momentum=0.9, steps=160,
                    checkpoints={"zoom_every": 0, "every_epochs": 4, "best": True})


def test_best_validation_checkpoint(tiny_data, tiny_dataset, tmp_path):
    """Validation at every epoch end; best.pt holds the weights of the first epoch with the highest
    validation accuracy (re-evaluated here from the file), with train and test rows at its step."""
    from sharpflow.data import load_prepared
    from sharpflow.models import build_model
    from sharpflow.train import evaluate

    run = _best_run()
    df = _train(run, tiny_dataset, tiny_data, tmp_path)
    valid = df[df.split == "valid"].sort_values("step")
    assert valid.step.tolist() == [0, *range(16, 161, 16)]  # every epoch end, plus step 0
    best_step = int(valid.step.iloc[int(valid.accuracy.to_numpy().argmax())])
    assert best_step not in (0, 64, 128, 160)  # an epoch end between checkpoints
    ck = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert ck["step"] == best_step and ck["status"] == "ok" and ck["best"] is True
    assert ck["lr"] == 0.3 and ck["epoch"] == best_step / 16
    data = load_prepared(tiny_data)
    model = build_model(run.model, tuple(data.input_shape), data.num_classes)
    model.load_state_dict(ck["model"])
    _loss, acc = evaluate(model, data.valid.x, data.valid.y, 2000)
    assert acc == float(valid[valid.step == best_step].accuracy.iloc[0])
    at_best = df[df.step == best_step].set_index("split")
    assert {"train", "valid", "test"} <= set(at_best.index)
    assert at_best.loc["test", "accuracy"] == evaluate(model, data.test.x, data.test.y, 2000)[1]
    assert at_best.loc["test", "dist_init"] == pytest.approx(at_best.loc["valid", "dist_init"])
    # without checkpoints.best: the same validation rows, no best.pt, no extra train/test rows
    plain = _train(tiny_run(optimizer__lr=0.3, optimizer__momentum=0.9, steps=160,
                            checkpoints={"zoom_every": 0, "every_epochs": 4}), tiny_dataset, tiny_data,
                   tmp_path / "plain")
    assert plain[plain.split == "valid"].accuracy.tolist() == valid.accuracy.tolist()
    assert plain[plain.split == "test"].step.tolist() == [0, 64, 128, 160]
    assert not (tmp_path / "plain" / "checkpoints" / "best.pt").exists()


@pytest.mark.parametrize("crash_after", [40, 100])
def test_best_checkpoint_survives_a_crash(tiny_data, tiny_dataset, tmp_path, crash_after):
    run = _best_run()
    ref = _train(run, tiny_dataset, tiny_data, tmp_path / "ref")
    out = tmp_path / "crash"
    _train(run, tiny_dataset, tiny_data, out, stop_after=crash_after)
    for p in _ckpts(out):
        p.unlink()
    again = _train(run, tiny_dataset, tiny_data, out)
    pd.testing.assert_frame_equal(_comparable(ref), _comparable(again))
    a, b = (load_checkpoint(d / "checkpoints" / "best.pt") for d in (tmp_path / "ref", out))
    assert a["step"] == b["step"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_state_of_another_config_is_ignored(tiny_data, tiny_dataset, tmp_path):
    _train(tiny_run(), tiny_dataset, tiny_data, tmp_path, stop_after=20)
    ref = _train(tiny_run(optimizer__lr=0.05), tiny_dataset, tiny_data, tmp_path / "ref")
    again = _train(tiny_run(optimizer__lr=0.05), tiny_dataset, tiny_data, tmp_path)
    pd.testing.assert_frame_equal(_comparable(ref), _comparable(again))


def test_divergence_ends_cleanly_and_marks_checkpoints(tiny_data, tiny_dataset, tmp_path):
    run = tiny_run(optimizer__lr=1e4)
    df = _train(run, tiny_dataset, tiny_data, tmp_path)
    steps = checkpoint_steps(run, tiny_dataset)
    assert [int(p.stem[4:]) for p in _ckpts(tmp_path)] == steps
    statuses = [load_checkpoint(tmp_path / "checkpoints" / f"step{s:08d}.pt")["status"] for s in steps]
    assert statuses[0] == "ok" and statuses[-1] == "diverged"
    assert "diverged" in set(df.status)
    batch = df[df.split == "batch"]
    assert len(batch) < 40  # training stopped early
    assert not math.isfinite(batch.loss.iloc[-1])
    assert df.step.max() == 40


def test_early_stopping_marks_remaining_checkpoints(tiny_data, tiny_dataset, tmp_path):
    run = tiny_run(optimizer__lr=1e-12, optimizer__schedule={"kind": "plateau", "patience": 1, "early_stop": 1})
    df = _train(run, tiny_dataset, tiny_data, tmp_path)
    ck = load_checkpoint(tmp_path / "checkpoints" / "step00000040.pt")
    assert ck["status"] == "stopped"
    assert len(df[df.split == "batch"]) == 32  # stopped at the end of epoch 2 (no gain after epoch 1)
    # plateau: lr dropped by 10x after one epoch without val-loss improvement
    assert df[df.split == "batch"].lr.min() == pytest.approx(1e-13)


def test_step_schedule(tiny_data, tiny_dataset, tmp_path):
    run = tiny_run(optimizer__schedule={"kind": "step", "milestones": [1.0], "factor": 0.5})
    df = _train(run, tiny_dataset, tiny_data, tmp_path)
    lrs = df[df.split == "batch"].set_index("step").lr
    assert lrs[15] == 0.1 and lrs[16] == 0.05
    # a checkpoint records the rate in force there (the one its next update uses): the analyses'
    # projected steps read it rather than the base rate
    ck = {s: load_checkpoint(tmp_path / "checkpoints" / f"step{s:08d}.pt")["lr"] for s in (15, 16, 32)}
    assert ck == {15: 0.1, 16: 0.05, 32: 0.05}


def test_warmup_factor_by_hand():
    from sharpflow.config import ScheduleConfig
    from sharpflow.train import warmup_factor

    cos = ScheduleConfig(kind="warmup_cosine", warmup_steps=4, warmup_start=0.2, final_factor=0.1)
    # linear from 0.2 at step 0 to 1 at step 4: 0.2 + 0.8·s/4
    assert [warmup_factor(cos, s, 12) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    # then a half cosine over the 8 remaining steps, to 0.1 at step 12 and held there
    assert warmup_factor(cos, 8, 12) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(π/2) = 0
    assert warmup_factor(cos, 12, 12) == pytest.approx(0.1)
    assert warmup_factor(cos, 20, 12) == pytest.approx(0.1)
    const = ScheduleConfig(kind="warmup_constant", warmup_steps=4, warmup_start=0.2)
    assert [warmup_factor(const, s, 12) for s in (2, 4, 11)] == pytest.approx([0.6, 1.0, 1.0])


def test_warmup_needs_its_length_and_only_warmup_takes_it():
    from pydantic import ValidationError

    from sharpflow.config import ScheduleConfig

    with pytest.raises(ValidationError, match="needs warmup_steps"):
        ScheduleConfig(kind="warmup_cosine")
    with pytest.raises(ValidationError, match="warmup_steps is for"):
        ScheduleConfig(kind="constant", warmup_steps=3)
    # an existing run's config dumps as before: the new fields are omitted at their defaults
    assert "warmup_steps" not in ScheduleConfig().model_dump()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "nsgd"])
def test_warmup_cosine_schedule_in_training(tiny_data, tiny_dataset, tmp_path, optimizer):
    sched = {"kind": "warmup_cosine", "warmup_steps": 10, "warmup_start": 0.1, "final_factor": 0.0}
    over = {"optimizer__name": optimizer, "optimizer__schedule": sched, "optimizer__grad_clip": 1.0}
    if optimizer == "nsgd":
        over["optimizer__nsgd"] = {"gamma": 0.5, "k": 2, "refresh_every_steps": 20}
    run = tiny_run(**over)
    df = _train(run, tiny_dataset, tiny_data, tmp_path)
    lrs = df[df.split == "batch"].set_index("step").lr
    expected = {0: 0.01, 5: 0.1 * (0.1 + 0.9 * 0.5), 10: 0.1, 25: 0.1 * 0.5 * (1 + math.cos(math.pi / 2))}
    assert {s: lrs[s] for s in expected} == pytest.approx(expected)
    assert lrs[39] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 29 / 30)))
    ck = {s: load_checkpoint(tmp_path / "checkpoints" / f"step{s:08d}.pt")["lr"] for s in (5, 15, 32)}
    assert ck == pytest.approx({5: expected[5], 15: 0.1 * 0.5 * (1 + math.cos(math.pi * 5 / 30)),
                                32: 0.1 * 0.5 * (1 + math.cos(math.pi * 22 / 30))})


def resumes_bitwise(run, ds, data, tmp_path, crash_after: int) -> pd.DataFrame:
    """Train ``run`` uninterrupted, and again killed after ``crash_after`` updates (its declared
    checkpoints deleted, as Snakemake does) then rerun: checkpoints and metrics must be equal.
    Returns the uninterrupted run's metrics."""
    ref = _train(run, ds, data, tmp_path / "ref")
    out = tmp_path / "crash"
    _train(run, ds, data, out, stop_after=crash_after)
    for p in _ckpts(out):
        p.unlink()
    again = _train(run, ds, data, out)
    _same_checkpoints(tmp_path / "ref", out)
    pd.testing.assert_frame_equal(_comparable(ref), _comparable(again))
    return ref


def test_warmup_run_resumes_bitwise(tiny_data, tiny_dataset, tmp_path):
    run = tiny_run(optimizer__name="adamw", optimizer__lr=0.01,
                   optimizer__schedule={"kind": "warmup_cosine", "warmup_steps": 8})
    resumes_bitwise(run, tiny_dataset, tiny_data, tmp_path, crash_after=13)


def _nsgd(**over):
    base = {"optimizer__name": "nsgd", "optimizer__nsgd": {"gamma": 0.1, "k": 3, "refresh_every_steps": 10}}
    base.update(over)
    return tiny_run(**base)


def test_nsgd_training_refreshes_the_subspace_and_logs_its_cost(tiny_data, tiny_dataset, tmp_path):
    df = _train(_nsgd(), tiny_dataset, tiny_data, tmp_path)
    batch = df[df.split == "batch"]
    refreshed = batch[batch.refresh_matvecs.notna()]
    assert refreshed.step.tolist() == [0, 10, 20, 30]
    assert (refreshed.refresh_matvecs > 0).all() and (refreshed.refresh_s > 0).all()
    # warm starts from the previous subspace need fewer products than the cold start
    assert refreshed.refresh_matvecs.iloc[1:].mean() <= refreshed.refresh_matvecs.iloc[0]


def test_nsgd_gamma_one_is_sgd(tiny_data, tiny_dataset, tmp_path):
    sgd = _train(tiny_run(), tiny_dataset, tiny_data, tmp_path / "sgd")
    nsgd = _train(_nsgd(optimizer__nsgd={"gamma": 1.0, "k": 3, "refresh_every_steps": 10}), tiny_dataset,
                  tiny_data, tmp_path / "nsgd")
    _same_checkpoints(tmp_path / "sgd", tmp_path / "nsgd")
    cols = ["step", "split", "loss", "accuracy"]
    pd.testing.assert_frame_equal(sgd[cols], nsgd[cols])


def test_nsgd_resume_between_refreshes_is_bitwise_identical(tiny_data, tiny_dataset, tmp_path):
    run = _nsgd(optimizer__momentum=0.5)
    ref = _train(run, tiny_dataset, tiny_data, tmp_path / "ref")
    out = tmp_path / "crash"
    _train(run, tiny_dataset, tiny_data, out, stop_after=17)  # last resume state at step 16
    again = _train(run, tiny_dataset, tiny_data, out)
    _same_checkpoints(tmp_path / "ref", out)
    pd.testing.assert_frame_equal(_comparable(ref), _comparable(again))


def test_nsgd_random_subspace_control(tiny_data, tiny_dataset, tmp_path):
    run = _nsgd(optimizer__nsgd={"gamma": 0.0, "k": 3, "subspace": "random"})
    df = _train(run, tiny_dataset, tiny_data, tmp_path)
    refreshed = df[(df.split == "batch") & df.refresh_matvecs.notna()]
    assert refreshed.step.tolist() == [0, 16, 32]  # once per epoch by default
    assert (refreshed.refresh_matvecs == 0).all()


class DropoutMLP(torch.nn.Module):
    """A user model (``tests.test_train:DropoutMLP``) whose training steps draw random numbers."""

    def __init__(self, input_shape, num_classes, p=0.5):
        super().__init__()
        n_in = math.prod(input_shape)
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(n_in, 16), torch.nn.ReLU(),
                                       torch.nn.Dropout(p), torch.nn.Linear(16, num_classes))

    def forward(self, x):
        return self.net(x)


def test_draws_randomness_tells_which_models_need_seeded_steps():
    from sharpflow.config import ModelConfig
    from sharpflow.models import build_model, draws_randomness

    mlp = build_model(ModelConfig(name="mlp", kwargs={"hidden": [8]}), (1, 40), 10)
    assert not draws_randomness(mlp)
    assert draws_randomness(DropoutMLP((1, 40), 10))
    assert draws_randomness(torch.nn.Sequential(mlp, torch.nn.RReLU()))

    class Custom(torch.nn.Module):  # user code may draw anything
        def forward(self, x):
            return x

    assert draws_randomness(torch.nn.Sequential(mlp, Custom()))


def test_dropout_run_resumes_bitwise_and_dropout_is_active(tiny_data, tiny_dataset, tmp_path):
    model = {"name": "tests.test_train:DropoutMLP", "kwargs": {"p": 0.5}}
    run = tiny_run(model=model)
    ref = _train(run, tiny_dataset, tiny_data, tmp_path / "ref")
    out = tmp_path / "crash"
    _train(run, tiny_dataset, tiny_data, out, stop_after=7)
    again = _train(run, tiny_dataset, tiny_data, out)
    _same_checkpoints(tmp_path / "ref", out)
    pd.testing.assert_frame_equal(_comparable(ref), _comparable(again))
    off = _train(tiny_run(model={**model, "kwargs": {"p": 0.0}}), tiny_dataset, tiny_data, tmp_path / "off")
    assert not _comparable(ref).equals(_comparable(off))


def test_a_failed_checkpoint_write_surfaces_and_the_rerun_resumes(tiny_data, tiny_dataset, tmp_path, monkeypatch):
    """Writes happen on a background thread; a failure there (disk full) must reach the caller as
    the error it was, and the rerun must resume from the last complete dump."""
    import sharpflow.checkpoints as T
    from sharpflow.io import SharpflowError

    run = tiny_run(optimizer__momentum=0.9)
    ref = _train(run, tiny_dataset, tiny_data, tmp_path / "ref")
    real, calls = T.write_bytes, []

    def failing(path, data, **kw):
        calls.append(path)
        if len(calls) == 10:  # the 4th dump's checkpoint
            raise SharpflowError(f"{path}: no space left on device")
        return real(path, data, **kw)

    monkeypatch.setattr(T, "write_bytes", failing)
    out = tmp_path / "x"
    with pytest.raises(SharpflowError, match="no space left"):
        _train(run, tiny_dataset, tiny_data, out)
    assert not (out / "metrics.parquet").exists()
    assert [p.name for p in _ckpts(out)] == ["step00000000.pt", "step00000005.pt", "step00000010.pt"]
    monkeypatch.setattr(T, "write_bytes", real)
    again = _train(run, tiny_dataset, tiny_data, out)
    _same_checkpoints(tmp_path / "ref", out)
    pd.testing.assert_frame_equal(_comparable(ref), _comparable(again))


def test_a_lost_metrics_chunk_restarts_the_run_cleanly(tiny_data, tiny_dataset, tmp_path):
    run = tiny_run()
    ref = _train(run, tiny_dataset, tiny_data, tmp_path / "ref")
    out = tmp_path / "x"
    _train(run, tiny_dataset, tiny_data, out, stop_after=20)
    chunks = sorted((out / ".resume" / "rows").glob("*.json"))
    assert len(chunks) == 5  # dumps at steps 0, 5, 10, 15, 16
    chunks[2].unlink()
    again = _train(run, tiny_dataset, tiny_data, out)
    pd.testing.assert_frame_equal(_comparable(ref), _comparable(again))


def test_writer_skips_every_job_after_a_failure_even_once_it_was_raised():
    """The jobs queued behind a failed write must never run: not after the error was raised at
    the next submit, and not when the writer is drained on the way out."""
    import threading

    from sharpflow.checkpoints import _Writer

    gate, seen, ran = threading.Event(), threading.Event(), []

    def failing() -> None:
        gate.wait(10)
        raise OSError("no space left on device")

    w = _Writer()
    real_get, gets = w._jobs.get, []

    def get(*a, **kw):  # the worker takes the next job only once the error reached training
        gets.append(1)
        if len(gets) == 2:
            seen.wait(10)
        return real_get(*a, **kw)

    w._jobs.get = get
    w.submit(failing)
    w.submit(lambda: ran.append(2))  # queued while the failing write is still running
    w.submit(lambda: ran.append(3))
    gate.set()
    with pytest.raises(OSError, match="no space left"):
        for _ in range(1000):
            w._raise()
            time.sleep(0.01)
    seen.set()
    w.close(raise_errors=False)
    assert ran == []
