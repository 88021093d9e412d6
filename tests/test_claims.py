"""The claims stage: hand-made results trees where each claim holds, fails, or lacks data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sharpflow.claims import CLAIMS, ClaimsConfig
from sharpflow.claims.checks import FAILS, HOLDS, NO_DATA, evaluate, make_claims

EPOCHS = list(range(11))  # checkpoints at epochs 0..10, 10 steps per epoch


def _meta(lr: float, study: str, bs: int | str = 32, gamma: float | None = None, seed: int = 0) -> dict:
    return {"study": study, "lr": lr, "batch_size": bs, "momentum": 0.0, "optimizer": "nsgd" if gamma else "sgd",
            "gamma": gamma, "k": 5 if gamma else None, "seed": seed}


def _spectrum(lams: list[float]) -> pd.DataFrame:
    return pd.DataFrame([{"step": 10 * e, "epoch": float(e), "status": "ok", "rank": 1, "eigenvalue": lam,
                          "converged": True} for e, lam in zip(EPOCHS, lams, strict=True)])


def _metrics(valid: list[float], test: list[float]) -> pd.DataFrame:
    rows = []
    for i, e in enumerate(EPOCHS[: len(valid)]):
        for split, acc in (("train", 0.5), ("valid", valid[i]), ("test", test[i])):
            rows.append({"step": 10 * e, "epoch": float(e), "split": split, "loss": 1.0, "accuracy": acc,
                         "dist_init": 1.0, "status": "ok"})
    return pd.DataFrame(rows)


def _alignment(eig: float, rnd: float) -> pd.DataFrame:
    rows = []
    for e in EPOCHS:
        for rank in range(1, 6):
            rows.append({"step": 10 * e, "epoch": float(e), "status": "ok", "source": "minibatch", "kind": "eigen",
                         "rank": rank, "abs_cos": eig})
        rows.append({"step": 10 * e, "epoch": float(e), "status": "ok", "source": "minibatch", "kind": "random",
                     "rank": 1, "abs_cos": rnd})
    return pd.DataFrame(rows)


def _decomposed(raised_above: int, raised_below: int, n: int = 6) -> pd.DataFrame:
    rows = []
    for side, raised in ((1.5, raised_above), (0.5, raised_below)):
        for i in range(n):
            rows.append({"step": 10 * i, "epoch": float(i), "status": "ok", "direction": "e1", "multiplier": 1.0,
                         "eta_lambda_half": side, "rel_change_pct": 1.0 if i < raised else -1.0, "diverged": False})
    return pd.DataFrame(rows)


def _write(root: Path, run: str, **tables: pd.DataFrame) -> list[Path]:
    d = root / "runs" / run
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for kind, df in tables.items():
        df.assign(run=run).to_parquet(d / f"{kind}.parquet", index=False)
        out.append(d / f"{kind}.parquet")
    return out


def _nsgd_run(lmax_best: float, test_best: float) -> dict[str, pd.DataFrame]:
    """Best validation at epoch 2, where λ_max is ``lmax_best`` and test accuracy ``test_best``."""
    lams = [1.0, 2.0, lmax_best] + [lmax_best / 2] * 8
    return {"metrics": _metrics([0.1, 0.5, 0.9, 0.8], [0.1, 0.5, test_best, 0.7]), "spectrum": _spectrum(lams)}


def tree(root: Path, case: str) -> tuple[dict, list[Path]]:
    """A study whose every claim holds ("holds") or fails ("fails")."""
    good = case == "holds"
    inputs: list[Path] = []
    runs: dict[str, dict] = {}
    # η grid: peak λ1 80 / 35 / 18 at epoch 2 then down (holds), or rising to the end with the largest
    # peak at the largest η (fails claims 1 and 2); η·λ1/2 at η = 0.1: about 0.8 (holds) or 3 (fails)
    for lr, peak in ((0.02, 80.0), (0.05, 35.0), (0.1, 18.0)):
        run = f"eta-lr{lr}"
        runs[run] = _meta(lr, "eta")
        if good:
            lams = [peak / 4, peak / 2, peak] + [0.85 * peak] * 8
        else:
            top = {0.02: 10.0, 0.05: 20.0, 0.1: 60.0}[lr]
            lams = list(np.linspace(top / 10, top, len(EPOCHS)))
        inputs += _write(root, run, spectrum=_spectrum(lams), alignment=_alignment(0.2 if good else 0.03, 0.02),
                         decomposed=_decomposed(6, 0) if good else _decomposed(3, 3))
    # NSGD: γ=0.1 sharper, γ=5 flatter, both beyond two seeds' spread (holds); or all alike (fails),
    # with γ=0.1 far worse in test accuracy
    levels = {0.1: (30.0, 0.80), 1.0: (20.0, 0.80), 5.0: (10.0, 0.80)} if good else \
        {0.1: (20.0, 0.60), 1.0: (20.0, 0.80), 5.0: (20.5, 0.80)}
    for gamma, (lam, acc) in levels.items():
        for seed in (0, 1):
            run = f"nsgd-gamma{gamma:g}-seed{seed}"
            runs[run] = _meta(0.05, "nsgd", gamma=gamma, seed=seed)
            inputs += _write(root, run, **_nsgd_run(lam + seed, acc + 0.01 * seed))
    # Edge of stability (claim 8): full-batch GD reaching 2/η and hovering at 1.05 of it (holds) or at
    # 2 (fails); in both, a small η that never reaches it (left out)
    for lr, level in ((0.1, 1.05 if good else 2.0), (0.2, 1.1 if good else 2.0), (0.01, 0.3)):
        run = f"eos-lr{lr}"
        runs[run] = _meta(lr, "eos", bs="full")
        ratios = [level * min(1.0, (e + 1) / 3) for e in EPOCHS] if level > 1 else [level * e / 10 for e in EPOCHS]
        inputs += _write(root, run, spectrum=_spectrum([2 * r / lr for r in ratios]))
    # Batch sharpness (claim 9): η·BS/2 at 1.0 with η·λ1/2 at 0.7 (holds), or at 0.4 (fails)
    for lr in (0.05, 0.1):
        run = f"eta-lr{lr}"
        inputs += _write(root, run, batch_sharpness=pd.DataFrame(
            [{"step": 10 * e, "epoch": float(e), "status": "ok", "ratio": (1.0 if good else 0.4) * min(1, (e + 1) / 4),
              "lambda1_ratio": 0.7} for e in EPOCHS]))
    # Adam (claim 10): λ1(P⁻¹H) at 0.9 of its threshold (holds) or 3 times it (fails)
    for lr in (0.001, 0.002):
        run = f"adam-lr{lr}"
        runs[run] = {**_meta(lr, "adam", bs="full"), "optimizer": "adam"}
        level = 0.9 if good else 3.0
        inputs += _write(root, run, precond=pd.DataFrame(
            [{"step": 10 * e, "epoch": float(e), "status": "ok", "rank": 1, "ratio": level * min(1, (e + 1) / 3)}
             for e in EPOCHS]))
    # The tiny subspace (claim 11): share 0.9 and overlap 0.8 at k = 10 (holds), or share 0.2 (fails)
    for lr in (0.05, 0.1):
        run = f"eta-lr{lr}"
        share = 0.9 if good else 0.2
        inputs += _write(root, run, subspace=pd.DataFrame(
            [{"step": 10 * e, "epoch": float(e), "status": "ok", "k": k, "fraction": share * k / 10,
              "overlap": 0.8 if e else math.nan} for e in EPOCHS for k in range(1, 11)]))
    grid_runs = [r for r in runs if r.startswith("eta")]
    nsgd_runs = [r for r in runs if r.startswith("nsgd")]
    eos_runs = [r for r in runs if r.startswith("eos")]
    adam_runs = [r for r in runs if r.startswith("adam")]
    plan = {"1": {"runs": grid_runs, "figures": ["figures/eta_grid"]},
            "2": {"runs": grid_runs, "figures": ["figures/eta_grid"]},
            "3": {"runs": grid_runs, "figures": ["figures/eta_grid"]},
            "4": {"runs": grid_runs, "figures": ["figures/alignment"]},
            "5": {"runs": grid_runs, "figures": ["figures/decomposed"]},
            "6": {"runs": nsgd_runs, "figures": ["tables/nsgd"]},
            "7": {"runs": nsgd_runs, "figures": ["tables/nsgd"]},
            "8": {"runs": eos_runs, "figures": ["figures/eos"]},
            "9": {"runs": grid_runs, "figures": ["figures/batch_sharpness"]},
            "10": {"runs": adam_runs, "figures": ["figures/adam"]},
            "11": {"runs": grid_runs, "figures": ["figures/subspace"]}}
    return {"config": {}, "claims": plan, "runs": runs}, inputs


def verdicts(rows: list[dict]) -> dict[int, str]:
    return {r["number"]: r["verdict"] for r in rows}


def test_every_claim_holds(tmp_path):
    spec, inputs = tree(tmp_path, "holds")
    rows = evaluate(spec, inputs)
    assert verdicts(rows) == {c.number: HOLDS for c in CLAIMS}, [(r["number"], r["reason"]) for r in rows]
    by = {r["number"]: r for r in rows}
    assert "ρ(η, peak λ_1) = -1.00 over 3 runs" in by[2]["measured"]
    assert "10.0×" in by[4]["measured"]  # 0.2 vs 0.02
    assert "η·λ_1/2 > 1: 18 of 18 steps raised the loss; < 1: 0 of 18" in by[5]["measured"]  # 3 runs × 6
    assert "γ=0.1: λ_max at best validation 30.5 ± 0.707 vs γ=1 20.5 ± 0.707" in by[6]["measured"]
    assert "peak 18 at epoch 2 of 10, final/peak 0.85" in by[1]["measured"]
    # claim 8: reached at epoch 2 (step 20); median 1.05 and 1.1; η = 0.01 never reached 0.8
    assert "eos-lr0.1 (η=0.1, S=full, seed=0): reached at step 20; median η·λ_1/2 1.05" in by[8]["measured"]
    assert "never reached 0.80 (max 0.30)" in by[8]["measured"]
    assert "did not reach the edge (left out): eos-lr0.01" in by[8]["reason"]
    assert "median η·BS/2 1.00, η·λ_1/2 0.70" in by[9]["measured"]  # eta-lr0.02 has no table: left out
    assert "missing tables (batch_sharpness) for: eta-lr0.02" in by[9]["reason"]
    assert "median λ_1(P⁻¹H)/threshold 0.90" in by[10]["measured"]
    assert "top-10 share 0.90, overlap 0.80" in by[11]["measured"]


def test_every_claim_fails(tmp_path):
    spec, inputs = tree(tmp_path, "fails")
    rows = evaluate(spec, inputs)
    assert verdicts(rows) == {c.number: FAILS for c in CLAIMS}, [(r["number"], r["reason"]) for r in rows]
    by = {r["number"]: r for r in rows}
    assert "fails for eta-lr0.02, eta-lr0.05, eta-lr0.1" in by[1]["reason"]  # peak at the last checkpoint
    assert "ρ(η, peak λ_1) = +1.00" in by[2]["measured"]
    assert "fails for eta-lr0.1" in by[3]["reason"]  # η·λ1/2 = 0.1·60/2 = 3 > 2
    assert "fails for γ=0.1, γ=5" in by[6]["reason"]
    assert "fails for γ=0.1" in by[7]["reason"]
    assert "fails for eos-lr0.1, eos-lr0.2" in by[8]["reason"]  # median 2 > 1.25
    assert "fails for eta-lr0.05, eta-lr0.1" in by[9]["reason"]
    assert "fails for adam-lr0.001, adam-lr0.002" in by[10]["reason"]
    assert "fails for eta-lr0.05, eta-lr0.1" in by[11]["reason"]


def test_edge_claims_need_the_edge_reached_and_enough_eigenvectors(tmp_path):
    """No full-batch run reaching 2/η (claim 8) and a spectrum with fewer eigenvectors than classes
    (claim 11) give "not enough data"; a run without the precond table, too."""
    spec, inputs = tree(tmp_path, "holds")
    spec["claims"]["8"]["runs"] = ["eos-lr0.01"]
    spec["claims"]["10"]["runs"] = ["eta-lr0.05"]
    spec["config"] = {"classes": 12}
    rows = {r["number"]: r for r in evaluate(spec, inputs)}
    assert rows[8]["verdict"] == NO_DATA and "no run reached the edge: eos-lr0.01" in rows[8]["reason"]
    assert rows[10]["verdict"] == NO_DATA and "missing tables (precond) for: eta-lr0.05" in rows[10]["reason"]
    assert rows[11]["verdict"] == NO_DATA and "fewer than 12 eigenvectors" in rows[11]["reason"]


def test_thresholds_come_from_the_config(tmp_path):
    """The same runs; a stricter alignment factor (the measured multiple is 10) flips claim 4 only."""
    spec, inputs = tree(tmp_path, "holds")
    spec["config"] = {"alignment_factor": 11.0}
    assert verdicts(evaluate(spec, inputs))[4] == FAILS
    with pytest.raises(ValueError):
        ClaimsConfig.model_validate({"alignment_factor": -1})


def test_not_enough_data_names_what_is_missing(tmp_path):
    spec, inputs = tree(tmp_path, "holds")
    # one seed per γ: no spread, so no verdict on claims 6 and 7
    inputs = [p for p in inputs if "seed1" not in p.parent.name]
    spec["claims"]["6"]["runs"] = [r for r in spec["claims"]["6"]["runs"] if r.endswith("seed0")]
    spec["claims"]["7"]["runs"] = list(spec["claims"]["6"]["runs"])
    # no alignment study in the config; a grid run whose tables never got written
    spec["claims"]["4"] = {"runs": [], "figures": []}
    spec["claims"]["1"]["runs"] = [*spec["claims"]["1"]["runs"], "eta-lr0.5"]
    spec["runs"]["eta-lr0.5"] = _meta(0.5, "eta")
    rows = {r["number"]: r for r in evaluate(spec, inputs)}
    assert rows[6]["verdict"] == NO_DATA and rows[7]["verdict"] == NO_DATA
    assert "≥ 2 seeds each" in rows[6]["reason"] and "nsgd-gamma0.1-seed0" in rows[6]["reason"]
    assert rows[4]["verdict"] == NO_DATA and "no study of kind 'alignment'" in rows[4]["reason"]
    assert rows[1]["verdict"] == HOLDS and "missing tables (spectrum) for: eta-lr0.5" in rows[1]["reason"]
    # too few points around η·λ1/2 = 1 for claim 5: 3 on each side (one per run), 5 needed
    spec2, inputs2 = tree(tmp_path / "b", "holds")
    for p in inputs2:
        if p.stem == "decomposed":
            _decomposed(1, 0, n=1).assign(run=p.parent.name).to_parquet(p, index=False)
    assert verdicts(evaluate(spec2, inputs2))[5] == NO_DATA


def test_outputs_are_written(tmp_path):
    spec, inputs = tree(tmp_path, "fails")
    out = tmp_path / "out"
    make_claims(spec, inputs, out / "claims.md", out / "claims.tex", out / "claims.csv")
    csv = pd.read_csv(out / "claims.csv")
    assert list(csv["number"]) == [c.number for c in CLAIMS]
    assert set(csv["verdict"]) == {FAILS} and csv["figures"].iloc[3] == "figures/alignment"
    md = (out / "claims.md").read_text()
    assert "does not hold" in md and r"alignment\_factor=3.0" in md
    tex = (out / "claims.tex").read_text()
    assert r"\toprule" in tex and not math.isnan(csv["number"].sum())
    assert sorted(p.name for p in out.iterdir()) == ["claims.csv", "claims.md", "claims.tex"]


def test_cli_from_a_config_and_its_results_tree(tmp_path):
    """`sharpflow claims --config` plans the claims from the config's figures and tables, reads the
    tables that exist under its results root and writes tables/claims.* there."""
    import subprocess
    import sys

    import yaml

    _, _ = tree(tmp_path / "results", "holds")
    cfg = {
        "results": str(tmp_path / "results"),
        "datasets": {"d": {"source": "mnist1d"}},
        "defaults": {"dataset": "d", "model": {"name": "cnn1d"}, "optimizer": {"lr": 0.05, "batch_size": 32},
                     "steps": 100, "device": "cpu"},
        "studies": {"eta": {"sweep": {"optimizer.lr": [0.02, 0.05, 0.1, 0.5]}},
                    "nsgd": {"base": {"optimizer": {"name": "nsgd", "nsgd": {"k": 5}}},
                             "sweep": {"optimizer.nsgd.gamma": [0.1, 1, 5], "seed": [0, 1]}}},
        "figures": {"eta_grid": {"kind": "grid", "studies": ["eta"]},
                    "decomposed": {"kind": "decomposed", "studies": ["eta"]}},
        "tables": {"nsgd": {"kind": "nsgd", "studies": ["nsgd"]}},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "sharpflow.cli", "claims", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    csv = pd.read_csv(tmp_path / "results" / "tables" / "claims.csv").set_index("number")
    assert csv.loc[2, "verdict"] == HOLDS and csv.loc[6, "verdict"] == HOLDS
    assert csv.loc[4, "verdict"] == NO_DATA  # no alignment figure in this config
    assert "eta-lr0.5" in csv.loc[1, "reason"]  # planned by the config, no tables on disk
    assert "claim 4: not enough data" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "sharpflow.cli", "claims"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "exactly one of --spec" in bad.stderr
