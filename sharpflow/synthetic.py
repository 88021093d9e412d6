"""Offline stand-ins for the paper's data: CIFAR-shaped images and a PTB-shaped token stream.

They let the paper's study (``config/paper.yaml``) run end to end on a machine without its
datasets (``config/smoke.yaml``), and give the tests data of the real shapes. They are
generated deterministically from a seed with numpy only, and they are *stand-ins*: nothing
computed on them is a result about CIFAR or PTB.

- :func:`images`: uint8 (N, 3, 32, 32) images in ``num_classes`` classes. Each class has a
  smooth colour prototype (a random 4×4×3 pattern upsampled to 32×32); an example is its
  class's prototype at a random contrast plus a random smooth background of larger weight,
  shifted by up to 3 pixels, plus pixel noise. The backgrounds live in the same low-dimensional
  space as the prototypes, so the classes overlap: a nearest-class-mean rule is far from perfect
  while a small CNN learns well above chance within a few hundred steps.
- :func:`tokens`: a stream of word ids from a sparse first-order Markov chain over a Zipf-like
  vocabulary, cut into sentences that end with ``<eos>`` (the last id). Each word has a few
  likely successors, so an LSTM's perplexity falls far below the vocabulary size.
"""

from __future__ import annotations

import numpy as np

IMAGE_SHAPE = (3, 32, 32)
#: Pixel noise, per-example background weight and contrast range of the image stand-in (in units
#: of the prototype's scale).
NOISE, BACKGROUND, CONTRAST = 1.0, 1.5, (0.6, 1.4)
#: Successors per word and mean sentence length of the text stand-in.
SUCCESSORS, SENTENCE = 6, 20


def _rng(seed: int, stream: int) -> np.random.Generator:
    """An independent generator per (seed, purpose): the split's draws use ``default_rng(seed)``."""
    return np.random.default_rng(np.random.SeedSequence([seed, 0x5EED, stream]))


def _smooth_patterns(rng: np.random.Generator, n: int) -> np.ndarray:
    """n smooth random colour images (n, 3, 32, 32) of unit std: 4×4×3 Gaussian blocks, upsampled
    and smoothed by a 3×3 box filter (wrap-around), so small shifts change them gradually."""
    c, h, w = IMAGE_SHAPE
    blocks = np.repeat(np.repeat(rng.standard_normal((n, c, 4, 4)), h // 4, axis=2), w // 4, axis=3)
    out = sum(np.roll(blocks, (dy, dx), axis=(2, 3)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9.0
    return out / out.std(axis=(1, 2, 3), keepdims=True)


def images(n_train: int, n_test: int, num_classes: int, seed: int, chunk: int = 4096) -> dict[str, np.ndarray]:
    """``train_x, train_y, test_x, test_y``: uint8 (n, 3, 32, 32) images and int64 labels.

    Labels are balanced up to rounding and in random order. The same arguments give the same
    arrays on every machine (numpy's PCG64 and float64 arithmetic only).
    """
    rng = _rng(seed, 1)
    c, h, w = IMAGE_SHAPE
    protos = _smooth_patterns(rng, num_classes)
    out: dict[str, np.ndarray] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
        x = np.empty((n, c, h, w), dtype=np.uint8)
        for i in range(0, n, chunk):
            yb = y[i : i + chunk]
            b = len(yb)
            contrast = rng.uniform(*CONTRAST, size=(b, 1, 1, 1))
            shifts = rng.integers(-3, 4, size=(b, 2))
            img = protos[yb] * contrast + BACKGROUND * _smooth_patterns(rng, b)
            for dy in range(-3, 4):  # one roll per distinct shift, not per example
                for dx in range(-3, 4):
                    sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
                    if sel.any():
                        img[sel] = np.roll(img[sel], (dy, dx), axis=(2, 3))
            img += NOISE * rng.standard_normal(img.shape)
            x[i : i + b] = np.clip(np.rint(128.0 + 30.0 * img), 0, 255).astype(np.uint8)
        out[f"{split}_x"], out[f"{split}_y"] = x, y
    return out


def tokens(n_tokens: dict[str, int], vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    """Word ids (int64) for each split of ``n_tokens``; id ``vocab_size - 1`` is ``<eos>``.

    Sentences start at a Zipf-distributed word, follow the chain (each word has
    :data:`SUCCESSORS` successors with decreasing probabilities), and end with probability
    1/:data:`SENTENCE` after each word; every split is drawn from the same chain.
    """
    rng = _rng(seed, 2)
    words = vocab_size - 1
    zipf = 1.0 / np.arange(1, words + 1)
    zipf /= zipf.sum()
    succ = rng.choice(words, size=(words, SUCCESSORS), p=zipf)
    probs = 0.5 ** np.arange(SUCCESSORS)
    cum = np.cumsum(probs / probs.sum())
    out: dict[str, np.ndarray] = {}
    for split, n in n_tokens.items():
        # Enough parallel sentences of a fixed maximal length, then cut at their ends.
        rows = max(1, 2 * n // SENTENCE + 1)
        length = 4 * SENTENCE
        sent = np.empty((rows, length), dtype=np.int64)
        sent[:, 0] = rng.choice(words, size=rows, p=zipf)
        for t in range(1, length):
            pick = np.searchsorted(cum, rng.random(rows), side="right").clip(max=SUCCESSORS - 1)
            sent[:, t] = succ[sent[:, t - 1], pick]
        ends = rng.geometric(1.0 / SENTENCE, size=rows).clip(max=length - 1)
        stream = np.concatenate([np.append(row[:e], words) for row, e in zip(sent, ends, strict=True)])
        while len(stream) < n:  # (rare) too few tokens: repeat the stream
            stream = np.concatenate([stream, stream])
        out[split] = np.ascontiguousarray(stream[:n])
    return out


def vocabulary(vocab_size: int) -> list[str]:
    """The stand-in's words: ``w0 … w{V-2}`` and ``<eos>`` last."""
    return [f"w{i}" for i in range(vocab_size - 1)] + ["<eos>"]
