"""The base every operator of this package builds on: bookkeeping, algebra, and a model's data.

:class:`Operator` holds what every D×D operator on flat parameter vectors shares: ``dim``,
``dtype``, ``device``, ``shape``, the product counter ``matvecs``, and one ``matvec`` that checks
the shape, moves the vector to ``dtype`` on ``device``, applies the subclass's ``_apply`` to a
(D,) vector or a (D, m) block, and counts. On top of it, an algebra:

- ``A + B``, ``A - B``: computes A v, then B v, and adds (subtracts) them;
- ``c * A``, ``A * c``, ``-A``: multiplies A v by the Python float c (−1 for ``-A``);
- ``A @ B``: applies B, then A; with ``D = DiagonalOperator(d)``, ``D @ A @ D`` is the symmetric
  scaling D A D (e.g. Adam's P^{-1/2} H P^{-1/2}, which has the eigenvalues of P^{-1} H);
- ``A @ v`` for a tensor v is ``A.matvec(v)``;
- ``A.adjoint()`` and ``A.to_scipy()`` (a ``scipy.sparse.linalg.LinearOperator``).

Operands of ``+``, ``-`` and ``@`` must have the same dimension, dtype and device (a ValueError
otherwise), so an expression computes in one dtype throughout. Every operator, an expression's
parts included, counts its own products.

:class:`CurvatureOperator` adds what an operator of a model's loss over N fixed examples needs:
a private copy of the model in the chosen mode, its trainable parameters θ, its buffers, and the
examples moved to θ's device once and optionally re-split into chunks. It turns every product
into one on a (D, m) block (``_matmat``). :class:`~sharpflow.hessian.operators.HessianOperator`
and :class:`~sharpflow.hessian.ggn.GGNOperator` are its subclasses.
"""

from __future__ import annotations

import copy
import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sharpflow.params import buffers, trainable


class Operator(ABC):
    """A D×D linear operator on flat parameter vectors: bookkeeping and algebra (module docstring).

    A subclass calls ``super().__init__(dim, dtype, device)`` and implements ``_apply(v)``, which
    receives a checked (D,) vector or (D, m) block already in ``dtype`` on ``device`` and returns
    the product in the same shape. It overrides :meth:`adjoint` if it is not symmetric.

    Attributes:
        dim: D.
        dtype, device: products are computed and returned in them.
        matvecs: products done so far (a block of m counts m).
    """

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.dim: int = int(dim)
        self.dtype: torch.dtype = dtype
        self.device: torch.device = torch.device(device)
        self.matvecs: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        """(D, D)."""
        return self.dim, self.dim

    def matvec(self, v: Tensor) -> Tensor:
        """A v for a (D,) vector or A V for a (D, m) block (m products), in any dtype and device;
        returns the same shape, in ``dtype`` on ``device``."""
        if v.ndim not in (1, 2) or v.shape[0] != self.dim:
            raise ValueError(f"expected shape ({self.dim},) or ({self.dim}, m), got {tuple(v.shape)}")
        out = self._apply(v.to(dtype=self.dtype, device=self.device))
        self.matvecs += 1 if v.ndim == 1 else int(v.shape[1])
        return out

    @abstractmethod
    def _apply(self, v: Tensor) -> Tensor:
        """The product with a checked (D,) or (D, m) tensor in ``dtype`` on ``device``."""

    def adjoint(self) -> Operator:
        """Aᵀ: the operator itself, for the symmetric operators this class is for (the Hessian, the
        GGN, a diagonal); a composition and a non-symmetric dense matrix override it."""
        return self

    def to_scipy(self) -> Any:
        """The operator as a ``scipy.sparse.linalg.LinearOperator`` on NumPy arrays in the matching
        float dtype; its ``matvec``/``matmat`` call :meth:`matvec` (and count), ``rmatvec``/``rmatmat``
        call the adjoint's."""
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator  # scipy only when asked

        np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
        forward, backward = partial(_numpy_product, self, np_dtype), partial(_numpy_product, self.adjoint(), np_dtype)
        return ScipyLinearOperator(self.shape, matvec=forward, matmat=forward, rmatvec=backward, rmatmat=backward,
                                   dtype=np_dtype)

    # -- algebra -------------------------------------------------------------------------------------
    def __add__(self, other: object) -> Operator:
        return _Sum(self, other, subtract=False) if isinstance(other, Operator) else NotImplemented

    def __sub__(self, other: object) -> Operator:
        return _Sum(self, other, subtract=True) if isinstance(other, Operator) else NotImplemented

    def __mul__(self, c: object) -> Operator:
        if isinstance(c, numbers.Real) and not isinstance(c, bool):
            return _Scaled(self, float(c))
        return NotImplemented

    __rmul__ = __mul__

    def __neg__(self) -> Operator:
        return _Scaled(self, -1.0)

    def __matmul__(self, other: object) -> Any:
        if isinstance(other, Operator):
            return _Composed(self, other)
        if isinstance(other, Tensor):
            return self.matvec(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, dtype={self.dtype}, device={self.device})"


