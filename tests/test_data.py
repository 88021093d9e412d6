"""Data preparation, loading and augmentation, on small files the tests make (fully offline).

Sizes: the real sources' sizes are fixed in ``DatasetConfig.train_size()`` (50000 CIFAR images,
60000 MNIST). Fake sources are tiny, so these tests set ``max_train`` (and ``valid_size``) so
that ``min(full - valid, max_train)`` equals what the tiny source really gives — the same
arithmetic a user relies on to train on a subset — and check the mismatch error without it.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import pickle
import socket
import struct
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from sharpflow.config import DatasetConfig
from sharpflow.data import DataError, augment, load_prepared, prepare, shift_flip


def quiet(_msg: str) -> None:
    pass


def npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------------- MNIST-1D
def mnist1d_cfg(**kw) -> DatasetConfig:
    base = {"source": "mnist1d", "mnist1d_samples": 500, "valid_size": 50, "hessian_subset": 64}
    return DatasetConfig(**(base | kw))


@pytest.fixture(scope="module")
def mnist1d_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mnist1d")
    prepare(mnist1d_cfg(), out, progress=False, log=quiet)
    return out


def test_mnist1d_files_shapes_split_and_normalisation(mnist1d_dir: Path) -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    cfg = mnist1d_cfg()
    for name in ("train.npz", "valid.npz", "test.npz", "hessian.npz", "meta.json"):
        assert (mnist1d_dir / name).is_file()
    tr, va, te = (npz(mnist1d_dir / f"{s}.npz") for s in ("train", "valid", "test"))
    assert len(tr["y"]) == cfg.train_size() == 350
    assert tr["x"].shape == (350, 40) and va["x"].shape == (50, 40) and te["x"].shape == (100, 40)
    assert tr["x"].dtype == np.float32 and tr["y"].dtype == np.int64

    # Independent truth: the package's own output, split as the documented contract says.
    args = get_dataset_args()
    args.num_samples, args.seed = 500, cfg.seed
    raw = make_dataset(args)
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(400)
    raw_train = raw["x"][perm[50:]]
    mean, std = raw_train.mean(), raw_train.std()
    np.testing.assert_allclose(tr["x"], (raw_train - mean) / std, atol=1e-5)
    np.testing.assert_array_equal(tr["y"], raw["y"][perm[50:]])
    np.testing.assert_allclose(va["x"], (raw["x"][perm[:50]] - mean) / std, atol=1e-5)
    np.testing.assert_allclose(te["x"], (raw["x_test"] - mean) / std, atol=1e-5)
    np.testing.assert_array_equal(te["y"], raw["y_test"])
    # Train normalised by its own statistics.
    assert abs(tr["x"].astype(np.float64).mean()) < 1e-5
    assert abs(tr["x"].astype(np.float64).std() - 1) < 1e-5

    idx = npz(mnist1d_dir / "hessian.npz")["idx"]
    assert idx.dtype == np.int64 and len(idx) == 64 and len(np.unique(idx)) == 64
    assert idx.min() >= 0 and idx.max() < 350
    np.testing.assert_array_equal(idx, rng.choice(350, size=64, replace=False))


def test_mnist1d_meta(mnist1d_dir: Path) -> None:
    import json

    meta = json.loads((mnist1d_dir / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["source"] == "mnist1d" and meta["kind"] == "vector"
    assert meta["num_classes"] == 10 and meta["input_shape"] == [40]
    assert meta["split_sizes"] == {"train": 350, "valid": 50, "test": 100}
    assert meta["shapes"]["test"] == {"x": [100, 40], "y": [100]}
    assert meta["dtypes"] == {"x": "float32", "y": "int64"}
    assert meta["seed"] == 0 and meta["hessian_subset"] == 64
    assert meta["normalization"]["applied"] is True and meta["normalization"]["std"] > 0
    assert set(meta["files"]) == {"train.npz", "valid.npz", "test.npz", "hessian.npz"}
    for name, digest in meta["files"].items():
        assert hashlib.sha256((mnist1d_dir / name).read_bytes()).hexdigest() == digest
    assert meta["provenance"]["args"]["num_samples"] == 500


def test_mnist1d_deterministic_and_seeded(tmp_path: Path, mnist1d_dir: Path) -> None:
    state = np.random.get_state()
    prepare(mnist1d_cfg(), tmp_path / "again", progress=False, log=quiet)
    # mnist1d reseeds numpy's global generator; prepare must hand it back untouched.
    assert np.array_equal(np.random.get_state()[1], state[1])
    for name in ("train.npz", "valid.npz", "test.npz", "hessian.npz", "meta.json"):
        assert (tmp_path / "again" / name).read_bytes() == (mnist1d_dir / name).read_bytes(), name
    prepare(mnist1d_cfg(seed=1), tmp_path / "seed1", progress=False, log=quiet)
    for name in ("train.npz", "hessian.npz"):
        assert (tmp_path / "seed1" / name).read_bytes() != (mnist1d_dir / name).read_bytes(), name


def test_hessian_subset_too_large(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"hessian_subset = 351 exceeds the 350"):
        prepare(mnist1d_cfg(hessian_subset=351), tmp_path, progress=False, log=quiet)
    assert not (tmp_path / "meta.json").exists()


def test_train_size_mismatch_names_both_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 505 samples: mnist1d makes 50 per class (500), so 400 - 50 = 350 train, which the config knows.
    cfg = mnist1d_cfg(mnist1d_samples=505)
    assert cfg.train_size() == 350
    # A config that expects another size (as a changed upstream generator would) is refused.
    monkeypatch.setattr(type(cfg), "train_size", lambda self: 354)
    with pytest.raises(DataError, match=r"gives 350 training.*train_size\(\) = 354"):
        prepare(cfg, tmp_path, progress=False, log=quiet)
    assert not (tmp_path / "meta.json").exists()


# -------------------------------------------------------------------------------------- CIFAR
def write_cifar(root: Path, hundred: bool, n_per_batch: int = 8, n_test: int = 10) -> tuple[np.ndarray, ...]:
    """A fake torchvision CIFAR folder: rows (n, 3072) channel-major uint8, str keys as in the real pickles."""
    rng = np.random.default_rng(123)
    key = "fine_labels" if hundred else "labels"
    k = 100 if hundred else 10
    batches = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    n_train = n_per_batch * 5
    x = rng.integers(0, 256, size=(n_train + n_test, 3072), dtype=np.uint8)
    y = rng.integers(0, k, size=n_train + n_test)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    chunks = np.array_split(np.arange(n_train), len(batches))
    for name, rows in zip(batches, chunks, strict=True):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": x[rows], key: y[rows].tolist()}, f, protocol=2)
    with open(folder / ("test" if hundred else "test_batch"), "wb") as f:
        pickle.dump({"data": x[n_train:], key: y[n_train:].tolist()}, f, protocol=2)
    meta_key = "fine_label_names" if hundred else "label_names"
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump({meta_key: [f"c{i}" for i in range(k)]}, f, protocol=2)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks the real files' MD5 sums; the fakes pass on existence alone."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_prepare_and_load(tmp_path: Path, no_md5: None, hundred: bool) -> None:
    cache = tmp_path / "cache"
    trx, try_, tex, tey = write_cifar(cache, hundred)
    source = "cifar100" if hundred else "cifar10"
    cfg = DatasetConfig(
        source=source, cache_dir=str(cache), download=False, valid_size=10, max_train=20, hessian_subset=8, seed=3
    )
    assert cfg.train_size() == 20
    meta = prepare(cfg, tmp_path / "out", progress=False, log=quiet)
    assert meta["kind"] == "image" and meta["input_shape"] == [3, 32, 32]
    assert meta["num_classes"] == (100 if hundred else 10)
    assert meta["split_sizes"] == {"train": 20, "valid": 10, "test": 10}

    perm = np.random.default_rng(3).permutation(40)
    tr = npz(tmp_path / "out" / "train.npz")
    assert tr["x"].dtype == np.uint8 and tr["x"].shape == (20, 3, 32, 32)
    # torchvision's pixel order is channel-major: row -> (3, 32, 32).
    np.testing.assert_array_equal(tr["x"], trx[perm[10:30]].reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(tr["y"], try_[perm[10:30]])
    te = npz(tmp_path / "out" / "test.npz")
    np.testing.assert_array_equal(te["x"], tex.reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(te["y"], tey)

    # Per-pixel mean and global std of the centred train split, in 0-255 units.
    rows = trx[perm[10:30]].reshape(-1, 3, 32, 32).astype(np.float64)
    mean = rows.mean(axis=0)
    std = (rows - mean).std()
    norm = npz(tmp_path / "out" / "norm.npz")
    assert norm["mean"].shape == (3, 32, 32)
    np.testing.assert_allclose(norm["mean"], mean, rtol=1e-6)
    assert abs(float(norm["std"]) - std) < 1e-4 and abs(meta["normalization"]["std"] - std) < 1e-9

    ds = load_prepared(tmp_path / "out")
    assert ds.kind == "image" and ds.input_shape == (3, 32, 32) and len(ds.train) == 20
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    x = ds.train.x.double()
    assert x.mean(0).abs().max() < 1e-5 and abs(x.std(unbiased=False) - 1) < 1e-5
    np.testing.assert_allclose(ds.test.x.numpy(), (tex.reshape(-1, 3, 32, 32) - mean) / std, atol=1e-4)


def test_cifar_train_size_mismatch(tmp_path: Path, no_md5: None) -> None:
    write_cifar(tmp_path, hundred=False)
    cfg = DatasetConfig(source="cifar10", cache_dir=str(tmp_path), download=False, valid_size=10, hessian_subset=8)
    with pytest.raises(DataError, match=r"gives 30 training.*= 49990.*max_train"):
        prepare(cfg, tmp_path / "out", progress=False, log=quiet)


def test_cifar_bad_checksum_is_reported(tmp_path: Path) -> None:
    """Without the test patch, torchvision's MD5 check rejects the fake files: a DataError naming the folder."""
    write_cifar(tmp_path, hundred=False)
    cfg = DatasetConfig(
        source="cifar10", cache_dir=str(tmp_path), download=False, valid_size=10, max_train=20, hessian_subset=8
    )
    with pytest.raises(DataError, match=r"missing or corrupt.*cifar-10-batches-py.*data_batch_1"):
        prepare(cfg, tmp_path / "out", progress=False, log=quiet)


