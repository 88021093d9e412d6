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
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sharpflow import synthetic, usersources
from sharpflow.config import FORMAT_VERSION, DatasetConfig, RunConfig
from sharpflow.errors import DataError, SharpflowError
from sharpflow.io import atomic_path, read_npz, sha256_file, write_npz, write_text

#: Version of the prepared-data directory layout (also part of the prepare stage's params).
DATA_FORMAT_VERSION = FORMAT_VERSION["prepare"]

#: torchvision class name and number of classes of each image source.
IMAGE_SOURCES: dict[str, tuple[str, int]] = {
    "cifar10": ("CIFAR10", 10),
    "cifar100": ("CIFAR100", 100),
    "mnist": ("MNIST", 10),
    "fashion_mnist": ("FashionMNIST", 10),
}
#: Sources normalised by a per-pixel mean (the paper's CIFAR protocol); the others use a global mean.
PER_PIXEL_MEAN = frozenset({"cifar10", "cifar100", "synthetic_images"})

PTB_SPLITS = ("train", "valid", "test")
EOS, UNK = "<eos>", "<unk>"
SHIFT = 4  # augmentation: maximal shift in pixels along each axis

Log = Callable[[str], Any]


# ------------------------------------------------------------------------------------ file I/O
def cache_root(cfg: DatasetConfig) -> Path:
    """The download cache: ``cfg.cache_dir``, else ``$SHARPFLOW_DATA``, else ``~/.cache/sharpflow``."""
    root = cfg.cache_dir or os.environ.get("SHARPFLOW_DATA") or "~/.cache/sharpflow"
    return Path(os.path.expandvars(root)).expanduser()


