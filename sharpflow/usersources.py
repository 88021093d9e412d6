"""The user's own data: reading the sources ``arrays``, ``text`` and ``python``, checked.

- ``arrays``: a local ``.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test`` (and optionally
  ``x_valid``, ``y_valid``): images (N, C, H, W), sequences or features (N, ...), with integer
  labels (N,) or next-token targets shaped like x (N, T);
- ``text``: a UTF-8 text file, or a directory of ``*.txt`` files read in name order, tokenised at
  character or word level (words: whitespace-split, ``<eos>`` at every line end), split by position
  into train/valid/test and cut into windows of ``bptt`` + 1 tokens, like PTB;
- ``python``: ``"package.module:function"`` called with no arguments, returning a mapping with the
  ``arrays`` keys (for a HuggingFace dataset already on disk, a simulator, anything else).

Every problem raises :class:`~sharpflow.errors.DataError` in one line naming the file (or the
function) and the fix. Only numpy and the standard library: :class:`sharpflow.config.DatasetConfig`
reads the training-set size from here when a config is validated (the Snakefile lays out every
checkpoint from it), and ``prepare`` reads the data itself.
"""

from __future__ import annotations

import importlib
import math
import zipfile
from collections import Counter
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
VALID_KEYS = ("x_valid", "y_valid")
EOS, UNK = "<eos>", "<unk>"


