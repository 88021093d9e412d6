"""Data-parallel Hessian products (sharpflow.hessian.distributed): products per second and the
all-reduce's share of a product, for 1, 2 and 4 ranks, as ratios against one rank in the same run.

The problem: the MLP of the default suite's models (tanh, hidden 100, 100; D = 15,210) on N
Gaussian examples of 40 features, 10 classes, in batches of 256, float32, cached double backward.
Each world size is a fresh job of spawned ranks (gloo on the CPU, one thread per rank by default;
NCCL with one GPU per rank when ``torch.cuda.device_count()`` has enough, ``--backend nccl``).
Per world size, after two warm-up products, each measured ``--reps`` times, medians:

- product: one block product of the distributed operator (the rank's shard, scaled, all-reduced,
  divided by N, weight decay added), in ms per vector, and products (vectors) per second;
- shard: the rank's own product alone (no collective), the slowest rank's median;
- all-reduce: a bare ``all_reduce`` of the same buffer, ranks lined up by a barrier first (the
  collective's own cost, without waiting for a slower rank); its share of a product's time.

    python bench/distributed.py
    python bench/distributed.py --ranks 1 2 4 8 --n 8192 --block 8
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from sharpflow.hessian.distributed import distributed_hessian, init_distributed, shard
from sharpflow.models import MLP, loss_fn


def _problem(n: int, device: torch.device) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MLP((40,), 10, hidden=(100, 100), activation="tanh").to(device)
    x = torch.randn(n, 40, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return model, [(xb.to(device), yb.to(device)) for xb, yb in zip(x.split(256), y.split(256), strict=True)]


def _rank(rank: int, world: int, port: int, a: argparse.Namespace, backend: str, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(a.threads)
    info = init_distributed(backend=backend, timeout_s=120.0)
    model, batches = _problem(a.n, info.device)
    op = distributed_hessian(model, loss_fn, batches, weight_decay=5e-4)
    v = torch.randn(op.dim, a.block, generator=torch.Generator().manual_seed(1)).to(info.device)

    def sync() -> None:
        if info.device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        op.matvec(v)
    sync()
    prod = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        op.matvec(v)
        sync()
        prod.append(time.perf_counter() - t0)
    local = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        op.local.matvec(v)
        sync()
        local.append(time.perf_counter() - t0)
    slowest = torch.tensor([statistics.median(local)], dtype=torch.float64, device=info.device)
    if world > 1:
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    buf = torch.zeros(op.dim * a.block + 2 + a.block, device=info.device)
    comm = []
    for _ in range(a.reps):
        if world > 1:
            dist.barrier()
        sync()
        t0 = time.perf_counter()
        if world > 1:
            dist.all_reduce(buf)
        sync()
        comm.append(time.perf_counter() - t0)
    if rank == 0:
        queue.put({"dim": op.dim, "shard": len(shard(a.n, 0, world)), "product": statistics.median(prod),
                   "comm": statistics.median(comm), "local": float(slowest[0]), "device": str(info.device)})
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _job(world: int, a: argparse.Namespace, backend: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, a, backend, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = queue.get(timeout=600)
    for p in procs:
        p.join(60)
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"{world} ranks: exit codes {[p.exitcode for p in procs]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="world sizes to measure (first: baseline)")
    ap.add_argument("--n", type=int, default=4096, help="examples N of the Hessian subset")
    ap.add_argument("--block", type=int, default=1, help="vectors per block product (one all-reduce per block)")
    ap.add_argument("--reps", type=int, default=30, help="timed products per world size (medians are printed)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto",
                    help="auto: NCCL when there is a GPU for every rank, else gloo on the CPU")
    a = ap.parse_args()
    gpus = torch.cuda.device_count()
    rows = []
    for world in a.ranks:
        backend = a.backend
        if backend == "auto":
            backend = "nccl" if gpus >= world and gpus > 0 else "gloo"
        if backend == "nccl" and gpus < world:
            print(f"{world} ranks: skipped, {gpus} GPU(s) for NCCL")
            continue
        rows.append((world, backend, _job(world, a, backend)))
    if not rows:
        return
    base = rows[0][2]["product"] / a.block
    first = rows[0][2]
    print(f"Hessian products, MLP tanh 100-100 (D = {first['dim']:,}), N = {a.n}, float32, blocks of {a.block}, "
          f"{a.threads} thread(s) per rank, medians of {a.reps}; {os.cpu_count()} CPU core(s), {gpus} GPU(s)")
    print("(a product is one vector; a block of m is m products and one all-reduce)")
    print(f"{'ranks':>5s} {'backend':>7s} {'shard':>6s} {'ms/product':>11s} {'products/s':>11s} "
          f"{'× 1st row':>10s} {'shard ms/product':>17s} {'all-reduce ms/block':>20s} {'all-reduce share':>17s}")
    for world, backend, r in rows:
        per = r["product"] / a.block
        print(f"{world:5d} {backend:>7s} {r['shard']:6d} {1000 * per:11.2f} {1 / per:11.1f} {base / per:10.2f} "
              f"{1000 * r['local'] / a.block:17.2f} {1000 * r['comm']:20.3f} {r['comm'] / r['product']:16.1%}")


if __name__ == "__main__":
    main()
