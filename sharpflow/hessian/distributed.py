"""Data-parallel curvature products over ``torch.distributed``: each rank holds a shard of the examples.

A curvature operator of this package is a *mean* over N fixed examples (targets, for the
Gauss-Newton matrix of a language model), plus weight decay. With R ranks, rank r builds the same
kind of operator on its shard of n_r examples, without weight decay, and :class:`DistributedOperator`
turns it into the operator of all N examples:

    H V = (Σ_r n_r · H_r V) / N + λ V,

where H_r V is the rank's shard mean (so n_r · H_r V is the sum of its examples' products). Each
block product is one ``all_reduce(SUM)`` of a (D, m) buffer (plus a few check entries, below), then
a division by the global N; the weight decay λ V is added once, after the reduction, by the wrapper.
The loss and gradient are reduced the same way. :func:`distributed_hessian` and
:func:`distributed_ggn` shard the examples (:func:`shard`, :func:`shard_batches`) and build both layers.

Lockstep: every rank runs the solver (:func:`~sharpflow.hessian.solvers.top_eigenpairs`, the
estimators, SLQ) itself, on identical reduced products. The solvers and estimators draw their
random vectors from a CPU generator seeded by their ``seed`` argument, never from the global RNG, so
the same seed on every rank gives the same start vectors, the same products, the same decisions
and the same eigenpairs on every rank; residuals come from reduced products, so a certificate
means what it means on one device. A rank given another seed (or another warm start) is caught at
its first product: every reduction carries a sequence number, the block width and a checksum of
each input vector, and every rank checks that the others' agree with its own
(:class:`LockstepError`, raised on every rank, so none waits for the others).

Failures: a collective that fails (a dead rank, or one that does not answer within the process
group's timeout) raises :class:`RankFailure`, one line naming this rank. The timeout is the one
given to ``init_process_group``; :func:`init_distributed` sets it (default 600 s).

With ``torch.distributed`` not initialised, or a world of one rank, :class:`DistributedOperator` is
a pass-through: the local operator's products plus the weight decay, no collective, no scaling.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sharpflow.errors import SharpflowError
from sharpflow.params import LossFn, flat_params

from .base import Operator
from .ggn import GGNOperator
from .operators import HessianOperator, LinearOperator

#: relative tolerance of the lockstep checksums (every rank computes its checksum from the same bits,
#: so only the rounding of the all-reduce's sum is tolerated).
LOCKSTEP_RTOL = 1e-5
#: sequence numbers wrap at this value, so sequence × world stays exact in float32.
_SEQ_WRAP = 2**14
#: operator dtypes whose products carry the lockstep check (exact integers up to 2^24 at least).
_CHECKED_DTYPES = (torch.float32, torch.float64)
_DTYPE_CODES = {torch.float32: 1, torch.float64: 2, torch.float16: 3, torch.bfloat16: 4}


class RankFailure(SharpflowError):
    """A collective failed on this rank: another rank died or did not answer within the timeout.
    The message is one line naming this rank."""

    @classmethod
    def of(cls, err: Exception, rank: int, world: int, what: str) -> RankFailure:
        """The one line for collective ``what`` that failed on ``rank`` with ``err`` (its first sentence,
        without the backend's "[file.cc:561]" prefix)."""
        first = (str(err).strip().splitlines() or [""])[0]
        first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:160]
        return cls(f"rank {rank} of {world}: {what} failed: another rank died or did not answer within the "
                   f"process group's timeout ({type(err).__name__}: {first})")


class LockstepError(RankFailure):
    """The ranks asked for different products (different seeds, warm starts or numbers of products)."""


class DistInfo(NamedTuple):
    """This process's place in the job (a named tuple: it unpacks as ``rank, world, device``)."""

    rank: int
    world: int
    device: torch.device


# ------------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------------


