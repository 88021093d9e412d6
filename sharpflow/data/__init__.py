"""Data preparation and loading: sources → ``results/data/{dataset}/`` → tensors on a device.

``prepare`` turns one :class:`~sharpflow.config.DatasetConfig` into a directory of plain arrays:

- ``train.npz``, ``valid.npz``, ``test.npz``: arrays ``x`` and ``y``;
- ``hessian.npz``: array ``idx``, the fixed Hessian subset (indices into train);
- ``norm.npz`` (images only): arrays ``mean`` and ``std`` in raw pixel units (0–255),
  broadcastable to one example (C, H, W): ``mean`` is (C, H, W) for CIFAR (per-pixel mean),
  () for MNIST / Fashion-MNIST (global mean); ``std`` is always () (global);
- ``meta.json``, written last, so its presence means the directory is complete.

Stored arrays, per kind:

========  ====================================  ==========================  =========================
kind      sources                               x                           y
========  ====================================  ==========================  =========================
vector    mnist1d                               float32 (N, 40), normalised int64 (N,) class
image     cifar10, cifar100, mnist,             uint8 (N, C, H, W), raw      int64 (N,) class
          fashion_mnist, synthetic_images       (normalised when loaded)
tokens    ptb, synthetic_text                   int64 (N, bptt) word ids    int64 (N, bptt), x shifted
========  ====================================  ==========================  =========================

Every file is written through :mod:`sharpflow.io` (atomically); its npz files carry fixed zip
timestamps, so the same config and seed give byte-identical files (and so equal SHA-256 digests,
recorded in ``meta.json`` and checked by ``load_prepared``).

Randomness: one ``numpy.random.default_rng(cfg.seed)``; its first draw is the permutation of
the source's training set (the first ``valid_size`` go to valid, the rest, in permuted order,
to train, of which ``max_train`` keeps the first n), its second draw the Hessian subset
(``hessian_subset`` distinct train indices, in random order, so any prefix of it is itself a
uniform random subset). Normalisation constants are computed on the final train split.

PTB: when ``valid_size`` is 0 (its default) valid comes from ``ptb.valid.txt``; a positive
``valid_size`` splits valid off the training windows instead, like every other source.

Modules: :mod:`.sources` (reading each source, downloads), :mod:`.preparation` (``prepare``),
:mod:`.loading` (``load_prepared``, the training view, the Hessian batches, verified against the
checksums), :mod:`.augmentation` (training's shifts and flips). This package re-exports their
public names.
"""

from __future__ import annotations

from ..errors import DataError
from .augmentation import SHIFT, augment, shift_flip
from .loading import Dataset, Split, TrainView, hessian_batches, load_prepared, train_view
from .preparation import prepare
from .sources import (
           DATA_FORMAT_VERSION,
           EOS,
           IMAGE_SOURCES,
           PER_PIXEL_MEAN,
           PTB_SPLITS,
           UNK,
           cache_root,
           ptb_vocabulary,
)

__all__ = ["DATA_FORMAT_VERSION", "EOS", "IMAGE_SOURCES", "PER_PIXEL_MEAN", "PTB_SPLITS", "SHIFT", "UNK", "DataError",
           "Dataset", "Split", "TrainView", "augment", "cache_root", "hessian_batches", "load_prepared", "prepare",
           "ptb_vocabulary", "shift_flip", "train_view"]
