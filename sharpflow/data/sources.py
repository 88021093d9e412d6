"""Reading each source (MNIST-1D, torchvision, PTB, the stand-ins, your own data) and the downloads:
one raw train/test set with its kind, classes and provenance, for :mod:`.preparation`."""

from __future__ import annotations

import gzip
import hashlib
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

from sharpflow import synthetic, usersources
from sharpflow.config import FORMAT_VERSION, DatasetConfig
from sharpflow.errors import DataError
from sharpflow.io import atomic_path, sha256_file

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


def _check_labels(y: np.ndarray, num_classes: int, what: str) -> None:
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{what}: labels outside [0, {num_classes}): min {y.min()}, max {y.max()}")


def read_source(cfg: DatasetConfig, log: Log, progress: bool) -> tuple[_Raw, str]:
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
