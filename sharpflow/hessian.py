"""Exact Hessian-vector products over a fixed set of examples, and certified top eigenpairs.

The operator (:class:`HessianOperator`) is the Hessian of the mean training loss over N fixed
examples, in the flat parameter coordinates of :mod:`sharpflow.params`. The solvers
(:func:`top_eigenpairs`, :func:`frobenius_norm`, :func:`trace`) only need an object with
``dim`` and ``matvec`` accepting a (D,) vector or a (D, m) block, so they work on
:class:`DenseOperator` (tests, users) as well.

Design choices, measured on a 288k-parameter CNN with 512 examples on a shared 2-core CPU
(``bench/hessian.py`` prints the numbers):

- The operator is fixed (θ and the N examples do not change), so by default it pays for the
  primal computation once and keeps it (``cache_graph``): either each chunk's gradient graph
  (``create_graph``), after which a product is one second-order backward pass (≈2.5 gradients'
  time for a CNN on CPU), or a trace of forward-over-reverse split into a primal program (run
  once per chunk, its values kept) and a tangent program, after which a product only pushes
  tangents (≈1.4-1.8 gradients). The trace is made once per chunk *shape* (~1.5 s for the
  benchmark CNN, against ~0.5-0.8 s per chunk for ``torch.func.linearize``, which bakes each
  chunk's values in), so ``method="auto"`` starts with double backward and moves to the trace
  only when a product is slow (≥ 0.2 s). A product that redoes the
  forward and backward, as an ARPACK loop over a plain HVP does, costs ≈3 gradients. Blocks
  (``vmap`` over tangents, ``is_grads_batched``) were slower than a loop on CPU.
- The eigensolver is thick-restart Lanczos (Krylov-Schur style) with full reorthogonalisation,
  block capable, with explicit Rayleigh-Ritz over stored products W = H V. Keeping W makes every
  reported residual ‖Hu − λu‖ a true residual, computed from actual Hessian products by
  linearity (u = V s, Hu = W s), at no extra product. On CNN Hessians, single-vector Lanczos
  needed the fewest products (blocks of 2-10 needed 20-150% more), so it is the default; its
  advantage over ARPACK is mostly the cheaper product and checking convergence every step.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from torch import Tensor, fx, nn

from sharpflow.params import LossFn, buffers, flatten, loss_of_params, trainable, unflatten

__all__ = [
    "DenseOperator",
    "EigenResult",
    "HessianOperator",
    "LinearOperator",
    "frobenius_norm",
    "top_eigenpairs",
    "trace",
]

_METHODS = ("fwd_rev", "double_backward")
# "auto" uses linearized forward-over-reverse rather than cached double backward when one product
# is estimated to take at least this long (seconds): the one-off tracing is then small next to the saving.
_LINEARIZE_ABOVE_S = 0.2


class LinearOperator(Protocol):
    """What the solvers need: a symmetric D×D operator applied to (D,) vectors or (D, m) blocks."""

    dim: int

    def matvec(self, v: Tensor) -> Tensor: ...


def _op_dtype(op: LinearOperator) -> torch.dtype:
    return getattr(op, "dtype", torch.float64)


def _op_device(op: LinearOperator) -> torch.device:
    return torch.device(getattr(op, "device", "cpu"))


class DenseOperator:
    """A symmetric matrix as an operator: for tests, and for users with an explicit Hessian.

    Args:
        matrix: (D, D) symmetric tensor. Only its symmetric part is used by the solvers' theory;
            it is applied as given.
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"need a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.dim = int(matrix.shape[0])
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.matvecs = 0

    def matvec(self, v: Tensor) -> Tensor:
        """(D,) -> (D,) or (D, m) -> (D, m); a block of m counts as m products."""
        v = v.to(dtype=self.dtype, device=self.device)
        self.matvecs += 1 if v.ndim == 1 else int(v.shape[1])
        return self.matrix @ v


