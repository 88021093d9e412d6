"""Sharpness-aware minimisation (Foret et al. 2021) and its adaptive form ASAM (Kwon et al. 2021).

A SAM step on a mini-batch B with base SGD (momentum μ, weight decay λ):

1. g = ∇L_B(w), the gradient the caller has just computed (``loss.backward()``);
2. the ascent ε = ρ·g/‖g‖ (SAM), or ε = ρ·T²g/‖T g‖ with T = diag(|w| + η_a) (ASAM, η_a = ``eta``);
3. g' = ∇L_B(w + ε): the ``closure`` recomputes loss and gradients at the perturbed weights on
   the same mini-batch;
4. w ← w with the SGD update of g' (momentum and weight decay as ``torch.optim.SGD``, at w).

Two gradient evaluations per step. The optimizer's state is SGD's (momentum buffers): resuming
from a checkpoint is bitwise, as for SGD. ``‖·‖`` is over all parameters of all groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


class SAM(torch.optim.SGD):
    """SGD whose gradient is taken at the worst point of a ρ-ball (SAM) or of an adaptive ellipsoid
    (ASAM, ``adaptive=True``) around the weights. ``step(closure)`` needs the closure."""

    def __init__(self, params: Iterable[Tensor], lr: float, rho: float = 0.05, adaptive: bool = False,
                 eta: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        if rho <= 0:
            raise ValueError(f"rho must be positive, got {rho}")
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.rho, self.adaptive, self.eta = float(rho), bool(adaptive), float(eta)

    @torch.no_grad()
    def ascent(self) -> list[tuple[Tensor, Tensor]]:
        """ε for every parameter with a gradient, from the gradients held now: (parameter, ε)."""
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        scale = [(p.abs() + self.eta) if self.adaptive else None for p in params]
        scaled = [p.grad if t is None else t * p.grad for p, t in zip(params, scale, strict=True)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        factor = self.rho / (norm + 1e-12)
        return [(p, (s if t is None else t * s) * factor) for p, s, t in zip(params, scaled, scale, strict=True)]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        if closure is None:
            raise RuntimeError("SAM.step needs a closure that recomputes the loss and its gradients")
        moves = self.ascent()
        saved = [p.clone() for p, _ in moves]  # (w + ε) − ε is not w in floating point: restore w itself
        for p, e in moves:
            p.add_(e)
        with torch.enable_grad():
            loss = closure()
        for (p, _), w in zip(moves, saved, strict=True):
            p.copy_(w)
        super().step()
        return loss


__all__ = ["SAM"]
