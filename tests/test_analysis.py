"""Tests of the projected-gradient kernels (sharpflow.analyses.gradients, .project_kernels, .escape_kernel)
against closed forms on an exact quadratic and plain autograd loops."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor, nn

from sharpflow.analyses import escape_kernel, gradients, project_kernels
from sharpflow.analyses.project import ProjectConfig
from sharpflow.params import flat_params, set_flat_params


class _Kernels:
    """The three kernel modules under one name, with the project config's grids as the defaults the
    analysis passes (the kernels themselves take them from the caller)."""

    DEFAULT_KS = tuple(sorted(ProjectConfig().cross_ks))
    DEFAULT_MULTIPLIERS = tuple(ProjectConfig().multipliers)
    DEFAULT_THRESHOLDS = tuple(ProjectConfig().width_thresholds)

    def __getattr__(self, name: str):
        for module in (gradients, project_kernels, escape_kernel):
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(name)

    def cross_sections(self, *args, ks=None, **kw):
        if len(args) < 7:
            kw["ks"] = self.DEFAULT_KS if ks is None else ks
        return project_kernels.cross_sections(*args, **kw)

    def cross_section_widths(self, df, thresholds=None):
        return project_kernels.cross_section_widths(df, self.DEFAULT_THRESHOLDS if thresholds is None else thresholds)

    def decomposed_step(self, *args, multipliers=None, **kw):
        return project_kernels.decomposed_step(
            *args, multipliers=self.DEFAULT_MULTIPLIERS if multipliers is None else multipliers, **kw)


an = _Kernels()

D = 6
LAMBDAS = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# An exact quadratic: loss of a batch = mean_n ½ (w − y_n)ᵀ A (w − y_n), Hessian A for every batch.
# ----------------------------------------------------------------------------------------------
class Quadratic(nn.Module):
    def __init__(self, w0: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w0.clone())

    def forward(self, x: Tensor) -> Tensor:
        # x is a dummy (n, 1) input: one copy of w per example, compared with its target y_n.
        return self.w.expand(x.shape[0], -1)


class Problem:
    """Quadratic model, loss, eigenpairs and data, all float64."""

    def __init__(self, seed: int = 0, sizes: tuple[int, ...] = (4, 4, 4, 4, 3)) -> None:
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
        self.E = q.T.contiguous()  # rows are eigenvectors, descending eigenvalue
        self.lam = LAMBDAS.clone()
        self.A = self.E.T @ torch.diag(self.lam) @ self.E
        self.theta = torch.randn(D, generator=gen, dtype=torch.float64)
        self.model = Quadratic(torch.zeros(D, dtype=torch.float64))
        self.batches = [
            (torch.zeros(n, 1, dtype=torch.float64), torch.randn(n, D, generator=gen, dtype=torch.float64))
            for n in sizes
        ]
        self.y_all = torch.cat([y for _, y in self.batches])

    def loss_fn(self, out: Tensor, y: Tensor) -> Tensor:
        r = out - y
        return 0.5 * torch.einsum("ni,ij,nj->n", r, self.A, r).mean()

    def loss(self, w: Tensor) -> float:
        """Closed form: the mean loss over all examples of self.batches."""
        r = w[None] - self.y_all
        return float(0.5 * torch.einsum("ni,ij,nj->n", r, self.A, r).mean())

    def grad_full(self, w: Tensor) -> Tensor:
        return self.A @ (w - self.y_all.mean(0))

    def grad_batch(self, w: Tensor, b: int) -> Tensor:
        return self.A @ (w - self.batches[b][1].mean(0))


@pytest.fixture
def qp() -> Problem:
    return Problem()


def _mlp_setup(sizes: list[int], seed: int = 0, conv: bool = False):
    """A tiny MLP on (n, 4) inputs, or (conv=True) a tiny CNN on (n, 2, 5, 5) images; 3 classes."""
    torch.manual_seed(seed)
    if conv:
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3, 3))
        shape: tuple[int, ...] = (2, 5, 5)
    else:
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        shape = (4,)
    model = model.double().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(n, *shape, generator=gen, dtype=torch.float64),
                torch.randint(0, 3, (n,), generator=gen)) for n in sizes]
    return model, nn.functional.cross_entropy, batches


def _autograd_grad(model: nn.Module, loss_fn, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Reference gradient: a deep copy of the model, parameters set, loss.backward()."""
    m = copy.deepcopy(model)
    set_flat_params(m, theta)
    m.zero_grad()
    loss_fn(m(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in m.parameters()])


