"""Data-parallel curvature products (sharpflow.hessian.distributed) on the CPU with gloo.

Jobs of 1, 2 and 3 ranks (3 gives unequal shards: 11, 10, 10 of N = 31) are started by a
``multiprocessing`` fork server on a free local port; each rank builds the distributed Hessian and Gauss-Newton
operators of a small tanh MLP with weight decay, runs the solvers and estimators unchanged on them,
and saves what it got. The test process compares every rank's results with the one-process
operators and with a dense Hessian (``torch.autograd.functional.hessian``) and a dense
Gauss-Newton matrix built from the Jacobian. Then the failures: ranks given different seeds, a rank
that dies, a rank that hangs past the timeout.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from sharpflow.hessian import GGNOperator, HessianOperator, frobenius_norm, spectral_density, top_eigenpairs, trace
from sharpflow.hessian.distributed import (
    DistributedOperator,
    LockstepError,
    RankFailure,
    distributed_ggn,
    distributed_hessian,
    gather_work,
    init_distributed,
    same_on_all_ranks,
    shard,
    shard_batches,
    split_work,
)
from sharpflow.params import flat_params, trainable, unflatten

from .conftest import free_port

N, D_IN, HIDDEN, CLASSES, BATCH = 31, 6, 8, 3, 8
WD = 1e-2  # weight decay: must appear once in every product, whatever the world size
K, TOL = 4, 1e-9
# Ranks are forked from a fork server that has imported torch and this module once (and run no torch op, so
# forking it is safe): a rank starts in a fraction of a second rather than re-importing torch.
SPAWN = mp.get_context("forkserver")
SPAWN.set_forkserver_preload(["torch", "sharpflow.hessian.distributed", __name__])


# ------------------------------------------------------------------------------------------------
# The problem, built the same way in the test process and in every rank
# ------------------------------------------------------------------------------------------------


def _problem(dtype: torch.dtype = torch.float64) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """A tanh MLP with fixed weights (large enough for a curved loss) and N examples in batches of 8."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.8)
    x = torch.randn(N, D_IN, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, CLASSES, (N,), generator=gen)
    return model, list(zip(x.split(BATCH), y.split(BATCH), strict=True))


