"""sharpflow.hessian against independent truths: dense Hessians from
``torch.autograd.functional.hessian`` with the loss written out by hand, ``torch.linalg.eigh``,
and matrices with a chosen spectrum."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import sharpflow.hessian.operators as operators_module
import sharpflow.hessian.tracing as tracing_module
from sharpflow.hessian import DenseOperator, HessianOperator, frobenius_norm, top_eigenpairs, trace
from sharpflow.params import flat_params, unflatten

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny problems gain nothing from threads, and on a shared machine extra threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_mlp(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    """A few hundred parameters; tanh keeps the Hessian indefinite and dense."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(5, 8), nn.Tanh()]
    if batchnorm:
        layers += [nn.BatchNorm1d(8), nn.Dropout(0.5)]
    layers += [nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(DT)


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)).to(DT)


def data(sizes: list[int], shape: tuple[int, ...] = (5,), seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=gen, dtype=DT), torch.randint(0, 3, (n,), generator=gen)) for n in sizes]


def dense_hessian(model: nn.Module, batches: list[tuple[Tensor, Tensor]], weight_decay: float = 0.0) -> Tensor:
    """Truth: the Hessian of (sum of per-example losses over all examples)/N + wd/2‖θ‖², taken by
    ``torch.autograd.functional.hessian`` on the concatenated data (no batches, no weights)."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    like = {n: p.detach() for n, p in model.named_parameters()}

    def loss(theta: Tensor) -> Tensor:
        out = functional_call(model, unflatten(theta, like), (x,))
        return F.cross_entropy(out, y, reduction="sum") / x.shape[0] + 0.5 * weight_decay * theta.square().sum()

    return torch.autograd.functional.hessian(loss, flat_params(model))


def rand_sym(spectrum: list[float], dim: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(A, Q): A = Q diag(λ) Qᵀ with the given leading eigenvalues and a small random remainder."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=DT))
    rest = 0.3 * torch.rand(dim - len(spectrum), generator=gen, dtype=DT) - 0.1
    lam = torch.cat([torch.tensor(spectrum, dtype=DT), rest])
    return (q * lam) @ q.T, q[:, : len(spectrum)]


def min_cos(u: Tensor, w: Tensor) -> float:
    """Smallest cosine of the principal angles between the row spaces of u (k, D) and w (k, D)."""
    qu, _ = torch.linalg.qr(u.T)
    qw, _ = torch.linalg.qr(w.T)
    return float(torch.linalg.svdvals(qu.T @ qw).min())


def dense_residuals(a: Tensor, vals: Tensor, vecs: Tensor) -> Tensor:
    return (vecs @ a - vals[:, None] * vecs).norm(dim=1)


# ---------------------------------------------------------------------------------------------
# The operator
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("method", ["double_backward", "fwd_rev"])
@pytest.mark.parametrize("make", [tiny_mlp, tiny_cnn])
def test_hvp_equals_dense_hessian(method: str, cache: bool, make) -> None:
    model = make()
    batches = data([6, 6], shape=(2, 6, 6)) if make is tiny_cnn else data([6, 6])
    h = dense_hessian(model, batches)
    op = HessianOperator(model, F.cross_entropy, batches, method=method, cache_graph=cache)
    assert op.dim == h.shape[0] and op.num_examples == 12
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(op.dim, generator=gen, dtype=DT)
    block = torch.randn(op.dim, 4, generator=gen, dtype=DT)
    for _ in range(2):  # the second round runs on whatever the first one cached
        torch.testing.assert_close(op.matvec(v), h @ v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(op.matvec(block), h @ block, rtol=1e-10, atol=1e-12)
    assert op.matvecs == 10  # a block of 4 counts 4


@pytest.mark.parametrize("threshold", [0.0, math.inf])
def test_auto_method_switches_only_when_products_are_large(monkeypatch, threshold: float) -> None:
    monkeypatch.setattr(operators_module, "_TRACE_ABOVE_WORK", threshold)
    model, batches = tiny_mlp(), data([5, 7])
    h = dense_hessian(model, batches)
    op = HessianOperator(model, F.cross_entropy, batches)
    v = torch.randn(op.dim, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert op.method == "double_backward"
    torch.testing.assert_close(op.matvec(v), h @ v, rtol=1e-10, atol=1e-12)
    assert op.method == ("fwd_rev" if threshold == 0.0 else "double_backward")
    torch.testing.assert_close(op.matvec(v), h @ v, rtol=1e-10, atol=1e-12)


def test_untraceable_model_falls_back_to_double_backward() -> None:
    class Branchy(nn.Module):  # Python control flow on a tensor value: make_fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(5, 3).to(DT)

        def forward(self, x: Tensor) -> Tensor:
            out = self.lin(x)
            return torch.tanh(out) if out.detach().sum() > 0 else out.square()

    model, batches = Branchy(), data([6])
    h = dense_hessian(model, batches)
    op = HessianOperator(model, F.cross_entropy, batches, method="fwd_rev", cache_graph=True)
    v = torch.randn(op.dim, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    with pytest.warns(RuntimeWarning, match="tracing forward-over-reverse failed"):
        hv = op.matvec(v)
    torch.testing.assert_close(hv, h @ v, rtol=1e-10, atol=1e-12)
    assert op.method == "double_backward"


def test_one_trace_serves_every_chunk_of_a_shape() -> None:
    """Forward-over-reverse is traced once per chunk shape, not once per chunk; the
    products of every chunk (and of the odd-sized last one) are still exactly the dense Hessian's."""
    model, batches = tiny_cnn(), data([4, 4, 4, 3], shape=(2, 6, 6))
    h = dense_hessian(model, batches)
    traced = []
    real = tracing_module._trace_hvp

    def counting(*args, **kw):
        traced.append(tuple(args[3].shape))
        return real(*args, **kw)

    op = HessianOperator(model, F.cross_entropy, batches, method="fwd_rev", cache_graph=True)
    v = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tracing_module, "_trace_hvp", counting)
        hv = op.matvec(v)
    assert traced == [(4, 2, 6, 6), (3, 2, 6, 6)]
    torch.testing.assert_close(hv, h @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matvec(v), hv, rtol=0, atol=0)  # the kept values are not consumed