def shard(n: int, rank: int, world: int) -> range:
    """The indices of the examples rank ``rank`` of ``world`` holds, out of ``0 .. n-1``.

    Contiguous, disjoint, in rank order and covering every index; sizes differ by at most one, the
    first ``n % world`` ranks holding one more (n = 10 over 3 ranks: 4, 3, 3). A pure function of
    its arguments, so every rank computes every shard the same way.
    """
    if n < 0 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"need n ≥ 0, world ≥ 1 and 0 ≤ rank < world, got n={n}, rank={rank}, world={world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_batches(batches: Sequence[tuple[Tensor, Tensor]], rank: int, world: int) -> list[tuple[Tensor, Tensor]]:
    """Rank ``rank``'s share of the examples of ``batches`` (the examples in order, batch after batch),
    as views of the batches it overlaps: the examples of :func:`shard` over the total count."""
    n = sum(int(x.shape[0]) for x, _ in batches)
    mine = shard(n, rank, world)
    out: list[tuple[Tensor, Tensor]] = []
    offset = 0
    for x, y in batches:
        size = int(x.shape[0])
        lo, hi = max(mine.start, offset), min(mine.stop, offset + size)
        if lo < hi:
            out.append((x[lo - offset : hi - offset], y[lo - offset : hi - offset]))
        offset += size
    return out


# ------------------------------------------------------------------------------------------------
# The process group
# ------------------------------------------------------------------------------------------------