# ----------------------------------------------------------------------------------------------
# Gradients and losses
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("sizes", [[8] * 5, [8, 8, 5, 8, 3, 5]])
@pytest.mark.parametrize("vectorise", [False, True])
def test_batch_gradients_match_autograd_loop(sizes: list[int], conv: bool, vectorise: bool, monkeypatch) -> None:
    monkeypatch.setattr(gradients, "VMAP", vectorise)  # both the vmap and the plain-loop paths
    model, loss_fn, batches = _mlp_setup(sizes, conv=conv)
    theta = flat_params(model)
    before = theta.clone()
    got = an.batch_gradients(model, loss_fn, theta, batches, chunk=2)
    ref = torch.stack([_autograd_grad(model, loss_fn, theta, x, y) for x, y in batches])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat_params(model), before, rtol=0, atol=0)  # weights untouched


def test_full_gradient_exact_weighting_uneven_batches() -> None:
    model, loss_fn, batches = _mlp_setup([8, 8, 5, 8, 3])
    theta = flat_params(model) + 0.1
    got = an.full_gradient(model, loss_fn, theta, batches, chunk=2)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    ref = _autograd_grad(model, loss_fn, theta, x, y)  # gradient of the loss on the concatenation
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    # A plain mean of per-batch gradients is NOT the answer with uneven batches: the test can fail.
    naive = an.batch_gradients(model, loss_fn, theta, batches).mean(0)
    assert (naive - ref).abs().max() > 1e-4


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("vectorise", [False, True])
def test_loss_at_matches_per_theta_evaluation(conv: bool, vectorise: bool, monkeypatch) -> None:
    monkeypatch.setattr(gradients, "VMAP", vectorise)
    model, loss_fn, batches = _mlp_setup([8, 8, 5, 8, 3], conv=conv)
    gen = torch.Generator().manual_seed(3)
    thetas = flat_params(model) + 0.3 * torch.randn(5, flat_params(model).numel(), generator=gen,
                                                    dtype=torch.float64)
    got = an.loss_at(model, loss_fn, thetas, batches, chunk=2)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    ref = []
    for t in thetas:
        m = copy.deepcopy(model)
        set_flat_params(m, t)
        ref.append(float(loss_fn(m(x), y).detach()))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)
    # non-finite parameter vectors give NaN, the others are unaffected
    thetas[1, 0] = math.nan
    got2 = an.loss_at(model, loss_fn, thetas, batches, chunk=2)
    assert math.isnan(got2[1]) and np.allclose(np.delete(got2.numpy(), 1), np.delete(ref, 1), rtol=1e-12)


class _NotVmappable(nn.Module):
    """Data-dependent Python control flow (``.item()``) cannot run under vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3).double()

    def forward(self, x: Tensor) -> Tensor:
        out = self.lin(x)
        return out if out.sum().item() < 1e9 else -out


def test_vmap_fallback_loop_gives_same_numbers(monkeypatch) -> None:
    monkeypatch.setattr(gradients, "VMAP", True)  # ask for vmap; the model cannot be vmapped
    torch.manual_seed(0)
    model = _NotVmappable()
    _, loss_fn, batches = _mlp_setup([6, 6, 6])
    theta = flat_params(model)
    with pytest.warns(RuntimeWarning, match="falling back"):
        got = an.batch_gradients(model, loss_fn, theta, batches)
    ref = torch.stack([_autograd_grad(model, loss_fn, theta, x, y) for x, y in batches])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    with pytest.warns(RuntimeWarning, match="falling back"):
        losses = an.loss_at(model, loss_fn, torch.stack([theta, theta + 0.1]), batches)
    assert losses.shape == (2,) and torch.isfinite(losses).all()


def test_quadratic_fixture_is_exact(qp: Problem) -> None:
    """The test problem itself: the package's gradient and loss agree with the closed forms."""
    g = an.batch_gradients(qp.model, qp.loss_fn, qp.theta, qp.batches)
    for b in range(len(qp.batches)):
        torch.testing.assert_close(g[b], qp.grad_batch(qp.theta, b))
    torch.testing.assert_close(an.full_gradient(qp.model, qp.loss_fn, qp.theta, qp.batches),
                               qp.grad_full(qp.theta))
    assert float(an.loss_at(qp.model, qp.loss_fn, qp.theta, qp.batches)[0]) == pytest.approx(qp.loss(qp.theta))
    H = torch.autograd.functional.hessian(
        lambda w: qp.loss_fn(w.expand(3, -1), qp.batches[0][1][:3]), qp.theta)
    torch.testing.assert_close(H, qp.A)