class HessianOperator:
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
            of every chunk are kept, so a product only pushes tangents: ≈1.4-1.8 gradients (the
            fastest measured). Without it, each call recomputes the primal and ``vmap``s the tangents of a block.
            ``"double_backward"``: reverse-over-reverse; the gradient graph (``create_graph``) is
            built once per chunk per call, or once for good with the cache, and reused for every
            vector: ≈2.5 gradients per vector plus ≈1 per chunk and call.
            ``"auto"``: without the cache, ``"double_backward"``; with it, cached double backward,
            or linearized ``"fwd_rev"`` if a product is estimated (from the time to build the
            first chunk's graph) to take ≥ 0.2 s: tracing then pays for itself; for small models
            and on GPUs it does not. ``self.method`` tells which is in use after the first product.
        cache_graph: keep per-chunk state for the operator's lifetime (the linearized tangent
            program, or the gradient graph) so the primal forward/backward is paid once, not per
            product. Memory: the activations of all N examples at once (``chunk_size`` then only
            sets the work per call); set False to hold one chunk at a time.

    Attributes:
        dim: D, number of trainable scalars.
        num_examples: N.
        matvecs: number of Hessian-vector products done so far (a block of m counts m).
        dtype, device: those of the parameters; products are computed and returned in them.
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
        # "auto" starts with double backward; with the cache it may move to linearize (matvec).
        self._auto = method == "auto" and self.cache_graph
        if method == "auto":
            method = "double_backward"
        if method not in _METHODS:
            raise ValueError(f"method must be one of {(*_METHODS, 'auto')}, got {method!r}")
        if not batches:
            raise ValueError("need at least one batch")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.method = method
        self.weight_decay = float(weight_decay)

        # A private copy: its mode can be set and BatchNorm buffers can change without touching
        # the user's model.
        self._model = copy.deepcopy(model)
        self._model.train(not eval_mode)
        self._like = {n: p.detach().clone() for n, p in trainable(self._model).items()}
        if not self._like:
            raise ValueError("the model has no trainable parameters")
        first = next(iter(self._like.values()))
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        self.dim: int = sum(p.numel() for p in self._like.values())
        self._theta = flatten(self._like)
        self._loss = loss_of_params(self._model, loss_fn)
        # Buffers are read by loss_of_params as constants; keep a handle so they are not collected.
        self._buffers = buffers(self._model)

        xs = [x.to(self.device) for x, _ in batches]
        ys = [y.to(self.device) for _, y in batches]
        self.num_examples: int = sum(int(x.shape[0]) for x in xs)
        if self.num_examples == 0:
            raise ValueError("the batches hold no examples")
        if chunk_size is not None:
            xs = list(torch.cat(xs).split(chunk_size))
            ys = list(torch.cat(ys).split(chunk_size))
        # Each chunk's mean loss enters with weight n_c / N: exact example weighting.
        self._chunks: list[tuple[Tensor, Tensor, float]] = [
            (x, y, x.shape[0] / self.num_examples) for x, y in zip(xs, ys, strict=True) if x.shape[0] > 0
        ]
        self.matvecs: int = 0
        self._graphs: list[tuple[list[Tensor], list[Tensor], list[int]]] | None = None
        self._linear: list[Callable[[list[Tensor]], list[Tensor]]] | None = None

    # -- helpers -----------------------------------------------------------------------------
    def _leaves(self) -> dict[str, Tensor]:
        """Fresh leaf tensors holding θ, so each chunk's graph is independent."""
        return {n: p.detach().requires_grad_(True) for n, p in self._like.items()}

    def _as_block(self, v: Tensor) -> tuple[Tensor, bool]:
        if v.ndim not in (1, 2) or v.shape[0] != self.dim:
            raise ValueError(f"expected shape ({self.dim},) or ({self.dim}, m), got {tuple(v.shape)}")
        single = v.ndim == 1
        v = v.to(dtype=self.dtype, device=self.device)
        return (v[:, None] if single else v), single

    # -- public API ----------------------------------------------------------------------------
    def matvec(self, v: Tensor) -> Tensor:
        """H v for a (D,) vector, or H V for a (D, m) block (m products); same shape out."""
        block, single = self._as_block(v)
        m = block.shape[1]
        rows = block.T.contiguous()  # (m, D): one row per vector, contiguous for unflatten
        out = torch.zeros_like(rows)
        with torch.enable_grad():
            if self.cache_graph:
                if self.method == "double_backward" and self._graphs is None:
                    self._graphs = self._build_graphs()  # "auto" may choose "fwd_rev" here
                if not (self.method == "fwd_rev" and self._matvec_linearized(rows, out)):
                    if self._graphs is None:
                        self._graphs = self._build_graphs()
                    for graph, (_, _, w) in zip(self._graphs, self._chunks, strict=True):
                        out.add_(self._second_backward(graph, rows, retain=True), alpha=w)
            else:
                for x, y, w in self._chunks:
                    if self.method == "double_backward":
                        graph = self._grad_graph(x, y)
                        out.add_(self._second_backward(graph, rows, retain=False), alpha=w)
                    else:
                        out.add_(self._hvp_fwd_rev(rows, x, y), alpha=w)
        if self.weight_decay:
            out.add_(rows, alpha=self.weight_decay)
        self.matvecs += m
        out = out.T
        return out[:, 0] if single else out

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _build_graphs(self) -> list[tuple[list[Tensor], list[Tensor], list[int]]] | None:
        """Every chunk's gradient graph; or, for ``method="auto"``, None when products are slow
        enough that linearized forward-over-reverse pays for its tracing (then it is used).

        The first chunk's graph build, about one gradient of that chunk, is the probe: a second
        backward costs ≈2.5 of them, so a product over all chunks costs ≈2.5 × chunks × probe.
        Tracing costs a roughly fixed ~1-2 s per chunk shape (Python) plus ~2 gradients of compute per
        chunk and then saves ~40% of each product: a clear win for a CNN on CPU (≈1 s per product), a loss
        for small models or on a GPU (milliseconds per product).
        """
        start = self._clock()
        first = self._grad_graph(*self._chunks[0][:2])
        probe = self._clock() - start
        if self._auto:
            self._auto = False
            if 2.5 * probe * len(self._chunks) >= _LINEARIZE_ABOVE_S:
                self.method = "fwd_rev"
                return None
        return [first] + [self._grad_graph(x, y) for x, y, _ in self._chunks[1:]]

    def _linearized(self) -> list[Callable[[list[Tensor]], list[Tensor]]]:
        """Per chunk, v ↦ H_c v (tangents as a list in θ's order) with the primal values kept.

        Forward-over-reverse is traced once per distinct chunk shape (:func:`_trace_hvp`) and its
        primal part is evaluated once per chunk; where that split is not possible (a model that
        updates tensors in place, e.g. BatchNorm statistics in train mode), each chunk is traced
        by ``torch.func.linearize`` instead.
        """
        if self._linear is None:
            names = list(self._like)
            params = [self._like[n].detach() for n in names]
            traces: dict[tuple[object, ...], tuple[fx.GraphModule, fx.GraphModule]] = {}
            linear: list[Callable[[list[Tensor]], list[Tensor]]] = []
            try:
                for x, y, _ in self._chunks:
                    key = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype)
                    if key not in traces:
                        traces[key] = _trace_hvp(self._loss, names, params, x, y)
                    primal, tangent = traces[key]
                    # Cloned: the primal pass leaves its outputs scattered among freed temporaries,
                    # and products over them then page-fault on every call (25% slower, measured).
                    kept = [t.clone() if isinstance(t, Tensor) else t for t in primal(x, y, *params)]
                    linear.append(partial(_run_tangent, tangent, kept, params))
            except _NotSplittable:
                linear = [self._linearize_chunk(names, params, x, y) for x, y, _ in self._chunks]
            self._linear = linear
        return self._linear

    def _linearize_chunk(
        self, names: list[str], params: list[Tensor], x: Tensor, y: Tensor
    ) -> Callable[[list[Tensor]], list[Tensor]]:
        from torch.func import grad, linearize

        grad_fn = grad(lambda p: self._loss(p, x, y))
        with warnings.catch_warnings():
            # const-folding the trace warns about its own bookkeeping; nothing to act on
            warnings.simplefilter("ignore", UserWarning)
            fn = linearize(grad_fn, dict(zip(names, params, strict=True)))[1]

        def apply(tangents: list[Tensor]) -> list[Tensor]:
            out = fn(dict(zip(names, tangents, strict=True)))
            return [out[n] for n in names]

        return apply

    def _matvec_linearized(self, rows: Tensor, out: Tensor) -> bool:
        """Cached forward-over-reverse into ``out``; False (and a warning) if the model cannot be
        traced: the method is then cached double backward."""
        try:
            linear = self._linearized()
        except Exception as err:  # make_fx cannot trace every model (e.g. data-dependent Python)
            warnings.warn(
                f"HessianOperator: tracing forward-over-reverse failed ({type(err).__name__}: {err}); "
                "using cached double backward instead",
                RuntimeWarning,
                stacklevel=3,
            )
            self.method = "double_backward"
            return False
        for j in range(rows.shape[0]):
            v = list(unflatten(rows[j], self._like).values())
            for fn, (_, _, w) in zip(linear, self._chunks, strict=True):
                out[j].add_(flatten(fn(v)), alpha=w)
        return True

    def _grad_graph(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], list[Tensor], list[int]]:
        """θ leaves, the chunk's gradient built with ``create_graph``, and which entries depend on θ."""
        params = self._leaves()
        plist = list(params.values())
        grads = torch.autograd.grad(self._loss(params, x, y), plist, create_graph=True)
        # A gradient entry that does not depend on θ (e.g. a linear model's) has no graph: its
        # Hessian rows are zero and it is left out of the second backward.
        keep = [i for i, g in enumerate(grads) if g.requires_grad]
        return plist, [grads[i] for i in keep], keep

    def _second_backward(
        self, graph: tuple[list[Tensor], list[Tensor], list[int]], rows: Tensor, retain: bool
    ) -> Tensor:
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
        from torch.func import grad, jvp, vmap

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


