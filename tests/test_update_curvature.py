"""The last update Δθ = θ_t − θ_{t−1} stored by training, and the selfstab analysis's curvature along it,
ΔθᵀHΔθ/‖Δθ‖² (Damian et al. 2023), against a dense Hessian."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sharpflow.checkpoints import load_checkpoint
from sharpflow.config import checkpoint_steps

from .conftest import tiny_run

DT = torch.float64
LR, WD = 0.5, 1e-3
N_HESSIAN = 64


def _quiet(*_):
    pass


def _run(**over):
    """Full-batch gradient descent without momentum, a checkpoint at every step (one step per epoch)."""
    return tiny_run(model={"name": "mlp", "kwargs": {"hidden": [6], "activation": "tanh"}}, steps=4,
                    optimizer={"lr": LR, "batch_size": "full", "weight_decay": WD},
                    checkpoints={"zoom_every": 0, "every_epochs": 1}, **over)


def _ck(out: Path, step: int) -> dict:
    return load_checkpoint(out / "checkpoints" / f"step{step:08d}.pt")


@pytest.fixture(scope="module")
def trained(tiny_data, tiny_dataset, tmp_path_factory):
    from sharpflow.train import train

    run = _run()
    out = tmp_path_factory.mktemp("gd")
    train(run, tiny_dataset, run_name="r", data_dir=tiny_data, out_dir=out, progress=False, log=_quiet)
    return run, out


def _model(run, data, state=None):
    from sharpflow.models import build_model

    model = build_model(run.model, tuple(data.input_shape), data.num_classes)
    if state is not None:
        model.load_state_dict(state)
    return model


def test_checkpoints_store_the_last_update(trained, tiny_data, tiny_dataset):
    """last_update at step t is θ_t − θ_{t−1} bit for bit (two adjacent checkpoints), and −η(∇L(θ_{t−1}) +
    wd·θ_{t−1}) recomputed by hand in float64; step 0 has none."""
    from sharpflow.data import load_prepared, train_view
    from sharpflow.models import loss_for
    from sharpflow.params import flat_params, num_params

    run, out = trained
    data = load_prepared(tiny_data)
    assert checkpoint_steps(run, tiny_dataset) == [0, 1, 2, 3, 4]
    assert "last_update" not in _ck(out, 0)
    for t in range(1, 5):
        before, after = _ck(out, t - 1), _ck(out, t)
        d = after["last_update"]
        assert d.dtype == torch.float32 and d.device.type == "cpu"
        assert d.shape == (num_params(_model(run, data)),)
        theta0 = flat_params(_model(run, data, before["model"]))
        theta1 = flat_params(_model(run, data, after["model"]))
        assert torch.equal(d, theta1 - theta0), t
    # by hand: the full-batch gradient at θ_1, in float64
    view = train_view(run, data)
    model = _model(run, data, _ck(out, 1)["model"]).double()
    loss = loss_for(run.loss)(model(view.x.double()), view.y)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    theta = flat_params(model)
    want = -LR * (torch.cat([g.reshape(-1) for g in grads]) + WD * theta)
    got = _ck(out, 2)["last_update"].double()
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-5, rel


def test_resumed_run_stores_the_same_last_updates(trained, tiny_data, tiny_dataset, tmp_path):
    """A run killed after two steps and resumed writes the same last_update in every checkpoint."""
    from sharpflow.train import train

    run, ref = trained
    kw = {"run_name": "r", "data_dir": tiny_data, "out_dir": tmp_path, "progress": False, "log": _quiet}
    train(run, tiny_dataset, stop_after=2, **kw)
    for p in (tmp_path / "checkpoints").glob("step*.pt"):
        p.unlink()
    train(run, tiny_dataset, **kw)
    assert "last_update" not in _ck(tmp_path, 0)
    for t in range(1, 5):
        assert torch.equal(_ck(tmp_path, t)["last_update"], _ck(ref, t)["last_update"]), t


def _dense(run, data, state):
    """The loss over the Hessian subset (with weight decay) as a function of the flat parameters, in
    float64, and its dense Hessian there."""
    from sharpflow.models import loss_for
    from sharpflow.params import flat_params, loss_of_params, unflatten

    model = _model(run, data, state).double().eval()
    idx = data.hessian_idx[:N_HESSIAN]
    x, y = data.train.x[idx].double(), data.train.y[idx]
    f = loss_of_params(model, loss_for(run.loss))
    like = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss(th):
        return f(unflatten(th, like), x, y) + 0.5 * WD * th.square().sum()

    theta = flat_params(model)
    return torch.autograd.functional.hessian(loss, theta, vectorize=True)


def _ctx(run, data, out, step, h=None, log=_quiet):
    from sharpflow.analyses.context import open_checkpoint

    ctx = open_checkpoint(run, "r", data, out / "checkpoints" / f"step{step:08d}.pt", torch.device("cpu"), log=log)
    if h is not None:
        vals, vecs = torch.linalg.eigh(h)
        ctx.eigvecs = {"eigenvalues": vals[-1:], "eigenvectors": vecs[:, -1][None]}
    return ctx


def test_update_curvature_against_a_dense_hessian(trained, tiny_data):
    from sharpflow.analyses.selfstab import SelfStabConfig
    from sharpflow.analyses.selfstab import compute as selfstab
    from sharpflow.data import load_prepared

    run, out = trained
    data = load_prepared(tiny_data)
    for step in (2, 4):
        ck = _ck(out, step)
        h = _dense(run, data, ck["model"])
        d = ck["last_update"].double()
        row = selfstab(_ctx(run, data, out, step, h), SelfStabConfig(enabled=True, n=N_HESSIAN))["selfstab"].iloc[0]
        want = float(d @ h @ d / (d @ d))
        assert row.update_curvature == pytest.approx(want, rel=1e-8)
        assert row.update_norm == pytest.approx(float(d.norm()), rel=1e-12)
        assert row.lambda1 == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-8)
        assert row.grad_curvature > 0 and math.isfinite(row.alpha)


def test_third_order_terms_direction_on_a_cubic_by_hand():
    """L(θ) = ½θᵀAθ + Σ c_i θ_i³/6: H = A + diag(c⊙θ); dᵀHd/‖d‖² for a direction d, the other terms unchanged."""
    from sharpflow.analyses.selfstab import third_order_terms

    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=DT))
    a = q @ torch.diag(torch.tensor([3.0, 1.0, 0.5, 0.2], dtype=DT)) @ q.T
    c, theta, u, d = (torch.randn(4, generator=gen, dtype=DT) for _ in range(4))
    u = u / u.norm()

    def loss(w):
        return 0.5 * w @ a @ w + (c * w**3).sum() / 6

    with_d, without = third_order_terms(loss, theta, u, d), third_order_terms(loss, theta, u)
    h = a + torch.diag(c * theta)
    assert with_d["update_curvature"] == pytest.approx(float(d @ h @ d / (d @ d)), rel=1e-12)
    assert with_d["update_norm"] == pytest.approx(float(d.norm()), rel=1e-14)
    assert "update_curvature" not in without
    assert {k: with_d[k] for k in without} == without
    assert math.isnan(third_order_terms(loss, theta, u, torch.zeros(4, dtype=DT))["update_curvature"])


def test_checkpoint_without_last_update_gives_nan_and_one_log_line(trained, tiny_data):
    from sharpflow.analyses.selfstab import SelfStabConfig
    from sharpflow.analyses.selfstab import compute as selfstab
    from sharpflow.data import load_prepared

    run, out = trained
    data = load_prepared(tiny_data)
    cfg = SelfStabConfig(enabled=True, n=N_HESSIAN)
    lines: list[str] = []
    h = _dense(run, data, _ck(out, 0)["model"])
    row0 = selfstab(_ctx(run, data, out, 0, h, log=lines.append), cfg)["selfstab"].iloc[0]
    assert math.isnan(row0.update_curvature) and math.isnan(row0.update_norm) and math.isfinite(row0.lambda1)
    assert lines == []  # step 0 has no update to tell about
    for step in (3, 4):  # as written before training stored it
        ctx = _ctx(run, data, out, step, _dense(run, data, _ck(out, step)["model"]), log=lines.append)
        del ctx.checkpoint["last_update"]
        row = selfstab(ctx, cfg)["selfstab"].iloc[0]
        assert math.isnan(row.update_curvature) and math.isnan(row.update_norm)
        assert math.isfinite(row.lambda1) and math.isfinite(row.grad_curvature) and row.status == "ok"
    assert len(lines) == 1 and "no last update" in lines[0] and "retrain" in lines[0]


def test_eos_figure_draws_the_update_curvature(tmp_path):
    """η·update_curvature/2 is a thin dotted line of the run's colour in the η·λ1/2 panel, with a legend
    entry; a selfstab table of format 1 (no such column) draws none."""
    from sharpflow.figures import eos
    from sharpflow.results import load

    from .test_followups import _runs_tree

    inputs, meta = _runs_tree(tmp_path)
    steps = list(range(0, 100, 10))
    uc = [math.nan] + [5.0 + s / 10 for s in steps[1:]]
    d = tmp_path / "runs" / "eos-lr0.1"
    rows = pd.DataFrame([{"run": "eos-lr0.1", "step": s, "epoch": float(s), "status": "ok", "alpha": 1.0, "beta": 2.0,
                          "lambda1": 22.0, "grad_norm": 1.0, "grad_curvature": 10.0, "eta_lambda_half": 1.1,
                          "update_curvature": c, "update_norm": 0.1} for s, c in zip(steps, uc, strict=True)])
    rows.to_parquet(d / "selfstab.parquet", index=False)
    eos_inputs = [p for p in inputs if p.parent.name == "eos-lr0.1"]
    spec = {"runs": {"eos-lr0.1": meta["eos-lr0.1"]}}
    fig = eos.plot(load([*eos_inputs, d / "selfstab.parquet"], ("metrics", "spectrum", "selfstab"), spec), {})
    (line,) = [ln for ln in fig.axes[0].lines if ln.get_gid() == "update_curvature"]
    np.testing.assert_allclose(line.get_xdata(), steps[1:])
    np.testing.assert_allclose(line.get_ydata(), [0.1 * c / 2 for c in uc[1:]])
    lam_line = next(ln for ln in fig.axes[0].lines if ln.get_marker() == "o")
    assert line.get_linestyle() == ":" and line.get_color() == lam_line.get_color()
    assert line.get_linewidth() < lam_line.get_linewidth()
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert any("Delta" in t for t in legend)
    fig.savefig(tmp_path / "f.png")  # the legend's mathtext renders
    old = rows.drop(columns=["update_curvature", "update_norm"])
    old.to_parquet(d / "selfstab.parquet", index=False)
    fig = eos.plot(load([*eos_inputs, d / "selfstab.parquet"], ("metrics", "spectrum", "selfstab"), spec), {})
    assert not [ln for ln in fig.axes[0].lines if ln.get_gid() == "update_curvature"]
    assert not any("Delta" in t.get_text() for t in fig.axes[1].get_legend().get_texts())