# ----------------------------------------------------------------------------------------------
# 1. Alignment
# ----------------------------------------------------------------------------------------------
def test_alignment_inside_and_orthogonal_to_subspace(qp: Problem) -> None:
    K = 3
    E = qp.E[:K]
    gen = torch.Generator().manual_seed(5)
    inside = torch.randn(K, generator=gen, dtype=torch.float64) @ E
    outside = torch.randn(D, generator=gen, dtype=torch.float64)
    outside = outside - E.T @ (E @ outside)
    grads = torch.stack([inside, outside, torch.zeros(D, dtype=torch.float64)])
    df = an.alignment(grads, E, full_grad=inside, n_random=4, generator=1)

    assert len(df) == 4 * (K + 4 + 1)
    assert set(df.columns) >= {"source", "batch", "direction", "cos", "abs_cos", "frac_in_subspace", "diverged"}
    eig = df[df.kind == "eigen"]
    sub = df[df.direction == "subspace"].set_index("batch")
    s_in = eig[eig.batch == 0]
    assert (s_in.cos**2).sum() == pytest.approx(1.0, abs=1e-12)
    assert sub.loc[0, "frac_in_subspace"] == pytest.approx(1.0, abs=1e-12)
    assert sub.loc[-1, "frac_in_subspace"] == pytest.approx(1.0, abs=1e-12)
    assert (df[df.source == "full"].cos.to_numpy()[:K] == pytest.approx(s_in.cos.to_numpy()))
    # signed cosines equal the hand-computed ones
    np.testing.assert_allclose(s_in.cos.to_numpy(), (E @ inside / inside.norm()).numpy(), atol=1e-12)
    assert np.abs(eig[eig.batch == 1].cos).max() < 1e-12
    assert sub.loc[1, "frac_in_subspace"] == pytest.approx(0.0, abs=1e-12)
    # zero gradient: NaN cosines, no crash, not flagged as diverged
    zero = df[df.batch == 2]
    assert zero.cos.isna().all() and zero.frac_in_subspace.isna().all() and not zero.diverged.any()
    # reproducible random directions
    df2 = an.alignment(grads, E, full_grad=inside, n_random=4, generator=1)
    np.testing.assert_array_equal(df.cos.to_numpy(), df2.cos.to_numpy())


def test_random_cos_baseline_large_dim() -> None:
    dim, n = 10_000, 1000
    g = torch.zeros(1, dim, dtype=torch.float64)
    g[0, 0] = 1.0
    df = an.alignment(g, torch.zeros(0, dim, dtype=torch.float64), n_random=n, generator=0)
    a = df[df.kind == "random"].abs_cos.to_numpy()
    sem = a.std(ddof=1) / math.sqrt(n)
    assert abs(a.mean() - an.random_cos_baseline(dim)) < 4 * sem
    assert an.random_cos_baseline(dim) == pytest.approx(an.random_cos_baseline(dim, exact=True), rel=1e-4)


def test_random_cos_baseline_exact_small_dim() -> None:
    assert an.random_cos_baseline(2, exact=True) == pytest.approx(2 / math.pi)
    dim, n = 5, 20_000
    g = torch.ones(1, dim, dtype=torch.float64)
    df = an.alignment(g, torch.zeros(0, dim, dtype=torch.float64), n_random=n, generator=7)
    a = df[df.kind == "random"].abs_cos.to_numpy()
    sem = a.std(ddof=1) / math.sqrt(n)
    assert abs(a.mean() - an.random_cos_baseline(dim, exact=True)) < 4 * sem
    # ... while the large-dim approximation is measurably off at dim=5
    assert abs(a.mean() - an.random_cos_baseline(dim)) > 6 * sem


# ----------------------------------------------------------------------------------------------
# 2. Cross-sections
# ----------------------------------------------------------------------------------------------
def _closed_form_k(qp: Problem, e: Tensor, s: float, tau: float) -> tuple[float, float]:
    """|k| per side where L0 + b·t + ½λt² first equals τ·L0 (t = ±k·s), b = ∇Lᵀe, λ = eᵀAe."""
    L0 = qp.loss(qp.theta)
    b = float(qp.grad_full(qp.theta) @ e)
    lam = float(e @ qp.A @ e)
    disc = math.sqrt(b * b + 2 * lam * (tau - 1) * L0)
    return (-b + disc) / lam / s, (b + disc) / lam / s


def test_cross_sections_are_parabolas_with_eigenvalue_curvature(qp: Problem) -> None:
    grads = an.batch_gradients(qp.model, qp.loss_fn, qp.theta, qp.batches)
    lr = 0.1
    dirs = {"e1": qp.E[0], "e3": qp.E[2], "e5": qp.E[4]}
    steps = {n: an.typical_step(grads, e, lr) for n, e in dirs.items()}
    assert steps["e1"] == pytest.approx(lr * float((grads @ qp.E[0]).abs().mean()))
    df = an.cross_sections(qp.model, qp.loss_fn, qp.theta, dirs, steps, qp.batches)

    assert len(df) == 3 * 15 and not df.diverged.any()
    assert sorted(df.k.unique()) == sorted(an.DEFAULT_KS)
    L0 = qp.loss(qp.theta)
    for i, name in ((0, "e1"), (2, "e3"), (4, "e5")):
        part = df[df.direction == name]
        a2, a1, a0 = np.polyfit(part.offset, part.loss, 2)
        assert 2 * a2 == pytest.approx(float(qp.lam[i]), rel=1e-9)
        assert a1 == pytest.approx(float(qp.grad_full(qp.theta) @ qp.E[i]), rel=1e-8, abs=1e-10)
        assert a0 == pytest.approx(L0, rel=1e-10)
        for _, row in part.iterrows():  # every point, not just the fit
            assert row.loss == pytest.approx(qp.loss(qp.theta + row.offset * qp.E[i]), rel=1e-12)
        assert part[part.k == 0].rel_loss.item() == 1.0


