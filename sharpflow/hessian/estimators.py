"""Stochastic estimates of ‖H‖_F and tr(H) from operator products with random probes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .operators import LinearOperator


def _probes(op: LinearOperator, m: int, gen: torch.Generator, kind: str) -> Tensor:
    """(D, m) Gaussian or Rademacher probes, drawn in float64 on the CPU from ``gen`` (the same
    draws on every device), returned in the operator's dtype on its device."""
    z = torch.randn(op.dim, m, generator=gen, dtype=torch.float64)
    if kind == "rademacher":
        z = torch.sign(z)
    return z.to(dtype=op.dtype, device=op.device)


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