class _NotSplittable(Exception):
    """The traced product cannot be split into a primal part and a tangent part."""


def _trace_hvp(
    loss: Callable[[dict[str, Tensor], Tensor, Tensor], Tensor],
    names: list[str],
    params: list[Tensor],
    x: Tensor,
    y: Tensor,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Trace v ↦ ∇²loss(θ; x, y) v (forward-over-reverse) once, split into two programs.

    ``primal(x, y, *θ)`` computes every value the product needs that does not depend on v (the
    forward activations, the backward's intermediate gradients); ``tangent(*kept, *v)`` then only
    pushes the tangents. The trace takes x, y and θ as inputs, so one trace serves every chunk of
    the same shape: ``torch.func.linearize`` traces each chunk anew with its values baked in,
    which cost ~0.5-0.8 s per chunk on the benchmark CNN (the product itself is identical).
    """
    import torch.autograd.forward_ad as fwad
    from torch.func import grad
    from torch.fx.experimental.proxy_tensor import make_fx

    grad_fn = grad(loss)
    n = len(names)

    def product(x: Tensor, y: Tensor, *flat: Tensor) -> list[Tensor | None]:
        with fwad.dual_level():
            duals = {k: fwad.make_dual(p, t) for k, p, t in zip(names, flat[:n], flat[n:], strict=True)}
            g = grad_fn(duals, x, y)
            return [fwad.unpack_dual(g[k]).tangent for k in names]

    graph = make_fx(product)(x, y, *params, *[torch.zeros_like(p) for p in params])
    return _split_tangent(graph, 2 + n)


def _split_tangent(gm: fx.GraphModule, n_primal: int) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Split a traced graph whose first ``n_primal`` inputs are primal, the rest tangents."""
    nodes = list(gm.graph.nodes)
    inputs = [node for node in nodes if node.op == "placeholder"]
    output = next(node for node in nodes if node.op == "output")
    tangent_in = inputs[n_primal:]
    dep = set(tangent_in)  # nodes that depend on the tangents
    for node in nodes:
        if node.op not in ("placeholder", "output") and any(a in dep for a in node.all_input_nodes):
            dep.add(node)
    for node in nodes:
        # An in-place update is only safe on a value made and used within the tangent program:
        # in the primal one it could change a kept value after the tangent program read it.
        if (
            node.op == "call_function"
            and isinstance(node.target, torch._ops.OpOverload)
            and node.target._schema.is_mutable
            and (node not in dep or not (isinstance(node.args[0], fx.Node) and node.args[0] in dep))
        ):
            raise _NotSplittable(f"in-place {node.target} on a value kept between products")
    kept: dict[fx.Node, None] = {}  # primal values read by the tangent program, in order
    for node in nodes:
        if node in dep or node is output:
            for a in node.all_input_nodes:
                if a not in dep:
                    kept[a] = None
    primal, env = fx.Graph(), {}
    for node in nodes:
        if node is not output and node not in dep:
            env[node] = primal.node_copy(node, lambda a: env[a])
    primal.output(tuple(env[a] for a in kept))
    primal.eliminate_dead_code()
    tangent, env = fx.Graph(), {}
    for i, a in enumerate(kept):
        env[a] = tangent.placeholder(f"kept_{i}")
    for node in tangent_in:
        env[node] = tangent.placeholder(node.name)
    for node in nodes:
        if node in dep and node.op != "placeholder":
            env[node] = tangent.node_copy(node, lambda a: env[a])
    tangent.output(fx.map_arg(output.args[0], lambda a: env[a]))
    tangent.eliminate_dead_code()  # the trace's unused shape/storage checks would run every product
    return fx.GraphModule(gm, primal), fx.GraphModule(gm, tangent)


def _run_tangent(tangent: fx.GraphModule, kept: list[Tensor], params: list[Tensor], v: list[Tensor]) -> list[Tensor]:
    out = tangent(*kept, *v)
    # An entry of the gradient that does not depend on θ has no tangent: its Hessian rows are 0.
    return [torch.zeros_like(p) if t is None else t for t, p in zip(out, params, strict=True)]


# ------------------------------------------------------------------------------------------------
# Eigenpairs
# ------------------------------------------------------------------------------------------------


@dataclass
class EigenResult:
    """Top eigenpairs with their certificates.

    Rows are ordered by the ``which`` criterion, best first: algebraically descending for "LA",
    by magnitude descending for "LM". Eigenvalues are always signed.

    Attributes:
        eigenvalues: (k,) Rayleigh quotients uᵀHu of the returned vectors (float64; units of H,
            loss per parameter²).
        eigenvectors: (k, D) orthonormal rows u_i, in the operator's dtype.
        residuals: (k,) ‖H u_i − λ_i u_i‖, from actual Hessian products (same units as λ).
        rel_residuals: (k,) residual / max(|λ_i|, tiny). For a float32 operator they cannot go
            much below ~1e-7 · max|λ| / |λ_i| (rounding in the products themselves).
        converged: (k,) bool, rel_residual <= tol.
        matvecs: Hessian-vector products spent (a block of m counts m), verification included.
        seconds: wall time of the call.
        backend: "lanczos" or "arpack".
        which: "LA" or "LM".
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    rel_residuals: Tensor
    converged: Tensor
    matvecs: int
    seconds: float
    backend: str
    which: str


_TINY = 1e-30
_WARM_NOISE = 0.1  # norm of the random part of a warm start vector, relative to the rest


def _order(theta: Tensor, which: str) -> Tensor:
    """Indices of Ritz values, best first for ``which``."""
    key = theta if which == "LA" else theta.abs()
    return torch.argsort(key, descending=True, stable=True)


def _orthonormalize(x: Tensor, basis: Tensor, drop_tol: float, passes: int = 2) -> Tensor:
    """Rows of ``x`` (m, D) made orthonormal to the rows of ``basis`` (n, D) and to each other.

    Classical Gram-Schmidt against the basis, ``passes`` times as GEMMs ("twice is enough"), then
    modified Gram-Schmidt with re-orthogonalisation inside the block. A row whose norm falls
    below ``drop_tol`` times its norm before projection adds nothing new and is dropped.
    """
    norms0 = x.norm(dim=1).clamp_min(_TINY)
    if basis.shape[0]:
        for _ in range(passes):
            x = x - (x @ basis.T) @ basis
    rows: list[Tensor] = []
    for j in range(x.shape[0]):
        r = x[j]
        for _ in range(2):
            for q in rows:
                r = r - (q @ r) * q
        nrm = r.norm()
        if nrm > drop_tol * norms0[j]:
            rows.append(r / nrm)
    if not rows:
        return x[:0]
    return torch.stack(rows)


def _rows(v0: Tensor | None, dim: int) -> Tensor | None:
    if v0 is None:
        return None
    v0 = v0.reshape(1, -1) if v0.ndim == 1 else v0
    if v0.ndim != 2 or v0.shape[1] != dim:
        raise ValueError(f"v0 must have shape ({dim},) or (k', {dim}), got {tuple(v0.shape)}")
    return v0


def _finish(vecs: Tensor, hvecs: Tensor, tol: float, which: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Rayleigh quotients, true residuals and order for columns u (D, k) with products Hu (D, k).

    Returns (λ, u as (k, D) rows, ‖Hu − λu‖, relative residuals, converged), best first.
    Computed in float64.
    """
    vecs, hvecs = vecs.double(), hvecs.double()
    nrm = vecs.norm(dim=0).clamp_min(_TINY)
    u = vecs / nrm
    hu = hvecs / nrm
    lam = (u * hu).sum(dim=0)
    res = (hu - u * lam).norm(dim=0)
    idx = _order(lam, which)
    lam, u, res = lam[idx], u[:, idx], res[idx]
    rel = res / lam.abs().clamp_min(_TINY)
    return lam, u.T.contiguous(), res, rel, rel <= tol


def top_eigenpairs(
    op: LinearOperator,
    k: int,
    tol: float = 1e-3,
    v0: Tensor | None = None,
    which: str = "LA",
    backend: str = "lanczos",
    max_matvecs: int | None = None,
    block_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
    *,
    max_basis: int | None = None,
    verify: bool = False,
) -> EigenResult:
    """Top-k eigenpairs of a symmetric operator, with true residuals.

    Args:
        op: anything with ``dim`` and ``matvec`` taking (D,) and (D, m); ``dtype``/``device``
            attributes are used when present (default float64 on the CPU).
        k: number of eigenpairs.
        tol: convergence when ‖Hu − λu‖ <= tol · |λ| for each of the k pairs.
        v0: warm start: a (D,) vector or (k', D) rows, e.g. the eigenvectors at a nearby point.
            With ``block_size=1`` (and for arpack) the start vector is the sum of the normalised
            rows plus 10% noise; with blocks, the rows form the first block.
        which: "LA" (largest algebraic) or "LM" (largest magnitude).
        backend: "lanczos" (block Krylov, below) or "arpack" (``scipy.sparse.linalg.eigsh``).
        max_matvecs: budget of products (default 1000 + 50k). When it runs out the current
            pairs are returned with ``converged`` False where they are not, and a warning is
            issued. For "arpack" the budget is mapped to ARPACK restarts, so it is approximate.
        block_size: vectors per block product (lanczos); default 1, i.e. thick-restart Lanczos,
            which needed the fewest products on CNN Hessians (bench/hessian.py). Use a block at
            least as large as the multiplicity of an exactly repeated eigenvalue: a single-vector
            Krylov space holds only one vector of each eigenspace.
        seed: seed of the random start vectors.
        progress: show a tqdm bar of products.
        max_basis: lanczos basis size before a thick restart (default ``max(3k, k + 5b, 30)``).
            Memory: two (D, max_basis) float64 arrays.
        verify: recompute H u for the final vectors with k extra products, and report residuals
            from those. Without it residuals come from the stored products H V by linearity,
            which are true products as well; ``verify`` is an independent check.

    Returns:
        An :class:`EigenResult`.
    """
    if which not in ("LA", "LM"):
        raise ValueError(f"which must be 'LA' or 'LM', got {which!r}")
    if not 1 <= k <= op.dim:
        raise ValueError(f"need 1 <= k <= dim={op.dim}, got k={k}")
    if max_matvecs is None:
        max_matvecs = 1000 + 50 * k
    start = time.perf_counter()
    if backend == "lanczos":
        lam, vecs, res, rel, conv, count = _block_krylov(
            op, k, tol, _rows(v0, op.dim), which, max_matvecs, block_size, max_basis, seed, progress, verify
        )
    elif backend == "arpack":
        lam, vecs, res, rel, conv, count = _arpack(op, k, tol, _rows(v0, op.dim), which, max_matvecs, seed, progress)
    else:
        raise ValueError(f"backend must be 'lanczos' or 'arpack', got {backend!r}")
    return EigenResult(
        eigenvalues=lam,
        eigenvectors=vecs,
        residuals=res,
        rel_residuals=rel,
        converged=conv,
        matvecs=count,
        seconds=time.perf_counter() - start,
        backend=backend,
        which=which,
    )


class _Progress:
    """A tqdm bar of products (its total is the budget), or nothing."""

    def __init__(self, show: bool, total: int) -> None:
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="hvp", desc="eigenpairs", leave=False)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _block_krylov(
    op: LinearOperator,
    k: int,
    tol: float,
    v0: Tensor | None,
    which: str,
    max_matvecs: int,
    block_size: int | None,
    max_basis: int | None,
    seed: int,
    progress: bool,
    verify: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    """(Block) Lanczos with full reorthogonalisation, explicit Rayleigh-Ritz and thick restart.

    The basis V (D, n) is orthonormal and W = H V holds the products. Each step adds the next
    Krylov block, (I − VVᵀ) H X, and does Rayleigh-Ritz on T = Vᵀ W: Ritz pairs (θ, u = V s) have
    Hu = W s, so residuals ‖W s − θ V s‖ are true ones. They are tracked cheaply through the Gram
    matrix G = WᵀW (‖r‖² = sᵀGs − θ², no pass over D-vectors) and, once that says the pairs have
    converged, confirmed from the vectors themselves. When V is full it is compressed to the best
    Ritz vectors (V ← VS, W ← WS, a Krylov-Schur restart), which costs no product.

    V and W are kept in float64 whatever the operator's dtype: float32 inner products over
    D ~ 10⁵-10⁶ entries err by ~1e-5 relative, which would put a floor of that order under the
    residuals; vectors are rounded to the operator's dtype only to be multiplied.
    """
    dim = op.dim
    dtype, device = _op_dtype(op), _op_device(op)
    wd = torch.float64
    b = max(1, min(block_size or 1, dim))
    if v0 is not None and b > 1:
        b = max(b, v0.shape[0])  # the rows are the first block of a block Krylov space
    nmax = min(dim, max_basis or max(3 * k, k + 5 * b, 30))
    if nmax <= k and nmax < dim:
        raise ValueError(f"max_basis={nmax} must exceed k={k}")
    keep = max(k, min(nmax - b, max(k + b, (nmax + k) // 2)))
    drop_tol = 1e-10  # columns with less than this fraction of their norm left are dependent
    gram_floor = 1e-6  # below this relative residual, sᵀGs − θ² is cancellation noise: check vectors
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(m: int) -> Tensor:
        return torch.randn(m, dim, generator=gen, dtype=wd).to(device)

    if v0 is None:
        x = randn(b)
    elif b == 1:
        # One Lanczos run from the sum of the previous vectors: it is rich in every one of them,
        # and a Krylov space grown from one vector beats a block. A little noise keeps every
        # direction reachable (an eigenvector new to the top k).
        rows = v0.to(dtype=wd, device=device)
        start = (rows / rows.norm(dim=1, keepdim=True).clamp_min(_TINY)).sum(dim=0)
        z = randn(1)[0]
        x = (start / start.norm().clamp_min(_TINY) + _WARM_NOISE * z / z.norm())[None]
    else:
        x = v0.to(dtype=wd, device=device)[: nmax - b]
        if x.shape[0] < b:
            x = torch.cat([x, randn(b - x.shape[0])])

    count = 0
    tick = _Progress(progress, max_matvecs)
    # Row-major buffers, filled in place: V[:n] is the basis, W[:n] = (H V)ᵀ.
    basis = torch.empty(nmax, dim, dtype=wd, device=device)
    prods = torch.empty(nmax, dim, dtype=wd, device=device)
    n = 0
    proj = torch.zeros(0, 0, dtype=wd, device=device)  # T = VᵀHV, the symmetric part of V Wᵀ
    gram = torch.zeros(0, 0, dtype=wd, device=device)  # G = W Wᵀ
    hit_budget = False
    passes = 2
    while True:
        x = _orthonormalize(x, basis[:n], drop_tol, passes)
        if x.shape[0] == 0:  # the Krylov space is invariant: continue from a random direction
            x = _orthonormalize(randn(b), basis[:n], drop_tol)
            if x.shape[0] == 0:
                break  # V spans the whole space
        x = x[: max(0, max_matvecs - count)]
        m = x.shape[0]
        if m == 0:
            hit_budget = True
            break
        hx = op.matvec(x.T.to(dtype)).to(dtype=wd, device=device).T  # (m, D)
        count += m
        tick(m)
        cross = basis[:n] @ hx.T  # (n, m): Vᵀ H x
        back = prods[:n] @ torch.cat([x, hx]).T  # (n, 2m): (HV)ᵀx and (HV)ᵀHx, one pass over W
        # T must be exactly the symmetric part of V Wᵀ (float32 products are not exactly
        # symmetric), else the Gram residual estimate below floors at √(asymmetry) ≈ 3e-4.
        proj = _grow(proj, 0.5 * (cross + back[:, :m]), x @ hx.T)
        gram = _grow(gram, back[:, m:], hx @ hx.T)
        basis[n : n + m] = x
        prods[n : n + m] = hx
        # Next Krylov block, projected once here; the orthonormalisation above adds the second pass.
        x = hx - cross.T @ basis[:n] - (x @ hx.T).T @ x
        n += m
        passes = 1

        theta, s = torch.linalg.eigh(proj)
        order = _order(theta, which)
        if n < k:
            continue
        want = order[:k]
        sw, tw = s[:, want], theta[want]
        est = ((sw * (gram @ sw)).sum(dim=0) - tw.square()).clamp_min(0).sqrt() / tw.abs().clamp_min(_TINY)
        done = n >= dim
        if not done and bool((est <= max(tol, gram_floor)).all()):
            # Confirm on the vectors: the Gram estimate cannot resolve residuals below ~1e-7.
            res = (sw.T @ prods[:n] - tw[:, None] * (sw.T @ basis[:n])).norm(dim=1)
            done = bool((res <= tol * tw.abs()).all())
        if done:
            break
        if count >= max_matvecs:
            hit_budget = True
            break
        if n + x.shape[0] > nmax:  # thick restart: keep the best Ritz vectors and their products
            sk = s[:, order[:keep]]
            basis[:keep] = sk.T @ basis[:n]
            prods[:keep] = sk.T @ prods[:n]
            n = keep
            proj = torch.diag(theta[order[:keep]])
            gram = sk.T @ gram @ sk
            passes = 2  # x is orthogonal to the old, larger basis; one more pass costs little

    theta, s = torch.linalg.eigh(proj)
    ss = s[:, _order(theta, which)[:k]]
    u, hu = ss.T @ basis[:n], ss.T @ prods[:n]  # (k, D)
    if verify:
        u = u / u.norm(dim=1, keepdim=True).clamp_min(_TINY)
        hu = op.matvec(u.T.to(dtype)).to(dtype=wd, device=device).T
        count += u.shape[0]
        tick(u.shape[0])
    tick.close()
    lam, vecs, res, rel, conv = _finish(u.T, hu.T, tol, which)
    if hit_budget and not bool(conv.all()):
        warnings.warn(
            f"top_eigenpairs: max_matvecs={max_matvecs} reached with {int((~conv).sum())} of {k} "
            f"pairs above tol={tol} (worst relative residual {float(rel.max()):.2e})",
            RuntimeWarning,
            stacklevel=3,
        )
    return lam, vecs.to(dtype), res, rel, conv, count


def _grow(mat: Tensor, cross: Tensor, corner: Tensor) -> Tensor:
    """Symmetric [[mat, cross], [crossᵀ, corner]] with the corner symmetrised."""
    n, m = cross.shape
    out = torch.empty(n + m, n + m, dtype=mat.dtype, device=mat.device)
    out[:n, :n] = mat
    out[:n, n:] = cross
    out[n:, :n] = cross.T
    out[n:, n:] = 0.5 * (corner + corner.T)
    return out


def _arpack(
    op: LinearOperator,
    k: int,
    tol: float,
    v0: Tensor | None,
    which: str,
    max_matvecs: int,
    seed: int,
    progress: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    """scipy's ARPACK (implicitly restarted Lanczos, the paper's method), then k true residuals."""
    import numpy as np
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh
    from scipy.sparse.linalg import LinearOperator as ScipyOperator

    dim = op.dim
    dtype, device = _op_dtype(op), _op_device(op)
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    count = 0
    tick = _Progress(progress, max_matvecs)

    def mv(x: np.ndarray) -> np.ndarray:
        nonlocal count
        count += 1
        tick(1)
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np_dtype).reshape(-1)).to(device)
        return op.matvec(v).detach().cpu().numpy().astype(np_dtype, copy=False)

    lin = ScipyOperator((dim, dim), matvec=mv, dtype=np_dtype)
    start = np.random.default_rng(seed).standard_normal(dim)
    if v0 is not None:  # as for lanczos: the sum of the normalised rows, plus 10% noise
        rows = v0.to(dtype=torch.float64).cpu()
        warm = (rows / rows.norm(dim=1, keepdim=True).clamp_min(_TINY)).sum(dim=0).numpy()
        start = warm / max(np.linalg.norm(warm), _TINY) + _WARM_NOISE * start / np.linalg.norm(start)
    ncv = min(dim, max(2 * k + 1, 20))
    # ARPACK counts restarts, not products: about ncv - k products per restart after the first ncv.
    maxiter = max(1, (max_matvecs - ncv) // max(1, ncv - k) + 1)
    try:
        _, vecs = eigsh(lin, k=k, which=which, tol=tol, v0=start.astype(np_dtype), ncv=ncv, maxiter=maxiter)
        hit_budget = False
    except ArpackNoConvergence as err:
        vecs = err.eigenvectors
        hit_budget = True
    u = torch.from_numpy(np.ascontiguousarray(vecs)).to(dtype=dtype, device=device)
    if u.shape[1] == 0:
        raise RuntimeError(f"ARPACK converged no eigenpair within max_matvecs={max_matvecs}")
    hu = op.matvec(u).to(device=device)
    count += u.shape[1]
    tick(u.shape[1])
    tick.close()
    lam, vecs_t, res, rel, conv = _finish(u, hu, tol, which)
    if hit_budget or not bool(conv.all()):
        warnings.warn(
            f"top_eigenpairs(arpack): {int(conv.sum())} of {k} pairs within tol={tol} after {count} products",
            RuntimeWarning,
            stacklevel=3,
        )
    return lam, vecs_t.to(dtype), res, rel, conv, count


# ------------------------------------------------------------------------------------------------
# Stochastic norms
# ------------------------------------------------------------------------------------------------


def _probes(op: LinearOperator, m: int, gen: torch.Generator, kind: str) -> Tensor:
    dtype, device = _op_dtype(op), _op_device(op)
    z = torch.randn(op.dim, m, generator=gen, dtype=torch.float64)
    if kind == "rademacher":
        z = torch.sign(z)
    return z.to(dtype=dtype, device=device)


def frobenius_norm(op: LinearOperator, probes: int = 20, seed: int = 0) -> tuple[float, float]:
    """‖H‖_F estimated as sqrt(mean_i ‖H z_i‖²) over Gaussian z_i (E‖Hz‖² = ‖H‖_F²).

    Returns:
        (estimate, standard error); the error is the delta-method one, se(mean)/(2·estimate).
        Units: those of H (loss per parameter²). Costs ``probes`` products.
    """
    if probes < 2:
        raise ValueError("need at least 2 probes for a standard error")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = _probes(op, probes, gen, "gaussian")
    q = op.matvec(z).double().square().sum(dim=0)
    mean = float(q.mean())
    se_mean = float(q.std(unbiased=True)) / math.sqrt(probes)
    est = math.sqrt(max(mean, 0.0))
    return est, (se_mean / (2 * est) if est > 0 else 0.0)


def trace(op: LinearOperator, probes: int = 20, seed: int = 0, method: str = "hutchpp") -> tuple[float, float]:
    """tr(H) by Hutchinson's estimator or Hutch++ (Meyer et al. 2021), Rademacher probes.

    Hutch++ spends a third of the products on a sketch S, takes Q = orth(H S), computes tr(QᵀHQ)
    exactly (a third) and applies Hutchinson to (I − QQᵀ)H(I − QQᵀ) with the rest: far lower
    variance when a few eigenvalues dominate, as for a network's Hessian.

    Returns:
        (estimate, standard error); the error is that of the Hutchinson part (the exact part
        given Q adds none). Costs ``probes`` products.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if method == "hutchinson":
        if probes < 2:
            raise ValueError("need at least 2 probes for a standard error")
        z = _probes(op, probes, gen, "rademacher")
        t = (z.double() * op.matvec(z).double()).sum(dim=0)
        return float(t.mean()), float(t.std(unbiased=True)) / math.sqrt(probes)
    if method != "hutchpp":
        raise ValueError(f"method must be 'hutchpp' or 'hutchinson', got {method!r}")
    sketch = probes // 3
    rest = probes - 2 * sketch
    if sketch < 1 or rest < 2:
        raise ValueError("Hutch++ needs at least 4 probes")
    s = _probes(op, sketch, gen, "rademacher")
    q, _ = torch.linalg.qr(op.matvec(s).double())
    qd = q.to(dtype=s.dtype)
    exact = float((q * op.matvec(qd).double()).sum())
    g = _probes(op, rest, gen, "rademacher").double()
    g = g - q @ (q.T @ g)
    t = (g * op.matvec(g.to(dtype=s.dtype)).double()).sum(dim=0)
    return exact + float(t.mean()), float(t.std(unbiased=True)) / math.sqrt(rest)