# ------------------------------------------------------------------------------------- sources
@dataclass
class _Raw:
    """A source as read: its own train (to be split) and test sets, and what describes them."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    kind: str
    num_classes: int
    provenance: dict[str, Any]
    # Set by sources that ship their own validation set (PTB); used when valid_size is 0.
    valid_x: np.ndarray | None = None
    valid_y: np.ndarray | None = None
    extra_meta: dict[str, Any] = field(default_factory=dict)


def _load_mnist1d(cfg: DatasetConfig, log: Log) -> _Raw:
    """MNIST-1D generated locally by ``mnist1d.data.make_dataset`` (never its downloading helper)."""
    from importlib.metadata import PackageNotFoundError, version

    from mnist1d.data import get_dataset_args, make_dataset

    if cfg.mnist1d_samples < 10:
        raise DataError(f"mnist1d_samples = {cfg.mnist1d_samples} gives an empty dataset (10 classes); use ≥ 10")
    args = get_dataset_args()
    args.num_samples = cfg.mnist1d_samples
    args.seed = cfg.seed
    log(f"generating MNIST-1D: {cfg.mnist1d_samples} examples, seed {cfg.seed}")
    # make_dataset reseeds numpy's and Python's global generators; leave the caller's state as found.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    try:
        pkg_version = version("mnist1d")
    except PackageNotFoundError:  # pragma: no cover - installed as a dependency
        pkg_version = "unknown"
    gen_args = {k: v for k, v in vars(args).items() if k != "url"}
    return _Raw(
        train_x=np.asarray(data["x"], dtype=np.float64),
        train_y=np.asarray(data["y"], dtype=np.int64),
        test_x=np.asarray(data["x_test"], dtype=np.float64),
        test_y=np.asarray(data["y_test"], dtype=np.int64),
        kind="vector",
        num_classes=10,
        provenance={"generator": "mnist1d.data.make_dataset", "mnist1d_version": pkg_version, "args": gen_args},
    )


def _load_synthetic_images(cfg: DatasetConfig, log: Log) -> _Raw:
    """The CIFAR-shaped stand-in (:func:`sharpflow.synthetic.images`), generated from the seed."""
    log(f"generating synthetic_images (a stand-in, not CIFAR): {cfg.synthetic_train} train + "
        f"{cfg.synthetic_test} test, {cfg.synthetic_classes} classes, seed {cfg.seed}")
    arr = synthetic.images(cfg.synthetic_train, cfg.synthetic_test, cfg.synthetic_classes, cfg.seed)
    return _Raw(
        train_x=arr["train_x"], train_y=arr["train_y"], test_x=arr["test_x"], test_y=arr["test_y"],
        kind="image",
        num_classes=cfg.synthetic_classes,
        provenance={"generator": "sharpflow.synthetic.images", "stand_in_for": "cifar",
                    "note": "synthetic stand-in data: not a result about any real dataset"},
    )


def _load_synthetic_text(cfg: DatasetConfig, log: Log) -> _Raw:
    """The PTB-shaped stand-in (:func:`sharpflow.synthetic.tokens`): windows of bptt+1 tokens."""
    n_eval = max(cfg.bptt + 1, cfg.ptb_train_tokens // 12)
    log(f"generating synthetic_text (a stand-in, not PTB): {cfg.ptb_train_tokens} train tokens, "
        f"vocabulary {cfg.vocab_size}, seed {cfg.seed}")
    ids = synthetic.tokens({"train": cfg.ptb_train_tokens, "valid": n_eval, "test": n_eval}, cfg.vocab_size, cfg.seed)
    xy = {s: _ptb_windows(ids[s], cfg.bptt, Path(f"synthetic_text/{s}")) for s in PTB_SPLITS}
    return _Raw(
        train_x=xy["train"][0], train_y=xy["train"][1],
        valid_x=xy["valid"][0], valid_y=xy["valid"][1],
        test_x=xy["test"][0], test_y=xy["test"][1],
        kind="tokens",
        num_classes=cfg.vocab_size,
        provenance={"generator": "sharpflow.synthetic.tokens", "stand_in_for": "ptb",
                    "tokens": {s: len(v) for s, v in ids.items()},
                    "note": "synthetic stand-in data: not a result about any real dataset"},
        extra_meta={"vocab": synthetic.vocabulary(cfg.vocab_size), "bptt": cfg.bptt},
    )


def _manual_instructions(source: str, cls: Any, root: Path) -> str:
    """Where to get the files of a torchvision source and where to put them by hand."""
    if source in PER_PIXEL_MEAN:  # CIFAR
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return (
            f"download {cls.url} by hand and extract it into {root}, so that "
            f"{root / cls.base_folder}/ holds {', '.join(names)}"
        )
    names = [name for name, _ in cls.resources]
    mirrors = " or ".join(cls.mirrors)
    return (
        f"download {', '.join(names)} from {mirrors} by hand and put them (gzipped or not) into "
        f"{root / cls.__name__ / 'raw'}/"
    )


def _gunzip_placed(raw_dir: Path, gz_names: list[str]) -> None:
    """Decompress MNIST ``.gz`` files placed by hand: torchvision reads only the decompressed ones."""
    for name in gz_names:
        gz, plain = raw_dir / name, raw_dir / name.removesuffix(".gz")
        if gz.is_file() and not plain.is_file():
            with atomic_path(plain) as tmp:
                try:
                    with gzip.open(gz, "rb") as src, open(tmp, "wb") as fh:
                        shutil.copyfileobj(src, fh)
                except (OSError, EOFError) as err:
                    raise DataError(f"{gz}: cannot decompress ({err}); replace the file") from None


def _load_torchvision(cfg: DatasetConfig, log: Log) -> _Raw:
    """CIFAR-10/100, MNIST, Fashion-MNIST through torchvision, cached under :func:`cache_root`."""
    import torchvision
    from torchvision import datasets

    cls_name, num_classes = IMAGE_SOURCES[cfg.source]
    cls = getattr(datasets, cls_name)
    root = cache_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    how = _manual_instructions(cfg.source, cls, root)
    if cfg.source not in PER_PIXEL_MEAN:
        _gunzip_placed(root / cls.__name__ / "raw", [name for name, _ in cls.resources])

    def load(train: bool) -> tuple[np.ndarray, np.ndarray]:
        try:
            ds = cls(root=str(root), train=train, download=cfg.download)
        except (urllib.error.URLError, OSError, RuntimeError) as err:
            if cfg.download:
                raise DataError(
                    f"{cfg.source}: the download into {root} failed ({type(err).__name__}: {err}). "
                    f"To place the files by hand: {how}; then rerun."
                ) from None
            raise DataError(
                f"{cfg.source}: the files are missing or corrupt in {root} and download is false "
                f"({err}). Either set download: true, or {how}."
            ) from None
        x = np.asarray(ds.data)
        y = np.asarray(ds.targets, dtype=np.int64)
        # CIFAR comes as (N, H, W, C), MNIST as (N, H, W): store (N, C, H, W).
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if x.ndim == 4 else x[:, None, :, :]
        return x.astype(np.uint8, copy=False), y

    log(f"reading {cfg.source} from {root}")
    train_x, train_y = load(True)
    test_x, test_y = load(False)
    if cfg.source in PER_PIXEL_MEAN:
        folder = root / cls.base_folder
        files = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        urls = [cls.url]
    else:
        folder = root / cls.__name__ / "raw"
        files = [name.removesuffix(".gz") for name, _ in cls.resources]
        urls = [m + name for m in cls.mirrors for name, _ in cls.resources]
    return _Raw(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        kind="image",
        num_classes=num_classes,
        provenance={
            "torchvision_class": f"torchvision.datasets.{cls_name}",
            "torchvision_version": torchvision.__version__,
            "directory": str(folder),
            "files": files,
            "urls": urls,
        },
    )


def _ptb_fetch(cfg: DatasetConfig, log: Log, progress: bool) -> tuple[dict[str, Path], dict[str, str | None]]:
    """Local paths of ``ptb.{split}.txt`` (downloading them into the cache for a URL prefix)."""
    loc = cfg.ptb_location
    assert loc is not None  # DatasetConfig requires it for ptb
    names = {s: f"ptb.{s}.txt" for s in PTB_SPLITS}
    if "://" not in loc:
        directory = Path(os.path.expandvars(loc)).expanduser()
        paths = {s: directory / n for s, n in names.items()}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise DataError(
                f"ptb: missing {', '.join(missing)}. Put ptb.train.txt, ptb.valid.txt and ptb.test.txt "
                f"into {directory}/ (or set ptb_location to a directory or URL prefix holding them)."
            )
        return paths, {s: None for s in PTB_SPLITS}

    prefix = loc if loc.endswith("/") else loc + "/"
    # One cache folder per URL prefix, so two PTB variants never overwrite each other.
    cache = cache_root(cfg) / "ptb" / hashlib.sha256(prefix.encode()).hexdigest()[:16]
    paths = {s: cache / n for s, n in names.items()}
    urls: dict[str, str | None] = {s: prefix + n for s, n in names.items()}
    how = (
        f"put ptb.train.txt, ptb.valid.txt and ptb.test.txt into {cache}/ by hand "
        f"(or set ptb_location to a local directory holding them)"
    )
    for split, path in paths.items():
        expected = (cfg.ptb_sha256 or {}).get(split)
        if path.is_file() and (expected is None or sha256_file(path) == expected.lower()):
            continue
        url = urls[split]
        if not cfg.download:
            raise DataError(f"ptb: {path} is missing and download is false. Set download: true, or {how}.")
        log(f"downloading {url}")
        assert url is not None
        with atomic_path(path) as tmp:
            try:
                _download(url, tmp, names[split], progress)
            except (urllib.error.URLError, OSError, ValueError) as err:
                raise DataError(
                    f"ptb: the download of {url} failed ({type(err).__name__}: {err}). To fix: {how}."
                ) from None
    return paths, urls


def _download(url: str, dest: Path, desc: str, progress: bool) -> None:
    """Copy ``url`` into the file ``dest``, with a progress bar if asked."""
    with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as fh:
        total = resp.headers.get("Content-Length")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=int(total) if total else None, unit="B", unit_scale=True, desc=desc)
        try:
            while chunk := resp.read(1 << 16):
                fh.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()


def _ptb_tokens(path: Path) -> list[str]:
    """Words of one PTB file: whitespace-split, ``<eos>`` appended to every line."""
    tokens: list[str] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                tokens.extend(line.split())
                tokens.append(EOS)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    if len(tokens) == tokens.count(EOS):
        raise DataError(f"{path}: the file has no words (empty); replace it with the real PTB file")
    return tokens


def ptb_vocabulary(train_tokens: list[str], vocab_size: int, need_unk: Callable[[set[str]], bool]) -> list[str]:
    """The vocabulary: the ``vocab_size`` most frequent training words, most frequent first.

    Ties keep the order of first appearance. If the training set has more distinct words, the
    rest map to ``<unk>``, which then takes the last slot unless it is already among the
    kept words. ``need_unk(vocab)`` says whether other splits hold words outside ``vocab``;
    ``<unk>`` is then appended if room is left, else this raises :class:`DataError`.
    """
    ranked = [w for w, _ in Counter(train_tokens).most_common()]
    if len(ranked) > vocab_size:
        kept = ranked[:vocab_size]
        vocab = kept if UNK in kept else [*ranked[: vocab_size - 1], UNK]
    else:
        vocab = ranked
    if UNK not in vocab and need_unk(set(vocab)):
        if len(vocab) >= vocab_size:
            raise DataError(
                f"ptb: valid/test hold words unseen in training but the vocabulary is full "
                f"(vocab_size {vocab_size}) with no '{UNK}' slot; raise vocab_size by one"
            )
        vocab.append(UNK)
    return vocab


def _ptb_windows(ids: np.ndarray, bptt: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows of bptt+1 tokens: x (n, bptt) inputs, y (n, bptt) next tokens."""
    n = (len(ids) - 1) // bptt
    if n <= 0:
        raise DataError(f"{path}: {len(ids)} tokens, fewer than bptt+1 = {bptt + 1}: no example")
    x = ids[: n * bptt].reshape(n, bptt)
    y = ids[1 : n * bptt + 1].reshape(n, bptt)
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def _load_ptb(cfg: DatasetConfig, log: Log, progress: bool) -> _Raw:
    paths, urls = _ptb_fetch(cfg, log, progress)
    digests: dict[str, str] = {}
    for split, path in paths.items():
        digests[split] = sha256_file(path)
        expected = (cfg.ptb_sha256 or {}).get(split)
        if expected is not None and digests[split] != expected.lower():
            raise DataError(
                f"{path}: SHA-256 mismatch: expected {expected.lower()}, got {digests[split]}. "
                f"Replace the file (or fix ptb_sha256.{split})."
            )
    tokens = {s: _ptb_tokens(p) for s, p in paths.items()}
    if len(tokens["train"]) != cfg.ptb_train_tokens:
        raise DataError(
            f"{paths['train']}: {len(tokens['train'])} tokens (incl. {EOS}), but the config says "
            f"ptb_train_tokens = {cfg.ptb_train_tokens}; set ptb_train_tokens: {len(tokens['train'])}"
        )
    vocab = ptb_vocabulary(
        tokens["train"],
        cfg.vocab_size,
        lambda v: any(w not in v for s in ("valid", "test") for w in tokens[s]),
    )
    index = {w: i for i, w in enumerate(vocab)}
    unk = index.get(UNK, -1)
    xy: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in PTB_SPLITS:
        ids = np.fromiter((index.get(w, unk) for w in tokens[split]), dtype=np.int64, count=len(tokens[split]))
        xy[split] = _ptb_windows(ids, cfg.bptt, paths[split])
    log(f"PTB: vocabulary {len(vocab)}, train tokens {len(tokens['train'])}")
    return _Raw(
        train_x=xy["train"][0],
        train_y=xy["train"][1],
        valid_x=xy["valid"][0],
        valid_y=xy["valid"][1],
        test_x=xy["test"][0],
        test_y=xy["test"][1],
        kind="tokens",
        num_classes=len(vocab),
        provenance={
            "location": cfg.ptb_location,
            "files": {
                s: {"path": str(paths[s]), "url": urls[s], "sha256": digests[s], "tokens": len(tokens[s])}
                for s in PTB_SPLITS
            },
        },
        extra_meta={"vocab": vocab, "bptt": cfg.bptt},
    )


