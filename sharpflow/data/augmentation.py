"""Training's augmentation of images: random shifts by up to ``SHIFT`` pixels and horizontal flips."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SHIFT = 4  # the largest shift in pixels along each axis


# ----------------------------------------------------------------------------------- augmentation
def shift_flip(x: Tensor, shift_y: Tensor, shift_x: Tensor, flip: Tensor) -> Tensor:
    """Shift each image by whole pixels (zeros enter at the borders), then mirror it left-right.

    x: (B, C, H, W); shift_y, shift_x: (B,) integers in [-4, 4], the displacement of the
    content (positive: down / right); flip: (B,) bool. Equivalent to padding 4 zeros on every
    side and cropping at offset ``4 - shift``; done with two gathers, no loop over examples.
    """
    if x.ndim != 4:
        raise ValueError(f"shift_flip: expected images (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    padded = F.pad(x, (SHIFT, SHIFT, SHIFT, SHIFT))
    dev = x.device
    rows = (SHIFT - shift_y.to(dev))[:, None] + torch.arange(h, device=dev)  # (B, H) into padded rows
    cols = (SHIFT - shift_x.to(dev))[:, None] + torch.arange(w, device=dev)  # (B, W) into padded cols
    cols = torch.where(flip.to(dev)[:, None], cols.flip(1), cols)
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * SHIFT))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """The paper's CIFAR augmentation, batched on x's device: random shifts of up to 4 px along
    each axis (zero padding) and a horizontal flip with probability 1/2, independently per image.

    x: (B, C, H, W) images; returns a new tensor of the same shape and dtype. Deterministic
    given the generator's state (which may live on another device than x). Raises ValueError
    for anything but 4-D image batches (vectors, tokens).
    """
    if x.ndim != 4:
        raise ValueError(f"augment works on image batches (B, C, H, W); got shape {tuple(x.shape)}")
    b, gdev = x.shape[0], generator.device
    shift_y = torch.randint(-SHIFT, SHIFT + 1, (b,), generator=generator, device=gdev)
    shift_x = torch.randint(-SHIFT, SHIFT + 1, (b,), generator=generator, device=gdev)
    flip = torch.rand(b, generator=generator, device=gdev) < 0.5
    return shift_flip(x, shift_y, shift_x, flip)
