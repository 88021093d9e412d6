"""NudgedSGD against torch.optim.SGD (bit for bit at γ = 1) and against dense hand-written updates."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import Tensor, nn

from sharpflow.nsgd import NudgedSGD
from sharpflow.params import flatten, num_params, trainable, unflatten

VARIANTS = ["correct_v", "correct_g", "correct_both"]


def mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """4 → 3 → 2 tanh network, D = 23."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(dtype)


def batch(i: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(8, 4, generator=g, dtype=dtype), torch.randint(0, 2, (8,), generator=g)


def orthonormal(k: int, d: int, seed: int = 1) -> Tensor:
    """(k, d) float64 with orthonormal rows."""
    a = torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.linalg.qr(a).Q.T.contiguous()


def train_step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    x, y = batch(i, next(model.parameters()).dtype)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def flat_grad(model: nn.Module, i: int) -> Tensor:
    x, y = batch(i)
    loss = nn.functional.cross_entropy(model(x), y)
    return flatten(torch.autograd.grad(loss, list(trainable(model).values())))


# ---------------------------------------------------------------- γ = 1 is SGD, bit for bit


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.0, 1e-2), (0.9, 5e-4)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gamma_one_is_sgd_bitwise(momentum: float, weight_decay: float, variant: str) -> None:
    ref = mlp(torch.float32)
    model = copy.deepcopy(ref)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    nsgd = NudgedSGD(
        model.parameters(),
        lr=0.1,
        gamma=1.0,
        k=3,
        momentum=momentum,
        weight_decay=weight_decay,
        variant=variant,
    )
    nsgd.set_random_subspace(generator=torch.Generator().manual_seed(0))
    for i in range(5):
        train_step(ref, sgd, i)
        train_step(model, nsgd, i)
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    if momentum:
        for a, b in zip(ref.parameters(), model.parameters(), strict=True):
            assert torch.equal(sgd.state[a]["momentum_buffer"], nsgd.state[b]["momentum_buffer"])
    # The comparison can fail: one step more on one side breaks equality.
    train_step(model, nsgd, 5)
    assert not torch.equal(next(ref.parameters()), next(model.parameters()))


def test_no_subspace_is_sgd_bitwise_at_any_gamma() -> None:
    ref = mlp(torch.float32)
    model = copy.deepcopy(ref)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.5)
    nsgd = NudgedSGD(model.parameters(), lr=0.05, gamma=0.1, momentum=0.5)
    for i in range(4):
        train_step(ref, sgd, i)
        train_step(model, nsgd, i)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters(), strict=True))


# ---------------------------------------------------------------- m = 0: the dense formula


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("gamma", [0.01, 5.0])
def test_no_momentum_matches_dense_projector(variant: str, weight_decay: float, gamma: float) -> None:
    model = mlp()
    d = num_params(model)
    e = orthonormal(4, d)
    lr = 0.3
    theta0 = flatten(trainable(model)).detach().clone()
    g = flat_grad(model, 0) + weight_decay * theta0
    # Learning rate γη inside span(E), η outside; correct_both applies P twice, i.e. γ² inside.
    g_in = gamma**2 if variant == "correct_both" else gamma
    expected = -lr * (torch.eye(d, dtype=torch.float64) - (1 - g_in) * e.T @ e) @ g

    opt = NudgedSGD(model.parameters(), lr=lr, gamma=gamma, k=4, weight_decay=weight_decay, variant=variant)
    opt.set_subspace(e)
    train_step(model, opt, 0)
    step = flatten(trainable(model)).detach() - theta0
    torch.testing.assert_close(step, expected, rtol=1e-12, atol=1e-14)
    # And it is not SGD's step (the check can fail).
    assert (step + lr * g).abs().max() > 1e-4


# ---------------------------------------------------------------- momentum: 3 steps vs the paper's formulas