# ------------------------------------------------------------------------------------- prepare
def _image_norm(x: np.ndarray, per_pixel: bool, chunk: int = 4096) -> tuple[np.ndarray, float]:
    """(mean, std) of uint8 images x (N, C, H, W) in raw pixel units, in float64, by chunks.

    mean: (C, H, W) per pixel, or () global; std: the global std of ``x - mean``, so the
    normalised training set has unit variance overall.
    """
    n = len(x)
    total = np.zeros(x.shape[1:], dtype=np.float64)
    for i in range(0, n, chunk):
        total += x[i : i + chunk].sum(axis=0, dtype=np.float64)
    mean = total / n if per_pixel else np.asarray(total.sum() / (n * total.size))
    sq = 0.0
    for i in range(0, n, chunk):
        sq += float(np.square(x[i : i + chunk].astype(np.float64) - mean).sum())
    return mean, float(np.sqrt(sq / x.size))


def _check_labels(y: np.ndarray, num_classes: int, what: str) -> None:
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{what}: labels outside [0, {num_classes}): min {y.min()}, max {y.max()}")


def _read_source(cfg: DatasetConfig, log: Log, progress: bool) -> tuple[_Raw, str]:
    """The source as read, checked non-empty with labels in range; also how to name it in errors."""
    if cfg.source == "mnist1d":
        raw = _load_mnist1d(cfg, log)
    elif cfg.source == "ptb":
        raw = _load_ptb(cfg, log, progress)
    elif cfg.source == "synthetic_images":
        raw = _load_synthetic_images(cfg, log)
    elif cfg.source == "synthetic_text":
        raw = _load_synthetic_text(cfg, log)
    elif cfg.source in ("arrays", "text", "python"):
        log(f"reading your own data ({cfg.source}): {cfg.path or cfg.function}")
        raw = _Raw(**usersources.read_source(cfg))
    else:
        raw = _load_torchvision(cfg, log)
    src = raw.provenance.get("directory", cfg.source)
    if len(raw.train_y) == 0:
        raise DataError(f"{src}: the training set is empty")
    if len(raw.test_y) == 0:
        raise DataError(f"{src}: the test set is empty")
    if raw.kind != "tokens":  # (user sources check theirs, token ids too, in usersources.label_count)
        _check_labels(raw.train_y, raw.num_classes, f"{src} (train)")
        _check_labels(raw.test_y, raw.num_classes, f"{src} (test)")
    return raw, src


