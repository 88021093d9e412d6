"""Per-step cost of NudgedSGD (K random orthonormal directions) against torch.optim.SGD.

Times forward + backward + optimizer step of a small CNN on a fixed batch, the two optimizers
interleaved in alternating order so that drifting machine load hits both alike, and reports
the median over repeats. The subspace is set once (between refreshes is what is measured).

    python bench/nsgd_overhead.py                 # CPU, batch 128 × 3×32×32, K = 10
    python bench/nsgd_overhead.py --device cuda --steps 50

On a CPU shared with other jobs, ``--threads 1`` gives steadier numbers: with more threads than
free cores every parallel kernel waits for descheduled threads, which swamps a ~1 ms difference.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from sharpflow.nsgd import NudgedSGD


def cnn(width: int = 32, hidden: int = 64) -> nn.Module:
    """SimpleCNN-like net for 3×32×32 inputs; about 212k parameters at the defaults."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 6 * 6, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def run(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int
) -> tuple[float, float]:
    """Seconds per full step and per ``opt.step()`` alone, averaged over ``steps``."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    in_step = 0.0
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        sync()
        s0 = time.perf_counter()
        opt.step()
        sync()
        in_step += time.perf_counter() - s0
    return (time.perf_counter() - t0) / steps, in_step / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128, help="examples per step (default 128)")
    ap.add_argument("--k", type=int, default=10, help="subspace dimension K (default 10)")
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block (default 5)")
    ap.add_argument("--repeats", type=int, default=12, help="timed blocks per optimizer (default 12)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer first (default 3)")
    ap.add_argument("--momentum", type=float, default=0.0, help="momentum for both (default 0)")
    ap.add_argument("--gamma", type=float, default=0.1, help="NSGD γ (default 0.1)")
    ap.add_argument("--variant", default="correct_v", choices=["correct_v", "correct_g", "correct_both"])
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    base = cnn().to(device)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    m_sgd, m_nsgd = copy.deepcopy(base), copy.deepcopy(base)
    sgd = torch.optim.SGD(m_sgd.parameters(), lr=0.01, momentum=args.momentum)
    nsgd = NudgedSGD(
        m_nsgd.parameters(), lr=0.01, gamma=args.gamma, k=args.k, momentum=args.momentum, variant=args.variant
    )
    nsgd.set_random_subspace(generator=torch.Generator().manual_seed(0))
    d = sum(p.numel() for p in base.parameters())
    print(
        f"model: {d} parameters; batch {args.batch}×3×32×32; K={args.k}; device {device}; "
        f"threads {torch.get_num_threads()}; {args.repeats} repeats × {args.steps} steps"
    )

    pairs = {"SGD": (m_sgd, sgd), "NSGD": (m_nsgd, nsgd)}
    for model, opt in pairs.values():
        run(model, opt, x, y, args.warmup)
    total: dict[str, list[float]] = {name: [] for name in pairs}
    step: dict[str, list[float]] = {name: [] for name in pairs}
    for r in range(args.repeats):
        order = list(pairs) if r % 2 == 0 else list(reversed(pairs))
        for name in order:
            t, s = run(*pairs[name], x, y, args.steps)
            total[name].append(t)
            step[name].append(s)

    # Each repeat times both back to back, so its ratio sees one machine state: the median of
    # these paired ratios is steadier than a ratio of medians when other jobs share the CPU.
    paired = [n / s for n, s in zip(total["NSGD"], total["SGD"], strict=True)]
    med = {name: statistics.median(v) * 1e3 for name, v in total.items()}
    med_step = {name: statistics.median(v) * 1e3 for name, v in step.items()}
    for name in pairs:
        print(
            f"{name:5s} {med[name]:8.2f} ms/step (median; min {min(total[name]) * 1e3:.2f})   "
            f"optimizer.step {med_step[name]:7.3f} ms"
        )
    print(
        f"ratio NSGD/SGD per full step: {med['NSGD'] / med['SGD']:.3f} (ratio of medians), "
        f"{statistics.median(paired):.3f} (median of {len(paired)} paired ratios)"
    )
    print(
        f"optimizer.step overhead: {med_step['NSGD'] - med_step['SGD']:+.3f} ms "
        f"= {(med_step['NSGD'] - med_step['SGD']) / med['SGD'] * 100:+.2f} % of an SGD step"
    )


if __name__ == "__main__":
    main()