# -------------------------------------------------------------------------------------- MNIST
def idx_bytes(arr: np.ndarray) -> bytes:
    """The idx-ubyte format: magic (0, 0, type 0x08 = ubyte, ndim), big-endian int32 dims, data."""
    head = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def write_mnist(raw: Path, gz: bool, n_train: int = 30, n_test: int = 10) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(7)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=n_test),
    }
    raw.mkdir(parents=True)
    for name, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            (raw / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (raw / name).write_bytes(data)
    return tuple(arrays.values())


@pytest.mark.parametrize(
    ("source", "folder", "gz"), [("mnist", "MNIST", False), ("fashion_mnist", "FashionMNIST", True)]
)
def test_mnist_prepare_and_load(tmp_path: Path, source: str, folder: str, gz: bool) -> None:
    trx, try_, tex, _ = write_mnist(tmp_path / "cache" / folder / "raw", gz)
    cfg = DatasetConfig(
        source=source, cache_dir=str(tmp_path / "cache"), download=False, valid_size=5, max_train=20, hessian_subset=10
    )
    meta = prepare(cfg, tmp_path / "out", progress=False, log=quiet)
    assert meta["input_shape"] == [1, 28, 28] and meta["split_sizes"] == {"train": 20, "valid": 5, "test": 10}
    perm = np.random.default_rng(0).permutation(30)
    tr = npz(tmp_path / "out" / "train.npz")
    assert tr["x"].shape == (20, 1, 28, 28) and tr["x"].dtype == np.uint8
    np.testing.assert_array_equal(tr["x"][:, 0], trx[perm[5:25]])
    np.testing.assert_array_equal(tr["y"], try_[perm[5:25]])
    rows = trx[perm[5:25]].astype(np.float64)
    assert meta["normalization"]["scheme"] == "global"
    assert abs(meta["normalization"]["mean"] - rows.mean()) < 1e-9
    assert abs(meta["normalization"]["std"] - rows.std()) < 1e-9
    ds = load_prepared(tmp_path / "out")
    np.testing.assert_allclose(ds.test.x[:, 0].numpy(), (tex - rows.mean()) / rows.std(), atol=1e-4)


# ---------------------------------------------------------------------------- download failure
@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.mark.parametrize(("source", "where"), [("cifar10", "cifar-10-batches-py"), ("mnist", "MNIST/raw")])
def test_download_failure_says_how_to_place_files(tmp_path: Path, offline: None, source: str, where: str) -> None:
    cfg = DatasetConfig(
        source=source, cache_dir=str(tmp_path), download=True, valid_size=5, max_train=5, hessian_subset=2
    )
    with pytest.raises(DataError, match="download") as err:
        prepare(cfg, tmp_path / "out", progress=False, log=quiet)
    msg = str(err.value)
    assert "failed" in msg and "by hand" in msg and str(tmp_path / where) in msg
    assert not (tmp_path / "out" / "meta.json").exists()


def test_download_disabled_and_missing(tmp_path: Path) -> None:
    cfg = DatasetConfig(
        source="fashion_mnist", cache_dir=str(tmp_path), download=False, valid_size=5, max_train=5, hessian_subset=2
    )
    with pytest.raises(DataError, match=r"download is false.*train-images-idx3-ubyte.*FashionMNIST/raw"):
        prepare(cfg, tmp_path / "out", progress=False, log=quiet)


# ---------------------------------------------------------------------------------------- PTB
PTB = {
    "train": "a b c\n b c \nc\nd a\n",  # 13 tokens with <eos>: a b c E b c E c E d a E... see below
    "valid": "a zz c\nb\n",
    "test": "d d q\n",
}
# train tokens: a b c <eos> b c <eos> c <eos> d a <eos>  -> 12 tokens
# counts: c 3, <eos> 4, a 2, b 2, d 1  -> vocab by frequency, ties in order of first appearance.
TRAIN_TOKENS = ["a", "b", "c", "<eos>", "b", "c", "<eos>", "c", "<eos>", "d", "a", "<eos>"]


def write_ptb(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in PTB.items():
        (folder / f"ptb.{split}.txt").write_text(text)
    return {s: hashlib.sha256(t.encode()).hexdigest() for s, t in PTB.items()}


def ptb_cfg(location: str, tmp_path: Path, **kw) -> DatasetConfig:
    base = {
        "source": "ptb",
        "ptb_location": location,
        "ptb_train_tokens": 12,
        "bptt": 2,
        "hessian_subset": 3,
        "cache_dir": str(tmp_path / "cache"),
    }
    return DatasetConfig(**(base | kw))


def test_ptb_vocab_windows_and_unk(tmp_path: Path) -> None:
    sums = write_ptb(tmp_path / "ptb")
    cfg = ptb_cfg(str(tmp_path / "ptb"), tmp_path, ptb_sha256=sums)
    assert cfg.train_size() == 5  # (12 - 1) // 2
    meta = prepare(cfg, tmp_path / "out", progress=False, log=quiet)
    vocab = meta["vocab"]
    assert vocab == ["<eos>", "c", "a", "b", "d", "<unk>"]  # unseen zz, q need <unk>; room left (10k)
    assert meta["kind"] == "tokens" and meta["num_classes"] == 6 and meta["input_shape"] == [2]
    tr = npz(tmp_path / "out" / "train.npz")
    assert tr["x"].shape == (5, 2) and tr["x"].dtype == np.int64 and tr["y"].dtype == np.int64
    # Windows (in any order after the seeded permutation): x = t[2i:2i+2], y = t[2i+1:2i+3].
    got = sorted(([vocab[i] for i in x], [vocab[i] for i in y]) for x, y in zip(tr["x"], tr["y"], strict=True))
    want = sorted((TRAIN_TOKENS[2 * i : 2 * i + 2], TRAIN_TOKENS[2 * i + 1 : 2 * i + 3]) for i in range(5))
    assert got == want
    va = npz(tmp_path / "out" / "valid.npz")  # valid_size 0: ptb.valid.txt, in order
    assert [[vocab[i] for i in r] for r in va["x"]] == [["a", "<unk>"], ["c", "<eos>"]]
    assert [[vocab[i] for i in r] for r in va["y"]] == [["<unk>", "c"], ["<eos>", "b"]]
    te = npz(tmp_path / "out" / "test.npz")
    assert [[vocab[i] for i in r] for r in te["x"]] == [["d", "d"]]
    assert [[vocab[i] for i in r] for r in te["y"]] == [["d", "<unk>"]]
    ds = load_prepared(tmp_path / "out")
    assert ds.kind == "tokens" and ds.num_classes == 6 and ds.train.x.dtype == torch.int64


def test_ptb_vocab_truncation_maps_rare_words_to_unk(tmp_path: Path) -> None:
    write_ptb(tmp_path / "ptb")
    meta = prepare(ptb_cfg(str(tmp_path / "ptb"), tmp_path, vocab_size=3), tmp_path / "out", progress=False, log=quiet)
    assert meta["vocab"] == ["<eos>", "c", "<unk>"]
    tr = npz(tmp_path / "out" / "train.npz")
    words = {meta["vocab"][i] for i in np.concatenate([tr["x"].ravel(), tr["y"].ravel()])}
    assert words == {"<eos>", "c", "<unk>"}


def test_ptb_no_room_for_unk(tmp_path: Path) -> None:
    write_ptb(tmp_path / "ptb")
    with pytest.raises(DataError, match=r"no '<unk>' slot"):
        prepare(ptb_cfg(str(tmp_path / "ptb"), tmp_path, vocab_size=5), tmp_path / "out", progress=False, log=quiet)


def test_ptb_checksum_mismatch_names_file(tmp_path: Path) -> None:
    sums = write_ptb(tmp_path / "ptb")
    bad = sums | {"valid": "0" * 64}
    with pytest.raises(DataError, match=rf"ptb\.valid\.txt: SHA-256 mismatch: expected 0{{64}}, got {sums['valid']}"):
        prepare(ptb_cfg(str(tmp_path / "ptb"), tmp_path, ptb_sha256=bad), tmp_path / "out", progress=False, log=quiet)


def test_ptb_token_count_mismatch_and_empty(tmp_path: Path) -> None:
    write_ptb(tmp_path / "ptb")
    with pytest.raises(DataError, match=r"12 tokens.*ptb_train_tokens: 12"):
        prepare(
            ptb_cfg(str(tmp_path / "ptb"), tmp_path, ptb_train_tokens=100), tmp_path / "o1", progress=False, log=quiet
        )
    (tmp_path / "ptb" / "ptb.test.txt").write_text("")
    with pytest.raises(DataError, match=r"ptb\.test\.txt: the file has no words"):
        prepare(ptb_cfg(str(tmp_path / "ptb"), tmp_path), tmp_path / "o2", progress=False, log=quiet)
    (tmp_path / "ptb" / "ptb.test.txt").unlink()
    with pytest.raises(DataError, match=r"missing .*ptb\.test\.txt"):
        prepare(ptb_cfg(str(tmp_path / "ptb"), tmp_path), tmp_path / "o3", progress=False, log=quiet)


def test_ptb_from_file_url_is_cached(tmp_path: Path) -> None:
    sums = write_ptb(tmp_path / "ptb")
    prefix = (tmp_path / "ptb").as_uri()  # file:///...; no trailing slash: joined as a directory
    meta = prepare(ptb_cfg(prefix, tmp_path, ptb_sha256=sums), tmp_path / "out", progress=False, log=quiet)
    cached = Path(meta["provenance"]["files"]["train"]["path"])
    assert cached.is_relative_to(tmp_path / "cache") and cached.read_text() == PTB["train"]
    assert meta["provenance"]["files"]["train"]["url"] == prefix + "/ptb.train.txt"
    # Second time: the cache serves it, even with downloads off and the source gone.
    for p in (tmp_path / "ptb").iterdir():
        p.unlink()
    prepare(ptb_cfg(prefix, tmp_path, ptb_sha256=sums, download=False), tmp_path / "out2", progress=False, log=quiet)
    assert (tmp_path / "out2" / "train.npz").read_bytes() == (tmp_path / "out" / "train.npz").read_bytes()


def test_ptb_over_http(tmp_path: Path) -> None:
    write_ptb(tmp_path / "srv")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    def handler(*args, **kwargs):
        return Quiet(*args, directory=str(tmp_path / "srv"), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        meta = prepare(ptb_cfg(url, tmp_path), tmp_path / "out", progress=False, log=quiet)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert meta["split_sizes"]["train"] == 5


def test_ptb_download_failure_says_how_to_place_files(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/data/"
    with pytest.raises(DataError, match=rf"download of {url}ptb\.train\.txt failed.*by hand") as err:
        prepare(ptb_cfg(url, tmp_path), tmp_path / "out", progress=False, log=quiet)
    assert str(tmp_path / "cache" / "ptb") in str(err.value)
    with pytest.raises(DataError, match=r"download is false"):
        prepare(ptb_cfg(url, tmp_path, download=False), tmp_path / "out", progress=False, log=quiet)


# ------------------------------------------------------------------------------- load_prepared
def test_load_prepared_round_trip(mnist1d_dir: Path) -> None:
    ds = load_prepared(mnist1d_dir, "cpu")
    assert ds.kind == "vector" and ds.input_shape == (40,) and ds.num_classes == 10
    for name, sp in (("train", ds.train), ("valid", ds.valid), ("test", ds.test)):
        arr = npz(mnist1d_dir / f"{name}.npz")
        assert torch.equal(sp.x, torch.from_numpy(arr["x"])) and torch.equal(sp.y, torch.from_numpy(arr["y"]))
        assert sp.x.device.type == "cpu"
    assert torch.equal(ds.hessian_idx, torch.from_numpy(npz(mnist1d_dir / "hessian.npz")["idx"]))
    assert ds.hessian_idx.dtype == torch.int64


@pytest.mark.parametrize("verify", [True, False])
def test_load_prepared_corrupt_file(tmp_path: Path, verify: bool) -> None:
    prepare(mnist1d_cfg(), tmp_path, progress=False, log=quiet)
    path = tmp_path / "valid.npz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match=r"valid\.npz.*sharpflow prepare"):
        load_prepared(tmp_path, verify=verify)


def test_load_prepared_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not prepared"):
        load_prepared(tmp_path)
    prepare(mnist1d_cfg(), tmp_path, progress=False, log=quiet)
    (tmp_path / "hessian.npz").unlink()
    with pytest.raises(DataError, match=r"hessian\.npz: missing"):
        load_prepared(tmp_path)


# ------------------------------------------------------------------------------------ augment
def naive_shift_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Reference, one image at a time: out[i, j] = x[i - dy, j - dx] (0 outside), then mirror."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    for b in range(len(x)):
        sy, sx = int(dy[b]), int(dx[b])
        for i in range(h):
            for j in range(w):
                if 0 <= i - sy < h and 0 <= j - sx < w:
                    out[b, :, i, j] = x[b, :, i - sy, j - sx]
        if flip[b]:
            out[b] = out[b].flip(-1)
    return out


def test_shift_flip_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 2, 7, 9, generator=g, dtype=torch.float64)
    dy = torch.tensor([-4, -3, 0, 4, 2, 1, -1, 0, 3, -2, 4, -4])
    dx = torch.tensor([4, 0, -4, 1, -2, 3, 0, 0, -1, 2, -4, 4])
    flip = torch.tensor([True, False] * 6)
    assert torch.equal(shift_flip(x, dy, dx, flip), naive_shift_flip(x, dy, dx, flip))


def test_augment_shape_determinism_and_errors() -> None:
    x = torch.rand(16, 3, 32, 32)
    a = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError):
        augment(torch.rand(4, 40), torch.Generator())
    with pytest.raises(ValueError):
        augment(torch.zeros(4, 20, dtype=torch.int64), torch.Generator())


def test_augment_shift_bounds_and_flip_rate() -> None:
    b, r, c, w = 4000, 16, 5, 32
    x = torch.zeros(b, 1, 32, w)
    x[:, 0, r, c] = 1.0
    out = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(out.sum((1, 2, 3)), torch.ones(b))  # the pixel is never lost (c ± 4 stays inside)
    pos = out[:, 0].flatten(1).argmax(1)
    rows, cols = pos // w, pos % w
    assert (rows - r).abs().max() <= 4 and set((rows - r).tolist()) == set(range(-4, 5))
    flipped = (cols - (w - 1 - c)).abs() <= 4  # mirrored column 26 ± 4 never overlaps 5 ± 4
    assert torch.all(flipped | ((cols - c).abs() <= 4))
    assert set((cols[~flipped] - c).tolist()) == set(range(-4, 5))
    assert 0.46 < flipped.double().mean() < 0.54


def test_augment_zero_padding_enters_at_borders() -> None:
    x = torch.ones(500, 3, 32, 32)
    out = augment(x, torch.Generator().manual_seed(5))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(out[:, :, 4:-4, 4:-4] == 1)  # shifts ≤ 4 never reach the centre
    ones = out[:, 0].sum((1, 2))
    # Each image keeps a (32-|dy|) x (32-|dx|) block of ones; the rest is zero padding.
    allowed = {(32 - a) * (32 - b) for a in range(5) for b in range(5)}
    assert set(ones.long().tolist()) <= allowed and (ones < 32 * 32).float().mean() > 0.5
    assert torch.any(out[:, :, 0, :] == 0) and torch.any(out[:, :, -1, :] == 0)
    assert torch.any(out[:, :, :, 0] == 0) and torch.any(out[:, :, :, -1] == 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augment_and_load_on_cuda(mnist1d_dir: Path) -> None:
    x = torch.rand(64, 3, 32, 32)
    on_cpu = augment(x, torch.Generator().manual_seed(3))
    # A CPU generator drives a CUDA batch: same draws, same result.
    on_gpu = augment(x.cuda(), torch.Generator().manual_seed(3))
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), on_cpu)
    ds = load_prepared(mnist1d_dir, "cuda")
    assert ds.train.x.device.type == "cuda" and ds.hessian_idx.device.type == "cuda"
    assert torch.equal(ds.train.x.cpu(), torch.from_numpy(npz(mnist1d_dir / "train.npz")["x"]))


# ------------------------------------------------------------------------------- stand-ins
@pytest.mark.parametrize("classes", [10, 100])
def test_synthetic_images_shapes_split_norm_and_determinism(tmp_path: Path, classes: int) -> None:
    cfg = DatasetConfig(source="synthetic_images", synthetic_classes=classes, synthetic_train=600,
                        synthetic_test=200, valid_size=100, hessian_subset=50, seed=3)
    meta = prepare(cfg, tmp_path / "a", progress=False, log=quiet)
    assert meta["split_sizes"] == {"train": 500, "valid": 100, "test": 200} and cfg.train_size() == 500
    assert meta["kind"] == "image" and meta["num_classes"] == classes and meta["input_shape"] == [3, 32, 32]
    assert meta["provenance"]["stand_in_for"] == "cifar"
    train = npz(tmp_path / "a" / "train.npz")
    assert train["x"].dtype == np.uint8 and train["x"].shape == (500, 3, 32, 32)
    assert set(np.unique(npz(tmp_path / "a" / "test.npz")["y"])) == set(range(classes))  # every class present
    # CIFAR's normalisation path: a per-pixel mean, a global std, applied when loaded
    assert meta["normalization"]["scheme"] == "per_pixel_mean"
    ds = load_prepared(tmp_path / "a")
    x = ds.train.x.double()
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2
    # the same config and seed give the same bytes; another seed other images
    prepare(cfg, tmp_path / "b", progress=False, log=quiet)
    assert (tmp_path / "a" / "train.npz").read_bytes() == (tmp_path / "b" / "train.npz").read_bytes()
    other = prepare(cfg.model_copy(update={"seed": 4}), tmp_path / "c", progress=False, log=quiet)
    assert other["files"]["train.npz"] != meta["files"]["train.npz"]


def test_synthetic_images_have_class_structure_but_are_not_trivial(tmp_path: Path) -> None:
    """Held-out nearest-class-mean accuracy: far above chance (learnable) and below 100 % (the
    backgrounds overlap the classes), for 10 and 100 classes."""
    from sharpflow import synthetic

    for classes, lo in ((10, 0.5), (100, 0.2)):
        a = synthetic.images(4000, 1000, classes, seed=0)
        x = a["train_x"].reshape(4000, -1).astype(np.float64)
        xt = a["test_x"].reshape(1000, -1).astype(np.float64)
        means = np.stack([x[a["train_y"] == c].mean(0) for c in range(classes)])
        d = (xt**2).sum(1)[:, None] - 2 * xt @ means.T + (means**2).sum(1)[None]
        acc = float((d.argmin(1) == a["test_y"]).mean())
        assert lo < acc < 0.99, (classes, acc)


def test_synthetic_text_is_ptb_shaped_and_predictable(tmp_path: Path) -> None:
    cfg = DatasetConfig(source="synthetic_text", vocab_size=300, ptb_train_tokens=20 * 500 + 1,
                        hessian_subset=40, seed=1)
    meta = prepare(cfg, tmp_path, progress=False, log=quiet)
    assert meta["kind"] == "tokens" and meta["num_classes"] == 300 and meta["bptt"] == 20
    assert meta["split_sizes"]["train"] == cfg.train_size() == 500
    assert meta["vocab"][-1] == "<eos>" and len(meta["vocab"]) == 300
    ds = load_prepared(tmp_path)
    x, y = ds.train.x, ds.train.y
    assert x.shape == (500, 20) and torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token
    assert int(x.max()) < 300 and (x == 299).any()  # sentences end with <eos>
    # Learnable: the empirical bigram model's held-out cross-entropy is far below log(V) (a
    # uniform guess) and below the unigram model's.
    tr, va = x.flatten().numpy(), ds.valid.x.flatten().numpy()
    counts = np.ones((300, 300))
    np.add.at(counts, (tr[:-1], tr[1:]), 1)
    bigram = counts / counts.sum(1, keepdims=True)
    uni = np.bincount(tr, minlength=300) + 1.0
    uni /= uni.sum()
    h_bigram = -np.log(bigram[va[:-1], va[1:]]).mean()
    h_uni = -np.log(uni[va[1:]]).mean()
    assert h_bigram < h_uni - 1.0 and h_uni < np.log(300)


def test_synthetic_config_errors() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="vocab_size >= 3"):
        DatasetConfig(source="synthetic_text", vocab_size=2)
    with pytest.raises(ValidationError):
        DatasetConfig(source="synthetic_images", synthetic_classes=1)
    # Options added later leave the dumps of existing configs (Snakemake params) unchanged.
    dumped = DatasetConfig(source="mnist1d").model_dump()
    assert not any(k.startswith("synthetic_") for k in dumped)
    assert DatasetConfig(source="synthetic_images", synthetic_train=10).model_dump()["synthetic_train"] == 10