def test_in_place_model_is_traced_per_chunk_and_exact() -> None:
    """An in-place activation mutates a primal value, so the shared trace cannot be split safely:
    each chunk is linearized on its own (torch.func.linearize) and the product stays exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    batches = data([6, 6])
    with pytest.raises(tracing_module._NotSplittable, match="in-place"):
        like = {n: p.detach() for n, p in model.named_parameters()}
        from sharpflow.params import loss_of_params

        tracing_module._trace_hvp(loss_of_params(model, F.cross_entropy), list(like), list(like.values()), *batches[0])
    h = dense_hessian(model, batches)
    op = HessianOperator(model, F.cross_entropy, batches, method="fwd_rev", cache_graph=True)
    v = torch.randn(op.dim, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fall-back to double backward
        torch.testing.assert_close(op.matvec(v), h @ v, rtol=1e-10, atol=1e-12)
    assert op.method == "fwd_rev"


def test_uneven_batches_weight_every_example_equally() -> None:
    model, batches = tiny_mlp(), data([3, 7, 2])
    h = dense_hessian(model, batches)
    op = HessianOperator(model, F.cross_entropy, batches)
    v = torch.randn(op.dim, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    torch.testing.assert_close(op.matvec(v), h @ v, rtol=1e-10, atol=1e-12)
    # A plain average of the three batch Hessians (the common mistake) is a different operator.
    naive = sum(dense_hessian(model, [b]) for b in batches) / 3
    assert (naive @ v - h @ v).abs().max() > 1e-3


def test_gradient_and_loss_match_autograd() -> None:
    model, batches, wd = tiny_mlp(), data([3, 7, 2]), 0.1
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    sq = sum(p.square().sum() for p in model.parameters())
    ref_loss = F.cross_entropy(model(x), y, reduction="sum") / 12 + 0.5 * wd * sq
    ref_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ref_loss, list(model.parameters()))])
    op = HessianOperator(model, F.cross_entropy, batches, weight_decay=wd)
    assert op.loss() == pytest.approx(float(ref_loss.detach()), rel=1e-12)
    torch.testing.assert_close(op.gradient(), ref_grad, rtol=1e-10, atol=1e-12)


def test_chunking_gives_the_same_operator() -> None:
    model, batches = tiny_mlp(), data([4, 9, 3])
    whole = HessianOperator(model, F.cross_entropy, batches)
    v = torch.randn(whole.dim, 3, generator=torch.Generator().manual_seed(2), dtype=DT)
    for size in (1, 5, 100):
        chunked = HessianOperator(model, F.cross_entropy, batches, chunk_size=size)
        assert len(chunked._chunks) == math.ceil(16 / size)
        torch.testing.assert_close(chunked.matvec(v), whole.matvec(v), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(chunked.gradient(), whole.gradient(), rtol=1e-12, atol=1e-13)


def test_weight_decay_adds_identity() -> None:
    model, batches = tiny_mlp(), data([8])
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(4), dtype=DT)
    plain = HessianOperator(model, F.cross_entropy, batches)
    decayed = HessianOperator(model, F.cross_entropy, batches, weight_decay=0.25)
    torch.testing.assert_close(decayed.matvec(v) - plain.matvec(v), 0.25 * v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(decayed.matvec(v), dense_hessian(model, batches, 0.25) @ v, rtol=1e-10, atol=1e-12)


def test_eval_mode_copy_leaves_the_users_model_alone() -> None:
    model, batches = tiny_mlp(batchnorm=True), data([6, 6])
    with torch.no_grad():  # non-trivial running statistics, so train and eval modes differ
        model[2].running_mean.uniform_(-0.5, 0.5)
        model[2].running_var.uniform_(0.5, 2.0)
    model.train()
    state = {n: t.clone() for n, t in model.state_dict().items()}
    op = HessianOperator(model, F.cross_entropy, batches, eval_mode=True)
    v = torch.randn(op.dim, 2, generator=torch.Generator().manual_seed(5), dtype=DT)
    hv = op.matvec(v)
    op.gradient()
    # The user's model: still in train mode everywhere, weights and running statistics untouched.
    assert all(m.training for m in model.modules())
    for n, t in model.state_dict().items():
        assert torch.equal(t, state[n]), n
    # The operator is the Hessian of the eval-mode network (running statistics, no dropout).
    frozen = tiny_mlp(batchnorm=True)
    frozen.load_state_dict(state)
    frozen.eval()
    torch.testing.assert_close(hv, dense_hessian(frozen, batches) @ v, rtol=1e-10, atol=1e-12)
    # and it is a snapshot: later changes to the model do not reach it.
    with torch.no_grad():
        model[0].weight.add_(1.0)
    torch.testing.assert_close(op.matvec(v), hv, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Eigenpairs
# ---------------------------------------------------------------------------------------------


def test_known_spectrum_with_true_residuals() -> None:
    a, q = rand_sym([9.0, 7.0, 6.0, 4.5, 3.0], 120)
    op = DenseOperator(a)
    res = top_eigenpairs(op, 5, tol=1e-8, block_size=3)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([9.0, 7.0, 6.0, 4.5, 3.0], dtype=DT), rtol=1e-10, atol=0)
    assert min_cos(res.eigenvectors, q.T) > 1 - 1e-10
    torch.testing.assert_close(res.eigenvectors @ res.eigenvectors.T, torch.eye(5, dtype=DT), atol=1e-12, rtol=0)
    # Reported residuals are true ones: recomputed here with the dense matrix.
    dense = dense_residuals(a, res.eigenvalues, res.eigenvectors)
    torch.testing.assert_close(res.residuals, dense, rtol=1e-3, atol=1e-12)
    assert bool(res.converged.all()) and float(res.rel_residuals.max()) <= 1e-8
    assert res.matvecs == op.matvecs and res.backend == "lanczos" and res.which == "LA"


def test_verify_recomputes_the_same_residuals() -> None:
    a, _ = rand_sym([5.0, 4.0, 3.0], 80, seed=2)
    plain = top_eigenpairs(DenseOperator(a), 3, tol=1e-4, block_size=2)
    checked = top_eigenpairs(DenseOperator(a), 3, tol=1e-4, block_size=2, verify=True)
    assert checked.matvecs == plain.matvecs + 3
    torch.testing.assert_close(checked.residuals, plain.residuals, rtol=1e-6, atol=1e-13)
    torch.testing.assert_close(
        plain.residuals, dense_residuals(a, plain.eigenvalues, plain.eigenvectors), rtol=1e-6, atol=1e-13
    )


def test_repeated_eigenvalue_whole_eigenspace() -> None:
    a, q = rand_sym([8.0, 5.0, 5.0, 5.0, 2.0], 100, seed=3)
    res = top_eigenpairs(DenseOperator(a), 5, tol=1e-9, block_size=4)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([8.0, 5.0, 5.0, 5.0, 2.0], dtype=DT), rtol=1e-9, atol=0)
    assert min_cos(res.eigenvectors[1:4], q[:, 1:4].T) > 1 - 1e-9  # the full 3-dim eigenspace


def test_negative_eigenvalues_la_versus_lm() -> None:
    a, q = rand_sym([6.0, -10.0, 4.0, -5.0, 3.0], 90, seed=4)
    la = top_eigenpairs(DenseOperator(a), 3, tol=1e-9, which="LA")
    lm = top_eigenpairs(DenseOperator(a), 3, tol=1e-9, which="LM")
    torch.testing.assert_close(la.eigenvalues, torch.tensor([6.0, 4.0, 3.0], dtype=DT), rtol=1e-9, atol=0)
    torch.testing.assert_close(lm.eigenvalues, torch.tensor([-10.0, 6.0, -5.0], dtype=DT), rtol=1e-9, atol=0)
    assert min_cos(lm.eigenvectors, q[:, [1, 0, 3]].T) > 1 - 1e-9
    arp = top_eigenpairs(DenseOperator(a), 3, tol=1e-9, which="LM", backend="arpack")
    torch.testing.assert_close(arp.eigenvalues, lm.eigenvalues, rtol=1e-9, atol=0)


def test_warm_start_needs_fewer_products() -> None:
    a, _ = rand_sym([10.0, 9.0, 8.0, 7.0, 6.0, 5.5], 300, seed=5)
    gen = torch.Generator().manual_seed(6)
    e = 0.02 * torch.randn(300, 300, generator=gen, dtype=DT)
    b = a + (e + e.T) / 2  # a nearby "checkpoint"
    prev = top_eigenpairs(DenseOperator(a), 6, tol=1e-6, block_size=6)
    cold = top_eigenpairs(DenseOperator(b), 6, tol=1e-6, block_size=6)
    warm = top_eigenpairs(DenseOperator(b), 6, tol=1e-6, block_size=6, v0=prev.eigenvectors)
    torch.testing.assert_close(warm.eigenvalues, torch.linalg.eigvalsh(b).flip(0)[:6], rtol=1e-9, atol=0)
    assert bool(warm.converged.all()) and bool(cold.converged.all())
    assert warm.matvecs < 0.75 * cold.matvecs


def test_warm_start_helps_lanczos_at_a_bulk_edge() -> None:
    # Six outliers just above a dense bulk reaching 8: like a network's Hessian, the last pairs
    # need many products whatever the start, but the previous vectors still save some.
    a, _ = rand_sym([10.0, 9.5, 9.0, 8.8, 8.6, 8.5], 300, seed=5)
    gen = torch.Generator().manual_seed(15)
    lam, q = torch.linalg.eigh(a)
    lam[:-6] = 8.0 * torch.rand(294, generator=gen, dtype=DT)
    a = (q * lam) @ q.T
    e = 0.005 * torch.randn(300, 300, generator=gen, dtype=DT)
    b = a + (e + e.T) / 2
    prev = top_eigenpairs(DenseOperator(a), 6, tol=1e-6)
    cold = top_eigenpairs(DenseOperator(b), 6, tol=1e-6)
    warm = top_eigenpairs(DenseOperator(b), 6, tol=1e-6, v0=prev.eigenvectors)
    torch.testing.assert_close(warm.eigenvalues, torch.linalg.eigvalsh(b).flip(0)[:6], rtol=1e-9, atol=0)
    assert bool(warm.converged.all()) and bool(cold.converged.all())
    assert warm.matvecs < 0.9 * cold.matvecs


def test_budget_exhausted_is_reported_not_hidden() -> None:
    a, _ = rand_sym([3.0, 2.9, 2.8, 2.7], 200, seed=7)
    with pytest.warns(RuntimeWarning, match="max_matvecs"):
        res = top_eigenpairs(DenseOperator(a), 4, tol=1e-10, max_matvecs=12, block_size=4)
    assert res.matvecs <= 12
    assert not bool(res.converged.all())
    assert bool((res.rel_residuals[~res.converged] > 1e-10).all())
    # The flags agree with the residuals recomputed here.
    dense = dense_residuals(a, res.eigenvalues, res.eigenvectors) / res.eigenvalues.abs()
    assert torch.equal(dense <= 1e-10, res.converged)


def test_model_hessian_eigenpairs_against_eigh() -> None:
    model, batches = tiny_cnn(), data([5, 9], shape=(2, 6, 6))
    h = dense_hessian(model, batches, weight_decay=1e-3)
    evals, evecs = torch.linalg.eigh(h)
    op = HessianOperator(model, F.cross_entropy, batches, weight_decay=1e-3)
    orders = (("LA", torch.argsort(evals, descending=True)), ("LM", torch.argsort(evals.abs(), descending=True)))
    for which, order in orders:
        # k=3: the 4th eigenvalue sits in a cluster (1.05, 1.02, -0.97) that takes the whole space.
        res = top_eigenpairs(op, 3, tol=1e-8, which=which, block_size=2)
        torch.testing.assert_close(res.eigenvalues, evals[order[:3]], rtol=1e-8, atol=1e-12)
        assert min_cos(res.eigenvectors, evecs[:, order[:3]].T) > 1 - 1e-8
        torch.testing.assert_close(
            res.residuals, dense_residuals(h, res.eigenvalues, res.eigenvectors), rtol=1e-3, atol=1e-12
        )
        assert bool(res.converged.all())


def test_arpack_backend_agrees_and_reports_true_residuals() -> None:
    model, batches = tiny_mlp(seed=2), data([10])
    h = dense_hessian(model, batches)
    op = HessianOperator(model, F.cross_entropy, batches)
    arp = top_eigenpairs(op, 4, tol=1e-10, backend="arpack")
    lan = top_eigenpairs(op, 4, tol=1e-10)
    torch.testing.assert_close(arp.eigenvalues, torch.linalg.eigvalsh(h).flip(0)[:4], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(arp.eigenvalues, lan.eigenvalues, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        arp.residuals, dense_residuals(h, arp.eigenvalues, arp.eigenvectors), rtol=1e-3, atol=1e-12
    )
    assert arp.backend == "arpack" and bool(arp.converged.all())


def test_progress_bar_runs() -> None:
    a, _ = rand_sym([4.0, 3.0], 50, seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm may warn about the missing terminal
        res = top_eigenpairs(DenseOperator(a), 2, tol=1e-6, progress=True)
    assert bool(res.converged.all())


# ---------------------------------------------------------------------------------------------
# Stochastic norms
# ---------------------------------------------------------------------------------------------


def test_frobenius_norm_within_standard_errors() -> None:
    a, _ = rand_sym([3.0, -2.0, 1.5], 60, seed=9)
    truth = float(torch.linalg.matrix_norm(a))
    for seed in range(3):
        est, se, lo, hi = frobenius_norm(DenseOperator(a), probes=40, seed=seed)
        assert 0 < se < 0.2 * truth
        assert abs(est - truth) < 4 * se
        assert lo < est < hi


@pytest.mark.parametrize("shape", ["rank_one", "spiked"])
def test_frobenius_interval_has_its_nominal_coverage(shape: str) -> None:
    """Over 400 independent 10-probe estimates of matrices with a known norm, the 95 % interval
    contains the truth at least 92 % of the time (binomial sd at 95 %: 1.1 %), and for a rank-one
    matrix (where it is exact) at most 98 %; the delta-method estimate ± 1.96·se covers far less
    on these spiked spectra (it is what the interval replaces)."""
    n = 200
    gen = torch.Generator().manual_seed(21)
    if shape == "rank_one":
        lam = torch.zeros(n, dtype=DT)
        lam[0] = 4.0
    else:
        lam = torch.cat([torch.tensor([30.0], dtype=DT), 0.5 * torch.randn(n - 1, generator=gen, dtype=DT)])
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    op = DenseOperator(q @ torch.diag(lam) @ q.T)
    truth = float(lam.norm())
    inside = delta = 0
    trials = 400
    for seed in range(trials):
        est, se, lo, hi = frobenius_norm(op, probes=10, seed=seed)
        inside += lo <= truth <= hi
        delta += abs(est - truth) <= 1.96 * se
    assert inside / trials >= 0.92
    if shape == "rank_one":
        assert inside / trials <= 0.98
    assert delta / trials < 0.9


def test_frobenius_interval_against_chi_square_by_hand() -> None:
    """Rank one, one probe: ‖Hz‖² = λ²·w², so the interval is |λ|·|w|·[1/sqrt(χ²₁(0.975)),
    1/sqrt(χ²₁(0.025))] with the quantiles 5.0239 and 0.00098207."""
    from sharpflow.hessian.estimators import frobenius_interval

    lo, hi = frobenius_interval(9.0, 1, 0.95)
    assert lo == pytest.approx(3.0 / math.sqrt(5.023886), rel=1e-5)
    assert hi == pytest.approx(3.0 / math.sqrt(0.000982069), rel=1e-4)
    with pytest.raises(ValueError):
        frobenius_interval(1.0, 3, 1.5)


def test_trace_estimators_within_standard_errors() -> None:
    a, _ = rand_sym([20.0, 12.0, -8.0, 5.0], 80, seed=10)
    truth = float(torch.trace(a))
    ses = {}
    for method in ("hutchinson", "hutchpp"):
        est, se = trace(DenseOperator(a), probes=30, seed=1, method=method)
        assert abs(est - truth) < 4 * se
        ses[method] = se
    assert ses["hutchpp"] < ses["hutchinson"]  # dominant eigenvalues are what Hutch++ removes


def test_hutchpp_exact_for_low_rank() -> None:
    gen = torch.Generator().manual_seed(11)
    u = torch.randn(70, 2, generator=gen, dtype=DT)
    a = u @ torch.diag(torch.tensor([3.0, -1.0], dtype=DT)) @ u.T  # rank 2 <= sketch of 3
    est, se = trace(DenseOperator(a), probes=9, seed=0)
    assert est == pytest.approx(float(torch.trace(a)), rel=1e-10)
    assert se < 1e-10


def test_norm_estimators_on_a_model_hessian() -> None:
    model, batches = tiny_mlp(seed=3), data([12])
    h = dense_hessian(model, batches)
    op = HessianOperator(model, F.cross_entropy, batches)
    est, se, lo, hi = frobenius_norm(op, probes=30, seed=0)
    assert abs(est - float(torch.linalg.matrix_norm(h))) < 4 * se
    assert lo <= float(torch.linalg.matrix_norm(h)) <= hi
    est, se = trace(op, probes=30, seed=0)
    assert abs(est - float(torch.trace(h))) < 4 * se


def test_traced_product_prints_no_torch_deprecation_warning():
    """The first forward-mode trace in a process loads torch's jvp decompositions, whose import warns
    that torch.jit.script is deprecated; sharpflow keeps that out of job logs. In a fresh process with
    FutureWarning as an error, the traced path must still be taken (not fall back)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from sharpflow.hessian import HessianOperator\n"
        "from sharpflow.models import REGISTRY, loss_fn\n"
        "m = REGISTRY['mlp']((8,), 3)\n"
        "op = HessianOperator(m, loss_fn, [(torch.randn(4, 8), torch.randint(0, 3, (4,)))], method='fwd_rev')\n"
        "op.matvec(torch.randn(op.dim))\n"
        "print(op.method)\n"
    )
    proc = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "fwd_rev" and "Warning" not in proc.stderr, proc.stderr
