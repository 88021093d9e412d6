"""The spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

Ghorbani, Krishnan & Xiao (2019) and Papyan (2019): for a random unit probe v, m steps of Lanczos
from v give a tridiagonal T_m whose eigenvalues θ_j (the *nodes*) and squared first eigenvector
components τ_j (the *weights*, summing to 1) form the Gauss quadrature of the measure
μ_v = Σ_i (vᵀu_i)² δ_{λ_i}: Σ_j τ_j θ_j^p = vᵀH^p v exactly for p ≤ 2m − 1. For v uniform on the
sphere E[μ_v] = μ, the uniform measure on H's D eigenvalues, so the average of the probes'
quadratures estimates H's spectral density; a Gaussian kernel of width σ turns it into a curve.

Accuracy, in the Wasserstein-1 distance to μ (every eigenvalue in [a, b]): Gauss quadrature is
exact for polynomials of degree 2m − 1, and a 1-Lipschitz function is within π(b − a)/(4·2m) of
one (Jackson), so the quadrature of each probe is within π(b − a)/(4m) of μ_v; the average over n
probes of μ_v has E|F_n(t) − F(t)| ≤ sqrt(1/(2n(D + 2))) at every t (the variance of a sum of s
of the D weights of a uniform unit vector is 2s(D − s)/(D²(D + 2))). Together:

    E W1(μ_SLQ, μ) ≤ π(b − a)/(4m) + (b − a)/sqrt(2n(D + 2)),

which shrinks with the steps m and the probes n (tests check it on a dense Hessian).

The Lanczos basis is fully reorthogonalised (in float64 when it fits; else in the operator's
dtype, the tridiagonal always in float64), so the nodes are not spoiled by lost orthogonality;
an invariant subspace found early (β ≈ 0) ends that probe's recursion with its exact quadrature.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .operators import LinearOperator

#: the basis is kept in float64 up to this many scalars (steps × D); else in the operator's dtype.
_FLOAT64_BASIS = 2**27


@dataclass(frozen=True)
class SpectralDensity:
    """SLQ nodes and weights per probe, and what they cost (frozen: fields cannot be reassigned).

    Attributes:
        nodes: (P, m) float64, each probe's quadrature nodes (eigenvalues of its T_m), ascending;
            a probe that stopped early (invariant subspace) has weight-0 padding nodes.
        weights: (P, m) float64, each row summing to 1.
        steps: Lanczos steps actually taken per probe.
        matvecs: operator products used; seconds: wall time.
    """

    nodes: Tensor
    weights: Tensor
    steps: list[int]
    matvecs: int
    seconds: float

    def moment(self, p: int) -> float:
        """Σ_probes Σ_j τ_j θ_j^p / P: an estimate of tr(H^p)/D (exact per probe for p ≤ 2m − 1)."""
        return float((self.weights * self.nodes.pow(p)).sum(dim=1).mean())

    def density(self, grid: Tensor, sigma: float) -> Tensor:
        """The Gaussian-smoothed density on ``grid`` (float64), averaged over probes; integrates to
        ~1 over a grid that covers the nodes ± 4σ."""
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        g = grid.to(torch.float64).reshape(-1, 1, 1)
        kern = torch.exp(-0.5 * ((g - self.nodes[None]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return (kern * self.weights[None]).sum(dim=2).mean(dim=1)


def spectral_density(
    op: LinearOperator, num_probes: int = 10, lanczos_steps: int = 50, seed: int = 0
) -> SpectralDensity:
    """SLQ nodes and weights of ``op`` from ``num_probes`` Gaussian probes (normalised: uniform on the
    sphere) and ``lanczos_steps`` Lanczos steps each (see the module docstring). Costs
    ``num_probes × lanczos_steps`` products at most."""
    if num_probes < 1 or lanczos_steps < 1:
        raise ValueError(f"need num_probes ≥ 1 and lanczos_steps ≥ 1, got {num_probes}, {lanczos_steps}")
    m = min(lanczos_steps, op.dim)
    basis_dtype = torch.float64 if (m + 1) * op.dim <= _FLOAT64_BASIS else op.dtype
    gen = torch.Generator(device="cpu").manual_seed(seed)
    nodes = torch.zeros(num_probes, m, dtype=torch.float64)
    weights = torch.zeros(num_probes, m, dtype=torch.float64)
    steps: list[int] = []
    matvecs = 0
    t0 = time.perf_counter()
    for p in range(num_probes):
        v = torch.randn(op.dim, generator=gen, dtype=torch.float64)
        q = torch.empty(m, op.dim, dtype=basis_dtype, device=op.device)
        q[0] = (v / v.norm()).to(device=op.device, dtype=basis_dtype)
        alpha, beta = [], []
        for j in range(m):
            w = op.matvec(q[j].to(op.dtype)).to(basis_dtype)
            matvecs += 1
            a = float(w.double() @ q[j].double())
            alpha.append(a)
            # full reorthogonalisation (twice is enough), against every basis vector so far
            for _ in range(2):
                w = w - q[: j + 1].T @ (q[: j + 1] @ w)
            b = float(w.double().norm())
            if j + 1 == m or b <= 1e-10 * max(1.0, max(abs(x) for x in alpha)):
                break
            beta.append(b)
            q[j + 1] = w / b
        k = len(alpha)
        t = torch.diag(torch.tensor(alpha, dtype=torch.float64))
        if k > 1:
            off = torch.tensor(beta[: k - 1], dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(t)
        nodes[p, :k], weights[p, :k] = theta, s[0] ** 2
        if k < m:
            nodes[p, k:] = theta[-1]  # padding, weight 0
        steps.append(k)
    return SpectralDensity(nodes, weights, steps, matvecs, time.perf_counter() - t0)


def w1_bound(lo: float, hi: float, probes: int, steps: int, dim: int) -> float:
    """The bound of the module docstring on E W1(μ_SLQ, μ) for a spectrum inside [lo, hi]."""
    width = hi - lo
    return math.pi * width / (4 * steps) + width / math.sqrt(2 * probes * (dim + 2))


__all__ = ["SpectralDensity", "spectral_density", "w1_bound"]