# ----------------------------------------------------------------------------------------- arrays
def _existing(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such {what}; check the dataset's path")
    return p


@lru_cache(maxsize=16)
def _npz_sizes(path: str, mtime_ns: int, size: int) -> tuple[int, bool]:
    arrays = _open_npz(Path(path))
    return len(arrays["y_train"]), VALID_KEYS[0] in arrays.files


def _open_npz(path: Path) -> Mapping[str, np.ndarray]:
    if path.is_file() and not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a readable .npz file (not a zip archive: truncated or another format); "
                        "write it with numpy.savez")
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz file ({type(err).__name__}: {err}); "
                        "write it with numpy.savez") from None
    if not hasattr(arrays, "files"):
        raise DataError(f"{path}: a single .npy array, not an .npz with {', '.join(ARRAY_KEYS)}; "
                        "write it with numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
    missing = [k for k in ARRAY_KEYS if k not in arrays.files]
    if missing:
        raise DataError(f"{path}: no array {', '.join(missing)} (it has {', '.join(arrays.files) or 'none'}); "
                        f"an arrays source needs {', '.join(ARRAY_KEYS)}")
    return arrays


def npz_sizes(path: str | Path) -> tuple[int, bool]:
    """The training examples of an ``arrays`` file and whether it has its own validation arrays
    (read once per version of the file)."""
    p = _existing(path, "file")
    st = p.stat()
    return _npz_sizes(str(p.resolve()), st.st_mtime_ns, st.st_size)


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an ``arrays`` source, checked (:func:`check_arrays`)."""
    p = _existing(path, "file")
    arrays = _open_npz(p)
    try:
        out = {k: np.asarray(arrays[k]) for k in (*ARRAY_KEYS, *VALID_KEYS) if k in arrays.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{p}: an array cannot be read ({err}); the file may be truncated: write it again") from None
    return check_arrays(out, str(p))


def call_function(spec: str) -> dict[str, np.ndarray]:
    """Import ``package.module:function``, call it and check what it returns."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise DataError(f"function {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure of user code is the user's to fix
        raise DataError(f"function {spec!r}: cannot import {module_name!r} ({type(err).__name__}: {err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DataError(f"function {spec!r}: {module_name!r} has no callable {attr!r}")
    try:
        out = fn()
    except Exception as err:
        raise DataError(f"function {spec!r} failed: {type(err).__name__}: {err}") from None
    if not isinstance(out, Mapping):
        raise DataError(f"function {spec!r} returned {type(out).__name__}; return a dict with "
                        f"{', '.join(ARRAY_KEYS)}")
    missing = [k for k in ARRAY_KEYS if k not in out]
    if missing:
        raise DataError(f"function {spec!r}: the result has no {', '.join(missing)}; return a dict with "
                        f"{', '.join(ARRAY_KEYS)}")
    try:
        arrays = {k: np.asarray(out[k]) for k in (*ARRAY_KEYS, *VALID_KEYS) if k in out}
    except Exception as err:
        raise DataError(f"function {spec!r}: a returned value is not an array ({err})") from None
    return check_arrays(arrays, f"function {spec!r}")


def check_arrays(arrays: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Matching lengths, integer labels, consistent example shapes; valid arrays both or neither."""
    if (VALID_KEYS[0] in arrays) != (VALID_KEYS[1] in arrays):
        raise DataError(f"{where}: give both x_valid and y_valid, or neither")
    shape = None
    for split in ("train", "valid", "test"):
        if f"x_{split}" not in arrays:
            continue
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim < 2:
            raise DataError(f"{where}: x_{split} has shape {x.shape}; it needs one row per example (N, ...)")
        if len(x) != len(y):
            raise DataError(f"{where}: x_{split} has {len(x)} examples but y_{split} {len(y)}")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{where}: y_{split} is {y.dtype}; labels must be integers (class ids or token ids)")
        if y.ndim not in (1, 2) or (y.ndim == 2 and y.shape != x.shape):
            raise DataError(f"{where}: y_{split} has shape {y.shape}; use (N,) class labels or next-token "
                            f"targets shaped like x_{split} {x.shape}")
        if shape is not None and x.shape[1:] != shape:
            raise DataError(f"{where}: x_{split} examples are {x.shape[1:]}, x_train's {shape}")
        if x.dtype.kind not in "biuf":
            raise DataError(f"{where}: x_{split} is {x.dtype}; use numbers")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise DataError(f"{where}: x_{split} holds NaN or inf")
        shape = x.shape[1:]
    if len(arrays["y_train"]) == 0:
        raise DataError(f"{where}: x_train is empty")
    if len(arrays["y_test"]) == 0:
        raise DataError(f"{where}: x_test is empty")
    return arrays


def array_kind(arrays: dict[str, np.ndarray]) -> str:
    """``tokens`` (integer x with targets shaped like it), ``image`` (uint8 (N, C, H, W)) or ``vector``."""
    x, y = arrays["x_train"], arrays["y_train"]
    if y.ndim == 2:
        if not np.issubdtype(x.dtype, np.integer):
            raise DataError(f"next-token targets need integer token ids in x_train, got {x.dtype}")
        return "tokens"
    return "image" if x.dtype == np.uint8 and x.ndim == 4 else "vector"


def label_count(arrays: dict[str, np.ndarray], num_classes: int | None, where: str) -> int:
    """The classes (or the vocabulary): ``num_classes`` if given, else the largest label + 1; every
    label (and, for tokens, every input id) must lie in [0, that)."""
    tokens = arrays["y_train"].ndim == 2
    ids = [arrays[k] for k in arrays if k.startswith("y_") or (tokens and k.startswith("x_"))]
    lo = min(int(a.min()) for a in ids if a.size)
    hi = max(int(a.max()) for a in ids if a.size)
    n = int(num_classes) if num_classes is not None else hi + 1
    if lo < 0 or hi >= n:
        what = "token ids" if tokens else "labels"
        raise DataError(f"{where}: {what} outside [0, {n}): min {lo}, max {hi}"
                        + ("; raise num_classes" if num_classes is not None else ""))
    if n < 2:
        raise DataError(f"{where}: one class only ({n}); a classifier needs at least 2")
    return n


# ------------------------------------------------------------------------------------------- text
def _text_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"{path}: a directory without *.txt files; put the corpus in .txt files there")
        return files
    return [path]


def tokenize(path: str | Path, level: str) -> list[str]:
    """The tokens of a text source: characters, or whitespace-split words with ``<eos>`` per line."""
    tokens: list[str] = []
    for f in _text_files(_existing(path, "file or directory")):
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{f}: not UTF-8 text ({err}); convert it to UTF-8") from None
        if level == "char":
            tokens.extend(text)
        else:
            for line in text.splitlines():
                tokens.extend(line.split())
                tokens.append(EOS)
    if not [t for t in tokens if t != EOS]:
        raise DataError(f"{path}: no text (empty)")
    return tokens


def text_split_lengths(n_tokens: int, valid_fraction: float, test_fraction: float) -> dict[str, int]:
    """Tokens per split, by position: train first, then valid, then test."""
    n_valid = math.floor(n_tokens * valid_fraction)
    n_test = math.floor(n_tokens * test_fraction)
    return {"train": n_tokens - n_valid - n_test, "valid": n_valid, "test": n_test}


@lru_cache(maxsize=16)
def _text_token_count(path: str, level: str, stamp: tuple[tuple[str, int, int], ...]) -> int:
    return len(tokenize(path, level))


def text_token_count(path: str | Path, level: str) -> int:
    """The number of tokens of a text source (tokenised once per version of its files)."""
    p = _existing(path, "file or directory")
    stamp = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in _text_files(p))
    return _text_token_count(str(p.resolve()), level, stamp)


def text_vocabulary(train: list[str], vocab_size: int) -> list[str]:
    """The ``vocab_size`` most frequent training tokens (ties: first appearance) and ``<unk>`` last
    for everything else, which takes the last slot when the training split has more."""
    ranked = [w for w, _ in Counter(train).most_common()]
    if len(ranked) >= vocab_size:
        return [*ranked[: vocab_size - 1], UNK]
    return [*ranked, UNK]


def text_windows(ids: np.ndarray, bptt: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows: x (n, bptt) and y, x shifted by one token."""
    n = (len(ids) - 1) // bptt
    if n <= 0:
        raise DataError(f"{where}: {len(ids)} tokens, fewer than bptt + 1 = {bptt + 1}; lower bptt or "
                        "give a larger share of the text to this split")
    return (np.ascontiguousarray(ids[: n * bptt].reshape(n, bptt)),
            np.ascontiguousarray(ids[1 : n * bptt + 1].reshape(n, bptt)))


def read_text(path: str | Path, level: str, vocab_size: int, bptt: int, valid_fraction: float,
              test_fraction: float) -> tuple[dict[str, np.ndarray], list[str], dict[str, int]]:
    """The windows of each split (keys as an ``arrays`` source), the vocabulary, tokens per split."""
    tokens = tokenize(path, level)
    lengths = text_split_lengths(len(tokens), valid_fraction, test_fraction)
    bounds = np.cumsum([0, lengths["train"], lengths["valid"], lengths["test"]])
    parts = {s: tokens[bounds[i] : bounds[i + 1]] for i, s in enumerate(("train", "valid", "test"))}
    vocab = text_vocabulary(parts["train"], vocab_size)
    index = {w: i for i, w in enumerate(vocab)}
    unk = index[UNK]
    out: dict[str, np.ndarray] = {}
    for split, toks in parts.items():
        ids = np.fromiter((index.get(t, unk) for t in toks), dtype=np.int64, count=len(toks))
        out[f"x_{split}"], out[f"y_{split}"] = text_windows(ids, bptt, f"{path} ({split} split)")
    return out, vocab, lengths


def train_examples(source: str, path: str | None, function: str | None, level: str, bptt: int,
                   valid_fraction: float, test_fraction: float, given: int | None) -> int:
    """Training examples a user source gives, before the validation split: ``given`` if set (required
    for ``python``: calling a function to lay out a workflow would be too slow), else read from the data."""
    if given is not None:
        return given
    if source == "arrays":
        return npz_sizes(str(path))[0]
    if source == "text":
        n = text_split_lengths(text_token_count(str(path), level), valid_fraction, test_fraction)["train"]
        return max(0, (n - 1) // bptt)
    raise DataError(f"function {function!r}: a python source needs train_examples, the number of training "
                    "examples the function returns (the workflow lays out the checkpoints from it)")


# ------------------------------------------------------------------------------------- one source
def read_source(cfg: Any) -> dict[str, Any]:
    """A user source (``cfg``: its :class:`~sharpflow.config.DatasetConfig`) as the fields of the
    prepare stage's raw source: the arrays, kind, classes, provenance (the file's SHA-256, the
    function, the tokens per split) and what goes into ``meta.json`` beside them."""
    from .io import sha256_file as sha256  # pandas: kept out of what the config (and the Snakefile) imports

    extra: dict[str, Any] = {}
    if cfg.source == "text":
        arrays, vocab, lengths = read_text(cfg.path, cfg.tokenizer, cfg.vocab_size, cfg.bptt, cfg.valid_fraction,
                                           cfg.test_fraction)
        files = _text_files(Path(cfg.path).expanduser())
        provenance: dict[str, Any] = {"path": str(cfg.path), "tokenizer": cfg.tokenizer, "tokens": lengths,
                                      "files": {str(f): sha256(f) for f in files}}
        where, kind, n = str(cfg.path), "tokens", len(vocab)
        extra = {"vocab": vocab, "bptt": cfg.bptt}
    else:
        if cfg.source == "arrays":
            arrays, where = read_arrays(cfg.path), str(cfg.path)
            provenance = {"path": where, "sha256": sha256(Path(cfg.path).expanduser())}
        else:
            arrays, where = call_function(cfg.function), f"function {cfg.function!r}"
            provenance = {"function": cfg.function}
        kind = array_kind(arrays)
        n = label_count(arrays, cfg.num_classes, where)
    return {"train_x": arrays["x_train"], "train_y": arrays["y_train"], "test_x": arrays["x_test"],
            "test_y": arrays["y_test"], "valid_x": arrays.get("x_valid"), "valid_y": arrays.get("y_valid"),
            "kind": kind, "num_classes": n, "provenance": {**provenance, "directory": where}, "extra_meta": extra}


__all__ = ["ARRAY_KEYS", "EOS", "UNK", "VALID_KEYS", "array_kind", "call_function", "check_arrays", "label_count",
           "read_arrays", "read_source", "read_text", "text_token_count", "tokenize", "train_examples"]