def group_rank_world(group: Any = None) -> tuple[int, int]:
    """(rank, world size) in ``group`` (default: the whole job); (0, 1) when ``torch.distributed``
    is unavailable or not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Join the job that ``torchrun`` (or ``srun`` with the same variables) started, with a timeout.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from the
    environment. Without ``RANK``/``WORLD_SIZE`` (a plain ``python`` run) nothing is initialised and
    this process is rank 0 of 1. Already initialised: returns where this process stands.

    Args:
        backend: "nccl" or "gloo"; default NCCL when CUDA is available, gloo otherwise. With NCCL each
            rank is pinned to ``cuda:LOCAL_RANK``.
        timeout_s: how long a collective waits for the other ranks before it fails (then
            :class:`DistributedOperator` raises :class:`RankFailure`). Longer than the slowest
            rank's share of one product, plus what runs between two products (a solver's own
            arithmetic, a checkpoint load on rank 0).

    Returns:
        :class:`DistInfo`: rank, world size, and the device this rank should compute on.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return DistInfo(rank, world, _rank_device(dist.get_backend()))
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, torch.device("cuda" if cuda else "cpu"))
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), _rank_device(backend))


def _rank_device(backend: str) -> torch.device:
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def same_on_all_ranks(t: Tensor, group: Any = None) -> bool:
    """Whether ``t`` holds the same bits on every rank of ``group`` (two small collectives: the
    bitwise max and min). True without a process group. Every rank must call it."""
    rank, world = group_rank_world(group)
    if world == 1:
        return True
    flat = t.detach().contiguous().reshape(-1)
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    bits = flat.view(ints).to(torch.int64)
    hi, lo = bits.clone(), bits.clone()
    _all_reduce(hi, dist.ReduceOp.MAX, group, rank, world, "the lockstep check")
    _all_reduce(lo, dist.ReduceOp.MIN, group, rank, world, "the lockstep check")
    return bool(torch.equal(hi, lo))


def _all_reduce(buf: Tensor, op: Any, group: Any, rank: int, world: int, what: str) -> None:
    """``dist.all_reduce`` in place, a failure turned into one :class:`RankFailure` line."""
    try:
        dist.all_reduce(buf, op=op, group=group)
    except RuntimeError as err:  # DistBackendError, DistNetworkError, gloo's timeouts and closed pairs
        raise RankFailure.of(err, rank, world, what) from err


# ------------------------------------------------------------------------------------------------
# The operator
# ------------------------------------------------------------------------------------------------


class DistributedOperator(Operator):
    """The operator of all N examples from each rank's operator of its own shard (module docstring).

    Built on every rank of ``group`` at the same point of the program (construction is one small
    collective: the ranks exchange their shard sizes and check they agree on D and the dtype).
    Every rank must then ask for the same products in the same order: the products are collectives.
    The operator is symmetric when the rank operators are (:meth:`adjoint` returns it).

    Args:
        local: this rank's operator, a mean over its ``local_count`` examples, *without* weight decay
            (a ``weight_decay`` attribute other than 0 is refused: give it here instead). Any
            :class:`~sharpflow.hessian.operators.LinearOperator`: a
            :class:`~sharpflow.hessian.operators.HessianOperator`, a
            :class:`~sharpflow.hessian.ggn.GGNOperator`, an expression of them.
        local_count: the number of terms ``local`` averages over; default its ``num_targets`` (the
            Gauss-Newton operator) or ``num_examples`` (the Hessian operator).
        weight_decay: λ, added as λ·v once, after the reduction (λ/2‖θ‖² to :meth:`loss`, λθ to
            :meth:`gradient`).
        theta: θ as a (D,) vector; needed only by :meth:`loss` and :meth:`gradient` with λ > 0.
        group: the process group (default: the whole job).
        check_lockstep: carry and check the lockstep entries with every product (float32 and float64
            operators; 2 + m extra numbers per block of m).

    Attributes:
        local: the rank's operator.
        rank, world: this process's rank and the group's size; ``world == 1`` (or no process group)
            makes the operator a pass-through.
        distributed: whether products are reduced (``world > 1``).
        counts: every rank's ``local_count``, in rank order; total: N, their sum.
        weight_decay: λ.
        reductions: all-reduces done so far (one per block product, one per loss or gradient).
        matvecs: products done so far (a block of m counts m).
    """

    def __init__(self, local: LinearOperator, *, local_count: int | None = None, weight_decay: float = 0.0,
                 theta: Tensor | None = None, group: Any = None, check_lockstep: bool = True) -> None:
        super().__init__(local.dim, local.dtype, local.device)
        own_decay = float(getattr(local, "weight_decay", 0.0) or 0.0)
        if own_decay:
            raise ValueError(f"the rank's operator adds weight decay itself ({own_decay}): it would be counted on "
                             "every rank; build it with weight_decay=0 and give weight_decay to DistributedOperator, "
                             "which adds it once, after the all-reduce")
        if local_count is None:
            local_count = getattr(local, "num_targets", None) or getattr(local, "num_examples", None)
            if local_count is None:
                raise ValueError("local_count is needed: the rank's operator has no num_targets or num_examples")
        if int(local_count) < 1:
            raise ValueError(f"local_count must be positive, got {local_count}")
        if theta is not None and tuple(theta.shape) != (self.dim,):
            raise ValueError(f"theta must have shape ({self.dim},), got {tuple(theta.shape)}")
        self.local = local
        self.local_count = int(local_count)
        self.weight_decay = float(weight_decay)
        self._theta = None if theta is None else theta.detach().to(dtype=self.dtype, device=self.device)
        self.group = group
        self.rank, self.world = group_rank_world(group)
        self.distributed = self.world > 1
        self.reductions = 0
        self.check_lockstep = bool(check_lockstep) and self.dtype in _CHECKED_DTYPES
        self._seq = 0
        self._probe: Tensor | None = None
        self.counts: tuple[int, ...] = (self.local_count,)
        if self.distributed:
            self.counts = self._exchange_counts()
        self.total: int = sum(self.counts)

    def _exchange_counts(self) -> tuple[int, ...]:
        """Every rank's count, D and dtype, in one all-reduce; refuses ranks that disagree on D or the dtype."""
        table = torch.zeros(self.world, 3, dtype=torch.int64, device=self.device)
        table[self.rank] = torch.tensor([self.local_count, self.dim, _DTYPE_CODES.get(self.dtype, 0)])
        _all_reduce(table, dist.ReduceOp.SUM, self.group, self.rank, self.world, "building the operator")
        rows = table.cpu().tolist()
        if len({(d, c) for _, d, c in rows}) != 1:
            raise ValueError(f"rank {self.rank} of {self.world}: the ranks' operators differ in (D, dtype code): "
                             f"{[(d, c) for _, d, c in rows]}")
        return tuple(int(n) for n, _, _ in rows)

    # -- products ------------------------------------------------------------------------------
    def _apply(self, v: Tensor) -> Tensor:
        if not self.distributed:
            out = self.local.matvec(v)
            return torch.add(out, v, alpha=self.weight_decay) if self.weight_decay else out
        block = v[:, None] if v.ndim == 1 else v
        d, m = block.shape
        local = self.local.matvec(block)
        extra = 2 + m if self.check_lockstep else 0
        buf = torch.empty(d * m + extra, dtype=self.dtype, device=self.device)
        torch.mul(local.reshape(d, m), float(self.local_count), out=buf[: d * m].view(d, m))
        if self.check_lockstep:
            sums, scale = self._stamp(buf[d * m :], block)
        what = f"the all-reduce of a {m}-vector product"
        _all_reduce(buf, dist.ReduceOp.SUM, self.group, self.rank, self.world, what)
        self.reductions += 1
        if self.check_lockstep:
            self._check_stamp(buf[d * m :], sums, scale, m)
        out = buf[: d * m].view(d, m).div_(self.total)
        if self.weight_decay:
            out.add_(block, alpha=self.weight_decay)
        return out[:, 0] if v.ndim == 1 else out

    def _stamp(self, tail: Tensor, block: Tensor) -> tuple[Tensor, Tensor]:
        """Write (sequence number, m, checksum of each column) into ``tail``; return the checksums
        and their scales (Σ_i w_i |v_i|), against which the reduced tail is checked."""
        if self._probe is None:  # fixed, unequal weights in [1, 2): a permuted vector has another checksum
            i = torch.arange(self.dim, device=self.device, dtype=torch.int64)
            self._probe = (1 + (i * 7919 % 1009).to(self.dtype) / 1009)
        self._seq = self._seq % _SEQ_WRAP + 1
        sums = self._probe @ block
        tail[0] = self._seq
        tail[1] = block.shape[1]
        tail[2:] = sums
        return sums, self._probe @ block.abs()

    def _check_stamp(self, tail: Tensor, sums: Tensor, scale: Tensor, m: int) -> None:
        """Every rank stamped the same sequence number, width and checksums (up to the sum's rounding)."""
        w = self.world
        off = (tail[2:] - w * sums).abs()
        same = (float(tail[0]) == w * self._seq and float(tail[1]) == w * m
                and bool((off <= LOCKSTEP_RTOL * w * scale + torch.finfo(self.dtype).tiny).all()))
        if not same:
            raise LockstepError(f"rank {self.rank} of {self.world}: the ranks asked for different products at product "
                                f"call {self._seq}: the solver must run with the same seed and warm start, and ask "
                                "for the same products in the same order, on every rank")

    # -- loss and gradient --------------------------------------------------------------------------
    def _decay_theta(self) -> Tensor:
        if self._theta is None:
            raise ValueError("theta is needed for the loss and gradient with weight decay")
        return self._theta

    def gradient(self) -> Tensor:
        """∇L(θ) of the loss of all N examples (weight decay included): one all-reduce."""
        local_gradient = getattr(self.local, "gradient", None)
        if not callable(local_gradient):
            raise TypeError(f"the rank's operator ({type(self.local).__name__}) has no gradient()")
        g = local_gradient().to(dtype=self.dtype, device=self.device)
        if self.distributed:
            g = g * float(self.local_count)
            _all_reduce(g, dist.ReduceOp.SUM, self.group, self.rank, self.world, "the all-reduce of the gradient")
            self.reductions += 1
            g = g / self.total
        if self.weight_decay:
            g = torch.add(g, self._decay_theta(), alpha=self.weight_decay)
        return g

    def loss(self) -> float:
        """L(θ) of all N examples (weight decay included), reduced in float64: one all-reduce."""
        local_loss = getattr(self.local, "loss", None)
        if not callable(local_loss):
            raise TypeError(f"the rank's operator ({type(self.local).__name__}) has no loss()")
        total = float(local_loss())
        if self.distributed:
            buf = torch.tensor([total * self.local_count], dtype=torch.float64, device=self.device)
            _all_reduce(buf, dist.ReduceOp.SUM, self.group, self.rank, self.world, "the all-reduce of the loss")
            self.reductions += 1
            total = float(buf[0]) / self.total
        if self.weight_decay:
            total += 0.5 * self.weight_decay * float(self._decay_theta().double().square().sum())
        return total

    def __repr__(self) -> str:
        return (f"DistributedOperator(rank={self.rank}, world={self.world}, dim={self.dim}, N={self.total}, "
                f"local={type(self.local).__name__})")


