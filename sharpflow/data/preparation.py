"""``prepare``: a source, read (:mod:`.sources`), split, sub-sampled for the Hessian, normalised and
written atomically with its checksums into ``results/data/{dataset}/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sharpflow.config import DatasetConfig
from sharpflow.errors import DataError
from sharpflow.io import sha256_file, write_npz, write_text

from .sources import DATA_FORMAT_VERSION, PER_PIXEL_MEAN, Log, _Raw, read_source


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

    raw, src = read_source(cfg, log, progress)
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