Splits = dict[str, tuple[np.ndarray, np.ndarray]]


def _split(cfg: DatasetConfig, raw: _Raw, rng: np.random.Generator, expected: int) -> Splits:
    """Train, valid and test; the rng's first draw permutes the source's training set."""
    n_source = len(raw.train_y)
    n_valid = cfg.default_valid_size()
    if n_valid >= n_source:
        raise DataError(
            f"{cfg.source}: valid_size {n_valid} leaves no training examples of the {n_source} in the source"
        )
    perm = rng.permutation(n_source)
    valid_idx, train_idx = perm[:n_valid], perm[n_valid:]
    if cfg.max_train is not None:
        train_idx = train_idx[: cfg.max_train]
    if len(train_idx) != expected:
        raise DataError(
            f"{cfg.source}: the data gives {len(train_idx)} training examples ({n_source} in the source, "
            f"{n_valid} to valid, max_train {cfg.max_train}) but the config expects cfg.train_size() = "
            f"{expected}, from which the checkpoint schedule is laid out. Fix: set max_train to at most "
            f"{n_source - n_valid}, or valid_size / ptb_train_tokens / mnist1d_samples (a multiple of 10) "
            f"to match the data."
        )
    splits = {
        "train": (raw.train_x[train_idx], raw.train_y[train_idx]),
        "valid": (raw.train_x[valid_idx], raw.train_y[valid_idx]),
        "test": (raw.test_x, raw.test_y),
    }
    if raw.valid_x is not None and raw.valid_y is not None and n_valid == 0:
        splits["valid"] = (raw.valid_x, raw.valid_y)
    return splits


