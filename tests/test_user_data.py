"""The user's own data (sources arrays, text, python): reading, sizing, and one clear line per bad input."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
from pydantic import ValidationError

from sharpflow.config import DatasetConfig
from sharpflow.errors import DataError
from sharpflow.usersources import read_arrays, read_source, read_text, tokenize


def _npz(path, n_train=50, n_test=10, shape=(6,), classes=3, **extra):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.normal(size=(n_train, *shape)), "y_train": rng.integers(0, classes, n_train),
              "x_test": rng.normal(size=(n_test, *shape)), "y_test": rng.integers(0, classes, n_test)}
    arrays.update(extra)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


# ------------------------------------------------------------------------------------------- arrays
def test_arrays_size_comes_from_the_file(tmp_path):
    path = _npz(tmp_path / "d.npz", n_train=50)
    cfg = DatasetConfig(source="arrays", path=str(path), hessian_subset=8)
    # 10 % of the 50 to validation by default
    assert cfg.train_size() == 45
    assert DatasetConfig(source="arrays", path=str(path), hessian_subset=8, valid_size=0).train_size() == 50


def test_arrays_read_and_kinds(tmp_path):
    src = read_source(DatasetConfig(source="arrays", path=str(_npz(tmp_path / "d.npz")), hessian_subset=8))
    assert src["kind"] == "vector" and src["num_classes"] == 3 and src["train_x"].shape == (50, 6)
    assert len(src["provenance"]["sha256"]) == 64
    imgs = np.zeros((20, 1, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "i.npz", x_train=imgs, y_train=np.arange(20) % 2, x_test=imgs[:5], y_test=np.zeros(5, int))
    assert read_source(DatasetConfig(source="arrays", path=str(tmp_path / "i.npz")))["kind"] == "image"
    tok = np.arange(40).reshape(10, 4) % 7
    np.savez(tmp_path / "t.npz", x_train=tok, y_train=(tok + 1) % 7, x_test=tok[:2], y_test=tok[:2])
    t = read_source(DatasetConfig(source="arrays", path=str(tmp_path / "t.npz")))
    assert t["kind"] == "tokens" and t["num_classes"] == 7


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(b"not a zip at all"), "not a readable .npz"),
    (lambda p: np.savez(p, x_train=np.zeros((3, 2)), y_train=np.zeros(3, int)), "no array x_test, y_test"),
    (lambda p: _npz(p, y_train=np.zeros(7, int)), "x_train has 50 examples but y_train 7"),
    (lambda p: _npz(p, y_train=np.zeros(50)), "y_train is float64; labels must be integers"),
    (lambda p: _npz(p, x_test=np.zeros((10, 5))), r"x_test examples are \(5,\), x_train's \(6,\)"),
    (lambda p: _npz(p, x_valid=np.zeros((4, 6))), "both x_valid and y_valid"),
    (lambda p: _npz(p, x_train=np.full((50, 6), np.nan)), "x_train holds NaN"),
])
def test_bad_arrays_files_are_named(tmp_path, make, message):
    path = tmp_path / "bad.npz"
    make(path)
    with pytest.raises(DataError, match=message) as info:
        read_arrays(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_labels_out_of_range(tmp_path):
    path = _npz(tmp_path / "d.npz", y_test=np.array([0, 1, 5, -1, 2, 0, 1, 2, 1, 0]))
    with pytest.raises(DataError, match=r"labels outside \[0, 3\): min -1, max 5; raise num_classes"):
        read_source(DatasetConfig(source="arrays", path=str(path), num_classes=3))


def test_config_names_the_dataset_and_file_of_a_bad_source(tmp_path):
    from sharpflow.errors import ConfigError
    from sharpflow.study import parse_config

    raw = {"datasets": {"mine": {"source": "arrays", "path": str(tmp_path / "missing.npz"), "hessian_subset": 4}},
           "defaults": {"dataset": "mine", "model": {"name": "mlp"}, "steps": 10},
           "studies": {"s": {}}}
    with pytest.raises(ConfigError, match=r"datasets\.mine: .*missing\.npz: no such file"):
        parse_config(raw)


def test_source_fields_are_checked():
    with pytest.raises(ValidationError, match="needs path"):
        DatasetConfig(source="arrays")
    with pytest.raises(ValidationError, match=r"package\.module:function"):
        DatasetConfig(source="python", function="no_colon")
    # the new fields stay out of an existing dataset's JSON (no params change, no rerun)
    assert "path" not in DatasetConfig(source="mnist1d").model_dump()


# --------------------------------------------------------------------------------------------- text
def test_text_words_split_by_position_and_unk(tmp_path):
    lines = ["a b c a", "b a d", "a a b", "e f g"]
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    toks = tokenize(tmp_path / "c.txt", "word")
    assert toks[:5] == ["a", "b", "c", "a", "<eos>"] and len(toks) == 17
    arrays, vocab, lengths = read_text(tmp_path / "c.txt", "word", vocab_size=3, bptt=2, valid_fraction=0.2,
                                       test_fraction=0.2)
    # 17 tokens: test floor(3.4) = 3, valid 3, train 11 (by position: train first)
    assert lengths == {"train": 11, "valid": 3, "test": 3}
    assert vocab == ["a", "b", "<unk>"]  # the two most frequent training words, the rest <unk>
    assert arrays["x_train"].shape == (5, 2)  # (11 - 1) // 2 windows of 2
    np.testing.assert_array_equal(arrays["y_train"][:, :-1], arrays["x_train"][:, 1:])
    last = [2, 2, 2]  # e f g: all unseen in training
    assert arrays["x_test"].tolist() == [last[:2]]


def test_text_chars_and_directory_size(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "b.txt").write_text("world", encoding="utf-8")
    (d / "a.txt").write_text("hello ", encoding="utf-8")
    assert "".join(tokenize(d, "char")) == "hello world"  # files in name order
    cfg = DatasetConfig(source="text", path=str(d), tokenizer="char", bptt=2, valid_fraction=0.1,
                        test_fraction=0.2, hessian_subset=1)
    # 11 chars: test 2, valid 1, train 8: (8 - 1) // 2 = 3 windows
    assert cfg.train_size() == 3


@pytest.mark.parametrize(("write", "message"), [
    (lambda p: p.write_bytes(b"\xff\xfe\x00bad"), "not UTF-8 text"),
    (lambda p: p.write_text("\n\n", encoding="utf-8"), "no text"),
    (lambda p: p.mkdir(), "directory without \\*.txt files"),
])
def test_bad_text_is_named(tmp_path, write, message):
    path = tmp_path / "c.txt"
    write(path)
    with pytest.raises(DataError, match=message) as info:
        tokenize(path, "word")
    assert str(path) in str(info.value)


def test_text_split_too_short_for_a_window(tmp_path):
    (tmp_path / "c.txt").write_text("a b c d e f g h\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.txt \(valid split\): 0 tokens, fewer than bptt \+ 1"):
        read_text(tmp_path / "c.txt", "word", 10, 2, valid_fraction=0.05, test_fraction=0.3)


# ------------------------------------------------------------------------------------------- python
SOURCE = """
import numpy as np