def _numpy_product(op: Operator, np_dtype: np.dtype, x: np.ndarray) -> np.ndarray:
    """``op.matvec`` on a NumPy (D,) or (D, m) array, returned as a NumPy array."""
    v = torch.from_numpy(np.ascontiguousarray(x, dtype=np_dtype)).to(op.device)
    return op.matvec(v).detach().cpu().numpy()


def _check_compatible(a: Operator, b: Operator, what: str) -> None:
    if (a.dim, a.dtype, a.device) != (b.dim, b.dtype, b.device):
        raise ValueError(f"cannot {what} operators of (dim, dtype, device) {(a.dim, a.dtype, a.device)} "
                         f"and {(b.dim, b.dtype, b.device)}")


class _Sum(Operator):
    """A + B or A − B: A v, then B v, then their sum or difference."""

    def __init__(self, a: Operator, b: Operator, subtract: bool) -> None:
        _check_compatible(a, b, "subtract" if subtract else "add")
        super().__init__(a.dim, a.dtype, a.device)
        self.a, self.b, self.subtract = a, b, subtract

    def _apply(self, v: Tensor) -> Tensor:
        av = self.a.matvec(v)
        bv = self.b.matvec(v)
        return av - bv if self.subtract else av + bv

    def adjoint(self) -> Operator:
        """Aᵀ ± Bᵀ."""
        return _Sum(self.a.adjoint(), self.b.adjoint(), self.subtract)


class _Scaled(Operator):
    """c · A for a Python float c: A v, then multiplied by c."""

    def __init__(self, a: Operator, c: float) -> None:
        super().__init__(a.dim, a.dtype, a.device)
        self.a, self.c = a, c

    def _apply(self, v: Tensor) -> Tensor:
        return self.c * self.a.matvec(v)

    def adjoint(self) -> Operator:
        """c · Aᵀ."""
        return _Scaled(self.a.adjoint(), self.c)


class _Composed(Operator):
    """A B: B v, then A applied to it."""

    def __init__(self, a: Operator, b: Operator) -> None:
        _check_compatible(a, b, "compose")
        super().__init__(a.dim, a.dtype, a.device)
        self.a, self.b = a, b

    def _apply(self, v: Tensor) -> Tensor:
        return self.a.matvec(self.b.matvec(v))

    def adjoint(self) -> Operator:
        """Bᵀ Aᵀ."""
        return _Composed(self.b.adjoint(), self.a.adjoint())


class DiagonalOperator(Operator):
    """diag(d) for a (D,) vector d: ``d * v`` (each column of a block). ``D @ A @ D`` with
    ``D = DiagonalOperator(d)`` is the symmetric scaling D A D.

    Attributes:
        d: the diagonal as given; ``dtype`` and ``device`` are its own.
    """

    def __init__(self, d: Tensor) -> None:
        if d.ndim != 1:
            raise ValueError(f"the diagonal must be a vector, got shape {tuple(d.shape)}")
        super().__init__(int(d.shape[0]), d.dtype, d.device)
        self.d = d

    def _apply(self, v: Tensor) -> Tensor:
        return (self.d if v.ndim == 1 else self.d[:, None]) * v