def _normalise(
    cfg: DatasetConfig, raw: _Raw, splits: Splits, src: str
) -> tuple[Splits, dict[str, Any] | None, dict[str, np.ndarray] | None]:
    """Constants from the final train split: (splits, meta's ``normalization``, ``norm.npz`` arrays).

    Vectors are stored normalised; images raw, with their constants in ``norm.npz``; tokens as they are.
    """
    if raw.kind == "vector":
        tx = splits["train"][0]
        mean, std = float(tx.mean()), float(tx.std())
        if not std > 0:
            raise DataError(f"{src}: the training inputs are constant (std 0); cannot normalise")
        splits = {k: (((x - mean) / std).astype(np.float32), y) for k, (x, y) in splits.items()}
        normalization: dict[str, Any] = {
            "scheme": "global",
            "mean": mean,
            "std": std,
            "applied": True,
            "note": "x is stored normalised: (raw - mean) / std",
        }
        return splits, normalization, None
    if raw.kind != "image":
        return splits, None, None
    per_pixel = cfg.source in PER_PIXEL_MEAN
    mean_arr, std = _image_norm(splits["train"][0], per_pixel)
    if not std > 0:
        raise DataError(f"{src}: the training images are constant (std 0); cannot normalise")
    norm_arrays = {"mean": mean_arr.astype(np.float32), "std": np.asarray(std, dtype=np.float32)}
    normalization = {
        "scheme": "per_pixel_mean" if per_pixel else "global",
        "mean": float(mean_arr) if mean_arr.ndim == 0 else None,
        "mean_shape": list(mean_arr.shape),
        "mean_average": float(mean_arr.mean()),
        "std": std,
        "applied": False,
        "file": "norm.npz",
        "note": "x is stored raw (uint8, 0-255); loaders compute (x - mean) / std, "
        "mean and std from norm.npz in the same units",
    }
    return splits, normalization, norm_arrays


