"""Exact Hessian-vector products over a fixed set of examples, and certified top eigenpairs.

The solvers need only a :class:`LinearOperator` (``dim``, ``dtype``, ``device`` and ``matvec``
accepting a (D,) vector or a (D, m) block), so they work on :class:`HessianOperator`,
:class:`DenseOperator` (tests, users) and any other symmetric operator alike.

Modules:

- :mod:`~sharpflow.hessian.operators`: the :class:`LinearOperator` protocol, :class:`DenseOperator`
  and :class:`HessianOperator` (the Hessian of the mean training loss over N fixed examples, with
  its per-chunk caches and the choice between double backward and traced forward-over-reverse).
- :mod:`~sharpflow.hessian.tracing`: forward-over-reverse traced once per chunk shape and split
  into a primal program (run once per chunk) and a tangent program (run per product), with the
  per-chunk ``torch.func.linearize`` fall-back.
- :mod:`~sharpflow.hessian.solvers`: :func:`top_eigenpairs` and :class:`EigenResult`
  (thick-restart block Lanczos with true residuals, or scipy's ARPACK).
- :mod:`~sharpflow.hessian.estimators`: :func:`frobenius_norm` (with :func:`frobenius_interval`)
  and :func:`trace` (Hutchinson, Hutch++).
"""

from __future__ import annotations

from .estimators import FrobeniusEstimate, frobenius_interval, frobenius_norm, trace
from .operators import DenseOperator, HessianOperator, LinearOperator
from .solvers import EigenResult, top_eigenpairs

__all__ = [
    "DenseOperator",
    "EigenResult",
    "FrobeniusEstimate",
    "HessianOperator",
    "LinearOperator",
    "frobenius_interval",
    "frobenius_norm",
    "top_eigenpairs",
    "trace",
]
