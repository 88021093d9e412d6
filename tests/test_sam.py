"""SAM and ASAM (Foret et al. 2021; Kwon et al. 2021): a step against its hand-computed update, and in training."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from sharpflow.config import OptimizerConfig
from sharpflow.sam import SAM

from .conftest import tiny_run
from .test_train import _train, resumes_bitwise

DT = torch.float64


def _problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=gen, dtype=DT)
    y = torch.randn(8, generator=gen, dtype=DT)
    w0 = torch.randn(3, generator=gen, dtype=DT)
    return x, y, w0


def _loss(w, x, y):
    return 0.5 * (x @ w - y).square().mean()


def _closure(opt, w, x, y):
    """The training loop's closure: zero the gradients, the loss, its backward."""

    def closure():
        opt.zero_grad()
        loss = _loss(w, x, y)
        loss.backward()
        return loss

    return closure


def _grad(w, x, y):
    """∇ of ½ mean (xw − y)² by hand: xᵀ(xw − y)/n."""
    return x.T @ (x @ w - y) / len(y)


@pytest.mark.parametrize("adaptive", [False, True])
def test_one_step_equals_the_hand_computed_update(adaptive):
    x, y, w0 = _problem()
    lr, rho, eta = 0.1, 0.2, 0.01
    g = _grad(w0, x, y)
    if adaptive:  # ASAM: ε = ρ T² g / ‖T g‖, T = |w| + η
        t = w0.abs() + eta
        eps = rho * t * t * g / torch.linalg.vector_norm(t * g)
    else:  # SAM: ε = ρ g / ‖g‖
        eps = rho * g / torch.linalg.vector_norm(g)
    want = w0 - lr * _grad(w0 + eps, x, y)

    w = torch.nn.Parameter(w0.clone())
    opt = SAM([w], lr=lr, rho=rho, adaptive=adaptive, eta=eta)
    closure = _closure(opt, w, x, y)
    closure()
    opt.step(closure)
    torch.testing.assert_close(w.detach(), want, rtol=1e-12, atol=1e-14)


def test_two_steps_with_momentum_and_weight_decay():
    """SGD's momentum and weight decay act on the perturbed-point gradient, at the unperturbed weights."""
    x, y, w0 = _problem()
    lr, rho, mu, wd = 0.1, 0.05, 0.9, 0.01
    w_ref, buf = w0.clone(), None
    for _ in range(2):
        g = _grad(w_ref, x, y)
        d = _grad(w_ref + rho * g / torch.linalg.vector_norm(g), x, y) + wd * w_ref
        buf = d if buf is None else mu * buf + d
        w_ref = w_ref - lr * buf
    w = torch.nn.Parameter(w0.clone())
    opt = SAM([w], lr=lr, rho=rho, momentum=mu, weight_decay=wd)
    closure = _closure(opt, w, x, y)
    for _ in range(2):
        closure()
        opt.step(closure)
    torch.testing.assert_close(w.detach(), w_ref, rtol=1e-12, atol=1e-14)


def test_sam_needs_a_closure_and_a_positive_radius():
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(RuntimeError, match="needs a closure"):
        SAM([w], lr=0.1).step()
    with pytest.raises(ValueError, match="rho must be positive"):
        SAM([w], lr=0.1, rho=0.0)
    with pytest.raises(ValidationError, match="'sam' settings given"):
        OptimizerConfig(name="sgd", sam={"rho": 0.1})
    assert OptimizerConfig(name="sam").sam.rho == 0.05
    assert "sam" not in OptimizerConfig().model_dump()  # existing runs' params unchanged


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_training_resumes_bitwise_and_differs_from_sgd(tiny_data, tiny_dataset, tmp_path, adaptive):
    run = tiny_run(optimizer__name="sam", optimizer__momentum=0.9,
                   optimizer__sam={"rho": 0.1, "adaptive": adaptive})
    ref = resumes_bitwise(run, tiny_dataset, tiny_data, tmp_path, crash_after=17)
    sgd = _train(tiny_run(optimizer__momentum=0.9), tiny_dataset, tiny_data, tmp_path / "sgd")
    last = ref[ref.split == "train"]["loss"].iloc[-1]
    assert last != sgd[sgd.split == "train"]["loss"].iloc[-1]