def test_cross_section_widths_match_closed_form(qp: Problem) -> None:
    dirs = {"e1": qp.E[0], "e3": qp.E[2], "e5": qp.E[4]}
    steps = {"e1": 0.05, "e3": 0.1, "e5": 0.1}
    taus = (1.01, 1.1, 1.5, 2.0)
    for ks, dense in ((an.DEFAULT_KS, False), (tuple(np.linspace(-16, 16, 641)), True)):
        df = an.cross_sections(qp.model, qp.loss_fn, qp.theta, dirs, steps, qp.batches, ks=ks)
        w = an.cross_section_widths(df, taus).set_index(["direction", "threshold", "side"])
        grid = np.array(sorted({abs(k) for k in ks if k != 0}))
        n_inf = 0
        for name, e in dirs.items():
            for tau in taus:
                kp, km = _closed_form_k(qp, e, steps[name], tau)
                for side, kstar in (("+", kp), ("-", km), ("min", min(kp, km))):
                    row = w.loc[(name, tau, side)]
                    above = grid[grid > kstar]
                    if len(above) == 0:
                        assert row.width_k == math.inf and row.width_k_interp == math.inf
                        n_inf += 1
                        continue
                    assert row.width_k == pytest.approx(above[0], abs=1e-9)
                    assert row.width == pytest.approx(above[0] * steps[name])
                    # the chord of a convex curve lies above it: interpolation crosses slightly early
                    assert row.width_k_interp <= kstar + 1e-9
                    if dense:
                        assert row.width_k_interp == pytest.approx(kstar, abs=1e-3)
        if not dense:
            assert 0 < n_inf < len(dirs) * len(taus) * 3  # both outcomes exercised


def test_cross_section_widths_hand_computed() -> None:
    k = [-2.0, -1.0, 0.0, 1.0, 2.0, 4.0]
    rel = [math.inf, 1.05, 1.0, 1.02, 1.3, 3.0]
    df = pd.DataFrame({"direction": "d", "k": k, "step_size": 0.5, "offset": np.multiply(k, 0.5),
                       "loss": np.multiply(rel, 2.0), "rel_loss": rel, "diverged": False})
    w = an.cross_section_widths(df, thresholds=(1.1, 5.0)).set_index(["threshold", "side"])
    # + side, τ=1.1: first above at k=2 (1.3); chord from (1, 1.02): 1 + (0.08/0.28)·1
    assert w.loc[(1.1, "+")].width_k == 2.0
    assert w.loc[(1.1, "+")].width_k_interp == pytest.approx(1 + 0.08 / 0.28)
    assert w.loc[(1.1, "+")].width == 1.0
    # − side: the overflowed (inf) loss at k=−2 counts as exceeding, reported at the grid point
    assert w.loc[(1.1, "-")].width_k == 2.0 and w.loc[(1.1, "-")].width_k_interp == 2.0
    assert w.loc[(1.1, "min")].width_k_interp == pytest.approx(1 + 0.08 / 0.28)
    # τ=5 never reached on the + side: inf; the − side still crosses at the inf sample
    assert w.loc[(5.0, "+")].width_k == math.inf and w.loc[(5.0, "min")].width_k == 2.0


