"""Flat parameter vectors: the common coordinate system of every curvature computation.

A model's trainable parameters (``requires_grad``), in ``named_parameters()`` order, are
concatenated into one vector of length D. Eigenvectors, gradients and steps are all (D,)
tensors (or (k, D) stacks) in this order, so they can be saved, compared and projected
without knowing the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

LossFn = Callable[[Tensor, Tensor], Tensor]


def trainable(model: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters by name, in ``named_parameters()`` order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def buffers(model: nn.Module) -> dict[str, Tensor]:
    """Buffers (e.g. BatchNorm running statistics) plus frozen parameters."""
    out = dict(model.named_buffers())
    out.update({n: p for n, p in model.named_parameters() if not p.requires_grad})
    return out


def num_params(model: nn.Module) -> int:
    """D, the number of trainable scalars."""
    return sum(p.numel() for p in trainable(model).values())


def flatten(tensors: dict[str, Tensor] | list[Tensor]) -> Tensor:
    """Concatenate tensors (a dict in its order, or a list) into one (D,) vector."""
    items = list(tensors.values()) if isinstance(tensors, dict) else list(tensors)
    return torch.cat([t.reshape(-1) for t in items])


def flat_params(model: nn.Module) -> Tensor:
    """θ as a detached (D,) vector."""
    return flatten(trainable(model)).detach().clone()


def unflatten(vec: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Split a (D,) vector (or a (..., D) batch of them) into tensors shaped like ``like``.

    Leading batch dimensions are kept: a (m, D) input gives tensors of shape (m, *p.shape).
    """
    out: dict[str, Tensor] = {}
    lead = vec.shape[:-1]
    offset = 0
    for name, ref in like.items():
        n = ref.numel()
        out[name] = vec[..., offset : offset + n].reshape(*lead, *ref.shape)
        offset += n
    if offset != vec.shape[-1]:
        raise ValueError(f"vector has {vec.shape[-1]} entries, the model has {offset} parameters")
    return out


def set_flat_params(model: nn.Module, vec: Tensor) -> None:
    """Write a (D,) vector into the model's trainable parameters, in place."""
    with torch.no_grad():
        for p, v in zip(trainable(model).values(), unflatten(vec, trainable(model)).values(), strict=True):
            p.copy_(v)


def loss_of_params(model: nn.Module, loss_fn: LossFn) -> Callable[[dict[str, Tensor], Tensor, Tensor], Tensor]:
    """A pure function ``f(params, x, y) -> loss`` for ``torch.func`` transforms.

    The model's current buffers are used as constants (call this on an eval-mode model
    when BatchNorm statistics must not depend on the batch).
    """
    bufs = buffers(model)

    def f(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, (params, bufs), (x,)), y)

    return f
