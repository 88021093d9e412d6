"""The protocol the solvers use, a dense matrix, and the Hessian of the mean training loss.

:class:`LinearOperator` is all the solvers and estimators need (``dim``, ``dtype``, ``device`` and
``matvec``), so any object with those works, subclass of :class:`~sharpflow.hessian.base.Operator`
or not. :class:`DenseOperator` wraps a matrix (tests, users with an explicit Hessian).

:class:`HessianOperator` is the Hessian of the mean training loss over N fixed examples, in the
flat parameter coordinates of :mod:`sharpflow.params`. It is fixed (θ and the N examples do not
change), so by default it pays for the primal computation once and keeps it (``cache_graph``):

- either each chunk's gradient graph (``create_graph``), after which a product is one
  second-order backward pass over it;
- or a trace of forward-over-reverse split into a primal program (run once per chunk, its
  values kept) and a tangent program (:mod:`sharpflow.hessian.tracing`), after which a product
  only pushes tangents. This is the cheaper product, but the trace is made once per chunk shape,
  a fixed cost, so ``method="auto"`` uses it only on the CPU and only when the problem is large
  (parameters × examples ≥ 5e7, ``_TRACE_ABOVE_WORK``); otherwise cached double backward. The
  choice depends on the problem's size, never on a clock.

A product that redoes the forward and backward pass every time, as an ARPACK loop over a plain
HVP does, costs more than either. Blocks (``vmap`` over tangents, ``is_grads_batched``) were
slower than a loop over the vectors on CPU, so the cached products loop over a block's vectors.
Measured costs: ``docs/measured/benchmarks.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from sharpflow.params import LossFn, flatten, loss_of_params, unflatten

from .base import CurvatureOperator, Operator
from .tracing import TangentProgram, _tangent_programs

_METHODS = ("fwd_rev", "double_backward")
# "auto" uses traced forward-over-reverse rather than cached double backward on the CPU when a
# product is large: parameters × examples at least this (the default suite's 3,466-parameter CNN
# over 512 examples is 1.8e6; the 288k-parameter benchmark CNN over 512 is 1.5e8). The one-off
# tracing is then small next to the saving on every product. The choice depends on the problem
# only, never on a clock, so a config gives the same bits on every run on one machine. On a GPU
# products take milliseconds and the tracing would not pay: double backward.
_TRACE_ABOVE_WORK = 5e7

# A chunk's gradient graph: θ leaves, the gradient entries that depend on θ, and their indices.
_GradGraph = tuple[list[Tensor], list[Tensor], list[int]]


class LinearOperator(Protocol):
    """What the solvers need: a symmetric D×D operator applied to (D,) vectors or (D, m) blocks.

    ``matvec`` takes vectors in any dtype/device and computes in ``dtype`` on ``device``; the
    solvers hand it vectors rounded to ``dtype`` and allocate their start vectors on ``device``.
    """

    dim: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: Tensor) -> Tensor:
        """(D,) -> (D,) or (D, m) -> (D, m), in ``dtype`` on ``device``."""
        ...


class DenseOperator(Operator):
    """A matrix as an operator: for tests, and for users with an explicit Hessian.

    Args:
        matrix: (D, D) tensor, symmetric for the solvers' theory; it is applied as given
            (``matrix @ v``), and :meth:`adjoint` is its transpose.

    Attributes:
        matrix: the tensor given.
        dim, dtype, device: D, and the matrix's dtype and device.
        matvecs: number of products done so far (a block of m counts m).
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"need a square matrix, got shape {tuple(matrix.shape)}")
        super().__init__(int(matrix.shape[0]), matrix.dtype, matrix.device)
        self.matrix = matrix

    def _apply(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    def adjoint(self) -> Operator:
        """The transpose, as a :class:`DenseOperator` (the operator itself if the matrix is symmetric)."""
        return self if torch.equal(self.matrix, self.matrix.T) else DenseOperator(self.matrix.T)


class HessianOperator(CurvatureOperator):
    """Hessian of the mean training loss over a fixed set of N examples (+ weight_decay/2 · ‖θ‖²).

    The loss is L(θ) = Σ_b n_b · loss_fn(model(x_b), y_b) / N + weight_decay/2 · ‖θ‖², i.e. every
    example has weight 1/N whatever the size of its batch (``loss_fn`` returns the batch mean).
    θ is the model's trainable parameters (``requires_grad``) in ``named_parameters()`` order, taken
    when the operator is built: later changes to the model do not affect the operator.

    Args:
        model: the network. It is deep-copied; the user's model is never modified (weights or mode).
        loss_fn: ``loss_fn(logits, targets) -> mean loss over the batch`` (a 0-d tensor).
        batches: the N examples as ``(x, y)`` tuples; they are moved to the parameters' device once.
        weight_decay: adds ``weight_decay · v`` to every product.
        eval_mode: run the copy in eval mode (BatchNorm running statistics, no dropout). With
            ``eval_mode=False`` BatchNorm uses per-chunk statistics and dropout is random, so the
            operator then depends on the chunking and is not deterministic.
        chunk_size: if given, the examples are concatenated and re-split into chunks of at most
            this many, bounding memory; the operator is the same up to float rounding.
        method: how a product is taken (all exact):
            ``"fwd_rev"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``. With
            the cache, forward-over-reverse is traced once per chunk shape and the primal values
            of every chunk are kept, so a product only pushes tangents (the cheapest product).
            Without it, each call recomputes the primal and ``vmap``s the tangents of a block.
            ``"double_backward"``: reverse-over-reverse; the gradient graph (``create_graph``) is
            built once per chunk per call, or once for good with the cache, and reused for every
            vector: one second backward per vector, plus about one gradient per chunk and call
            to build the graph.
            ``"auto"``: without the cache, ``"double_backward"``; with it, cached double backward,
            or traced ``"fwd_rev"`` on the CPU when parameters × examples ≥ 5e7 (a product then
            takes long enough for tracing to pay for itself; for small models and on GPUs it does
            not). Decided from the problem's size, not from a clock, so the same config gives the
            same bits on every run. ``self.method`` tells which is in use after the first product.
        cache_graph: keep per-chunk state for the operator's lifetime (the traced tangent
            programs with their primal values, or the gradient graphs) so the primal
            forward/backward is paid once, not per product. Memory: the activations of all N
            examples at once (``chunk_size`` then only sets the work per call); set False to
            hold one chunk at a time.

    Attributes:
        dim: D, number of trainable scalars.
        dtype, device: those of the parameters; products are computed and returned in them.
        num_examples: N.
        matvecs: number of Hessian-vector products done so far (a block of m counts m).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[tuple[Tensor, Tensor]],
        *,
        weight_decay: float = 0.0,
        eval_mode: bool = True,
        chunk_size: int | None = None,
        method: str = "auto",
        cache_graph: bool = True,
    ) -> None:
        self.cache_graph = bool(cache_graph)
        # "auto" starts with double backward; with the cache it may move to the trace (matvec).
        self._auto = method == "auto" and self.cache_graph
        if method == "auto":
            method = "double_backward"
        if method not in _METHODS:
            raise ValueError(f"method must be one of {(*_METHODS, 'auto')}, got {method!r}")
        super().__init__(model, batches, eval_mode=eval_mode, chunk_size=chunk_size)
        self.method = method
        self.weight_decay = float(weight_decay)
        self._theta = flatten(self._like)
        self._loss = loss_of_params(self._model, loss_fn)
        self.num_examples: int = sum(int(x.shape[0]) for x, _ in self._data)
        if self.num_examples == 0:
            raise ValueError("the batches hold no examples")
        # Each chunk's mean loss enters with weight n_c / N: exact example weighting.
        self._chunks: list[tuple[Tensor, Tensor, float]] = [(x, y, x.shape[0] / self.num_examples)
                                                             for x, y in self._data]
        self._graphs: list[_GradGraph] | None = None
        self._programs: list[TangentProgram] | None = None

    # -- helpers -----------------------------------------------------------------------------
    def _leaves(self) -> dict[str, Tensor]:
        """Fresh leaf tensors holding θ, so each chunk's graph is independent."""
        return {n: p.detach().requires_grad_(True) for n, p in self._like.items()}

    # -- products ------------------------------------------------------------------------------
    def _matmat(self, block: Tensor) -> Tensor:
        """H V for a (D, m) block; (+ weight_decay · V)."""
        rows = block.T.contiguous()  # (m, D): one row per vector, contiguous for unflatten
        out = torch.zeros_like(rows)
        with torch.enable_grad():
            if self.cache_graph:
                self._matvec_cached(rows, out)
            else:
                self._matvec_uncached(rows, out)
        if self.weight_decay:
            out.add_(rows, alpha=self.weight_decay)
        return out.T

    def _matvec_cached(self, rows: Tensor, out: Tensor) -> None:
        """Products with the kept per-chunk state (traced programs or gradient graphs) into ``out``."""
        if self.method == "double_backward" and self._graphs is None:
            self._graphs = self._build_graphs()  # "auto" may choose "fwd_rev" here
        if not (self.method == "fwd_rev" and self._matvec_traced(rows, out)):
            if self._graphs is None:
                self._graphs = self._build_graphs()
            for graph, (_, _, w) in zip(self._graphs, self._chunks, strict=True):
                out.add_(self._second_backward(graph, rows, retain=True), alpha=w)

    def _matvec_uncached(self, rows: Tensor, out: Tensor) -> None:
        """Products that redo each chunk's primal computation, into ``out``."""
        for x, y, w in self._chunks:
            if self.method == "double_backward":
                graph = self._grad_graph(x, y)
                out.add_(self._second_backward(graph, rows, retain=False), alpha=w)
            else:
                out.add_(self._hvp_fwd_rev(rows, x, y), alpha=w)

    def _build_graphs(self) -> list[_GradGraph] | None:
        """Every chunk's gradient graph; or, for ``method="auto"``, None when the product is large
        enough that traced forward-over-reverse pays for its tracing (then it is used; see
        ``_TRACE_ABOVE_WORK``)."""
        if self._auto:
            self._auto = False
            if self.device.type == "cpu" and self.dim * self.num_examples >= _TRACE_ABOVE_WORK:
                self.method = "fwd_rev"
                return None
        first = self._grad_graph(*self._chunks[0][:2])
        return [first] + [self._grad_graph(x, y) for x, y, _ in self._chunks[1:]]

    def _traced_programs(self) -> list[TangentProgram]:
        """Per chunk, v ↦ H_c v (tangents as a list in θ's order) with the primal values kept,
        built on first use (:func:`sharpflow.hessian.tracing._tangent_programs`)."""
        if self._programs is None:
            names = list(self._like)
            params = [self._like[n].detach() for n in names]
            self._programs = _tangent_programs(self._loss, names, params, self._chunks)
        return self._programs

    def _matvec_traced(self, rows: Tensor, out: Tensor) -> bool:
        """Cached forward-over-reverse into ``out``; False (and a warning) if the model cannot be
        traced: the method is then cached double backward."""
        try:
            programs = self._traced_programs()
        except Exception as err:  # make_fx cannot trace every model (e.g. data-dependent Python)
            warnings.warn(
                f"HessianOperator: tracing forward-over-reverse failed ({type(err).__name__}: {err}); "
                "using cached double backward instead",
                RuntimeWarning,
                stacklevel=6,  # the caller of matvec, past Operator.matvec, _apply, _matmat, _matvec_cached
            )
            self.method = "double_backward"
            return False
        for j in range(rows.shape[0]):
            v = list(unflatten(rows[j], self._like).values())
            for fn, (_, _, w) in zip(programs, self._chunks, strict=True):
                out[j].add_(flatten(fn(v)), alpha=w)
        return True

    def _grad_graph(self, x: Tensor, y: Tensor) -> _GradGraph:
        """θ leaves, the chunk's gradient built with ``create_graph``, and which entries depend on θ."""
        params = self._leaves()
        plist = list(params.values())
        grads = torch.autograd.grad(self._loss(params, x, y), plist, create_graph=True)
        # A gradient entry that does not depend on θ (e.g. a linear model's) has no graph: its
        # Hessian rows are zero and it is left out of the second backward.
        keep = [i for i, g in enumerate(grads) if g.requires_grad]
        return plist, [grads[i] for i in keep], keep

    def _second_backward(self, graph: _GradGraph, rows: Tensor, retain: bool) -> Tensor:
        """Products of one chunk's Hessian with each row of ``rows`` (m, D), reusing its graph."""
        plist, outputs, keep = graph
        out = torch.zeros_like(rows)
        if not keep:
            return out
        m = rows.shape[0]
        for j in range(m):
            vs = list(unflatten(rows[j], self._like).values())
            hv = torch.autograd.grad(
                outputs,
                plist,
                grad_outputs=[vs[i] for i in keep],
                retain_graph=retain or j < m - 1,
                allow_unused=True,
                materialize_grads=True,
            )
            out[j] = flatten(list(hv))
        return out

    def _hvp_fwd_rev(self, rows: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Uncached forward-over-reverse for one chunk: ``jvp`` of ``grad``, ``vmap``ped over a block."""
        params = {n: p.detach() for n, p in self._like.items()}
        grad_fn = grad(lambda p: self._loss(p, x, y))

        def hvp(v: dict[str, Tensor]) -> dict[str, Tensor]:
            return jvp(grad_fn, (params,), (v,))[1]

        tangents = unflatten(rows, self._like)  # leading dim m
        if rows.shape[0] == 1:
            return flatten(hvp({n: t[0] for n, t in tangents.items()}))[None]
        out = vmap(hvp)(tangents)
        return torch.cat([t.reshape(rows.shape[0], -1) for t in out.values()], dim=1)

    def _loss_and_grad(self) -> tuple[float, Tensor]:
        total = 0.0
        g = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        with torch.enable_grad():
            for x, y, w in self._chunks:
                params = self._leaves()
                loss = self._loss(params, x, y)
                gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True, materialize_grads=True)
                g.add_(flatten(list(gs)), alpha=w)
                total += w * float(loss.detach())
        if self.weight_decay:
            g.add_(self._theta, alpha=self.weight_decay)
            total += 0.5 * self.weight_decay * float(self._theta.double().square().sum())
        return total, g

    def gradient(self) -> Tensor:
        """∇L(θ), a (D,) vector, of the same loss (weight decay included)."""
        return self._loss_and_grad()[1]

    def loss(self) -> float:
        """L(θ), the same loss (weight decay included)."""
        total = 0.0
        with torch.no_grad():
            params = {n: p.detach() for n, p in self._like.items()}
            for x, y, w in self._chunks:
                total += w * float(self._loss(params, x, y))
        if self.weight_decay:
            total += 0.5 * self.weight_decay * float(self._theta.double().square().sum())
        return total


__all__ = ["DenseOperator", "HessianOperator", "LinearOperator"]