# ----------------------------------------------------------------------------------------------
# 3. Decomposed step
# ----------------------------------------------------------------------------------------------
def test_decomposed_step_matches_quadratic_closed_form(qp: Problem) -> None:
    grads = an.batch_gradients(qp.model, qp.loss_fn, qp.theta, qp.batches)
    lr = 0.13
    df = an.decomposed_step(qp.model, qp.loss_fn, qp.theta, grads, qp.E, qp.lam, lr, qp.batches,
                            n_random=2, generator=0, chunk=7)
    M, k, A = len(qp.batches), D, len(an.DEFAULT_MULTIPLIERS)
    assert len(df) == M * (k + 2 + 1) * A and not df.diverged.any()
    L0 = qp.loss(qp.theta)
    gL = qp.grad_full(qp.theta)
    for _, r in df[df.kind == "eigen"].iterrows():
        i = r["rank"] - 1
        g, e, lam = grads[r.grad], qp.E[i], float(qp.lam[i])
        c = r.lr_eff * float(g @ e)
        dL = -c * float(gL @ e) + 0.5 * c * c * lam  # L(θ − c e) − L(θ), exact on a quadratic
        assert r.rel_change_pct == pytest.approx(100 * dL / L0, rel=1e-9, abs=1e-12)
        assert r.eta_lambda_half == pytest.approx(r.lr_eff * lam / 2)
        assert r.eigenvalue == lam
    for _, r in df[df.kind == "full"].iterrows():
        g = grads[r.grad]
        dL = -r.lr_eff * float(gL @ g) + 0.5 * r.lr_eff**2 * float(g @ qp.A @ g)
        assert r.rel_change_pct == pytest.approx(100 * dL / L0, rel=1e-9, abs=1e-12)
        assert r.g_dot_d == pytest.approx(float(g.norm()))
    rnd = df[df.kind == "random"]
    assert rnd.eta_lambda_half.isna().all() and set(rnd.direction) == {"rand1", "rand2"}
    # random rows: on a quadratic ΔL(a) = −a·lr·(gᵀr)(∇Lᵀr) + ½(a·lr·gᵀr)²·rᵀAr, a parabola through 0
    for _, part in rnd.groupby(["grad", "direction"]):
        coef, res, *_ = np.polyfit(part.multiplier, part.rel_change_pct, 2, full=True)
        assert abs(coef[2]) < 1e-9 and res.sum() < 1e-18


def test_decomposed_step_with_nudged_learning_rates(qp: Problem) -> None:
    """Nudged-SGD: the step along e_i (i ≤ K) has rate γη, and the whole step is −η·u with the
    nudged gradient u = g − (1−γ)Σ_{i≤K}(gᵀe_i)e_i; checked against the quadratic's closed form."""
    grads = an.batch_gradients(qp.model, qp.loss_fn, qp.theta, qp.batches)
    lr, gamma, K = 0.13, 0.1, 2
    lrs = [gamma * lr if i < K else lr for i in range(D)]
    EK = qp.E[:K]
    u = grads - (1 - gamma) * (grads @ EK.T) @ EK
    df = an.decomposed_step(qp.model, qp.loss_fn, qp.theta, grads, qp.E, qp.lam, lr, qp.batches,
                            n_random=1, multipliers=[1.0, 2.0], direction_lr=lrs, full_steps=u)
    L0, gL = qp.loss(qp.theta), qp.grad_full(qp.theta)
    eig = df[df.kind == "eigen"]
    np.testing.assert_allclose(eig.lr_eff, [lrs[r - 1] * a for r, a in zip(eig["rank"], eig.multiplier, strict=True)])
    for _, r in eig.iterrows():
        e, lam = qp.E[r["rank"] - 1], float(qp.lam[r["rank"] - 1])
        c = r.lr_eff * float(grads[r.grad] @ e)
        assert r.rel_change_pct == pytest.approx(100 * (-c * float(gL @ e) + 0.5 * c * c * lam) / L0, rel=1e-9)
        assert r.eta_lambda_half == pytest.approx(r.lr_eff * lam / 2)
    for _, r in df[df.kind == "full"].iterrows():
        v = u[r.grad]
        dL = -r.lr_eff * float(gL @ v) + 0.5 * r.lr_eff**2 * float(v @ qp.A @ v)
        assert r.rel_change_pct == pytest.approx(100 * dL / L0, rel=1e-9)
    assert (df[df.kind != "eigen"].lr_eff.isin([lr, 2 * lr])).all()
    with pytest.raises(ValueError, match="direction learning rates"):
        an.decomposed_step(qp.model, qp.loss_fn, qp.theta, grads, qp.E, qp.lam, lr, qp.batches, direction_lr=[lr])


def test_decomposed_step_sign_flips_at_eta_lambda_two(qp: Problem) -> None:
    lr = 0.1
    g = qp.grad_full(qp.theta)[None]  # gradient of the measured loss: ΔL = −η'(gᵀe)²(1 − η'λ/2)
    mults = sorted({2 / (lr * float(lam)) * f for lam in qp.lam for f in (1 - 1e-3, 1 + 1e-3)})
    df = an.decomposed_step(qp.model, qp.loss_fn, qp.theta, g, qp.E, qp.lam, lr, qp.batches,
                            multipliers=mults, n_random=0)
    eig = df[df.kind == "eigen"]
    near = eig[(eig.eta_lambda_half - 1).abs() < 2e-3]
    assert len(near) == 2 * D
    assert ((near.rel_change_pct > 0) == (near.eta_lambda_half > 1)).all()
    assert (np.sign(eig.rel_change_pct) == np.sign(eig.eta_lambda_half - 1)).all()


