"""The operator base of sharpflow.hessian against dense truths: the algebra (A + B, A − B, c·A,
D A D, composition, adjoints), ``to_scipy()``, the product counter, the shared data handling,
frozen results, and the package's exports."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import sharpflow.hessian as hessian
from sharpflow.hessian import (
    DenseOperator,
    DiagonalOperator,
    GGNOperator,
    HessianOperator,
    Operator,
    frobenius_norm,
    spectral_density,
    top_eigenpairs,
    trace,
)
from sharpflow.params import flat_params, unflatten

from .test_hessian import data, dense_hessian, rand_sym, tiny_mlp

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dense_ggn(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Truth: (1/N) Jᵀ blockdiag(diag(p_n) − p_n p_nᵀ) J with J the dense Jacobian of all logits."""
    x = torch.cat([b[0] for b in batches])
    like = {n: p.detach() for n, p in model.named_parameters()}
    theta = flat_params(model)
    jac = torch.autograd.functional.jacobian(lambda t: functional_call(model, unflatten(t, like), (x,)), theta)
    p = torch.softmax(functional_call(model, like, (x,)).detach(), dim=-1)
    h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (N, C, C)
    return torch.einsum("nci,ncd,ndj->ij", jac, h_out, jac) / x.shape[0]


@pytest.fixture(scope="module")
def problem():
    """A tiny MLP over 11 examples: its Hessian and GGN as operators and as dense matrices, a random
    non-symmetric matrix, and a positive diagonal."""
    model, batches = tiny_mlp(), data([7, 4])
    h_dense, g_dense = dense_hessian(model, batches), dense_ggn(model, batches)
    dim = h_dense.shape[0]
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(dim, dim, generator=gen, dtype=DT)
    d = torch.rand(dim, generator=gen, dtype=DT) + 0.5
    block = torch.randn(dim, 3, generator=gen, dtype=DT)
    return model, batches, h_dense, g_dense, m, d, block


def _ops(problem):
    model, batches, *_ = problem
    return HessianOperator(model, F.cross_entropy, batches), GGNOperator(model, batches)


# ---------------------------------------------------------------------------------------------
# Algebra against dense matrices
# ---------------------------------------------------------------------------------------------


def test_the_operators_themselves_match_their_dense_truths(problem) -> None:
    _, _, h_dense, g_dense, m, d, block = problem
    h, g = _ops(problem)
    assert torch.allclose(h @ block, h_dense @ block, rtol=1e-9, atol=1e-12)
    assert torch.allclose(g @ block, g_dense @ block, rtol=1e-9, atol=1e-12)
    assert torch.equal(DenseOperator(m) @ block, m @ block)
    assert torch.equal(DiagonalOperator(d) @ block, torch.diag(d) @ block)


@pytest.mark.parametrize("expr", ["h + g", "h - g", "2.5 * h", "h * -0.5", "-g", "D @ h @ D", "M @ h",
                                  "h @ M", "0.5 * (h - g) + D @ g @ D", "(h + M) @ D - g"])
def test_algebra_equals_the_same_expression_of_dense_matrices(problem, expr: str) -> None:
    _, _, h_dense, g_dense, m, d, block = problem
    h, g = _ops(problem)
    op = eval(expr, {"h": h, "g": g, "M": DenseOperator(m), "D": DiagonalOperator(d)})
    truth = eval(expr, {"h": h_dense, "g": g_dense, "M": m, "D": torch.diag(d)})
    assert isinstance(op, Operator) and op.shape == truth.shape
    assert torch.allclose(op.matvec(block), truth @ block, rtol=1e-9, atol=1e-11)
    assert torch.allclose(op.matvec(block[:, 0]), truth @ block[:, 0], rtol=1e-9, atol=1e-11)
    assert torch.allclose(op.adjoint().matvec(block), truth.T @ block, rtol=1e-9, atol=1e-11)


def test_algebra_keeps_each_products_floating_point_order(problem) -> None:
    """A − B is A v, then B v, then their difference; D A D is d ⊙ A(d ⊙ v); c·A is c times A v:
    bit for bit what the Sum/Scaled classes computed before the algebra replaced them."""
    *_, d, block = problem
    for v in (block, block[:, 1]):
        h, g = _ops(problem)
        expected = h.matvec(v) - g.matvec(v)
        h, g = _ops(problem)
        assert torch.equal((h - g).matvec(v), expected)
        h, _ = _ops(problem)
        dd = d if v.ndim == 1 else d[:, None]
        expected = dd * h.matvec(dd * v)
        h, _ = _ops(problem)
        diag = DiagonalOperator(d)
        assert torch.equal((diag @ h @ diag).matvec(v), expected)
        h, g = _ops(problem)
        expected = 0.3 * h.matvec(v) + 1.7 * g.matvec(v)
        h, g = _ops(problem)
        assert torch.equal((0.3 * h + 1.7 * g).matvec(v), expected)