class Quadratic(nn.Module):
    """L(θ) = ½ θᵀAθ − bᵀθ over two parameters (2×3 and 4), D = 10; ∇L = Aθ − b in closed form."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w = nn.Parameter(torch.randn(2, 3, generator=g, dtype=torch.float64))
        self.c = nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))
        m = torch.randn(10, 10, generator=g, dtype=torch.float64)
        self.register_buffer("a", m @ m.T / 10 + torch.eye(10, dtype=torch.float64))
        self.register_buffer("b", torch.randn(10, generator=g, dtype=torch.float64))

    def theta(self) -> Tensor:
        return torch.cat([self.w.reshape(-1), self.c])

    def loss(self) -> Tensor:
        t = self.theta()
        return 0.5 * t @ self.a @ t - self.b @ t


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("two_groups", [False, True])
def test_momentum_variants_match_reference(variant: str, two_groups: bool) -> None:
    model = Quadratic()
    gamma, m, steps = 0.1, 0.9, 3
    e = orthonormal(3, 10, seed=3)
    if two_groups:  # different lr and weight decay per group; the subspace still spans both
        groups = [{"params": [model.w], "lr": 0.05, "weight_decay": 0.01}, {"params": [model.c]}]
        opt = NudgedSGD(groups, lr=0.02, gamma=gamma, k=5, momentum=m, weight_decay=0.0, variant=variant)
        lr = torch.tensor([0.05] * 6 + [0.02] * 4, dtype=torch.float64)
        wd = torch.tensor([0.01] * 6 + [0.0] * 4, dtype=torch.float64)
    else:
        opt = NudgedSGD(model.parameters(), lr=0.05, gamma=gamma, k=5, momentum=m, weight_decay=0.01, variant=variant)
        lr = torch.full((10,), 0.05, dtype=torch.float64)
        wd = torch.full((10,), 0.01, dtype=torch.float64)
    opt.set_subspace(e)

    # Reference in the paper's notation: v = m·v_prev − η·g; P u = u + (γ − 1) Eᵀ E u.
    def proj(u: Tensor) -> Tensor:
        return u + (gamma - 1) * e.T @ (e @ u)

    theta = model.theta().detach().clone()
    v = torch.zeros(10, dtype=torch.float64)
    for _ in range(steps):
        g = model.a @ theta - model.b + wd * theta
        if variant == "correct_v":
            v = m * v - lr * g
            delta = proj(v)
        elif variant == "correct_g":
            v = m * v - lr * proj(g)
            delta = v
        else:
            v = m * v - lr * proj(g)
            delta = proj(v)
        theta = theta + delta

        opt.zero_grad()
        model.loss().backward()
        opt.step()
        torch.testing.assert_close(model.theta().detach(), theta, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- subspace forms, random subspace


def test_per_parameter_forms_equal_flat_form() -> None:
    model = mlp()
    like = trainable(model)
    e = orthonormal(3, num_params(model))
    as_dicts = [unflatten(row, like) for row in e]
    as_lists = [list(dct.values()) for dct in as_dicts]

    results = []
    for form in (e, as_dicts, as_lists):
        m = copy.deepcopy(model)
        opt = NudgedSGD(m.parameters(), lr=0.1, gamma=0.1, k=3, momentum=0.9)
        opt.set_subspace(form)
        assert opt.subspace is not None
        assert torch.equal(opt.subspace, e)
        for i in range(2):
            train_step(m, opt, i)
        results.append(flatten(trainable(m)).detach())
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[0], results[2])


def test_subspace_follows_parameter_dtype_and_accepts_a_vector() -> None:
    model = mlp(torch.float32)
    opt = NudgedSGD(model.parameters(), lr=0.1, gamma=0.5, k=2)
    e = orthonormal(1, num_params(model))
    opt.set_subspace(e[0])
    assert opt.subspace is not None
    assert opt.subspace.shape == (1, num_params(model))
    assert opt.subspace.dtype == torch.float32
    opt.set_subspace(None)
    assert opt.subspace is None


def test_random_subspace_is_orthonormal_and_seeded() -> None:
    model = mlp()
    opt = NudgedSGD(model.parameters(), lr=0.1, gamma=0.1, k=5)
    e = opt.set_random_subspace(generator=torch.Generator().manual_seed(0))
    assert e.shape == (5, num_params(model))
    torch.testing.assert_close(e @ e.T, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)
    again = opt.set_random_subspace(generator=torch.Generator().manual_seed(0))
    assert torch.equal(e, again)
    other = opt.set_random_subspace(3, generator=torch.Generator().manual_seed(1))
    assert other.shape == (3, num_params(model))
    assert not torch.allclose(other, e[:3])
    with pytest.raises(ValueError, match="k <= min"):
        opt.set_random_subspace(6)


def test_frozen_and_unused_parameters() -> None:
    """Frozen parameters are outside D; a parameter without a gradient is left untouched."""
    model = mlp()
    model[0].bias.requires_grad_(False)  # frozen: not in D
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))  # trainable, never gets a gradient
    params = [*model.parameters(), unused]
    opt = NudgedSGD(params, lr=0.1, gamma=0.1, k=2, momentum=0.9)
    d = num_params(model) + 3
    with pytest.raises(ValueError, match=f"D={d}"):
        opt.set_subspace(orthonormal(2, d + 3))
    opt.set_subspace(orthonormal(2, d))
    frozen = model[0].bias.detach().clone()
    for i in range(2):
        train_step(model, opt, i)
    assert torch.equal(unused.detach(), torch.ones(3, dtype=torch.float64))
    assert torch.equal(model[0].bias.detach(), frozen)


# ---------------------------------------------------------------- state dict round trip


def test_state_dict_round_trip_with_subspace(tmp_path) -> None:
    model = mlp()
    straight = copy.deepcopy(model)
    kwargs = {
        "lr": 0.1,
        "gamma": 0.1,
        "k": 4,
        "momentum": 0.9,
        "weight_decay": 1e-3,
        "variant": "correct_both",
    }
    e = orthonormal(4, num_params(model))

    opt_straight = NudgedSGD(straight.parameters(), **kwargs)
    opt_straight.set_subspace(e)
    for i in range(4):
        train_step(straight, opt_straight, i)

    opt = NudgedSGD(model.parameters(), **kwargs)
    opt.set_subspace(e)
    for i in range(2):
        train_step(model, opt, i)
    path = tmp_path / "opt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)

    saved = torch.load(path, weights_only=True)
    resumed = mlp(seed=123)  # different init: everything must come from the file
    resumed.load_state_dict(saved["model"])
    opt2 = NudgedSGD(resumed.parameters(), lr=0.1, gamma=1.0, k=4)  # gamma, wd, momentum come back too
    assert opt2.subspace is None
    opt2.load_state_dict(saved["opt"])
    assert opt2.subspace is not None
    assert torch.equal(opt2.subspace, e)
    assert opt2.param_groups[0]["gamma"] == 0.1
    for i in range(2, 4):
        train_step(resumed, opt2, i)
    assert torch.equal(flatten(trainable(resumed)), flatten(trainable(straight)))


def test_state_dict_without_subspace_round_trips() -> None:
    model = mlp()
    opt = NudgedSGD(model.parameters(), lr=0.1, gamma=0.1)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = NudgedSGD(model.parameters(), lr=0.1, gamma=0.1)
    opt2.set_random_subspace()
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.subspace is None


# ---------------------------------------------------------------- bad inputs


def test_bad_subspaces_raise() -> None:
    model = mlp()
    d = num_params(model)
    opt = NudgedSGD(model.parameters(), lr=0.1, gamma=0.1, k=3)
    with pytest.raises(ValueError, match=f"D={d + 1} columns.*D={d}"):
        opt.set_subspace(orthonormal(2, d + 1))
    with pytest.raises(ValueError, match=r"k'=4 .* at most k=3"):
        opt.set_subspace(orthonormal(4, d))
    for bad in (float("nan"), float("inf")):
        e = orthonormal(2, d)
        e[1, 5] = bad
        with pytest.raises(ValueError, match="non-finite"):
            opt.set_subspace(e)
    with pytest.raises(ValueError, match="not orthonormal"):
        opt.set_subspace(2 * orthonormal(2, d))
    with pytest.raises(ValueError, match=r"shape \(3, 4\)"):
        opt.set_subspace([[torch.zeros(4, 3), *list(trainable(model).values())[1:]]])
    with pytest.raises(ValueError, match="has 1 tensors"):
        opt.set_subspace([[torch.zeros(3, 4)]])
    with pytest.raises(ValueError, match=r"\(k, D\)"):
        opt.set_subspace(torch.zeros(1, 2, d))
    assert opt.subspace is None  # nothing half-set


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": -0.1},
        {"lr": float("nan")},
        {"lr": 0.1, "gamma": -1.0},
        {"lr": 0.1, "gamma": float("inf")},
        {"lr": 0.1, "k": 0},
        {"lr": 0.1, "momentum": -0.5},
        {"lr": 0.1, "variant": "correct_x"},
    ],
)
def test_bad_hyperparameters_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        NudgedSGD(mlp().parameters(), **kwargs)
