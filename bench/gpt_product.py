"""One Hessian-vector product of the small GPT against one gradient, over the same examples.

The default suite's transformer (``gpt`` study: 2 layers, width 64, 4 heads, context 32, vocabulary
64) at its initialisation, N token windows (default 64, the study's Hessian subset), in-process on
the CPU with the given threads. The anchor is one gradient of the mean loss over the N windows
(forward + backward), measured in the same run; each product method is timed on a block of one
vector (a ``matvec``) after a warm-up product, and printed as a ratio to the anchor. curvlinops
reports 2-3x for an eager nanoGPT product against its gradient.

    python bench/gpt_product.py
    python bench/gpt_product.py --n 256 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from sharpflow.hessian import HessianOperator
from sharpflow.models import gpt, loss_fn


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="token windows the product is over")
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = gpt((a.context,), a.vocab, layers=2, width=64, heads=4).eval()
    x = torch.randint(0, a.vocab, (a.n, a.context))
    y = torch.randint(0, a.vocab, (a.n, a.context))
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> None:
        torch.autograd.grad(loss_fn(model(x), y), params)

    gradient()
    anchor = _best(gradient, a.repeats)
    print(f"GPT: {sum(p.numel() for p in params):,} parameters, N = {a.n} windows of {a.context} tokens, "
          f"{a.threads} thread(s)")
    print(f"{'':24s} {'ms':>8s} {'/ gradient':>11s}")
    print(f"{'gradient (anchor)':24s} {1e3 * anchor:8.1f} {1.0:11.2f}")
    v = torch.randn(sum(p.numel() for p in params), 1)
    for method, cache in (("double_backward", False), ("double_backward", True), ("fwd_rev", True)):
        op = HessianOperator(model, loss_fn, [(x, y)], method=method, cache_graph=cache)
        op.matvec(v)  # warm-up: builds the cache or the trace
        t = _best(lambda op=op: op.matvec(v), a.repeats)
        name = f"{method}{' (cached)' if cache else ''}"
        print(f"{name:24s} {1e3 * t:8.1f} {t / anchor:11.2f}")


if __name__ == "__main__":
    main()