# ------------------------------------------------------------------------------------------------
# Factories: shard, build the rank's operator without weight decay, wrap
# ------------------------------------------------------------------------------------------------


def distributed_hessian(model: nn.Module, loss_fn: LossFn, batches: Sequence[tuple[Tensor, Tensor]], *,
                        weight_decay: float = 0.0, group: Any = None, check_lockstep: bool = True,
                        **kwargs: Any) -> DistributedOperator:
    """The Hessian of the mean loss over all the examples of ``batches``, each rank computing on its shard.

    Every rank passes the same model and the same batches (the whole Hessian subset, in the same
    order); rank r keeps :func:`shard_batches` of them and builds a
    :class:`~sharpflow.hessian.operators.HessianOperator` on those, without weight decay.

    Args:
        model: the network (deep-copied, as by :class:`~sharpflow.hessian.operators.HessianOperator`).
        loss_fn: ``loss_fn(logits, targets) -> mean loss over the batch``.
        batches: all N examples as ``(x, y)`` tuples, the same on every rank.
        weight_decay: λ, added once after the reduction.
        group: the process group (default: the whole job).
        check_lockstep: as for :class:`DistributedOperator`.
        **kwargs: the other arguments of :class:`~sharpflow.hessian.operators.HessianOperator`
            (``eval_mode``, ``chunk_size``, ``method``, ``cache_graph``). With ``eval_mode=False``
            BatchNorm's batch statistics depend on the shards: the operator is then not the
            one-process operator.

    Returns:
        A :class:`DistributedOperator` (a pass-through without a process group).
    """
    mine = _my_batches(batches, group)
    local = HessianOperator(model, loss_fn, mine, weight_decay=0.0, **kwargs)
    return DistributedOperator(local, weight_decay=weight_decay, theta=flat_params(model), group=group,
                               check_lockstep=check_lockstep)