# ----------------------------------------------------------------------------------------------
# 4. Escape ablation
# ----------------------------------------------------------------------------------------------
def _escape(qp: Problem, mode: str, steps: int = 10, lr: float = 0.05, **kw):
    return an.escape_ablation(qp.model, qp.loss_fn, qp.theta, qp.E[0], itertools.cycle(qp.batches),
                              lr=lr, steps=steps, mode=mode, eval_batches=qp.batches, eval_every=4, **kw)


def test_escape_none_matches_manual_sgd(qp: Problem) -> None:
    df = _escape(qp, "none", lambda_max_fn=lambda th: float(qp.lam[0]))
    assert df.step.tolist() == [0, 4, 8, 10]
    th = qp.theta.clone()
    ref = {0: qp.loss(th)}
    for t in range(10):
        th = th - 0.05 * qp.grad_batch(th, t % len(qp.batches))
        ref[t + 1] = qp.loss(th)
    np.testing.assert_allclose(df.loss.to_numpy(), [ref[s] for s in df.step], rtol=1e-12)
    assert df.e1_coord.iloc[-1] == pytest.approx(float((th - qp.theta) @ qp.E[0]))
    assert (df.lambda_max == 5.0).all() and not df.diverged.any()
    assert _escape(qp, "none").lambda_max.isna().all()


def test_escape_with_momentum_and_weight_decay_matches_torch_sgd(qp: Problem) -> None:
    """Mode "none" with momentum and weight decay is torch.optim.SGD on the same batches."""
    df = _escape(qp, "none", momentum=0.9, weight_decay=0.01)
    model = Quadratic(qp.theta)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    ref = {0: qp.loss(qp.theta)}
    for t in range(10):
        x, y = qp.batches[t % len(qp.batches)]
        opt.zero_grad()
        qp.loss_fn(model(x), y).backward()
        opt.step()
        ref[t + 1] = qp.loss(model.w.detach())
    np.testing.assert_allclose(df.loss.to_numpy(), [ref[s] for s in df.step], rtol=1e-12)
    # "remove" with momentum: the buffer keeps the unedited direction, the motion along e1 stays zero
    rem = _escape(qp, "remove", momentum=0.9, weight_decay=0.01)
    assert rem.e1_coord.abs().max() < 1e-12 and rem.loss.iloc[-1] != df.loss.iloc[-1]


def test_escape_modes_geometry(qp: Problem) -> None:
    none = _escape(qp, "none")
    iso = _escape(qp, "isolate")
    np.testing.assert_allclose(iso.dist_from_start, iso.e1_coord.abs(), rtol=1e-12)  # θ − θ0 ∥ e1
    assert iso.dist_from_start.iloc[-1] > 1e-3
    rem = _escape(qp, "remove")
    assert rem.e1_coord.abs().max() < 1e-12 and rem.dist_from_start.iloc[-1] > 1e-3
    # rescale by 1 is plain SGD; rescale by 0 is removal
    r1 = _escape(qp, "rescale", factor=1.0)
    np.testing.assert_allclose(r1.loss, none.loss, rtol=1e-14)
    np.testing.assert_allclose(_escape(qp, "rescale", factor=0.0).loss, rem.loss, rtol=1e-12)
    # rescale by 2: the e1 coordinate evolves as c ← c − 2·lr·λ1·(c + e1ᵀ(θ0 − ȳ_b))
    r2 = _escape(qp, "rescale", factor=2.0, steps=3, lr=0.01)
    c, th = 0.0, qp.theta.clone()
    e = qp.E[0]
    for t in range(3):
        g = qp.grad_batch(th, t % len(qp.batches))
        th = th - 0.01 * (g + (g @ e) * e)
        c = float((th - qp.theta) @ e)
    assert r2.e1_coord.iloc[-1] == pytest.approx(c, rel=1e-12)
    assert set(r2["mode"]) == {"rescale"} and (r2.factor == 2.0).all()


def test_escape_freeze_vs_refreshed_remove(qp: Problem) -> None:
    calls = []

    def e1_fn(th: Tensor) -> Tensor:  # pretend the sharpest direction rotated to e2
        calls.append(th)
        return qp.E[1]

    rem = _escape(qp, "remove", e1_fn=e1_fn, refresh_every=3)
    assert len(calls) == 3  # refreshed before steps 3, 6, 9
    assert rem.e1_coord.abs().iloc[-1] > 1e-3  # after the refresh, motion along the initial e1 resumes
    fr = _escape(qp, "freeze", e1_fn=e1_fn, refresh_every=3)
    assert fr.e1_coord.abs().max() < 1e-14 and fr.dist_from_start.iloc[-1] > 1e-3
    with pytest.raises(ValueError, match="both"):
        _escape(qp, "remove", e1_fn=e1_fn)


