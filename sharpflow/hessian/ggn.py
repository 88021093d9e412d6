"""The generalised Gauss-Newton matrix of the mean cross-entropy (or square loss).

For logits z_n(θ) of example n and the softmax p_n, the Hessian of the mean cross-entropy splits as
H = G + R with G = (1/N) Σ_n J_nᵀ (diag(p_n) − p_n p_nᵀ) J_n, J_n = ∂z_n/∂θ, and R the part from
the curvature of the network itself (Σ_n Σ_c (p_nc − y_nc) ∇²z_nc / N). G is positive semi-definite;
for a model linear in θ, R = 0 and G = H. Papyan (2019, 2020): G's top eigenvalues, as many as the
classes, come from the class means and make the outliers of H's spectrum. For the square loss
½‖z_n − y_n‖² (``loss="mse"``) the Hessian in the outputs is the identity: G = (1/N) Σ_n J_nᵀJ_n.

:class:`GGNOperator` applies G (+ weight_decay·I, as the Hessian operator adds it) with the same data
handling as :class:`~sharpflow.hessian.operators.HessianOperator` (both are a
:class:`~sharpflow.hessian.base.CurvatureOperator`): the model deep-copied and in eval mode, exact
weighting of every example (every token for a language model), optional re-chunking. A product is a
forward-mode pass (J v), the softmax Hessian applied per example, and a backward pass (Jᵀu) whose
forward is kept per chunk, one vector of a block at a time. The residual H − G is ``h - g`` in the
operator algebra of :mod:`sharpflow.hessian.base` (both carry the weight decay, so it cancels).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp

from sharpflow.params import flatten, unflatten

from .base import CurvatureOperator


class GGNOperator(CurvatureOperator):
    """The generalised Gauss-Newton matrix of the mean cross-entropy (``loss="mse"``: of the mean
    square loss ½‖z − onehot(y)‖²) over N fixed examples.

    Args:
        model: the network (deep-copied; the user's model is never modified). Its output are logits
            (B, C) or, for a language model, (B, T, C) with targets (B, T).
        batches: the examples as ``(x, y)``; moved to the parameters' device once.
        weight_decay: adds ``weight_decay · v`` to every product (the Hessian operator's convention).
        eval_mode: run the copy in eval mode (BatchNorm running statistics, no dropout).
        chunk_size: re-split the examples into chunks of at most this many.
        cache: keep each chunk's forward pass for the backward half of every product (memory: the
            activations of all N examples); False recomputes it per product.
        loss: "cross_entropy" (softmax Hessian diag(p) − ppᵀ in the outputs) or "mse" (identity).

    Attributes:
        dim, dtype, device: D, and θ's dtype and device, as for every
            :class:`~sharpflow.hessian.base.CurvatureOperator`.
        num_targets: the number of cross-entropy terms averaged (examples, or tokens).
        matvecs: products done so far (a block of m counts m).
    """

    def __init__(self, model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], *, weight_decay: float = 0.0,
                 eval_mode: bool = True, chunk_size: int | None = None, cache: bool = True,
                 loss: str = "cross_entropy") -> None:
        if loss not in ("cross_entropy", "mse"):
            raise ValueError(f"unknown loss {loss!r}; the GGN knows 'cross_entropy' and 'mse'")
        self.loss = loss
        super().__init__(model, batches, eval_mode=eval_mode, chunk_size=chunk_size)
        self.weight_decay = float(weight_decay)
        self.num_targets: int = sum(int(y.numel()) for _, y in self._data)
        if self.num_targets == 0:
            raise ValueError("the batches hold no examples")
        self._cache = cache
        self._primal: list[tuple[Tensor, Callable[..., Any], torch.Size]] | None = None

    def _logits(self, x: Tensor) -> Callable[[dict[str, Tensor]], Tensor]:
        return lambda params: functional_call(self._model, {**params, **self._buffers}, (x,))

    def _primals(self) -> list[tuple[Tensor, Callable[..., Any], torch.Size]]:
        """Per chunk: the softmax probabilities (as (targets, C)), the vjp function, the logits' shape."""
        if self._primal is not None:
            return self._primal
        out = []
        for x, _ in self._data:
            z, back = vjp(self._logits(x), self._like)
            out.append((torch.softmax(z.detach().reshape(-1, z.shape[-1]), dim=-1), back, z.shape))
        if self._cache:
            self._primal = out
        return out

    def _matmat(self, block: Tensor) -> Tensor:
        """G V for a (D, m) block (+ weight_decay · V)."""
        out = torch.empty_like(block)
        primals = self._primals()
        for j in range(block.shape[1]):
            col = block[:, j]
            tangent = unflatten(col, self._like)
            acc = torch.zeros_like(col)
            for (x, _), (p, back, shape) in zip(self._data, primals, strict=True):
                with warnings.catch_warnings():
                    # forward mode loads torch's jvp decompositions, whose import warns that
                    # torch.jit.script is deprecated: torch's internals (as in .tracing)
                    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated",
                                            category=FutureWarning)
                    _, jv = jvp(self._logits(x), (self._like,), (tangent,))
                jv = jv.detach().reshape(-1, p.shape[-1])
                if self.loss == "mse":  # the square loss's Hessian in the outputs: the identity
                    u = jv / self.num_targets
                else:  # the softmax cross-entropy's Hessian in the logits, diag(p) − ppᵀ, per target
                    u = (p * jv - p * (p * jv).sum(dim=-1, keepdim=True)) / self.num_targets
                (g,) = back(u.reshape(shape))
                acc += flatten(g)
            out[:, j] = acc + self.weight_decay * col if self.weight_decay else acc
        return out


__all__ = ["GGNOperator"]
