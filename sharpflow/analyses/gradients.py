"""Gradient plumbing of the projected-gradient kernels: mini-batch and full gradients and losses at
parameter vectors, through ``torch.func`` (``vmap`` over batches or vectors, with a plain-loop
fallback).

The kernels built on it sit beside their analyses: :mod:`.project_kernels` (alignment,
cross-sections, the decomposed step) and :mod:`.escape_kernel` (the escape ablation). Every
function here is pure: tensors in, tensors or tidy (long) pandas DataFrames out. Loading a
checkpoint and its eigenvectors, and adding ``run``/``step``/``epoch`` columns, is the caller's job.

Conventions shared by all functions
-----------------------------------
- ``theta`` is a flat (D,) parameter vector in the order of :func:`sharpflow.params.trainable`;
  ``E`` is a (k, D) stack of orthonormal eigenvectors in descending eigenvalue order (row i-1 is
  e_i); mini-batch gradients are (B, D) stacks. The model's own weights are never touched: every
  evaluation goes through ``torch.func.functional_call`` with ``theta`` unflattened. Pass an
  eval-mode model (BatchNorm/dropout frozen); randomness inside the model is an error under vmap.
- ``loss_fn(logits, y)`` returns the MEAN loss over a batch. A batch's weight is its number of
  examples, ``x.shape[0]``, so losses and gradients "over ``batches``" are exact means over all
  their examples even when the batches differ in size.
- Randomness (random directions) comes only from the ``generator`` argument: a
  ``torch.Generator`` or an int seed. The same seed gives the same rows.
- Divergence: every DataFrame has a boolean ``diverged`` column. It is True on rows computed
  from a non-finite ``theta`` (or a non-finite gradient where the row depends on one); those
  rows carry NaN values instead of raising.
- ``chunk`` bounds memory: how many mini-batches (for gradients) or parameter vectors (for
  losses) are pushed through one ``vmap`` call. ``None`` picks a default (16 for gradients, 32
  for losses). If a model has an operation that ``vmap`` cannot batch, the functions fall back to
  a plain loop (with a warning) and give the same numbers, only slower.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from ..params import LossFn, loss_of_params, trainable, unflatten

Batch = tuple[Tensor, Tensor]
GRAD_CHUNK = 16
THETA_CHUNK = 32


# ----------------------------------------------------------------------------------------------
# Small private helpers
# ----------------------------------------------------------------------------------------------
def _flat_loss(model: nn.Module, loss_fn: LossFn) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``f(theta (D,), x, y) -> mean loss``: a pure function of the flat parameter vector."""
    like = trainable(model)
    f = loss_of_params(model, loss_fn)

    def f_flat(theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return f(unflatten(theta, like), x, y)

    return f_flat


#: Batch with ``torch.func.vmap``? None: only on accelerators. On the CPU the first vmap/grad call of
#: a process lazily imports torch's compiler stack (seconds; see docs/measured/benchmarks.md), more than a whole
#: per-checkpoint analysis of a small model costs with plain autograd loops; on a GPU the batching
#: pays. Set to True/False to force either path (the numbers agree; tests check both).
VMAP: bool | None = None


def _use_vmap(device: torch.device) -> bool:
    return device.type != "cpu" if VMAP is None else VMAP


def _plain_grad(f: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """∇_θ f(θ, x, y) with plain autograd (no functorch transform)."""

    def g(theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            return torch.autograd.grad(f(th, x, y), th)[0]

    return g


def batches_of(x: Tensor, y: Tensor, size: int) -> list[Batch]:
    """(x, y) cut into consecutive batches of ``size`` examples (the last may be shorter)."""
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _n_examples(batch: Batch) -> int:
    return int(batch[0].shape[0])


def _is_finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _as_generator(generator: torch.Generator | int) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(int(generator))


def _random_unit_vectors(n: int, dim: int, generator: torch.Generator | int, like: Tensor) -> Tensor:
    """(n, dim) rows drawn uniformly on the unit sphere (normalised Gaussians), dtype/device of ``like``."""
    gen = _as_generator(generator)
    v = torch.randn((n, dim), generator=gen, dtype=torch.float64, device=gen.device)
    v = v / v.norm(dim=1, keepdim=True)
    return v.to(dtype=like.dtype, device=like.device)


def _shape_groups(batches: Sequence[Batch]) -> list[list[int]]:
    """Indices of batches grouped by (shape, dtype) of x and y, so each group can be stacked."""
    groups: dict[tuple, list[int]] = {}
    for i, (x, y) in enumerate(batches):
        groups.setdefault((tuple(x.shape), x.dtype, tuple(y.shape), y.dtype), []).append(i)
    return list(groups.values())


def _warn_fallback(what: str, err: Exception) -> None:
    warnings.warn(f"vmap failed for {what} ({type(err).__name__}: {err}); falling back to a loop",
                  RuntimeWarning, stacklevel=3)


def _iter_batch_gradients(
    model: nn.Module, loss_fn: LossFn, theta: Tensor, batches: Sequence[Batch], chunk: int | None
) -> Iterator[tuple[list[int], Tensor]]:
    """Yield (batch indices, (len, D) gradients) chunk by chunk; batches of equal shape are vmapped."""
    chunk = chunk or GRAD_CHUNK
    dev = theta.device
    use_vmap = _use_vmap(dev)
    f = _flat_loss(model, loss_fn)
    g1 = grad(f) if use_vmap else _plain_grad(f)
    gv = vmap(g1, in_dims=(None, 0, 0))
    for group in _shape_groups(batches):
        for start in range(0, len(group), chunk):
            sel = group[start : start + chunk]
            if use_vmap and len(sel) > 1:
                xs = torch.stack([batches[i][0] for i in sel]).to(dev)
                ys = torch.stack([batches[i][1] for i in sel]).to(dev)
                try:
                    yield sel, gv(theta, xs, ys)
                    continue
                except (RuntimeError, NotImplementedError) as err:
                    _warn_fallback("mini-batch gradients", err)
                    use_vmap = False
            yield sel, torch.stack([g1(theta, batches[i][0].to(dev), batches[i][1].to(dev)) for i in sel])


def _mean_losses(
    f: Callable[[Tensor, Tensor, Tensor], Tensor], thetas: Tensor, batches: Sequence[Batch], state: dict
) -> Tensor:
    """(c,) float64 mean loss over all examples of ``batches`` for each row of ``thetas`` (c, D)."""
    n_total = sum(_n_examples(b) for b in batches)
    total = torch.zeros(thetas.shape[0], dtype=torch.float64, device=thetas.device)
    fv = vmap(f, in_dims=(0, None, None))
    for x, y in batches:
        x, y = x.to(thetas.device), y.to(thetas.device)
        w = _n_examples((x, y)) / n_total
        if state["vmap"]:
            try:
                total += w * fv(thetas, x, y).double()
                continue
            except (RuntimeError, NotImplementedError) as err:
                _warn_fallback("losses at parameter vectors", err)
                state["vmap"] = False
        total += w * torch.stack([f(t, x, y) for t in thetas]).double()
    return total


def _losses_along(
    model: nn.Module,
    loss_fn: LossFn,
    theta: Tensor,
    dirs: Tensor,
    index: Tensor,
    coef: Tensor,
    batches: Sequence[Batch],
    chunk: int | None,
) -> Tensor:
    """(m,) float64 losses at θ + coef[j]·dirs[index[j]], building the (m, D) points chunk by chunk.

    Materialising all m points at once would cost m·D memory (e.g. 490 × 362k floats for the
    decomposed step); a chunk of them is enough for one vmapped evaluation.
    """
    chunk = chunk or THETA_CHUNK
    f = _flat_loss(model, loss_fn)
    state = {"vmap": _use_vmap(theta.device)}
    out = torch.empty(index.shape[0], dtype=torch.float64, device=theta.device)
    with torch.no_grad():
        for s in range(0, index.shape[0], chunk):
            c = coef[s : s + chunk, None].to(device=theta.device, dtype=theta.dtype)
            pts = theta + c * dirs[index[s : s + chunk]]
            loss = _mean_losses(f, pts, batches, state)
            # A point that left the finite range has no meaningful loss, whatever the model returns.
            loss[~torch.isfinite(pts).all(dim=1)] = math.nan
            out[s : s + chunk] = loss
    return out


# ----------------------------------------------------------------------------------------------
# Gradients and losses at parameter vectors
# ----------------------------------------------------------------------------------------------
def batch_gradients(
    model: nn.Module, loss_fn: LossFn, theta: Tensor, batches: Sequence[Batch], *, chunk: int | None = None
) -> Tensor:
    """Gradient of each mini-batch's mean loss at ``theta``.

    Args:
        theta: (D,) flat parameters.
        batches: B tuples ``(x, y)``. Batches of equal shape are stacked and differentiated in
            one ``vmap(grad(f))`` call per ``chunk`` batches; a batch of odd size (typically the
            last one) is handled in its own group, so it does not force a slow loop on the rest.
        chunk: batches per vmap call (default 16); bounds memory to ``chunk`` batches' activations.

    Returns:
        (B, D) tensor, row b = ∇_θ loss_fn(model_θ(x_b), y_b), dtype/device of ``theta``.
        All NaN if ``theta`` is not finite.
    """
    theta = theta.detach()
    out = torch.full((len(batches), theta.numel()), math.nan, dtype=theta.dtype, device=theta.device)
    if not _is_finite(theta):
        return out
    for sel, g in _iter_batch_gradients(model, loss_fn, theta, batches, chunk):
        out[sel] = g
    return out


def full_gradient(
    model: nn.Module, loss_fn: LossFn, theta: Tensor, batches: Sequence[Batch], *, chunk: int | None = None
) -> Tensor:
    """Gradient of the mean loss over ALL examples of ``batches`` at ``theta``: a (D,) tensor.

    Exact weighting: batch b enters with weight n_b / Σ n, so uneven batches give the gradient of
    the loss on their concatenation. Memory is O(chunk·D), not O(B·D). All NaN if ``theta`` is
    not finite.
    """
    theta = theta.detach()
    acc = torch.zeros_like(theta)
    if not _is_finite(theta):
        return acc.fill_(math.nan)
    n_total = sum(_n_examples(b) for b in batches)
    for sel, g in _iter_batch_gradients(model, loss_fn, theta, batches, chunk):
        w = torch.tensor([_n_examples(batches[i]) / n_total for i in sel], dtype=g.dtype, device=g.device)
        acc += w @ g
    return acc


def loss_at(
    model: nn.Module, loss_fn: LossFn, thetas: Tensor, batches: Sequence[Batch], *, chunk: int | None = None
) -> Tensor:
    """Mean loss over all examples of ``batches`` at each of m parameter vectors.

    Args:
        thetas: (m, D) parameter vectors (a (D,) vector is treated as m=1).
        chunk: parameter vectors per vmap call (default 32).

    Returns:
        (m,) float64 tensor on ``thetas``' device; exact example weighting across uneven batches;
        NaN for rows of ``thetas`` that are not finite.
    """
    thetas = thetas.detach()
    if thetas.dim() == 1:
        thetas = thetas[None]
    m = thetas.shape[0]
    idx = torch.arange(m, device=thetas.device)
    zero = torch.zeros(thetas.shape[1], dtype=thetas.dtype, device=thetas.device)
    return _losses_along(model, loss_fn, zero, thetas, idx, torch.ones(m, dtype=thetas.dtype), batches, chunk)
