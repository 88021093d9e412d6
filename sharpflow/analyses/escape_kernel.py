"""The kernel of the ``escape`` analysis (:mod:`.escape`): SGD continued from a checkpoint with the
component of every step along e_1 edited (removed, isolated, frozen or rescaled), on the conventions
of :mod:`.gradients`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import pandas as pd
import torch
from torch import Tensor, nn

from ..params import LossFn
from .gradients import Batch, _flat_loss, _is_finite, _plain_grad, loss_at

Mode = Literal["none", "remove", "isolate", "freeze", "rescale"]


# ----------------------------------------------------------------------------------------------
# 4. Escape ablation: SGD with the e1 component of the step edited
# ----------------------------------------------------------------------------------------------
def _edit_step(step: Tensor, e: Tensor, mode: Mode, factor: float) -> Tensor:
    """The step with its component along the unit vector e edited as ``mode`` says."""
    along = (step @ e) * e
    if mode in ("remove", "freeze"):
        return step - along
    if mode == "isolate":
        return along
    if mode == "rescale":
        return step + (factor - 1.0) * along
    return step


def escape_ablation(
    model: nn.Module,
    loss_fn: LossFn,
    theta: Tensor,
    e1: Tensor,
    batch_iter: Iterator[Batch],
    *,
    lr: float,
    steps: int,
    mode: Mode,
    factor: float = 1.0,
    eval_batches: Sequence[Batch],
    eval_every: int,
    lambda_max_fn: Callable[[Tensor], float] | None = None,
    e1_fn: Callable[[Tensor], Tensor] | None = None,
    refresh_every: int | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> pd.DataFrame:
    """Continue SGD from ``theta`` with the step's component along e1 edited.

    With g the mini-batch gradient plus weight_decay·θ, the heavy-ball buffer v ← momentum·v + g
    (torch.optim.SGD's convention, v = 0 at the start), s = −lr·v the plain step and e the current
    e1 (unit); the buffer keeps the unedited v, as Nudged-SGD's "correct_v" does:

    - ``"none"``: θ += s (plain SGD, the control);
    - ``"remove"``: θ += s − (sᵀe)e  (no motion along e);
    - ``"isolate"``: θ += (sᵀe)e  (motion along e only);
    - ``"rescale"``: θ += s + (factor − 1)(sᵀe)e  (factor=1 is "none", factor=0 is "remove");
    - ``"freeze"``: the coordinate of θ along the INITIAL e1 is held at its initial value: the
      step is "remove" along the initial e1, which is never refreshed, and after each step any
      drift of (θ − θ0)ᵀe1 (floating-point round-off) is projected back out. Without refreshing,
      "freeze" and "remove" are the same dynamics; they differ when ``e1_fn`` refreshes the
      direction that "remove" (and "isolate", "rescale") act on while "freeze" keeps the
      initial one.

    Refreshing: if ``e1_fn`` is given, e is replaced by ``e1_fn(θ)`` (normalised) before the step
    at every step t > 0 with t % refresh_every == 0 (not in "freeze"). Give both or neither.

    Args:
        theta: (D,) start (a copy is updated; the model is not touched).
        e1: (D,) top eigenvector at ``theta``.
        batch_iter: yields the training mini-batches, one per step; running out raises ValueError.
        lr: SGD learning rate; steps: number of SGD updates.
        momentum, weight_decay: as torch.optim.SGD's (0: plain SGD).
        eval_batches: fixed subset for the tracked loss (exact example weighting).
        eval_every: evaluate after every ``eval_every`` updates (plus at 0 and at ``steps``).
        lambda_max_fn: θ (D,) -> λ_max, e.g. a Lanczos call; None gives NaN.

    Returns:
        One row per evaluation. Columns: ``step`` (updates done), ``loss`` (mean loss on
        ``eval_batches``), ``lambda_max``, ``mode``, ``factor`` (the multiplier the mode applies
        to the e1 component: 1 for "none" and "isolate", 0 for "remove" and "freeze", the
        argument for "rescale"), ``lr``, ``e1_coord`` ((θ − θ0)ᵀe1 along the initial e1),
        ``dist_from_start`` (‖θ − θ0‖), ``diverged`` (θ has become non-finite; values NaN from
        then on and training stops).
    """
    if mode not in ("none", "remove", "isolate", "freeze", "rescale"):
        raise ValueError(f"unknown mode {mode!r}")
    if (e1_fn is None) != (refresh_every is None):
        raise ValueError("give both e1_fn and refresh_every, or neither")
    if eval_every < 1 or steps < 0:
        raise ValueError("eval_every must be >= 1 and steps >= 0")
    theta0 = theta.detach().clone()
    th = theta0.clone()
    e0 = e1.detach().to(th)
    e0 = e0 / e0.norm()
    e = e0.clone()
    g1 = _plain_grad(_flat_loss(model, loss_fn))  # one gradient per step: nothing to batch
    eff = {"none": 1.0, "remove": 0.0, "freeze": 0.0, "isolate": 1.0, "rescale": float(factor)}[mode]
    diverged = not _is_finite(th)
    buf = torch.zeros_like(th)

    rows: list[dict] = []

    def record(step: int) -> None:
        if diverged:
            loss = lam = coord = dist = math.nan
        else:
            loss = float(loss_at(model, loss_fn, th, eval_batches)[0])
            lam = float(lambda_max_fn(th.clone())) if lambda_max_fn is not None else math.nan
            delta = (th - theta0).double()
            coord, dist = float(delta @ e0.double()), float(delta.norm())
        rows.append({"step": step, "loss": loss, "lambda_max": lam, "mode": mode, "factor": eff,
                     "lr": float(lr), "e1_coord": coord, "dist_from_start": dist, "diverged": diverged})

    record(0)
    for t in range(steps):
        if not diverged:
            if e1_fn is not None and refresh_every is not None and mode != "freeze" and t > 0 \
                    and t % refresh_every == 0:
                e = e1_fn(th.clone()).detach().to(th)
                e = e / e.norm()
            try:
                x, y = next(batch_iter)
            except StopIteration:
                raise ValueError(f"batch_iter ran out after {t} of {steps} steps") from None
            g = g1(th, x.to(th.device), y.to(th.device)).detach()
            if weight_decay:
                g = g + weight_decay * th
            buf = momentum * buf + g if momentum else g
            th = th + _edit_step(-lr * buf, e, mode, factor)
            if mode == "freeze":
                th = th - ((th - theta0) @ e0) * e0
            diverged = not _is_finite(th)
        if (t + 1) % eval_every == 0 or t + 1 == steps:
            record(t + 1)
    cols = ["step", "loss", "lambda_max", "mode", "factor", "lr", "e1_coord", "dist_from_start", "diverged"]
    return pd.DataFrame(rows, columns=cols)