def test_escape_divergence_is_flagged(qp: Problem) -> None:
    # lr·λ1 = 50: the e1 coordinate is multiplied by ≈ −49 each step and overflows.
    df = an.escape_ablation(qp.model, qp.loss_fn, qp.theta, qp.E[0], itertools.cycle(qp.batches),
                            lr=10.0, steps=400, mode="isolate", eval_batches=qp.batches, eval_every=50)
    assert not df.diverged.iloc[0] and df.diverged.iloc[-1]
    assert df[df.diverged].loss.isna().all()
    with pytest.raises(ValueError, match="ran out"):
        an.escape_ablation(qp.model, qp.loss_fn, qp.theta, qp.E[0], iter(qp.batches[:2]), lr=0.1,
                           steps=5, mode="none", eval_batches=qp.batches, eval_every=1)


# ----------------------------------------------------------------------------------------------
# 5. Non-finite theta
# ----------------------------------------------------------------------------------------------
def test_nan_theta_gives_diverged_rows(qp: Problem) -> None:
    bad = qp.theta.clone()
    bad[2] = math.nan
    grads = an.batch_gradients(qp.model, qp.loss_fn, bad, qp.batches)
    assert grads.isnan().all()
    assert an.full_gradient(qp.model, qp.loss_fn, bad, qp.batches).isnan().all()
    al = an.alignment(grads, qp.E, an.full_gradient(qp.model, qp.loss_fn, bad, qp.batches))
    assert al.diverged.all() and al.cos.isna().all() and al.frac_in_subspace.isna().all()
    cs = an.cross_sections(qp.model, qp.loss_fn, bad, {"e1": qp.E[0]}, {"e1": 0.1}, qp.batches)
    assert len(cs) == 15 and cs.diverged.all() and cs.loss.isna().all()
    w = an.cross_section_widths(cs)
    assert w.diverged.all() and w.width_k.isna().all()
    good_grads = an.batch_gradients(qp.model, qp.loss_fn, qp.theta, qp.batches)
    ds = an.decomposed_step(qp.model, qp.loss_fn, bad, good_grads, qp.E, qp.lam, 0.1, qp.batches)
    assert ds.diverged.all() and ds.rel_change_pct.isna().all()
    # a single bad gradient only spoils its own rows
    mixed = good_grads.clone()
    mixed[1, 0] = math.inf
    ds2 = an.decomposed_step(qp.model, qp.loss_fn, qp.theta, mixed, qp.E, qp.lam, 0.1, qp.batches)
    assert ds2[ds2.grad == 1].diverged.all() and ds2[ds2.grad == 1].rel_change_pct.isna().all()
    assert not ds2[ds2.grad != 1].diverged.any() and ds2[ds2.grad != 1].rel_change_pct.notna().all()
    esc = an.escape_ablation(qp.model, qp.loss_fn, bad, qp.E[0], itertools.cycle(qp.batches), lr=0.1,
                             steps=5, mode="remove", eval_batches=qp.batches, eval_every=2,
                             lambda_max_fn=lambda th: 1.0)
    assert esc.diverged.all() and esc.loss.isna().all() and esc.lambda_max.isna().all()


