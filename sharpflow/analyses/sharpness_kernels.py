"""The kernels of the ``sharpness`` analysis: worst-case, average-case and PAC-Bayes sharpness.

Pure functions of a loss of the flat parameters θ (D,) (``FlatLoss``), so they can be checked on a
quadratic with a known answer:

- :func:`worst_case`: max over ‖δ‖ ≤ ρ of L(θ + δ) − L(θ) (L2 or L∞; ``scale`` = |θ| for the
  adaptive, magnitude-aware ball ‖δ/|θ|‖ ≤ ρ) by projected normalised-gradient ascent from a random
  point of the ball, with the value after each step (Foret et al. 2021; Andriushchenko & Flammarion
  2022). On L(θ) = ½θᵀAθ at θ = 0 the L2 answer is ρ²λ_max(A)/2.
- :func:`average_case`: E_δ[L(θ + δ)] − L(θ) for δ ~ N(0, σ²I) (or σ·|θ| per coordinate, Jiang et al.
  2019's magnitude-aware form), Monte Carlo, with its standard error. On the quadratic: σ²tr(A)/2.
- :func:`pac_bayes_sigma`: the largest σ whose expected accuracy drop stays below a target, by
  bisection on log σ to a relative tolerance (Jiang et al. 2019's σ′).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

FlatLoss = Callable[[Tensor], Tensor]


def _random_start(theta: Tensor, rho: float, norm: str, gen: torch.Generator) -> Tensor:
    u = torch.randn(theta.shape, generator=gen, dtype=theta.dtype).to(theta.device)
    if norm == "linf":
        return rho * (2 * torch.rand(theta.shape, generator=gen, dtype=theta.dtype).to(theta.device) - 1)
    return rho * u / torch.linalg.vector_norm(u)


def worst_case(loss: FlatLoss, theta: Tensor, rho: float, *, norm: str = "l2", scale: Tensor | None = None,
               steps: int = 10, step_size: float = 0.5, generator: torch.Generator | None = None) -> list[float]:
    """L(θ + δ_t) − L(θ) at the random start (t = 0) and after each of ``steps`` ascent steps, δ = s⊙u,
    ‖u‖ ≤ ρ (s = ``scale`` or 1). A step moves u by ``step_size``·ρ along the normalised gradient
    (L2) or its sign (L∞), then projects back onto the ball."""
    gen = generator or torch.Generator().manual_seed(0)
    s = torch.ones_like(theta) if scale is None else scale
    with torch.no_grad():
        base = float(loss(theta))
    u = _random_start(theta, rho, norm, gen)
    values = []
    for t in range(steps + 1):
        u = u.detach().requires_grad_(t < steps)
        value = loss(theta + s * u)
        values.append(float(value.detach()) - base)
        if t == steps:
            break
        (grad,) = torch.autograd.grad(value, u)
        with torch.no_grad():
            if norm == "linf":
                u = (u + step_size * rho * grad.sign()).clamp(-rho, rho)
            else:
                gnorm = torch.linalg.vector_norm(grad)
                if not gnorm > 0:
                    break
                u = u + step_size * rho * grad / gnorm
                u = u * min(1.0, rho / float(torch.linalg.vector_norm(u)))
    return values


def average_case(loss: FlatLoss, theta: Tensor, sigma: float, *, scale: Tensor | None = None, samples: int = 16,
                 generator: torch.Generator | None = None) -> tuple[float, float]:
    """(mean, standard error) over ``samples`` draws of L(θ + δ) − L(θ), δ = σ·s⊙z, z ~ N(0, I)."""
    gen = generator or torch.Generator().manual_seed(0)
    s = torch.ones_like(theta) if scale is None else scale
    with torch.no_grad():
        base = float(loss(theta))
        diffs = []
        for _ in range(samples):
            z = torch.randn(theta.shape, generator=gen, dtype=theta.dtype).to(theta.device)
            diffs.append(float(loss(theta + sigma * s * z)) - base)
    t = torch.tensor(diffs, dtype=torch.float64)
    se = float(t.std(unbiased=True) / math.sqrt(samples)) if samples > 1 else math.nan
    return float(t.mean()), se


def pac_bayes_sigma(drop: Callable[[float], float], target: float, *, lo: float = 1e-5, hi: float = 1.0,
                    tol: float = 0.05, max_iter: int = 40) -> tuple[float, float, int]:
    """The largest σ in [lo, hi] with ``drop(σ)`` ≤ ``target`` (``drop`` increasing in σ on average), by
    bisection on log σ until hi/lo ≤ 1 + ``tol``: (σ′, the bracket's relative width, evaluations).
    σ′ = hi if even ``hi`` stays below the target, ``lo`` if even ``lo`` exceeds it."""
    evals = 0
    if drop(hi) <= target:
        return hi, 0.0, 1
    evals += 1
    if drop(lo) > target:
        return lo, 0.0, 2
    evals += 1
    for _ in range(max_iter):
        if hi / lo <= 1 + tol:
            break
        mid = math.sqrt(lo * hi)
        evals += 1
        if drop(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo, hi / lo - 1, evals


__all__ = ["FlatLoss", "average_case", "pac_bayes_sigma", "worst_case"]
