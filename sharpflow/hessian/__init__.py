"""Curvature operators of a model's loss over a fixed set of examples, certified top eigenpairs,
and stochastic estimators of the spectrum.

The solvers and estimators need only a :class:`LinearOperator` (``dim``, ``dtype``, ``device`` and
``matvec`` accepting a (D,) vector or a (D, m) block), so they work on every operator below and on
any other symmetric operator a user writes. Operators built on :class:`Operator` also combine:
``h - g``, ``0.5 * h``, ``D @ h @ D`` with ``D = DiagonalOperator(d)``, ``h.to_scipy()``.

Modules and what each exports:

- :mod:`~sharpflow.hessian.base`: :class:`Operator` (shape, dtype, device, product counter,
  ``matvec`` on vectors and blocks, the algebra ``+``, ``-``, scaling, composition, ``adjoint()``,
  ``to_scipy()``), :class:`DiagonalOperator`, :class:`BlockOperator` (a principal submatrix: one
  parameter block's diagonal block), and :class:`CurvatureOperator` (a private copy of
  the model and its examples, optionally re-chunked: the data handling of the two below).
- :mod:`~sharpflow.hessian.operators`: the :class:`LinearOperator` protocol, :class:`DenseOperator`
  and :class:`HessianOperator` (the Hessian of the mean training loss over N fixed examples, with
  its per-chunk caches and the choice between double backward and traced forward-over-reverse,
  made from the problem's size).
- :mod:`~sharpflow.hessian.ggn`: :class:`GGNOperator`, the generalised Gauss-Newton matrix of the
  mean cross-entropy or square loss.
- :mod:`~sharpflow.hessian.tracing`: forward-over-reverse traced once per chunk shape and split
  into a primal program (run once per chunk) and a tangent program (run per product), with the
  per-chunk ``torch.func.linearize`` fall-back (used by :class:`HessianOperator`; no exports).
- :mod:`~sharpflow.hessian.solvers`: :func:`top_eigenpairs` and its frozen result
  :class:`EigenResult` (thick-restart block Lanczos with true residuals, or scipy's ARPACK).
- :mod:`~sharpflow.hessian.estimators`: :func:`frobenius_norm` (a :class:`FrobeniusEstimate`, with
  the interval of :func:`frobenius_interval`) and :func:`trace` (Hutchinson, Hutch++; a
  :class:`TraceEstimate`).
- :mod:`~sharpflow.hessian.density`: :func:`spectral_density` (stochastic Lanczos quadrature; a
  frozen :class:`SpectralDensity`) and :func:`w1_bound`, its accuracy bound.
- :mod:`~sharpflow.hessian.distributed`: products over ``torch.distributed``:
  :class:`DistributedOperator` (each rank's shard sums, one all-reduce per block product, weight
  decay once), :func:`distributed_hessian` and :func:`distributed_ggn` (shard and wrap),
  :func:`shard` and :func:`shard_batches` (the deterministic shards), :func:`init_distributed` (a
  :class:`DistInfo`), :func:`group_rank_world`, :func:`same_on_all_ranks`, :func:`split_work` and
  :func:`gather_work` (independent items shared out over the ranks), and the one-line errors
  :class:`RankFailure` and :class:`LockstepError`.
"""

from __future__ import annotations

from .base import BlockOperator, CurvatureOperator, DiagonalOperator, Operator
from .density import SpectralDensity, spectral_density, w1_bound
from .distributed import (
    DistInfo,
    DistributedOperator,
    LockstepError,
    RankFailure,
    distributed_ggn,
    distributed_hessian,
    gather_work,
    group_rank_world,
    init_distributed,
    same_on_all_ranks,
    shard,
    shard_batches,
    split_work,
)
from .estimators import FrobeniusEstimate, TraceEstimate, frobenius_interval, frobenius_norm, trace
from .ggn import GGNOperator
from .operators import DenseOperator, HessianOperator, LinearOperator
from .solvers import EigenResult, top_eigenpairs

__all__ = [
    "BlockOperator",
    "CurvatureOperator",
    "DenseOperator",
    "DiagonalOperator",
    "DistInfo",
    "DistributedOperator",
    "EigenResult",
    "FrobeniusEstimate",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "LockstepError",
    "Operator",
    "RankFailure",
    "SpectralDensity",
    "TraceEstimate",
    "distributed_ggn",
    "distributed_hessian",
    "frobenius_interval",
    "frobenius_norm",
    "gather_work",
    "group_rank_world",
    "init_distributed",
    "same_on_all_ranks",
    "shard",
    "shard_batches",
    "spectral_density",
    "split_work",
    "top_eigenpairs",
    "trace",
    "w1_bound",
]