class BlockOperator(Operator):
    """The principal submatrix A[idx, idx] of an operator: the diagonal block of a set of coordinates
    (e.g. one layer's weights). A product embeds the block vector in zeros, applies A, and keeps
    the block's rows: one product of A per product (a block of m counts m, on both).

    Attributes:
        a: the full operator; idx: the (b,) coordinates, in order.
    """

    def __init__(self, a: Operator, idx: Tensor) -> None:
        idx = idx.to(device=a.device, dtype=torch.long)
        if idx.ndim != 1 or len(idx) == 0:
            raise ValueError(f"the block needs a non-empty (b,) index vector, got shape {tuple(idx.shape)}")
        if int(idx.min()) < 0 or int(idx.max()) >= a.dim:
            raise ValueError(f"block indices outside [0, {a.dim})")
        super().__init__(len(idx), a.dtype, a.device)
        self.a, self.idx = a, idx

    def _apply(self, v: Tensor) -> Tensor:
        full = torch.zeros((self.a.dim, *v.shape[1:]), dtype=self.dtype, device=self.device)
        full[self.idx] = v
        return self.a.matvec(full)[self.idx]


class CurvatureOperator(Operator):
    """An operator of a model's loss over N fixed examples: the model and data handling shared by
    :class:`~sharpflow.hessian.operators.HessianOperator` and :class:`~sharpflow.hessian.ggn.GGNOperator`.

    θ is the model's trainable parameters (``requires_grad``) in ``named_parameters()`` order, taken
    when the operator is built; ``dtype`` and ``device`` are θ's. A subclass implements ``_matmat``
    on (D, m) blocks; a (D,) vector reaches it as a (D, 1) block.

    Args:
        model: the network. It is deep-copied; the user's model is never modified (weights or mode).
        batches: the examples as ``(x, y)`` tuples; they are moved to θ's device once.
        eval_mode: run the copy in eval mode (BatchNorm running statistics, no dropout).
        chunk_size: if given, the examples are concatenated and re-split into chunks of at most
            this many. Empty chunks are dropped.
    """

    def __init__(self, model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], *, eval_mode: bool,
                 chunk_size: int | None) -> None:
        if not batches:
            raise ValueError("need at least one batch")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        # A private copy: its mode can be set and BatchNorm buffers can change without touching
        # the user's model.
        self._model = copy.deepcopy(model)
        self._model.train(not eval_mode)
        self._like = {n: p.detach().clone() for n, p in trainable(self._model).items()}
        if not self._like:
            raise ValueError("the model has no trainable parameters")
        # Buffers are read by the functional calls as constants; keep a handle so they are not collected.
        self._buffers = buffers(self._model)
        first = next(iter(self._like.values()))
        super().__init__(sum(p.numel() for p in self._like.values()), first.dtype, first.device)
        xs = [x.to(self.device) for x, _ in batches]
        ys = [y.to(self.device) for _, y in batches]
        if chunk_size is not None:
            xs, ys = list(torch.cat(xs).split(chunk_size)), list(torch.cat(ys).split(chunk_size))
        self._data: list[tuple[Tensor, Tensor]] = [(x, y) for x, y in zip(xs, ys, strict=True) if x.shape[0] > 0]

    def _apply(self, v: Tensor) -> Tensor:
        if v.ndim == 1:
            return self._matmat(v[:, None])[:, 0]
        return self._matmat(v)

    @abstractmethod
    def _matmat(self, block: Tensor) -> Tensor:
        """The product with a (D, m) block in ``dtype`` on ``device``; (D, m) out."""


__all__ = ["BlockOperator", "CurvatureOperator", "DiagonalOperator", "Operator"]