def test_algebra_refuses_mismatched_operands(problem) -> None:
    _, _, _, _, m, d, _ = problem
    a = DenseOperator(m)
    with pytest.raises(ValueError, match="cannot add"):
        a + DenseOperator(m[:5, :5])
    with pytest.raises(ValueError, match="cannot subtract"):
        a - DenseOperator(m.float())
    with pytest.raises(ValueError, match="compose"):
        DiagonalOperator(d[:3]) @ a
    with pytest.raises(ValueError, match="vector"):
        DiagonalOperator(m)
    for bad in ("a + 1.0", "a * 'x'", "a * True", "a @ 2"):
        with pytest.raises(TypeError):
            eval(bad, {"a": a})
    with pytest.raises(ValueError, match="expected shape"):
        (a + a).matvec(torch.zeros(3, dtype=DT))


def test_a_user_operator_gets_the_algebra_and_the_solvers(problem) -> None:
    """The how-to case: subclass Operator with ``_apply`` only."""

    class Spectrum(Operator):
        def __init__(self, lam: Tensor) -> None:
            super().__init__(lam.shape[0], lam.dtype, lam.device)
            self.lam = lam

        def _apply(self, v: Tensor) -> Tensor:
            return (self.lam if v.ndim == 1 else self.lam[:, None]) * v

    lam = torch.linspace(-1.0, 4.0, 40, dtype=DT)
    op = 2.0 * Spectrum(lam) - Spectrum(torch.ones(40, dtype=DT))
    res = top_eigenpairs(op, k=2, tol=1e-10)
    assert torch.allclose(res.eigenvalues, 2 * lam.flip(0)[:2] - 1, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# to_scipy, the counter, the data handling
# ---------------------------------------------------------------------------------------------


def test_to_scipy_matvec_and_matmat_equal_the_dense_matrix(problem) -> None:
    from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator
    from scipy.sparse.linalg import eigsh

    _, _, h_dense, _, m, d, block = problem
    h, _ = _ops(problem)
    for op, truth in ((h, h_dense), (DenseOperator(m) @ DiagonalOperator(d), m @ torch.diag(d))):
        lin = op.to_scipy()
        assert isinstance(lin, ScipyLinearOperator) and lin.shape == truth.shape and lin.dtype == np.float64
        x, xs = block[:, 0].numpy(), block.numpy()
        np.testing.assert_allclose(lin.matvec(x), (truth @ block[:, 0]).numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(lin.matmat(xs), (truth @ block).numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(lin @ xs, (truth @ block).numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(lin.rmatvec(x), (truth.T @ block[:, 0]).numpy(), rtol=1e-9, atol=1e-12)
    a, _ = rand_sym([5.0, 3.0], 30)
    top = eigsh(DenseOperator(a.float()).to_scipy(), k=1, which="LA")[0]
    assert DenseOperator(a.float()).to_scipy().dtype == np.float32
    assert top[0] == pytest.approx(5.0, rel=1e-5)


def test_the_product_counter_counts_every_operator_of_an_expression(problem) -> None:
    *_, block = problem
    h, g = _ops(problem)
    r = h - g
    r.matvec(block[:, 0])
    r.matvec(block)
    assert (r.matvecs, h.matvecs, g.matvecs) == (4, 4, 4)
    h @ block
    assert (r.matvecs, h.matvecs) == (4, 7)
    lin = h.to_scipy()
    lin.matvec(block[:, 0].numpy())
    lin.matmat(block.numpy())
    assert h.matvecs == 11
    a = DenseOperator(torch.eye(4, dtype=DT))
    with pytest.raises(ValueError):
        a.matvec(torch.zeros(4, 2, 2, dtype=DT))
    assert a.matvecs == 0  # a refused product is not counted
    res = top_eigenpairs(a, k=1, tol=1e-8)
    assert a.matvecs == res.matvecs > 0


def test_frobenius_trace_and_density_run_on_an_expression(problem) -> None:
    _, _, h_dense, g_dense, *_ = problem
    h, g = _ops(problem)
    r = h - g
    truth = torch.linalg.eigvalsh(h_dense - g_dense)
    est = trace(r, probes=r.dim, seed=0, method="hutchinson")
    assert est.estimate == pytest.approx(float(truth.sum()), abs=6 * est.se + 1e-9)
    fro = frobenius_norm(r, probes=40, seed=0)
    assert fro.lower <= float(truth.square().sum().sqrt()) <= fro.upper
    # Lanczos to the full dimension: every node that carries weight is an eigenvalue of H − G
    sd = spectral_density(r, num_probes=2, lanczos_steps=r.dim)
    nodes = sd.nodes[sd.weights > 1e-6]
    gap = (nodes[:, None] - truth[None]).abs().min(dim=1).values
    assert len(nodes) > 0 and float(gap.max()) < 1e-6 * float(truth.abs().max())


@pytest.mark.parametrize("make", ["hessian", "ggn"])
def test_hessian_and_ggn_share_the_data_handling(make: str) -> None:
    model, batches = tiny_mlp(), data([7, 0, 4])

    def build(m=model, b=batches, **kw):
        if make == "hessian":
            return HessianOperator(m, F.cross_entropy, b, **kw)
        return GGNOperator(m, b, **kw)

    op = build(chunk_size=3)
    assert [int(x.shape[0]) for x, _ in op._data] == [3, 3, 3, 2]
    assert op.shape == (op.dim, op.dim) and op.dim == sum(p.numel() for p in model.parameters())
    assert op.dtype == DT and op.device == torch.device("cpu") and op.matvecs == 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    op = build()
    assert model.training and not op._model.training  # a private copy in eval mode
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # later changes to the model do not reach the operator
    assert all(torch.equal(before[n], p) for n, p in op._like.items())
    with torch.no_grad():
        next(model.parameters()).sub_(1.0)
    with pytest.raises(ValueError, match="at least one batch"):
        build(b=[])
    with pytest.raises(ValueError, match="chunk_size"):
        build(chunk_size=0)
    with pytest.raises(ValueError, match="no examples"):
        build(b=[(torch.zeros(0, 5, dtype=DT), torch.zeros(0, dtype=torch.long))])
    frozen = tiny_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build(m=frozen)


# ---------------------------------------------------------------------------------------------
# Results and exports
# ---------------------------------------------------------------------------------------------


def test_result_types_are_frozen() -> None:
    a, _ = rand_sym([3.0, 2.0], 12)
    op = DenseOperator(a)
    res = top_eigenpairs(op, k=1, tol=1e-8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.matvecs = 0  # type: ignore[misc]
    sd = spectral_density(op, num_probes=1, lanczos_steps=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sd.steps = []  # type: ignore[misc]
    fro = frobenius_norm(op, probes=4)
    tr = trace(op, probes=6)
    for result in (fro, tr):
        with pytest.raises(AttributeError):
            result.estimate = 0.0  # type: ignore[misc]
    est, se = tr  # still unpacks as before
    assert (est, se) == (tr.estimate, tr.se)


def _public_names_of_submodules() -> set[str]:
    """Every public class and function defined in a module of sharpflow.hessian."""
    names = set()
    for info in pkgutil.iter_modules(hessian.__path__):
        mod = importlib.import_module(f"{hessian.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            if name.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if getattr(obj, "__module__", None) == mod.__name__:
                names.add(name)
    return names


def test_the_package_exports_every_public_operator_solver_and_estimator() -> None:
    exported = set(hessian.__all__)
    assert len(exported) == len(hessian.__all__)
    assert exported == _public_names_of_submodules()
    assert all(getattr(hessian, name) is not None for name in exported)


def test_the_package_docstring_names_every_export() -> None:
    doc = hessian.__doc__ or ""
    missing = [name for name in hessian.__all__ if not re.search(rf"`{re.escape(name)}`", doc)]
    assert not missing, f"sharpflow.hessian's docstring does not name {missing}"


def test_block_operator_is_the_dense_diagonal_block_of_each_layer(problem) -> None:
    """Per parameter block (Zhang et al. 2024): the certified top eigenvalue of H[b, b] equals the dense
    block's, for every layer's weight and bias."""
    from sharpflow.hessian import BlockOperator, top_eigenpairs

    model, _, h_dense, *_ = problem
    h, _ = _ops(problem)
    start = 0
    for name, p in model.named_parameters():
        idx = torch.arange(start, start + p.numel())
        start += p.numel()
        block = BlockOperator(h, idx)
        dense = h_dense[idx][:, idx]
        v = torch.randn(len(idx), 2, dtype=DT, generator=torch.Generator().manual_seed(start))
        assert torch.allclose(block @ v, dense @ v, rtol=1e-9, atol=1e-12), name
        if len(idx) >= 3:
            res = top_eigenpairs(block, k=1, tol=1e-8)
            assert float(res.eigenvalues[0]) == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-6)
    with pytest.raises(ValueError, match="outside"):
        BlockOperator(h, torch.tensor([0, h.dim]))