def _block(dim: int, m: int = 3) -> Tensor:
    return torch.randn(dim, m, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def _solves(h: Any, g: Any) -> dict[str, Any]:
    """What every rank, and the one-process reference, computes: the same calls on either operator."""
    v = _block(h.dim)
    out: dict[str, Any] = {"hv": h.matvec(v), "hv1": h.matvec(v[:, 0]), "gv": g.matvec(v)}
    for name, res in (("eig", top_eigenpairs(h, k=K, tol=TOL, seed=0)),
                      ("eig_block", top_eigenpairs(h, k=K, tol=TOL, seed=0, block_size=2)),
                      ("eig_arpack", top_eigenpairs(h, k=K, tol=TOL, seed=0, backend="arpack")),
                      ("geig", top_eigenpairs(g, k=3, tol=TOL, seed=0))):
        out[name] = {"values": res.eigenvalues, "vectors": res.eigenvectors, "converged": res.converged,
                     "residuals": res.residuals, "matvecs": res.matvecs}
    out["trace_hpp"] = tuple(trace(h, probes=12, seed=1))
    out["trace_hutch"] = tuple(trace(h, probes=8, seed=1, method="hutchinson"))
    out["gtrace"] = tuple(trace(g, probes=9, seed=4))
    out["frob"] = tuple(frobenius_norm(h, probes=8, seed=2))
    sd = spectral_density(h, num_probes=3, lanczos_steps=12, seed=3)
    out["slq"] = {"nodes": sd.nodes, "weights": sd.weights, "moments": [sd.moment(p) for p in range(5)]}
    out["loss"], out["grad"] = h.loss(), h.gradient()
    return out


# ------------------------------------------------------------------------------------------------
# What a rank runs
# ------------------------------------------------------------------------------------------------


def _main(rank: int, world: int) -> dict[str, Any]:
    model, batches = _problem()
    h = distributed_hessian(model, F.cross_entropy, batches, weight_decay=WD)
    g = distributed_ggn(model, batches, weight_decay=WD)
    before = [h.reductions]
    for call in (lambda: h.matvec(_block(h.dim)), h.loss, h.gradient):
        call()
        before.append(h.reductions)
    out = _solves(h, g)
    out["reductions_each"] = [b - a for a, b in itertools.pairwise(before)]
    out["lockstep"] = all(same_on_all_ranks(t) for t in (out["eig"]["values"], out["eig"]["vectors"], out["hv"]))
    out["rank_differs"] = not same_on_all_ranks(torch.tensor([float(rank)]))  # the check can say no
    out.update(counts=h.counts, world=h.world, distributed=h.distributed)
    # H − G of the rank's shard, made whole by the generic wrapper (an expression has no num_examples)
    mine = shard_batches(batches, rank, world)
    local = HessianOperator(model, F.cross_entropy, mine) - GGNOperator(model, mine)
    out["rv"] = DistributedOperator(local, local_count=len(shard(N, rank, world))).matvec(_block(h.dim))
    model32, batches32 = _problem(torch.float32)
    out["hv32"] = distributed_hessian(model32, F.cross_entropy, batches32, weight_decay=WD).matvec(_block(h.dim))
    out["mine"] = list(split_work(7))  # independent work items shared out, then gathered in item order
    out["gathered"] = gather_work([f"item{i}" for i in out["mine"]], 7)
    out["seed_error"] = None
    if world > 1:  # a rank with its own seed: every rank must fail at the first product, none hang
        try:
            top_eigenpairs(h, k=2, tol=1e-3, seed=rank)
        except LockstepError as err:
            out["seed_error"] = str(err)
    return out


def _dies(rank: int, world: int) -> dict[str, Any]:
    model, batches = _problem()
    h = distributed_hessian(model, F.cross_entropy, batches, weight_decay=WD)
    h.matvec(_block(h.dim))  # one good product first
    if rank == 1:
        os._exit(3)
    time.sleep(0.5)
    return _expect_failure(h)


def _hangs(rank: int, world: int) -> dict[str, Any]:
    model, batches = _problem()
    h = distributed_hessian(model, F.cross_entropy, batches, weight_decay=WD)
    if rank == 1:
        time.sleep(120)  # alive but silent; the test process ends it
    return _expect_failure(h)


def _expect_failure(h: DistributedOperator) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        h.matvec(_block(h.dim))
        err = None
    except RankFailure as e:
        err = str(e)
    return {"error": err, "seconds": time.monotonic() - t0}


_SCENARIOS: dict[str, Callable[[int, int], dict[str, Any]]] = {"main": _main, "dies": _dies, "hangs": _hangs}


def _worker(rank: int, world: int, port: int, out_dir: str, scenario: str, timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        info = init_distributed(backend="gloo", timeout_s=timeout_s)
        assert (info.rank, info.world, info.device.type) == (rank, world, "cpu")
        result = _SCENARIOS[scenario](rank, world)
        torch.save(result, out / f"rank{rank}.pt")
        if scenario == "main":
            dist.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    # after a failed collective destroy_process_group may wait for the dead peer: the process just ends
    os._exit(0)



def _spawn(world: int, scenario: str, out_dir: Path, timeout_s: float = 60.0, wait_s: float = 90.0,
           end_with_rank0: bool = False) -> list[int | None]:
    """Run ``scenario`` on ``world`` spawned ranks and return their exit codes. Ranks still alive
    after ``wait_s`` (or, with ``end_with_rank0``, once rank 0 has finished) are killed."""
    port = free_port()
    procs = [SPAWN.Process(target=_worker, args=(r, world, port, str(out_dir), scenario, timeout_s))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + wait_s
    for p in procs[:1] if end_with_rank0 else procs:
        p.join(max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    return [p.exitcode for p in procs]


def _load(out_dir: Path, rank: int) -> dict[str, Any]:
    path = out_dir / f"rank{rank}.pt"
    if not path.exists():
        err = out_dir / f"rank{rank}.err"
        pytest.fail(f"rank {rank} left no result:\n{err.read_text() if err.exists() else '(no traceback)'}")
    return torch.load(path, weights_only=False)


# ------------------------------------------------------------------------------------------------
# References in this process: one-process operators, dense matrices
# ------------------------------------------------------------------------------------------------


@contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny products run faster on one thread (as the ranks do) than on two of a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    with _one_thread():
        return _single()


def _single() -> dict[str, Any]:
    model, batches = _problem()
    out = _solves(HessianOperator(model, F.cross_entropy, batches, weight_decay=WD),
                  GGNOperator(model, batches, weight_decay=WD))
    out["rv"] = (HessianOperator(model, F.cross_entropy, batches) - GGNOperator(model, batches)).matvec(
        _block(out["hv"].shape[0]))
    model32, batches32 = _problem(torch.float32)
    out["hv32"] = HessianOperator(model32, F.cross_entropy, batches32, weight_decay=WD).matvec(
        _block(out["hv"].shape[0]))
    return out


@pytest.fixture(scope="module")
def dense() -> dict[str, Tensor]:
    with _one_thread():
        return _dense()


def _dense() -> dict[str, Tensor]:
    """H and G of the whole subset, with weight decay, from full Jacobians and Hessians."""
    model, batches = _problem()
    like = {n: p.detach() for n, p in trainable(model).items()}
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def logits(theta: Tensor) -> Tensor:
        return functional_call(model, unflatten(theta, like), (x,))

    def loss(theta: Tensor) -> Tensor:
        return F.cross_entropy(logits(theta), y) + 0.5 * WD * theta.square().sum()

    theta = flat_params(model)
    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    hess = torch.autograd.functional.hessian(loss, theta)
    jac = torch.autograd.functional.jacobian(logits, theta)  # (N, C, D)
    p = torch.softmax(logits(theta), dim=1)
    mid = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (N, C, C)
    ggn = torch.einsum("ncd,nce,nef->df", jac, mid, jac) / N + WD * eye
    return {"H": hess, "G": ggn, "grad": torch.func.grad(loss)(theta), "loss": loss(theta)}


_RUNS: dict[int, list[dict[str, Any]]] = {}


@pytest.fixture(params=[1, 2, 3], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory) -> list[dict[str, Any]]:
    """Every rank's results of the main scenario (one job per world size, run once per module)."""
    world = request.param
    if world not in _RUNS:
        out = tmp_path_factory.mktemp(f"world{world}")
        codes = _spawn(world, "main", out)
        results = [_load(out, r) for r in range(world)]
        assert codes == [0] * world, codes
        _RUNS[world] = results
    return _RUNS[world]


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "world"), [(10, 3), (31, 3), (31, 2), (5, 5), (7, 1), (64, 4), (3, 4)])
def test_shards_are_disjoint_contiguous_and_balanced(n, world):
    parts = [shard(n, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert [shard(n, r, world) for r in range(world)] == parts  # deterministic


def test_shard_of_ten_over_three_is_four_three_three():
    assert [len(shard(10, r, 3)) for r in range(3)] == [4, 3, 3]
    with pytest.raises(ValueError):
        shard(10, 3, 3)


def test_shard_batches_cut_across_batch_boundaries():
    _, batches = _problem()
    x = torch.cat([b[0] for b in batches])
    for world in (1, 2, 3, 4):
        got = [torch.cat([b[0] for b in shard_batches(batches, r, world)]) for r in range(world)]
        assert [len(g) for g in got] == [len(shard(N, r, world)) for r in range(world)]
        assert torch.equal(torch.cat(got), x)


# ------------------------------------------------------------------------------------------------
# No process group: a pass-through
# ------------------------------------------------------------------------------------------------


def test_without_a_process_group_the_wrapper_is_the_plain_operator(single):
    assert not dist.is_initialized()
    model, batches = _problem()
    h = distributed_hessian(model, F.cross_entropy, batches, weight_decay=WD)
    g = distributed_ggn(model, batches, weight_decay=WD)
    assert (h.world, h.distributed, h.counts, h.total) == (1, False, (N,), N)
    v = _block(h.dim)
    assert torch.allclose(h.matvec(v), single["hv"], rtol=1e-13, atol=0)
    assert torch.allclose(g.matvec(v), single["gv"], rtol=1e-13, atol=0)
    assert h.loss() == pytest.approx(single["loss"], rel=1e-14)
    assert torch.allclose(h.gradient(), single["grad"], rtol=1e-13, atol=1e-16)
    assert h.reductions == 0 and h.matvecs == 3


def test_a_local_operator_with_its_own_weight_decay_is_refused():
    model, batches = _problem()
    with pytest.raises(ValueError, match="weight_decay=0"):
        DistributedOperator(HessianOperator(model, F.cross_entropy, batches, weight_decay=WD))


# ------------------------------------------------------------------------------------------------
# 1, 2 and 3 ranks against one process and against dense matrices
# ------------------------------------------------------------------------------------------------


def test_work_items_are_shared_out_once_and_gathered_in_order(ranks):
    """split_work gives rank r the items r, r + world, …: every item exactly once over the ranks; gather_work
    returns all the results in item order on every rank (the ranks' shares are interleaved, so an order bug
    shows)."""
    world = len(ranks)
    mine = [r["mine"] for r in ranks]
    assert sorted(i for m in mine for i in m) == list(range(7))
    assert mine[0] == list(range(0, 7, world))
    for r in ranks:
        assert r["gathered"] == [f"item{i}" for i in range(7)]


def test_every_rank_holds_its_shard_and_ends_with_the_same_bits(ranks):
    world = len(ranks)
    for r, res in enumerate(ranks):
        assert res["counts"] == tuple(len(shard(N, q, world)) for q in range(world))
        assert res["world"] == world and res["distributed"] == (world > 1)
        assert res["lockstep"] and res["rank_differs"] == (world > 1)
        for key in ("hv", "gv", "rv"):
            assert torch.equal(res[key], ranks[0][key]), (r, key)
        for key in ("eig", "eig_block", "eig_arpack", "geig"):
            assert torch.equal(res[key]["vectors"], ranks[0][key]["vectors"]), (r, key)
            assert res[key]["matvecs"] == ranks[0][key]["matvecs"], (r, key)
    # one all-reduce per block product, one for the loss, one for the gradient; none on one rank
    assert ranks[0]["reductions_each"] == ([0, 0, 0] if world == 1 else [1, 1, 1])


def test_block_products_equal_one_process(ranks, single):
    res = ranks[0]
    for key in ("hv", "hv1", "gv", "rv"):
        assert _rel(res[key], single[key]) <= 1e-12, key
    assert _rel(res["hv32"].double(), single["hv32"].double()) <= 1e-6


def test_products_loss_and_gradient_equal_the_dense_ones(ranks, dense):
    res = ranks[0]
    v = _block(dense["H"].shape[0])
    assert _rel(res["hv"], dense["H"] @ v) <= 1e-10
    assert _rel(res["hv1"], dense["H"] @ v[:, 0]) <= 1e-10
    assert _rel(res["gv"], dense["G"] @ v) <= 1e-10
    assert _rel(res["grad"], dense["grad"]) <= 1e-10
    assert res["loss"] == pytest.approx(float(dense["loss"]), rel=1e-12)
    # the weight decay once: counted on every rank, the products would be off by far more than that
    if len(ranks) > 1:
        assert _rel(res["hv"] + (len(ranks) - 1) * WD * v, dense["H"] @ v) > 1e-3


@pytest.mark.parametrize("key", ["eig", "eig_block", "eig_arpack"])
def test_top_eigenpairs_equal_one_process_and_the_dense_spectrum(ranks, single, dense, key):
    got, ref = ranks[0][key], single[key]
    assert bool(got["converged"].all()) and torch.equal(got["converged"], ref["converged"])
    assert float(((got["values"] - ref["values"]) / ref["values"]).abs().max()) <= 1e-5
    overlap = (got["vectors"] * ref["vectors"]).sum(dim=1).abs()
    assert float((1 - overlap).abs().max()) <= 1e-6  # the same vectors up to sign
    evals, evecs = torch.linalg.eigh(dense["H"])
    top = evals.flip(0)[:K]
    assert float(((got["values"] - top) / top).abs().max()) <= 1e-8
    assert float((1 - (got["vectors"] @ evecs.flip(1)[:, :K]).diagonal().abs()).max()) <= 1e-6
    assert float(got["residuals"].max()) <= TOL * float(top.abs().max())


def test_gauss_newton_top_eigenpairs_equal_one_process_and_dense(ranks, single, dense):
    got, ref = ranks[0]["geig"], single["geig"]
    assert bool(got["converged"].all()) and torch.equal(got["converged"], ref["converged"])
    assert float(((got["values"] - ref["values"]) / ref["values"]).abs().max()) <= 1e-5
    assert float((1 - (got["vectors"] * ref["vectors"]).sum(dim=1).abs()).max()) <= 1e-6
    top = torch.linalg.eigvalsh(dense["G"]).flip(0)[:3]
    assert float(((got["values"] - top) / top).abs().max()) <= 1e-8


def test_estimators_and_slq_equal_one_process_for_the_same_seed(ranks, single):
    res = ranks[0]
    for key in ("trace_hpp", "trace_hutch", "gtrace", "frob"):
        assert res[key] == pytest.approx(single[key], rel=1e-10, abs=1e-12), key
    assert torch.allclose(res["slq"]["nodes"], single["slq"]["nodes"], rtol=1e-8, atol=1e-10)
    assert torch.allclose(res["slq"]["weights"], single["slq"]["weights"], rtol=1e-6, atol=1e-10)
    assert res["slq"]["moments"] == pytest.approx(single["slq"]["moments"], rel=1e-10)


# ------------------------------------------------------------------------------------------------
# Failures: different seeds, a dead rank, a silent rank
# ------------------------------------------------------------------------------------------------


def test_ranks_with_different_seeds_all_fail_at_the_first_product(ranks):
    if len(ranks) == 1:
        assert ranks[0]["seed_error"] is None
        return
    for r, res in enumerate(ranks):
        msg = res["seed_error"]
        assert msg is not None and "\n" not in msg and msg.startswith(f"rank {r} of {len(ranks)}:"), msg
        assert "same seed" in msg


def test_a_dead_rank_fails_the_others_in_one_line(tmp_path):
    codes = _spawn(2, "dies", tmp_path, timeout_s=20.0, wait_s=60.0)
    assert codes == [0, 3], codes
    res = _load(tmp_path, 0)
    assert res["error"] is not None, "the product after rank 1 died returned"
    assert "\n" not in res["error"] and res["error"].startswith("rank 0 of 2:"), res["error"]
    assert res["seconds"] < 20.0


def test_a_silent_rank_fails_the_others_after_the_timeout(tmp_path):
    t0 = time.monotonic()
    codes = _spawn(2, "hangs", tmp_path, timeout_s=3.0, wait_s=40.0, end_with_rank0=True)
    res = _load(tmp_path, 0)
    assert codes[0] == 0 and codes[1] != 0, codes  # rank 1 was still asleep and was ended here
    assert res["error"] is not None and "\n" not in res["error"] and res["error"].startswith("rank 0 of 2:")
    assert 2.5 <= res["seconds"] < 20.0, res["seconds"]
    assert time.monotonic() - t0 < 30.0
