"""Forward-over-reverse traced once and split into a primal program and a tangent program.

A Hessian-vector product over a fixed chunk (θ, x, y) redoes the same primal work for every
vector: the forward activations and the backward's intermediate gradients do not depend on v.
:func:`_trace_hvp` records v ↦ ∇²loss(θ; x, y) v with ``make_fx`` once per chunk *shape*
(x, y and θ are inputs of the trace, so one trace serves every chunk of that shape), and
:func:`_split_tangent` cuts it into

- ``primal(x, y, *θ)``: every value the product needs that does not depend on v, run once per
  chunk and kept;
- ``tangent(*kept, *v)``: what is left, run for every product; it only pushes tangents.

:func:`_tangent_programs` builds, per chunk, the function v ↦ H_c v from those two programs.
Where the split is not safe (a model that updates a primal value in place, e.g. an in-place
activation or BatchNorm statistics in train mode: :class:`_NotSplittable`), every chunk is
instead linearised on its own by ``torch.func.linearize`` (:func:`_linearize_chunk_fallback`),
which bakes that chunk's values into its trace; the product is the same.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor, fx

# v ↦ H_c v for one chunk, with the tangents and the result as lists in θ's order.
TangentProgram = Callable[[list[Tensor]], list[Tensor]]
# loss(params by name, x, y) -> mean loss over the chunk (see sharpflow.params.loss_of_params).
ChunkLoss = Callable[[dict[str, Tensor], Tensor, Tensor], Tensor]


class _NotSplittable(Exception):
    """The traced product cannot be split into a primal part and a tangent part."""


def _tangent_programs(
    loss: ChunkLoss,
    names: list[str],
    params: list[Tensor],
    chunks: Sequence[tuple[Tensor, Tensor, float]],
) -> list[TangentProgram]:
    """Per chunk ``(x, y, weight)``, v ↦ H_c v with the primal values kept.

    Forward-over-reverse is traced once per distinct chunk shape (:func:`_trace_hvp`) and its
    primal part is evaluated once per chunk; where that split is not possible, each chunk is
    linearised by ``torch.func.linearize`` instead (:func:`_linearize_chunk_fallback`).
    """
    traces: dict[tuple[object, ...], tuple[fx.GraphModule, fx.GraphModule]] = {}
    programs: list[TangentProgram] = []
    try:
        for x, y, _ in chunks:
            key = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype)
            if key not in traces:
                traces[key] = _trace_hvp(loss, names, params, x, y)
            primal, tangent = traces[key]
            # Cloned: the primal pass leaves its outputs scattered among freed temporaries, and
            # products over them then page-fault on every call (measurably slower).
            kept = [t.clone() if isinstance(t, Tensor) else t for t in primal(x, y, *params)]
            programs.append(partial(_run_tangent, tangent, kept, params))
    except _NotSplittable:
        programs = [_linearize_chunk_fallback(loss, names, params, x, y) for x, y, _ in chunks]
    return programs


def _linearize_chunk_fallback(
    loss: ChunkLoss, names: list[str], params: list[Tensor], x: Tensor, y: Tensor
) -> TangentProgram:
    """v ↦ H_c v for one chunk by ``torch.func.linearize``: a trace per chunk, its values baked in.

    Used only when the shared trace cannot be split (:class:`_NotSplittable`).
    """
    from torch.func import grad, linearize

    grad_fn = grad(lambda p: loss(p, x, y))
    with warnings.catch_warnings():
        # const-folding the trace warns about its own bookkeeping; nothing to act on
        warnings.simplefilter("ignore", UserWarning)
        fn = linearize(grad_fn, dict(zip(names, params, strict=True)))[1]

    def apply(tangents: list[Tensor]) -> list[Tensor]:
        out = fn(dict(zip(names, tangents, strict=True)))
        return [out[n] for n in names]

    return apply


def _trace_hvp(
    loss: ChunkLoss,
    names: list[str],
    params: list[Tensor],
    x: Tensor,
    y: Tensor,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Trace v ↦ ∇²loss(θ; x, y) v (forward-over-reverse) once, split into two programs.

    ``primal(x, y, *θ)`` computes every value the product needs that does not depend on v (the
    forward activations, the backward's intermediate gradients); ``tangent(*kept, *v)`` then only
    pushes the tangents. The trace takes x, y and θ as inputs, so one trace serves every chunk of
    the same shape, whereas ``torch.func.linearize`` traces each chunk anew with its values baked
    in (the product itself is identical).
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

    with warnings.catch_warnings():
        # forward-mode AD loads torch's own jvp decompositions on first use, and that import warns
        # that torch.jit.script is deprecated: torch's internals, nothing a user can act on
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
        graph = make_fx(product)(x, y, *params, *[torch.zeros_like(p) for p in params])
    return _split_tangent(graph, 2 + n)


def _tangent_dependents(nodes: list[fx.Node], tangent_in: list[fx.Node]) -> set[fx.Node]:
    """The tangent inputs and every node that depends on one of them (``nodes`` in graph order)."""
    dep = set(tangent_in)
    for node in nodes:
        if node.op not in ("placeholder", "output") and any(a in dep for a in node.all_input_nodes):
            dep.add(node)
    return dep


def _check_no_kept_mutation(nodes: list[fx.Node], dep: set[fx.Node]) -> None:
    """Raise :class:`_NotSplittable` if an in-place op could change a value kept between products.

    An in-place update is only safe on a value made and used within the tangent program: in the
    primal one it could change a kept value after the tangent program read it.
    """
    for node in nodes:
        if (
            node.op == "call_function"
            and isinstance(node.target, torch._ops.OpOverload)
            and node.target._schema.is_mutable
            and (node not in dep or not (isinstance(node.args[0], fx.Node) and node.args[0] in dep))
        ):
            raise _NotSplittable(f"in-place {node.target} on a value kept between products")


def _split_tangent(gm: fx.GraphModule, n_primal: int) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Split a traced graph whose first ``n_primal`` inputs are primal, the rest tangents."""
    nodes = list(gm.graph.nodes)
    inputs = [node for node in nodes if node.op == "placeholder"]
    output = next(node for node in nodes if node.op == "output")
    tangent_in = inputs[n_primal:]
    dep = _tangent_dependents(nodes, tangent_in)  # nodes that depend on the tangents
    _check_no_kept_mutation(nodes, dep)
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
