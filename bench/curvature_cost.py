"""Cost of the curvature quantities beyond the top-k, against the top-k solve, on one checkpoint.

On a freshly trained default-suite run (cnn1d on MNIST-1D, η=0.05, S=32, its last checkpoint; N =
the dataset's Hessian subset), in-process, one thread, each measured once after a warm-up product:

- the anchor: top-10 eigenpairs of H at tol 1e-3, cold (what the spectrum stage computes);
- SLQ spectral density, 10 probes × 50 Lanczos steps (and the default suite's 5 × 30);
- the Gauss-Newton matrix G: top-10 at tol 1e-3, and one G product against one H product;
- the residual H − G: top-10 by magnitude at tol 1e-3.

Prints products and seconds of each and its ratio to the anchor.

    python bench/curvature_cost.py
    python bench/curvature_cost.py --steps 1000   # an earlier checkpoint
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sharpflow.data import hessian_batches, load_prepared, prepare
from sharpflow.hessian import HessianOperator, top_eigenpairs
from sharpflow.hessian.density import spectral_density
from sharpflow.hessian.ggn import GGNOperator
from sharpflow.models import loss_fn
from sharpflow.study import expand_runs, load_config
from sharpflow.train import train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml")
    ap.add_argument("--run", default="eta-lr0.05")
    ap.add_argument("--steps", type=int, default=3000, help="train this many steps; the last checkpoint is used")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(a.config)
    run = expand_runs(cfg)[a.run].model_copy(update={"steps": a.steps})
    ds = cfg.datasets[run.dataset]
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        prepare(ds, data_dir, progress=False, log=lambda *_: None)
        train(run, ds, run_name=a.run, data_dir=data_dir, out_dir=Path(tmp) / "run", progress=False,
              log=lambda *_: None)
        from sharpflow.analyses.context import open_checkpoint
        from sharpflow.checkpoints import ckpt_name

        data = load_prepared(data_dir)
        ctx = open_checkpoint(run, a.run, data, Path(tmp) / "run" / "checkpoints" / ckpt_name(a.steps),
                              torch.device("cpu"), log=lambda *_: None)
        model = ctx.model()
        batches = hessian_batches(data, len(data.hessian_idx))
        h = HessianOperator(model, loss_fn, batches)
        g = GGNOperator(model, batches)
        v = torch.randn(h.dim)
        for op in (h, g):  # build caches, warm up
            op.matvec(v)
        rows = []

        def timed(name: str, fn, ops, products=None):
            before = [op.matvecs for op in ops]
            t0 = time.perf_counter()
            out = fn()
            secs = time.perf_counter() - t0
            done = sum(op.matvecs for op in ops) - sum(before) if products is None else products(out)
            rows.append((name, done, secs))
            return out

        top = timed("top-10 of H, tol 1e-3 (anchor)", lambda: top_eigenpairs(h, k=10, tol=1e-3), [h])
        timed("SLQ 10 probes x 50 steps", lambda: spectral_density(h, 10, 50), [h])
        timed("SLQ 5 probes x 30 steps (default suite)", lambda: spectral_density(h, 5, 30), [h])
        timed("top-10 of G, tol 1e-3", lambda: top_eigenpairs(g, k=10, tol=1e-3), [g])
        resid = h - g
        timed("top-10 |.| of H - G, tol 1e-3 (each an H and a G product)",
              lambda: top_eigenpairs(resid, k=10, tol=1e-3, which="LM"), [resid])
        _sharpness_family(ctx, top, timed)
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            h.matvec(v)
        th = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            g.matvec(v)
        tg = (time.perf_counter() - t0) / reps
    anchor = rows[0]
    print(f"{a.run}, step {a.steps}, D = {h.dim}, N = {len(data.hessian_idx)}, {a.threads} thread(s)")
    width = max(44, *(len(name) for name, _, _ in rows))
    print(f"{'quantity':{width}s} {'products':>9s} {'seconds':>8s} {'× anchor (products, s)':>24s}")
    for name, mv, secs in rows:
        prods = f"{mv:9d} {mv / anchor[1]:11.1f}" if mv >= 0 else f"{'–':>9s} {'–':>11s}"
        print(f"{name:{width}s} {prods[:9]} {secs:8.2f} {prods[10:]} {secs / anchor[2]:11.1f}")
    print("(–: no Hessian products; the sharpness measures cost forward/backward passes, counted in the "
          "docstring of _sharpness_family)")
    print(f"one product: H {1000 * th:.2f} ms, G {1000 * tg:.2f} ms (G/H = {tg / th:.2f})")


def _sharpness_family(ctx, top, timed) -> None:
    """The sharpness family at the defaults of their config sections, on the same checkpoint:

    - ``sharpness``: worst case, 4 batches of 128 × (10 ascent steps: 11 forward, 10 backward passes);
      average case, 17 forward passes over the N examples; no Hessian products;
    - ``blocks``: one certified top pair per weight block, each product a full H product;
    - ``blocks`` with ``density``: the same, plus 3 probes × 20 Lanczos steps per block (full H products);
    - ``selfstab``: one gradient, two Hessian-vector products with create_graph and one third-order
      backward over the N examples, plus one more product along the last update where the checkpoint
      stores it (reported as 3 or 4 products).
    """
    from sharpflow.analyses.blocks import BlocksConfig
    from sharpflow.analyses.blocks import compute as blocks
    from sharpflow.analyses.selfstab import SelfStabConfig
    from sharpflow.analyses.selfstab import compute as selfstab
    from sharpflow.analyses.sharpness import SharpnessConfig
    from sharpflow.analyses.sharpness import compute as sharpness

    ctx.eigvecs = {"eigenvalues": top.eigenvalues, "eigenvectors": top.eigenvectors}
    timed("sharpness: worst (4x128, 10 steps) + average (16)", lambda: sharpness(ctx, SharpnessConfig(enabled=True)),
          [], lambda out: -1)
    timed("blocks: top eigenvalue of each weight block", lambda: blocks(ctx, BlocksConfig(enabled=True)), [],
          lambda out: int(out["blocks"]["matvecs"].sum()))
    timed("blocks + density (3 probes x 20 steps per block)",
          lambda: blocks(ctx, BlocksConfig(enabled=True, density={"enabled": True})), [],
          lambda out: int(out["blocks"]["matvecs"].sum())
          + int(out["blocks_density"].drop_duplicates("block")["matvecs"].sum()))
    timed("selfstab: gHg/|g|^2, alpha, beta (third order)", lambda: selfstab(ctx, SelfStabConfig(enabled=True)), [],
          lambda out: 3 + int(out["selfstab"]["update_curvature"].notna().iloc[0]))


if __name__ == "__main__":
    main()