def distributed_ggn(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], *, weight_decay: float = 0.0,
                    group: Any = None, check_lockstep: bool = True, **kwargs: Any) -> DistributedOperator:
    """The generalised Gauss-Newton matrix over all the examples of ``batches``, each rank on its shard
    (as :func:`distributed_hessian`; targets are weighted one each, tokens for a language model).

    Args:
        model: the network (deep-copied, as by :class:`~sharpflow.hessian.ggn.GGNOperator`).
        batches: all the examples as ``(x, y)`` tuples, the same on every rank.
        weight_decay: λ, added once after the reduction.
        group: the process group (default: the whole job).
        check_lockstep: as for :class:`DistributedOperator`.
        **kwargs: the other arguments of :class:`~sharpflow.hessian.ggn.GGNOperator` (``eval_mode``,
            ``chunk_size``, ``cache``, ``loss``).

    Returns:
        A :class:`DistributedOperator` (a pass-through without a process group).
    """
    mine = _my_batches(batches, group)
    local = GGNOperator(model, mine, weight_decay=0.0, **kwargs)
    return DistributedOperator(local, weight_decay=weight_decay, group=group, check_lockstep=check_lockstep)


def _my_batches(batches: Sequence[tuple[Tensor, Tensor]], group: Any) -> list[tuple[Tensor, Tensor]]:
    rank, world = group_rank_world(group)
    n = sum(int(x.shape[0]) for x, _ in batches)
    if n < world:
        raise ValueError(f"rank {rank} of {world}: {n} examples cannot give every rank a shard")
    return shard_batches(batches, rank, world)


def split_work(n: int, group: Any = None) -> range:
    """The indices of ``n`` independent work items this rank computes: ``rank, rank + world, …`` (every
    item once over the ranks; all of them without a process group)."""
    rank, world = group_rank_world(group)
    return range(rank, n, world)


def gather_work(mine: Sequence[Any], n: int, group: Any = None, what: str = "the gather of results") -> list[Any]:
    """The results of all ``n`` items in item order on every rank, from each rank's results ``mine`` for
    its :func:`split_work` items (in that order). Without a process group: ``mine``. A dead or silent
    rank gives one :class:`RankFailure` line."""
    rank, world = group_rank_world(group)
    if world == 1:
        return list(mine)
    box: list[Any] = [None] * world
    try:
        dist.all_gather_object(box, list(mine), group=group)
    except RuntimeError as err:
        raise RankFailure.of(err, rank, world, what) from err
    out: list[Any] = [None] * n
    for r, part in enumerate(box):
        for i, value in zip(range(r, n, world), part, strict=True):
            out[i] = value
    return out


__all__ = [
    "LOCKSTEP_RTOL",
    "DistInfo",
    "DistributedOperator",
    "LockstepError",
    "RankFailure",
    "distributed_ggn",
    "distributed_hessian",
    "gather_work",
    "group_rank_world",
    "init_distributed",
    "same_on_all_ranks",
    "shard",
    "shard_batches",
    "split_work",
]