def make():
    x = np.arange(60, dtype=float).reshape(20, 3)
    return {"x_train": x, "y_train": np.arange(20) % 4, "x_test": x[:4], "y_test": np.arange(4)}

def broken():
    raise RuntimeError("simulator crashed")

def not_a_dict():
    return [1, 2]
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "sf_user_data.py").write_text(textwrap.dedent(SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "sf_user_data"
    sys.modules.pop("sf_user_data", None)


def test_python_source(user_module):
    cfg = DatasetConfig(source="python", function=f"{user_module}:make", train_examples=20, hessian_subset=4)
    assert cfg.train_size() == 18
    src = read_source(cfg)
    assert src["num_classes"] == 4 and src["train_x"].shape == (20, 3) and src["kind"] == "vector"


@pytest.mark.parametrize(("fn", "message"), [
    ("broken", "failed: RuntimeError: simulator crashed"),
    ("not_a_dict", "returned list"),
    ("absent", "has no callable 'absent'"),
])
def test_bad_python_sources_are_named(user_module, fn, message):
    cfg = DatasetConfig(source="python", function=f"{user_module}:{fn}", train_examples=20)
    with pytest.raises(DataError, match=message) as info:
        read_source(cfg)
    assert f"{user_module}:{fn}" in str(info.value)


def test_python_source_needs_its_size():
    cfg = DatasetConfig(source="python", function="x.y:z")
    with pytest.raises(DataError, match="needs train_examples"):
        cfg.train_size()