def _write_arrays(out: Path, npz_files: dict[str, dict[str, np.ndarray]]) -> dict[str, str]:
    """Write each ``{name}: arrays`` as ``out/name`` (C order, as ``np.savez``); return their SHA-256."""
    files: dict[str, str] = {}
    for name, arrays in npz_files.items():
        path = out / name
        write_npz(path, **{k: np.asarray(v, order="C") for k, v in arrays.items()})
        files[name] = sha256_file(path)
    return files


def prepare(cfg: DatasetConfig, out_dir: str | Path, *, progress: bool = True, log: Log = print) -> dict[str, Any]:
    """Prepare one dataset into ``out_dir`` (see the module docstring for the files); return its meta.

    Raises :class:`DataError` for anything the user must fix: a failed download, missing or
    corrupt files, a training set whose size differs from ``cfg.train_size()`` (which the
    Snakefile relies on), or a Hessian subset larger than the training set.
    """
    out = Path(out_dir)
    if not 0 <= cfg.seed < 2**32:
        raise DataError(f"seed {cfg.seed}: data seeds must be in [0, 2**32)")
    try:
        expected = cfg.train_size()
    except ValueError as err:
        raise DataError(f"{cfg.source}: {err}") from None
    if cfg.hessian_subset > expected:
        raise DataError(
            f"hessian_subset = {cfg.hessian_subset} exceeds the {expected} training examples; "
            f"lower hessian_subset to at most {expected}"
        )
    out.mkdir(parents=True, exist_ok=True)
    # A stale meta.json would mark a half-rewritten directory as complete.
    (out / "meta.json").unlink(missing_ok=True)

    raw, src = _read_source(cfg, log, progress)
    rng = np.random.default_rng(cfg.seed)
    splits = _split(cfg, raw, rng, expected)
    # The second draw: the Hessian subset.
    hessian_idx = rng.choice(len(splits["train"][1]), size=cfg.hessian_subset, replace=False).astype(np.int64)
    splits, normalization, norm_arrays = _normalise(cfg, raw, splits, src)

    npz_files = {f"{name}.npz": {"x": x, "y": y} for name, (x, y) in splits.items()}
    npz_files["hessian.npz"] = {"idx": hessian_idx}
    if norm_arrays is not None:
        npz_files["norm.npz"] = norm_arrays
    files = _write_arrays(out, npz_files)

    train_x = splits["train"][0]
    meta: dict[str, Any] = {
        "format_version": DATA_FORMAT_VERSION,
        "source": cfg.source,
        "kind": raw.kind,
        "num_classes": raw.num_classes,
        "input_shape": list(train_x.shape[1:]),
        "split_sizes": {k: len(y) for k, (_, y) in splits.items()},
        "shapes": {k: {"x": list(x.shape), "y": list(y.shape)} for k, (x, y) in splits.items()},
        "dtypes": {"x": str(train_x.dtype), "y": str(splits["train"][1].dtype)},
        "hessian_subset": int(cfg.hessian_subset),
        "seed": cfg.seed,
        "normalization": normalization,
        "files": files,
        "provenance": raw.provenance,
        "config": cfg.model_dump(mode="json"),
        **raw.extra_meta,
    }
    write_text(out / "meta.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
    sizes = meta["split_sizes"]
    log(f"prepared {cfg.source} in {out}: train {sizes['train']}, valid {sizes['valid']}, test {sizes['test']}")
    return meta


# ---------------------------------------------------------------------------------------- load
@dataclass
class Split:
    """One split on a device: x (N, *input_shape), y (N,) class ids or (N, bptt) next-token ids."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    """A prepared dataset, loaded once onto a device."""

    train: Split
    valid: Split
    test: Split
    hessian_idx: Tensor  # (N,) int64 indices into train
    meta: dict[str, Any]
    kind: str  # "image" | "vector" | "tokens"
    input_shape: tuple[int, ...]
    num_classes: int  # classes, or the vocabulary size for tokens


def _redo(data_dir: Path) -> str:
    return f"rerun `sharpflow prepare` (delete {data_dir} first)"


def _read_npz(path: Path, names: tuple[str, ...], data_dir: Path) -> dict[str, np.ndarray]:
    """The arrays ``names`` of a prepared file; a missing or unreadable one says how to redo it."""
    try:
        arrays = read_npz(path)
    except SharpflowError as err:
        if not path.exists():
            raise DataError(f"{path}: missing; {_redo(data_dir)}") from None
        raise DataError(f"{err}; {_redo(data_dir)}") from None
    absent = [n for n in names if n not in arrays]
    if absent:
        raise DataError(f"{path}: unreadable or corrupt (no arrays {absent}); {_redo(data_dir)}")
    return {n: arrays[n] for n in names}


def load_prepared(data_dir: str | Path, device: str | torch.device = "cpu", *, verify: bool = True) -> Dataset:
    """Load a directory written by :func:`prepare` onto ``device``, once, as tensors.

    Images become normalised float32 (N, C, H, W) (``(x - mean) / std`` with the constants of
    ``norm.npz``); MNIST-1D is float32 (N, 40) as stored; tokens are int64 (N, bptt). Labels
    are int64. ``verify`` checks every file's SHA-256 against ``meta.json`` first.
    """
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{data_dir}: not prepared (no meta.json); run `sharpflow prepare` for it")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        files: dict[str, str] = meta["files"]
        kind: str = meta["kind"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{meta_path}: corrupt ({err}); {_redo(data_dir)}") from None
    if meta.get("format_version") != DATA_FORMAT_VERSION:
        raise DataError(
            f"{meta_path}: data format version {meta.get('format_version')}, this sharpflow reads "
            f"{DATA_FORMAT_VERSION}; {_redo(data_dir)}"
        )
    if verify:
        for name, digest in files.items():
            path = data_dir / name
            if not path.is_file():
                raise DataError(f"{path}: missing; {_redo(data_dir)}")
            if sha256_file(path) != digest:
                raise DataError(f"{path}: SHA-256 differs from meta.json (corrupt or changed); {_redo(data_dir)}")

    dev = torch.device(device)
    norm = None
    if kind == "image":
        arr = _read_npz(data_dir / "norm.npz", ("mean", "std"), data_dir)
        norm = (
            torch.from_numpy(arr["mean"]).to(dev, torch.float32),
            torch.from_numpy(arr["std"]).to(dev, torch.float32),
        )

    def split(name: str) -> Split:
        arr = _read_npz(data_dir / f"{name}.npz", ("x", "y"), data_dir)
        if len(arr["x"]) != len(arr["y"]):
            raise DataError(f"{data_dir / name}.npz: x and y lengths differ; {_redo(data_dir)}")
        # Move the compact stored dtype (uint8 for images) and convert on the device.
        x = torch.from_numpy(arr["x"]).to(dev)
        if norm is not None:
            x = x.to(torch.float32).sub_(norm[0]).div_(norm[1])
        return Split(x=x, y=torch.from_numpy(arr["y"]).to(dev, torch.int64))

    train, valid, test = split("train"), split("valid"), split("test")
    idx = _read_npz(data_dir / "hessian.npz", ("idx",), data_dir)["idx"]
    if idx.size and (idx.min() < 0 or idx.max() >= len(train)):
        raise DataError(f"{data_dir / 'hessian.npz'}: indices outside the training set; {_redo(data_dir)}")
    return Dataset(
        train=train,
        valid=valid,
        test=test,
        hessian_idx=torch.from_numpy(idx).to(dev, torch.int64),
        meta=meta,
        kind=kind,
        input_shape=tuple(meta["input_shape"]),
        num_classes=int(meta["num_classes"]),
    )


@dataclass(frozen=True)
class TrainView:
    """The part of the training set a run trains on, and its mini-batch size."""

    x: Tensor  # the examples the run trains on (the first ``run.train_subset``, or all)
    y: Tensor
    n: int  # len(x)
    batch_size: int  # the run's mini-batch size (n for "full", capped at n)

    @property
    def steps_per_epoch(self) -> int:
        """Updates per epoch, as :func:`sharpflow.config.steps_per_epoch` counts them."""
        return max(1, -(-self.n // self.batch_size))

    def random_batches(self, count: int, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
        """``count`` mini-batches of the run's size, each drawn without replacement (one
        ``randperm`` of the examples per batch, from ``generator``)."""
        idx = torch.stack([torch.randperm(self.n, generator=generator)[: self.batch_size] for _ in range(count)])
        idx = idx.to(self.x.device)
        return [(self.x[i], self.y[i]) for i in idx]


def train_view(run: RunConfig, data: Dataset) -> TrainView:
    """The examples ``run`` trains on (``train_subset`` keeps the first n) and its batch size."""
    n = run.train_subset or len(data.train.x)
    bs = run.optimizer.batch_size
    return TrainView(
        x=data.train.x[:n], y=data.train.y[:n], n=n, batch_size=n if bs == "full" else min(bs, n)
    )


def hessian_batches(data: Dataset, n: int, batch_size: int = 512) -> list[tuple[Tensor, Tensor]]:
    """The first ``n`` examples of the prepared Hessian subset, as batches."""
    idx = data.hessian_idx[:n]
    if len(idx) < n:
        raise SharpflowError(f"the Hessian subset has {len(idx)} examples, {n} were asked for")
    x, y = data.train.x[idx], data.train.y[idx]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


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