# ----------------------------------------------------------------------------------------------
# 6. The escape stage on a trained run: its data order, its learning rate, its refreshes
# ----------------------------------------------------------------------------------------------
def test_escape_stage_continues_the_run_and_refreshes_e1(tiny_data, tiny_dataset, tmp_path) -> None:
    """Plain mode "none" from the step-16 checkpoint of a run whose step schedule halves η at
    step 16 retraces the run exactly: after 16 iterations θ is the step-32 checkpoint (same
    mini-batches in the same order, η in force = 0.05). With e1 refreshed every iteration,
    "remove" and "freeze" differ; with refresh_every 0 they are the same dynamics."""
    from sharpflow.analyses.context import open_checkpoint
    from sharpflow.analyses.escape import EscapeConfig
    from sharpflow.analyses.escape import compute as escape
    from sharpflow.analyses.spectrum import compute as spectrum
    from sharpflow.config import SpectrumConfig
    from sharpflow.data import load_prepared
    from sharpflow.train import train

    from .conftest import tiny_run

    run = tiny_run(optimizer__schedule={"kind": "step", "milestones": [1.0], "factor": 0.5})
    train(run, tiny_dataset, run_name="r", data_dir=tiny_data, out_dir=tmp_path, progress=False, log=lambda *_: None)
    data = load_prepared(tiny_data)
    ck = tmp_path / "checkpoints"
    ctx = open_checkpoint(run, "r", data, ck / "step00000016.pt", torch.device("cpu"), log=lambda *_: None)
    _, ev = spectrum(ctx, SpectrumConfig(k=2, tol=1e-6), log=lambda *_: None)
    ctx.eigvecs = ev
    assert ctx.lr == 0.05
    out = escape(ctx, EscapeConfig(checkpoints={"r": [16]}, iterations=16, eval_every=8, subset=64,
                                   modes=["none", "remove", "freeze"], lambda_tol=1e-4))["escape"]
    theta16 = flat_params(ctx.model()).double()
    theta32 = flat_params(open_checkpoint(run, "r", data, ck / "step00000032.pt", torch.device("cpu")).model())
    none = out[(out["mode"] == "none") & (out.step == 16)].iloc[0]
    assert none.dist_from_start == pytest.approx(float((theta32.double() - theta16).norm()), rel=1e-4)
    assert (out.lr == 0.05).all() and (out[out["mode"] == "remove"].refresh_every == 1).all()
    last = out[out.step == 16].set_index("mode")
    assert abs(last.loc["remove", "loss"] - last.loc["freeze", "loss"]) > 1e-6
    fixed = escape(ctx, EscapeConfig(checkpoints={"r": [16]}, iterations=16, eval_every=8, subset=64,
                                     modes=["remove", "freeze"], refresh_every=0))["escape"].set_index(["mode", "step"])
    np.testing.assert_allclose(fixed.loc["remove"].loss, fixed.loc["freeze"].loss, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# 7. The Hessian of augmented data (spectrum.augment)
# ----------------------------------------------------------------------------------------------
def test_spectrum_over_a_fixed_augmented_sample(tmp_path) -> None:
    """spectrum.augment 'fixed': the Hessian of an augmented copy of the subset, drawn per checkpoint
    (the same for every product of it, another for another step); its λ1 is that of an operator
    built by hand over those images and differs from the raw subset's; recorded in the table."""
    from sharpflow.analyses.context import open_checkpoint
    from sharpflow.analyses.spectrum import augment_batches
    from sharpflow.analyses.spectrum import compute as spectrum
    from sharpflow.config import DatasetConfig, RunConfig, SpectrumConfig
    from sharpflow.data import hessian_batches, load_prepared, prepare
    from sharpflow.hessian import HessianOperator, top_eigenpairs
    from sharpflow.models import loss_fn
    from sharpflow.train import train

    ds = DatasetConfig(source="synthetic_images", synthetic_train=120, synthetic_test=20, valid_size=20,
                       hessian_subset=24, seed=1)
    prepare(ds, tmp_path / "data", progress=False, log=lambda *_: None)
    run = RunConfig.model_validate({"dataset": "img", "model": {"name": "mlp", "kwargs": {"hidden": [3]}},
                                    "optimizer": {"lr": 0.05, "batch_size": 20}, "steps": 10, "augment": True,
                                    "checkpoints": {"zoom_every": 0, "every_epochs": 1}, "device": "cpu"})
    train(run, ds, run_name="r", data_dir=tmp_path / "data", out_dir=tmp_path / "r", progress=False,
          log=lambda *_: None)
    data = load_prepared(tmp_path / "data")
    ctx = open_checkpoint(run, "r", data, tmp_path / "r" / "checkpoints" / "step00000010.pt", torch.device("cpu"),
                          log=lambda *_: None)
    quiet = {"log": lambda *_: None}
    fixed, _ = spectrum(ctx, SpectrumConfig(k=1, tol=1e-5, augment="fixed"), **quiet)
    raw, _ = spectrum(ctx, SpectrumConfig(k=1, tol=1e-5), **quiet)
    assert fixed.augment.tolist() == ["fixed"] and raw.augment.tolist() == ["none"]
    raw_batches = hessian_batches(data, 24)
    aug = augment_batches(raw_batches, 10)
    assert not torch.equal(aug[0][0], raw_batches[0][0])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(aug, augment_batches(raw_batches, 10), strict=True))
    assert not torch.equal(aug[0][0], augment_batches(raw_batches, 11)[0][0])
    by_hand = top_eigenpairs(HessianOperator(ctx.model(), loss_fn, aug), k=1, tol=1e-5, backend="arpack")
    assert float(fixed.eigenvalue.iloc[0]) == pytest.approx(float(by_hand.eigenvalues[0]), rel=1e-4)
    assert abs(float(fixed.eigenvalue.iloc[0]) / float(raw.eigenvalue.iloc[0]) - 1) > 1e-3
    # a run without augmentation: 'fixed' changes nothing
    plain = ctx.run.model_copy(update={"augment": False})
    ctx2 = open_checkpoint(plain, "r", data, ctx.checkpoint_path, torch.device("cpu"), log=lambda *_: None)
    again, _ = spectrum(ctx2, SpectrumConfig(k=1, tol=1e-5, augment="fixed"), **quiet)
    assert again.augment.tolist() == ["none"] and again.eigenvalue.iloc[0] == raw.eigenvalue.iloc[0]
