"""Tables: hand-made runs whose summaries are known, checked in the CSV, Markdown and LaTeX."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sharpflow import tables
from sharpflow.io import SharpflowError
from sharpflow.tables._common import Column, Table, mean_std, tex_escape, to_latex, to_markdown

STEPS = [0, 10, 20, 30, 40]  # checkpoints; 10 steps per epoch, so epochs 0..4


def meta(lr: float, optimizer: str = "sgd", gamma: float | None = None, seed: int = 0, k: int | None = None,
         bs: int | str = 32, study: str = "nsgd") -> dict:
    return {"study": study, "lr": lr, "batch_size": bs, "momentum": 0.0, "optimizer": optimizer,
            "gamma": gamma, "seed": seed, "k": k}


def metrics(run: str, valid: list[float], test: list[float], train_loss: list[float], dist: list[float],
            extra_valid: dict[int, float] | None = None, diverge_at: int | None = None) -> pd.DataFrame:
    """Evaluations at STEPS (train/valid/test) plus batch rows; ``extra_valid``: validation-only
    evaluations at steps that are NOT checkpoints (no spectrum there)."""
    rows = []
    for i, step in enumerate(STEPS):
        div = diverge_at is not None and step >= diverge_at
        base = {"run": run, "step": step, "epoch": step / 10, "lr": 0.1, "wall_s": 0.0, "param_norm": 1.0,
                "refresh_s": math.nan, "refresh_matvecs": math.nan, "status": "diverged" if div else "ok"}
        nan = math.nan
        rows.append(base | {"split": "batch", "loss": nan if div else 1.0, "accuracy": nan, "dist_init": nan})
        rows.append(base | {"split": "train", "loss": nan if div else train_loss[i],
                            "accuracy": nan if div else 0.5, "dist_init": nan if div else dist[i]})
        rows.append(base | {"split": "valid", "loss": 1.0, "accuracy": nan if div else valid[i],
                            "dist_init": nan if div else dist[i]})
        rows.append(base | {"split": "test", "loss": 1.0, "accuracy": nan if div else test[i],
                            "dist_init": nan if div else dist[i]})
    for step, acc in (extra_valid or {}).items():
        rows.append({"run": run, "step": step, "epoch": step / 10, "split": "valid", "loss": 1.0,
                     "accuracy": acc, "lr": 0.1, "wall_s": 0.0, "dist_init": math.nan, "param_norm": 1.0,
                     "refresh_s": math.nan, "refresh_matvecs": math.nan, "status": "ok"})
    return pd.DataFrame(rows).sort_values(["step", "split"], kind="stable")


def spectrum(run: str, lam1: list[float], frob: list[float], lam2: list[float] | None = None,
             diverge_at: int | None = None) -> pd.DataFrame:
    rows = []
    for i, step in enumerate(STEPS):
        div = diverge_at is not None and step >= diverge_at
        lams = [lam1[i], lam2[i] if lam2 else lam1[i] / 2]
        for rank, lam in enumerate(lams, start=1):
            rows.append({"run": run, "step": step, "epoch": step / 10, "status": "diverged" if div else "ok",
                         "rank": rank, "eigenvalue": math.nan if div else lam, "residual": 0.0,
                         "rel_residual": 0.0, "converged": True, "matvecs": 10, "seconds": 0.1, "n": 100,
                         "k": 2, "tol": 1e-3, "which": "LA", "backend": "lanczos", "warm": False, "loss": 1.0,
                         "grad_norm": 1.0, "frobenius": math.nan if div else frob[i], "frobenius_se": 0.0,
                         "trace": math.nan, "trace_se": math.nan})
    return pd.DataFrame(rows)


def write_run(root: Path, run: str, **frames: pd.DataFrame) -> list[Path]:
    d = root / "runs" / run
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for kind, df in frames.items():
        df.to_parquet(d / f"{kind}.parquet", index=False)
        out.append(d / f"{kind}.parquet")
    return out


NAN5 = [math.nan] * 5


@pytest.fixture
def nsgd_case(tmp_path):
    """γ=0.1 with two seeds (A, B) whose summaries are worked out by hand below; γ=0.01 and
    two SGD baselines (one without a probe ‖H‖_F estimate) to check the row order."""
    inputs: list[Path] = []
    runs = {}
    # Seed A: best validation at step 20 (0.75); a non-checkpoint evaluation at step 25 scores
    # higher (0.99) but has no spectrum, so it must not be chosen.
    runs["nsgd-g0.1-s1"] = meta(0.05, "nsgd", 0.1, seed=1, k=5)
    inputs += write_run(tmp_path, "nsgd-g0.1-s1",
                        metrics=metrics("nsgd-g0.1-s1", valid=[0.125, 0.5, 0.75, 0.625, 0.6875],
                                        test=[0.1, 0.4, 0.625, 0.6, 0.6], train_loss=[2, 1, 0.5, 0.375, 0.25],
                                        dist=[0, 1, 1.5, 1.75, 2.0], extra_valid={25: 0.99}),
                        spectrum=spectrum("nsgd-g0.1-s1", lam1=[1, 4, 8, 7, 6], frob=[2, 6, 12, 11, 10]))
    # Seed B: validation ties at steps 30 and 40 (0.875): the earliest, 30, is the best.
    runs["nsgd-g0.1-s2"] = meta(0.05, "nsgd", 0.1, seed=2, k=5)
    inputs += write_run(tmp_path, "nsgd-g0.1-s2",
                        metrics=metrics("nsgd-g0.1-s2", valid=[0.125, 0.375, 0.625, 0.875, 0.875],
                                        test=[0.1, 0.3, 0.6, 0.875, 0.9], train_loss=[2, 1, 0.75, 0.625, 0.5],
                                        dist=[0, 1, 2, 2.5, 3.0]),
                        spectrum=spectrum("nsgd-g0.1-s2", lam1=[1, 5, 8, 9, 7], frob=[2, 7, 13, 16, 14]))
    runs["nsgd-g0.01-s1"] = meta(0.05, "nsgd", 0.01, seed=1, k=5)
    inputs += write_run(tmp_path, "nsgd-g0.01-s1",
                        metrics=metrics("nsgd-g0.01-s1", [0.5] * 5, [0.5] * 5, [1] * 5, [1] * 5),
                        spectrum=spectrum("nsgd-g0.01-s1", [20] * 5, [30] * 5))
    runs["sgd-lr0.01"] = meta(0.01)
    inputs += write_run(tmp_path, "sgd-lr0.01",
                        metrics=metrics("sgd-lr0.01", [0.5] * 5, [0.5] * 5, [1] * 5, [1] * 5),
                        spectrum=spectrum("sgd-lr0.01", [3] * 5, NAN5, lam2=[4] * 5))  # no ‖H‖_F probes
    runs["sgd-lr0.1"] = meta(0.1)
    inputs += write_run(tmp_path, "sgd-lr0.1",
                        metrics=metrics("sgd-lr0.1", [0.5] * 5, [0.5] * 5, [1] * 5, [1] * 5),
                        spectrum=spectrum("sgd-lr0.1", [2] * 5, [3] * 5))
    return {"kind": "nsgd", "studies": ["nsgd"], "style": {"early_epoch": "quarter"}, "runs": runs}, inputs


def make(tmp_path: Path, kind: str, spec: dict, inputs: list[Path]) -> tuple[pd.DataFrame, str, str]:
    out = tmp_path / "out"
    tables.make_table(kind, spec, inputs, out / "t.md", out / "t.tex", out / "t.csv")
    assert sorted(p.name for p in out.iterdir()) == ["t.csv", "t.md", "t.tex"]  # no temporary files left
    return pd.read_csv(out / "t.csv"), (out / "t.md").read_text(), (out / "t.tex").read_text()


def test_nsgd_mean_std_over_two_seeds(tmp_path, nsgd_case):
    csv, md, _ = make(tmp_path, "nsgd", *nsgd_case)
    row = csv.set_index("name").loc["γ=0.1"]
    assert row["n_seeds"] == 2 and row["n_diverged"] == 0
    # (value of seed A, value of seed B), by hand from the fixture:
    expected = {
        "frob_best": (12.0, 16.0),       # A best at step 20, B at step 30
        "frob_last": (10.0, 14.0),       # step 40
        "lmax_best": (8.0, 9.0),
        "lmax_last": (6.0, 7.0),
        "test_acc_best_pct": (62.5, 87.5),
        "val_acc_early_pct": (50.0, 37.5),   # epoch 1 = first validation at ≥ 25 % of 4 epochs
        "train_loss_final": (0.25, 0.5),
        "dist_init_best": (1.5, 2.5),    # at the best-validation checkpoints, steps 20 and 30
    }
    for key, (a, b) in expected.items():
        assert row[f"{key}_mean"] == (a + b) / 2, key
        assert row[f"{key}_std"] == pytest.approx(abs(a - b) / math.sqrt(2), rel=1e-12), key
    assert "val acc @ epoch 1 (%)" in md
    assert "14 ± 2.83" in md  # ‖H‖_F at best validation, as printed


def test_nsgd_row_order_and_names(tmp_path, nsgd_case):
    csv, md, _ = make(tmp_path, "nsgd", *nsgd_case)
    assert list(csv["name"]) == ["γ=0.01", "γ=0.1", "SGD(η=0.1)", "SGD(η=0.01)"]
    body = [ln.split("|")[1].strip() for ln in md.splitlines()[2:6]]
    assert body == ["γ=0.01", "γ=0.1", "SGD(η=0.1)", "SGD(η=0.01)"]


def test_best_validation_checkpoint_selection(nsgd_case):
    from sharpflow.results import load
    from sharpflow.tables.nsgd import run_summary

    spec, inputs = nsgd_case
    data = load(inputs, tables.KINDS["nsgd"], spec)
    a = run_summary(data, "nsgd-g0.1-s1", early=1.0)
    b = run_summary(data, "nsgd-g0.1-s2", early=1.0)
    assert a["best_step"] == 20  # not 25: no checkpoint (spectrum) there
    assert b["best_step"] == 30  # tie with 40: the earliest
    assert a["last_step"] == b["last_step"] == 40


def test_saved_best_checkpoint_is_used_when_present(tmp_path, nsgd_case):
    """Seed A kept its best checkpoint (checkpoints.best): step 25, between checkpoints, with its
    own spectrum (λ_max 9.5, ‖H‖_F 17) and train/test rows written by training at that step."""
    spec, inputs = nsgd_case
    run = "nsgd-g0.1-s1"
    d = tmp_path / "runs" / run
    met = pd.read_parquet(d / "metrics.parquet")
    extra = [{**met[(met.step == 20) & (met.split == split)].iloc[0].to_dict(), "step": 25, "epoch": 2.5,
              "accuracy": acc, "dist_init": 1.6} for split, acc in (("train", 0.9), ("test", 0.8125))]
    pd.concat([met, pd.DataFrame(extra)]).to_parquet(d / "metrics.parquet", index=False)
    sb = spectrum(run, lam1=[9.5] * 5, frob=[17] * 5)
    sb = sb[sb.step == 20].assign(step=25, epoch=2.5)
    inputs = [*inputs, *write_run(tmp_path, run, spectrum_best=sb)]
    csv, md, _ = make(tmp_path, "nsgd", spec, inputs)
    row = csv.set_index("name").loc["γ=0.1"]
    assert row["lmax_best_mean"] == (9.5 + 9.0) / 2 and row["frob_best_mean"] == (17 + 16) / 2
    assert row["test_acc_best_pct_mean"] == (81.25 + 87.5) / 2
    assert row["dist_init_best_mean"] == pytest.approx((1.6 + 2.5) / 2)
    assert row["lmax_last_mean"] == (6 + 7) / 2  # the last checkpoint is unchanged
    assert "where a run keeps it (checkpoints.best)" in md


def test_frobenius_fallback_is_a_marked_lower_bound(tmp_path, nsgd_case):
    csv, md, tex = make(tmp_path, "nsgd", *nsgd_case)
    row = csv.set_index("name").loc["SGD(η=0.01)"]
    assert row["frob_best_mean"] == 5.0  # sqrt(3² + 4²) over the top-2 eigenvalues
    assert bool(row["frob_best_lower_bound"]) and bool(row["frob_last_lower_bound"])
    assert not csv.set_index("name").loc["SGD(η=0.1)", "frob_best_lower_bound"]
    assert "5†" in md and "lower bound" in md
    assert r"\ensuremath{^\dagger}" in tex


def test_early_epoch_from_style(tmp_path, nsgd_case):
    spec, inputs = nsgd_case
    spec = {**spec, "style": {"early_epoch": 2}}
    csv, md, _ = make(tmp_path, "nsgd", spec, inputs)
    row = csv.set_index("name").loc["γ=0.1"]
    assert row["val_acc_early_pct_mean"] == (75.0 + 62.5) / 2
    assert "val acc @ epoch 2 (%)" in md and r"style.early\_epoch" in md


def test_early_epoch_defaults_to_the_papers_epoch_50(tmp_path, nsgd_case):
    """Without style.early_epoch, E is the paper's epoch 50: here (runs of 4 epochs) no run has a
    validation there, so the column is empty, not silently moved to another epoch."""
    spec, inputs = nsgd_case
    for style in ({}, {"early_epoch": None}):
        csv, md, _ = make(tmp_path / str(len(style)), "nsgd", {**spec, "style": style}, inputs)
        assert "val acc @ epoch 50 (%)" in md and "the paper's epoch 50" in md
        assert csv["val_acc_early_pct_mean"].isna().all()


def test_diverged_seed_is_left_out_and_counted(tmp_path):
    inputs, runs = [], {}
    for seed, div in ((1, None), (2, 30)):
        run = f"nsgd-g1-s{seed}"
        runs[run] = meta(0.05, "nsgd", 1.0, seed=seed)
        inputs += write_run(tmp_path, run,
                            metrics=metrics(run, valid=[0.5, 0.6, 0.7, 0.8, 0.9], test=[0.5] * 5,
                                            train_loss=[1, 0.9, 0.8, 0.7, 0.6], dist=[0, 1, 2, 3, 4],
                                            diverge_at=div),
                            spectrum=spectrum(run, [1, 2, 3, 4, 5], [2, 3, 4, 5, 6], diverge_at=div))
    csv, md, _ = make(tmp_path, "nsgd", {"runs": runs}, inputs)
    row = csv.iloc[0]
    assert row["n_seeds"] == 2 and row["n_diverged"] == 1
    # seed 2 has no finite value at the last checkpoint
    assert row["frob_last_mean"] == 6.0 and math.isnan(row["frob_last_std"])
    assert row["frob_best_mean"] == (6.0 + 4.0) / 2  # seed 2's best validation before diverging: step 20
    assert "2 (1 div.)" in md


def test_k_ablation_table(tmp_path):
    inputs, runs = [], {}
    for k in (10, 1, 5):
        run = f"nsgdk-K{k}"
        runs[run] = meta(0.05, "nsgd", 0.1, k=k, study="nsgdk")
        inputs += write_run(tmp_path, run, metrics=metrics(run, [0.5] * 5, [0.5] * 5, [1] * 5, [1] * 5),
                            spectrum=spectrum(run, [k] * 5, [2 * k] * 5))
    runs["sgd-lr0.1"] = meta(0.1)
    inputs += write_run(tmp_path, "sgd-lr0.1",
                        metrics=metrics("sgd-lr0.1", [0.5] * 5, [0.5] * 5, [1] * 5, [1] * 5),
                        spectrum=spectrum("sgd-lr0.1", [2] * 5, [3] * 5))
    csv, _, _ = make(tmp_path, "nsgd_k", {"runs": runs}, inputs)
    assert list(csv["name"]) == ["K=1", "K=5", "K=10", "SGD(η=0.1)"]
    assert list(csv["lmax_last_mean"]) == [1.0, 5.0, 10.0, 2.0]


def test_peak_table(tmp_path):
    inputs, runs = [], {}
    runs["grid_eta-lr0.1"] = meta(0.1, study="grid_eta")
    inputs += write_run(tmp_path, "grid_eta-lr0.1",
                        spectrum=spectrum("grid_eta-lr0.1", [1, 5, 9, 9, 4], NAN5))
    runs["grid_eta-lr0.02"] = meta(0.02, study="grid_eta", bs="full")
    inputs += write_run(tmp_path, "grid_eta-lr0.02",
                        spectrum=spectrum("grid_eta-lr0.02", [10, 30, 60, 50, 40], NAN5, diverge_at=40))
    csv, md, tex = make(tmp_path, "peak", {"runs": runs}, inputs)
    csv = csv.set_index("run")
    assert list(csv.index) == ["grid_eta-lr0.02", "grid_eta-lr0.1"]  # by η ascending
    a = csv.loc["grid_eta-lr0.1"]
    # the first of the tied maxima
    assert (a["peak_lambda_max"], a["peak_step"], a["peak_epoch"]) == (9.0, 20, 2.0)
    assert a["eta_lambda_half_at_peak"] == pytest.approx(0.1 * 9 / 2, rel=1e-15)
    assert a["final_lambda_max"] == 4.0 and a["status"] == "ok"
    b = csv.loc["grid_eta-lr0.02"]
    assert (b["peak_lambda_max"], b["peak_step"]) == (60.0, 20)
    assert b["eta_lambda_half_at_peak"] == pytest.approx(0.6, rel=1e-15)
    assert math.isnan(b["final_lambda_max"]) and b["status"] == "diverged at step 40"
    assert "full" in md
    assert r"grid\_eta-lr0.1" in tex and "grid_eta" not in tex  # underscores escaped in LaTeX
    assert r"grid\_eta-lr0.1" in md  # and in Markdown (no accidental emphasis)


def test_lambda_max_is_the_largest_algebraic_eigenvalue_whatever_which(tmp_path):
    """With which: LM, rank 1 is the largest *magnitude*: a negative eigenvalue can come first. λ_max
    in the peak table (and the NSGD table and figure) is still the largest algebraic one."""
    from sharpflow.results import lambda_max_rows

    # rank 1 is negative and larger in magnitude at steps 10 and 20; rank 2 holds the top of the spectrum
    sp = spectrum("lm-lr0.1", [-20, -30, 5, 4, 3], NAN5, lam2=[2, 8, 1, 1, 1]).assign(which="LM")
    d = lambda_max_rows(sp)
    assert d["step"].tolist() == STEPS and d["eigenvalue"].tolist() == [2, 8, 5, 4, 3]
    csv, _, _ = make(tmp_path, "peak", {"runs": {"lm-lr0.1": meta(0.1, study="lm")}},
                     write_run(tmp_path, "lm-lr0.1", spectrum=sp))
    row = csv.set_index("run").loc["lm-lr0.1"]
    assert (row["peak_lambda_max"], row["peak_step"], row["final_lambda_max"]) == (8.0, 10, 3.0)


def test_latex_escaping_and_structure(tmp_path, nsgd_case):
    assert tex_escape("a_b 50% & $x #1 {y} ~^ \\") == (
        r"a\_b 50\% \& \$x \#1 \{y\} \textasciitilde{}\textasciicircum{} \textbackslash{}")
    assert tex_escape("SGD(η=0.1) ± 2") == r"SGD(\ensuremath{\eta}=0.1) \ensuremath{\pm} 2"
    _, _, tex = make(tmp_path, "nsgd", *nsgd_case)
    lines = tex.splitlines()
    assert lines[0] == r"\begin{tabular}{llrrrrrrrr}"
    assert lines[1] == r"\toprule" and lines[3] == r"\midrule" and r"\bottomrule" in lines
    assert r"test acc best-val (\%)" in lines[2]
    body = lines[4 : lines.index(r"\bottomrule")]
    assert len(body) == 4 and all(ln.endswith(r"\\") and ln.count(" & ") == 9 for ln in body)
    # every % in the file is escaped
    assert "%" not in tex.replace(r"\%", "")


def test_writers_on_a_hand_made_table():
    t = Table([Column("name", "name_x", kind="text"), Column("v", "v (%)", kind="meanstd", fmt="{:.2f}"),
               Column("n", "n", kind="int")],
              [{"name": "a|b", "v": (1.0, 0.5, ""), "n": 3},
               {"name": "c", "v": (math.nan, math.nan, ""), "n": 1}],
              notes=["note 1"])
    md = to_markdown(t)
    assert md.splitlines()[:4] == [r"| name\_x | v (%) | n |", "|:---|---:|---:|",
                                   r"| a\|b | 1.00 ± 0.50 | 3 |", "| c | – | 1 |"]
    tex = to_latex(t)
    assert r"a|b & 1.00 \ensuremath{\pm} 0.50 & 3 \\" in tex and "note 1" in tex


def test_mean_std_helper():
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0), 2)
    m, s, n = mean_std([1.0, math.nan, None])
    assert (m, n) == (1.0, 1) and math.isnan(s)
    m, s, n = mean_std([])
    assert n == 0 and math.isnan(m) and math.isnan(s)
    x = np.array([0.3, 0.7, 1.9])
    assert mean_std(list(x))[1] == pytest.approx(float(np.std(x, ddof=1)))


def test_empty_inputs_give_empty_tables(tmp_path):
    for kind in tables.KINDS:
        csv_path = tmp_path / kind / "t.csv"
        out = tmp_path / kind
        tables.make_table(kind, {"runs": {}}, [], out / "t.md", out / "t.tex", csv_path)
        assert csv_path.read_text().strip() != ""  # a header line
        assert (tmp_path / kind / "t.md").read_text().startswith("| ")


def test_unknown_kind_and_wrong_inputs(tmp_path, nsgd_case):
    spec, _ = nsgd_case
    with pytest.raises(SharpflowError, match="unknown table kind"):
        tables.make_table("nope", {}, [], tmp_path / "a.md", tmp_path / "a.tex", tmp_path / "a.csv")
    bad = tmp_path / "runs" / "x" / "alignment.parquet"
    bad.parent.mkdir(parents=True)
    pd.DataFrame({"a": [1]}).to_parquet(bad)
    with pytest.raises(SharpflowError, match="not one of the tables read here"):
        tables.make_table("peak", {"runs": spec["runs"]}, [bad], tmp_path / "a.md", tmp_path / "a.tex",
                          tmp_path / "a.csv")
    assert not (tmp_path / "a.md").exists()


def test_kinds_modules_and_captions_are_consistent():
    root = Path(__file__).resolve().parents[1]
    reg = tables.REGISTRY
    assert set(tables.KINDS) == set(reg.modules) == set(reg.captions)
    for kind in tables.KINDS:
        for path in reg.code_files(kind):
            assert path.is_file(), path
        assert (root / reg.captions[kind]).is_file(), reg.captions[kind]


def test_sam_runs_are_their_own_group_beside_sgd_at_the_same_eta():
    """SAM at η = 0.05 is not an SGD(η=0.05) seed: it groups by (ρ, η), after the SGD baselines."""
    from sharpflow.results import Data, group_label, group_order, group_runs

    meta = {"sgd-s0": {"optimizer": "sgd", "lr": 0.05, "seed": 0},
            "sgd-s1": {"optimizer": "sgd", "lr": 0.05, "seed": 1},
            "sam-a": {"optimizer": "sam", "lr": 0.05, "rho": 0.05, "seed": 0},
            "sam-b": {"optimizer": "sam", "lr": 0.05, "rho": 0.2, "seed": 0},
            "sam-c": {"optimizer": "sam", "lr": 0.05, "rho": 0.05, "seed": 1},
            "nsgd-g": {"optimizer": "nsgd", "lr": 0.05, "gamma": 0.1, "k": 5, "seed": 0}}
    data = Data(tables={}, meta=meta, runs=list(meta), studies=[])
    groups = group_runs(data, list(meta))
    assert groups[("sam", 0.05, 0.05)] == ["sam-a", "sam-c"] and groups[("sgd", 0.05, None)] == ["sgd-s0", "sgd-s1"]
    labels = [group_label(g, ["gamma"]) for g in sorted(groups, key=group_order)]
    assert labels == ["γ=0.1", "SGD(η=0.05)", "SAM(ρ=0.05, η=0.05)", "SAM(ρ=0.2, η=0.05)"]
