"""Compare two results trees: is a refactor result-neutral?

    python bench/compare_results.py results_before/ results_after/

Every Parquet file under ``runs/`` and ``tables/`` is compared value for value (exact, NaN equal
to NaN, same columns in the same order and the same dtypes) except the wall-clock columns
(``wall_s``, ``seconds``, ``refresh_s``), which no two runs share; every PNG and CSV byte for
byte; every ``.pt`` file (checkpoints, eigenvectors) tensor for tensor. Files present on one side
only are listed. Logs, benchmarks, the cost table, PDFs (they embed a creation date) and the stash
directories are skipped. Exit status 0 when everything compared is identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

TIMING = ("wall_s", "seconds", "refresh_s")
SKIP_DIRS = {"logs", "benchmarks", ".resume", ".analysis", ".snakemake"}


def _files(root: Path) -> dict[str, Path]:
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if rel.parts[-1].startswith("cost.") or str(rel) == "README.md":  # timings only; the layout doc
            continue
        if p.is_file() and not SKIP_DIRS & set(rel.parts) and p.suffix in (".parquet", ".png", ".csv", ".pt", ".md"):
            out[str(rel)] = p
    return out


def _same_parquet(a: Path, b: Path) -> str | None:
    da, db = pd.read_parquet(a), pd.read_parquet(b)
    if list(da.columns) != list(db.columns):
        return f"columns differ: {list(da.columns)} vs {list(db.columns)}"
    da = da.drop(columns=[c for c in TIMING if c in da.columns])
    db = db.drop(columns=[c for c in TIMING if c in db.columns])
    try:
        pd.testing.assert_frame_equal(da, db, check_exact=True)
    except AssertionError as err:
        return " ".join(str(err).split())[:300]
    return None


def _same_torch(a: Path, b: Path) -> str | None:
    import torch

    oa, ob = torch.load(a, weights_only=True), torch.load(b, weights_only=True)

    def walk(x, y, where):
        if isinstance(x, dict):
            if not isinstance(y, dict) or set(x) != set(y):
                return f"{where}: keys differ"
            for k in x:
                if (msg := walk(x[k], y[k], f"{where}.{k}")) is not None:
                    return msg
            return None
        if isinstance(x, torch.Tensor):
            ok = isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(
                torch.nan_to_num(x), torch.nan_to_num(y))
            return None if ok else f"{where}: tensors differ"
        if isinstance(x, list | tuple):
            if len(x) != len(y):
                return f"{where}: lengths differ"
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                if (msg := walk(u, v, f"{where}[{i}]")) is not None:
                    return msg
            return None
        return None if x == y else f"{where}: {x!r} vs {y!r}"

    return walk(oa, ob, "")


def compare(a: Path, b: Path) -> list[str]:
    fa, fb = _files(a), _files(b)
    problems = [f"only in {a}: {k}" for k in sorted(set(fa) - set(fb))]
    problems += [f"only in {b}: {k}" for k in sorted(set(fb) - set(fa))]
    for rel in sorted(set(fa) & set(fb)):
        pa, pb = fa[rel], fb[rel]
        if pa.suffix == ".parquet":
            msg = _same_parquet(pa, pb)
        elif pa.suffix == ".pt":
            msg = _same_torch(pa, pb)
        else:
            msg = None if pa.read_bytes() == pb.read_bytes() else "bytes differ"
        if msg is not None:
            problems.append(f"{rel}: {msg}")
    print(f"compared {len(set(fa) & set(fb))} files", file=sys.stderr)
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    a = p.parse_args()
    problems = compare(a.before, a.after)
    for line in problems:
        print(line)
    print("identical" if not problems else f"{len(problems)} differences")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
