"""Figures: every kind draws from synthetic tables in the documented schemas, diverged runs
included, and writes a real PDF and PNG atomically; empty inputs give a "no data" figure."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sharpflow import figures
from sharpflow.io import SharpflowError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS_PER_EPOCH = 100
CHECKPOINTS = list(range(0, 25, 5)) + list(range(25, 601, 25))  # dense early ("zoom"), then every 1/4 epoch
DIVERGE_AT = 400  # the diverged run's first non-finite checkpoint


# ------------------------------------------------------------------------------ synthetic tables
def _ids(run: str, step: int, diverged: bool) -> dict:
    return {"run": run, "step": step, "epoch": step / STEPS_PER_EPOCH,
            "status": "diverged" if diverged else "ok"}


def metrics_table(run: str, lr: float, diverge_at: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Rows per (step, split) as in sharpflow.train.METRICS_COLUMNS."""
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(0, CHECKPOINTS[-1] + 1, 5):
        div = diverge_at is not None and step >= diverge_at
        t = step / 200
        loss = 2.3 * math.exp(-t * lr * 20) + 0.05
        batch_loss = math.nan if div else loss + rng.normal(0, 0.02)
        rows.append({**_ids(run, step, div), "split": "batch", "loss": batch_loss,
                     "accuracy": math.nan if div else 1 - loss / 2.5, "lr": lr, "wall_s": step * 0.01,
                     "dist_init": math.nan, "param_norm": math.nan, "refresh_s": math.nan,
                     "refresh_matvecs": math.nan})
        if step in CHECKPOINTS:
            for split, gap in (("train", 0.0), ("valid", 0.05), ("test", 0.06)):
                acc = math.nan if div else min(1.0, 1 - loss / 2.5 - gap + rng.normal(0, 0.005))
                rows.append({**_ids(run, step, div), "split": split, "loss": math.nan if div else loss + gap,
                             "accuracy": acc, "lr": lr, "wall_s": step * 0.01,
                             "dist_init": math.nan if div else 3 * math.sqrt(t), "param_norm": 10.0,
                             "refresh_s": math.nan, "refresh_matvecs": math.nan})
    return pd.DataFrame(rows)


def lambda_curve(step: np.ndarray | float, lr: float, rank: int) -> np.ndarray:
    """λ_rank(t): rises, peaks (lower and earlier for larger η), settles — the paper's shape."""
    peak, t_peak = 1.6 / lr, 120 * 0.05 / lr
    t = np.asarray(step, float) + 1.0
    return peak * (t / t_peak) * np.exp(1 - t / t_peak) * 0.6 ** (rank - 1) + 2.0 / rank


def spectrum_table(run: str, lr: float, diverge_at: int | None = None, k: int = 5) -> pd.DataFrame:
    rows = []
    for step in CHECKPOINTS:
        div = diverge_at is not None and step >= diverge_at
        lams = [math.nan if div else float(lambda_curve(step, lr, r)) for r in range(1, k + 1)]
        frob = math.nan if div else 1.3 * math.sqrt(sum(x * x for x in lams))
        for r, lam in enumerate(lams, start=1):
            rows.append({**_ids(run, step, div), "rank": r, "eigenvalue": lam, "residual": 1e-4,
                         "rel_residual": 1e-5, "converged": not div, "matvecs": 40, "seconds": 0.1, "n": 512,
                         "k": k, "tol": 1e-3, "which": "LA", "backend": "lanczos", "warm": step > 0,
                         "loss": 0.5, "grad_norm": 1.0, "frobenius": frob, "frobenius_se": 0.1,
                         "trace": math.nan, "trace_se": math.nan})
    return pd.DataFrame(rows)


def alignment_table(run: str, lr: float, diverge_at: int | None = None) -> pd.DataFrame:
    """Columns of sharpflow.analyses.project_kernels.alignment plus run/step/epoch/status."""
    rng = np.random.default_rng(1)
    rows = []
    for step in CHECKPOINTS[::2]:
        div = diverge_at is not None and step >= diverge_at
        for batch in [0, 1, 2, -1]:
            dirs = [(f"e{i}", "eigen", i) for i in range(1, 6)]
            dirs += [("rand1", "random", 1), ("rand2", "random", 2), ("subspace", "subspace", 5)]
            for name, kind, rank in dirs:
                level = {"eigen": 0.08 + 0.4 * min(step, 300) / 300 * lr / 0.1, "random": 0.004,
                         "subspace": 0.5}[kind] * (1.3 if batch == -1 else 1.0)
                c = math.nan if div else abs(level * (1 + rng.normal(0, 0.2)))
                rows.append({**_ids(run, step, div), "source": "full" if batch < 0 else "minibatch",
                             "batch": batch, "direction": name, "kind": kind,
                             "rank": rank, "cos": c, "abs_cos": c,
                             "frac_in_subspace": c * c, "grad_norm": 1.0, "diverged": div})
    return pd.DataFrame(rows)


KS = (-16.0, -8.0, -4.0, -2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def cross_sections_table(run: str, lr: float, diverge_at: int | None = None) -> pd.DataFrame:
    rows = []
    for step in CHECKPOINTS[::2]:
        div = diverge_at is not None and step >= diverge_at
        for name, curv in (("e1", 1.0), ("e3", 0.4), ("e5", 0.15), ("rand1", 0.01)):
            s = 0.05
            lam = curv * float(lambda_curve(step, lr, 1))
            centre = 0.5 + 1.5 * math.exp(-step / 200)
            for k in KS:
                loss = math.nan if div else centre + 0.5 * lam * (k * s) ** 2
                rows.append({**_ids(run, step, div), "direction": name, "k": k, "step_size": s,
                             "offset": k * s, "loss": loss, "rel_loss": loss / centre, "diverged": div})
    return pd.DataFrame(rows)


def decomposed_table(run: str, lr: float, diverge_at: int | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(2)
    rows = []
    for step in CHECKPOINTS[::2]:
        div = diverge_at is not None and step >= diverge_at
        lams = [float(lambda_curve(step, lr, r)) for r in range(1, 6)]
        base = 0.5 + 1.5 * math.exp(-step / 200)
        for grad in range(4):
            dirs = [(f"e{r}", "eigen", r, lams[r - 1]) for r in range(1, 6)]
            dirs += [("rand1", "random", 1, math.nan), ("full", "full", 0, math.nan)]
            for name, kind, rank, lam in dirs:
                gd = 0.5 * (1 + 0.3 * rng.normal()) if kind != "random" else 0.01
                for a in (0.25, 0.5, 1.0, 2.0):
                    eta = a * lr
                    curv = lam if np.isfinite(lam) else 1.0
                    change = -eta * gd**2 * (1 - eta * curv / 2)
                    rel = math.nan if div else 100 * change / base
                    rows.append({**_ids(run, step, div), "grad": grad, "direction": name, "kind": kind,
                                 "rank": rank, "multiplier": a, "lr_eff": eta, "eigenvalue": lam,
                                 "eta_lambda_half": eta * lam / 2, "g_dot_d": gd, "loss_before": base,
                                 "loss_after": base * (1 + rel / 100), "rel_change_pct": rel,
                                 "diverged": div})
    return pd.DataFrame(rows)


def escape_table(run: str, lr: float, diverge: bool = False) -> pd.DataFrame:
    rows = []
    modes = (("none", 1.0), ("remove", 0.0), ("isolate", 1.0), ("rescale", 0.5), ("rescale", 2.0))
    for mode, factor in modes:
        for step in range(0, 201, 10):
            div = diverge and mode == "rescale" and factor == 2.0 and step >= 120
            slow = {"none": 1.0, "remove": 0.4, "isolate": 0.05, "rescale": factor}[mode]
            loss = math.nan if div else 0.3 + 0.7 * math.exp(-step * slow / 80)
            lam = math.nan if div else 10 + 6 * (1 - math.exp(-step / 50)) * (1.5 if mode == "remove" else 1)
            rows.append({"step": step, "loss": loss, "lambda_max": lam, "mode": mode, "factor": factor,
                         "lr": lr, "e1_coord": 0.0, "dist_from_start": step * 0.01, "diverged": div,
                         "run": run, "epoch": 3.0, "status": "diverged" if div else "ok"})
    return pd.DataFrame(rows)


ETA_RUNS = {"eta-lr0.02": 0.02, "eta-lr0.05": 0.05, "eta-lr0.1": 0.1}
DIVERGED_RUN = "eta-lr0.1"


def run_meta(study: str, lr: float, bs: int | str = 32, optimizer: str = "sgd", gamma: float | None = None,
             seed: int = 0, k: int | None = None) -> dict:
    return {"study": study, "lr": lr, "batch_size": bs, "momentum": 0.0, "optimizer": optimizer,
            "gamma": gamma, "seed": seed, "k": k}


def write_study(root: Path, with_divergence: bool = True) -> tuple[dict, dict[str, list[Path]]]:
    """The η grid (3 runs, the largest η diverges) as Parquet files; returns (spec, kind -> paths)."""
    paths: dict[str, list[Path]] = {}
    runs = {}
    for run, lr in ETA_RUNS.items():
        div = DIVERGE_AT if with_divergence and run == DIVERGED_RUN else None
        runs[run] = run_meta("eta", lr)
        d = root / "runs" / run
        d.mkdir(parents=True)
        tables = {"metrics": metrics_table(run, lr, div), "spectrum": spectrum_table(run, lr, div),
                  "alignment": alignment_table(run, lr, div),
                  "cross_sections": cross_sections_table(run, lr, div),
                  "decomposed": decomposed_table(run, lr, div),
                  "escape": escape_table(run, lr, div is not None)}
        for kind, df in tables.items():
            df.to_parquet(d / f"{kind}.parquet", index=False)
            paths.setdefault(kind, []).append(d / f"{kind}.parquet")
    return {"studies": ["eta"], "style": {}, "runs": runs}, paths


def write_fullbatch(root: Path) -> tuple[dict, dict[str, list[Path]]]:
    """Two full-batch runs (1 step = 1 epoch); the larger η diverges at step 40."""
    paths: dict[str, list[Path]] = {}
    runs = {}
    for run, lr, div in (("fb-lr0.01", 0.01, None), ("fb-lr0.1", 0.1, 40)):
        runs[run] = run_meta("fb", lr, bs="full")
        d = root / "runs" / run
        d.mkdir(parents=True)
        met = metrics_table(run, lr, None if div is None else div * 10)
        met["epoch"] = met["step"]
        spec = spectrum_table(run, lr, None if div is None else div * 10)
        spec["epoch"] = spec["step"]
        for kind, df in (("metrics", met), ("spectrum", spec)):
            df.to_parquet(d / f"{kind}.parquet", index=False)
            paths.setdefault(kind, []).append(d / f"{kind}.parquet")
    return {"studies": ["fb"], "style": {}, "runs": runs}, paths


def write_nsgd(root: Path, ks: tuple[int, ...] = (5,)) -> tuple[dict, dict[str, list[Path]]]:
    """NSGD γ ∈ {0.1, 1} × seeds {777, 778} (× K), SGD baselines η ∈ {0.1, 0.01}; one seed diverges."""
    paths: dict[str, list[Path]] = {}
    runs = {}
    cases = [(f"nsgd-g{g}-K{k}-s{s}", 0.05, "nsgd", g, s, k)
             for g in (0.1, 1.0) for k in ks for s in (777, 778)]
    cases += [(f"sgd-lr{lr}", lr, "sgd", None, 777, None) for lr in (0.1, 0.01)]
    for run, lr, opt, g, s, k in cases:
        runs[run] = run_meta("nsgd", lr, optimizer=opt, gamma=g, seed=s, k=k)
        eff = lr * (g if g is not None else 1.0) * (1 + 0.1 * (k or 0))
        div = 300 if (g == 1.0 and s == 778 and k == ks[0]) else None
        d = root / "runs" / run
        d.mkdir(parents=True)
        for kind, df in (("metrics", metrics_table(run, lr, div, seed=s)),
                         ("spectrum", spectrum_table(run, eff, div))):
            df.to_parquet(d / f"{kind}.parquet", index=False)
            paths.setdefault(kind, []).append(d / f"{kind}.parquet")
    return {"studies": ["nsgd"], "style": {}, "runs": runs}, paths


def inputs_for(kind: str, paths: dict[str, list[Path]]) -> list[Path]:
    return [p for t in figures.KINDS[kind] for p in paths.get(t, [])]


def assert_figure(out: Path, kind: str) -> None:
    pdf, png = out / f"{kind}.pdf", out / f"{kind}.png"
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert pdf.stat().st_size > 3000 and png.stat().st_size > 3000
    leftovers = [p.name for p in out.iterdir() if p.name not in {f"{kind}.pdf", f"{kind}.png"}]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels from the PNG header."""
    head = path.read_bytes()[16:24]
    return int.from_bytes(head[:4], "big"), int.from_bytes(head[4:], "big")


# --------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    return write_study(root)


STUDY_KINDS = ["evolution", "grid", "alignment", "cross_sections", "decomposed", "escape"]


@pytest.mark.parametrize("kind", STUDY_KINDS)
def test_every_kind_draws_with_a_diverged_run(study, tmp_path, kind):
    spec, paths = study
    out = tmp_path / "out"
    spec = {**spec, "kind": kind}
    figures.draw(kind, spec, inputs_for(kind, paths), out / f"{kind}.pdf", out / f"{kind}.png")
    assert_figure(out, kind)


def test_fullbatch_draws_and_marks_divergence(tmp_path):
    spec, paths = write_fullbatch(tmp_path / "in")
    out = tmp_path / "out"
    inputs = inputs_for("fullbatch", paths)
    figures.draw("fullbatch", spec, inputs, out / "fullbatch.pdf", out / "fullbatch.png")
    assert_figure(out, "fullbatch")


@pytest.mark.parametrize("ks", [(5,), (1, 5)], ids=["gamma", "k-ablation"])
def test_nsgd_figure(tmp_path, ks):
    spec, paths = write_nsgd(tmp_path / "in", ks)
    out = tmp_path / "out"
    figures.draw("nsgd", spec, inputs_for("nsgd", paths), out / "nsgd.pdf", out / "nsgd.png")
    assert_figure(out, "nsgd")


def test_alignment_views(study):
    """Default: alignment and training accuracy against epoch (one accuracy curve per run, its
    metrics' train rows); style.view 'paper': against training accuracy and epoch; else an error."""
    from sharpflow import results as _common
    from sharpflow.figures import alignment, style

    spec, paths = study
    data = _common.load(inputs_for("alignment", paths), figures.KINDS["alignment"], spec)
    with style.context():
        fig = alignment.plot(data, {})
        ax_al, ax_tr = fig.axes[:2]
        assert ax_al.get_xlabel() == "epoch" and ax_tr.get_ylabel() == "training accuracy (%)"
        assert len(ax_tr.lines) == len(ETA_RUNS)
        met = data.rows("metrics", "eta-lr0.02")
        train = met[met["split"] == "train"].sort_values("step")
        drawn = {tuple(np.round(ln.get_xdata(), 9)) for ln in ax_tr.lines}
        assert tuple(np.round(train["epoch"].to_numpy(float), 9)) in drawn
        paper = alignment.plot(data, {"view": "paper"})
        assert paper.axes[0].get_xlabel() == "training accuracy (%)" and paper.axes[1].get_xlabel() == "epoch"
        with pytest.raises(ValueError, match="view"):
            alignment.plot(data, {"view": "nope"})


def test_divergence_is_marked_in_the_legend(study):
    """The diverged run's legend entry says so, and a × is drawn; the others say nothing."""
    from sharpflow import results as _common
    from sharpflow.figures import grid, style

    spec, paths = study
    data = _common.load(inputs_for("grid", paths), figures.KINDS["grid"], spec)
    assert data.divergence(DIVERGED_RUN) == (DIVERGE_AT, DIVERGE_AT / STEPS_PER_EPOCH)
    assert data.divergence("eta-lr0.02") is None
    with style.context():
        fig = grid.plot(data, {})
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "η=0.1 (diverged)" in labels and "η=0.02" in labels and "η=0.05" in labels
    crosses = [ln for ln in ax.lines if ln.get_marker() == "x"]
    assert len(crosses) == 1
    # at the divergence epoch, at the last finite λ1 of that run
    assert crosses[0].get_xdata()[0] == DIVERGE_AT / STEPS_PER_EPOCH
    last_ok = max(s for s in CHECKPOINTS if s < DIVERGE_AT)
    assert crosses[0].get_ydata()[0] == pytest.approx(float(lambda_curve(last_ok, 0.1, 1)))
    # one 2/η stability line per η, at 2/η
    hlines = sorted(ln.get_ydata()[0] for ln in ax.lines if ln.get_linestyle() == ":")
    assert hlines == pytest.approx(sorted(2 / lr for lr in ETA_RUNS.values()))


def test_grid_colours_follow_eta(study):
    """Same η, same colour; the swept quantity (η) is detected from the spec."""
    from sharpflow import results as _common
    from sharpflow.figures import style

    spec, paths = study
    data = _common.load(inputs_for("grid", paths), ("spectrum",), spec)
    key, colours = style.run_colours(data, data.runs)
    assert key == "lr"
    assert len(set(colours.values())) == 3
    # a subset of the runs keeps the colours the full spec gives them
    _, sub = style.run_colours(data, ["eta-lr0.02", "eta-lr0.1"])
    assert sub["eta-lr0.1"] == colours["eta-lr0.1"]


def test_two_dimensional_sweep_gets_one_colour_per_run(tmp_path):
    """When η and S both vary, colouring by η would give two runs one colour: use one per run."""
    from sharpflow import results as _common
    from sharpflow.figures import style

    runs = {"g-a": run_meta("g", 0.1, 32), "g-b": run_meta("g", 0.1, 128), "g-c": run_meta("g", 0.05, 32)}
    paths = []
    for run, m in runs.items():
        d = tmp_path / "runs" / run
        d.mkdir(parents=True)
        spectrum_table(run, m["lr"]).to_parquet(d / "spectrum.parquet", index=False)
        paths.append(d / "spectrum.parquet")
    data = _common.load(paths, ("spectrum",), {"runs": runs})
    key, colours = style.run_colours(data, data.runs)
    assert key is None and len(set(colours.values())) == 3
    assert _common.varying(data, data.runs) == ["lr", "batch_size"]


def test_grid_draws_seeds_as_a_mean_with_a_band(tmp_path):
    """Three seeds of η = 0.05 (λ scaled by 0.9, 1, 1.2; seeds 1 and 2 from a replicate study, which the
    spec already names by the study it repeats) and one run of η = 0.1: one panel; the seeds' λ1 drawn
    as their mean, with a band from their smallest to largest λ1; the lone run as itself."""
    from sharpflow.figures import grid

    runs = {"eta-lr0.05": run_meta("eta", 0.05), "eta_seeds-lr0.05-seed1": run_meta("eta", 0.05, seed=1),
            "eta_seeds-lr0.05-seed2": run_meta("eta", 0.05, seed=2), "eta-lr0.1": run_meta("eta", 0.1)}
    scale = {"eta-lr0.05": 0.9, "eta_seeds-lr0.05-seed1": 1.0, "eta_seeds-lr0.05-seed2": 1.2, "eta-lr0.1": 1.0}
    paths = []
    for run, m in runs.items():
        d = tmp_path / "runs" / run
        d.mkdir(parents=True)
        sp = spectrum_table(run, m["lr"])
        sp["eigenvalue"] *= scale[run]
        sp.to_parquet(d / "spectrum.parquet", index=False)
        paths.append(d / "spectrum.parquet")
    from sharpflow import results as _common

    fig = grid.plot(_common.load(paths, ("spectrum",), {"runs": runs}), {})
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 1
    ax = axes[0]
    epochs = np.array(CHECKPOINTS) / STEPS_PER_EPOCH
    lam1 = lambda_curve(np.array(CHECKPOINTS), 0.05, 1)
    solid = {ln.get_label(): ln for ln in ax.lines if ln.get_linestyle() == "-" and not ln.get_label().startswith("_")}
    mean = next(ln for label, ln in solid.items() if "mean of 3 seeds" in label)
    assert mean.get_ydata() == pytest.approx(lam1 * (0.9 + 1.0 + 1.2) / 3)
    assert list(mean.get_xdata()) == pytest.approx(list(epochs))
    lone = next(ln for label, ln in solid.items() if "seeds" not in label)
    assert lone.get_ydata() == pytest.approx(lambda_curve(np.array(CHECKPOINTS), 0.1, 1))
    (band,) = ax.collections[:1]
    verts = band.get_paths()[0].vertices
    assert verts[:, 1].min() == pytest.approx((0.9 * lam1).min())
    assert verts[:, 1].max() == pytest.approx((1.2 * lam1).max())
    assert len(ax.collections) == 1  # one band: the lone run has none


@pytest.mark.parametrize("kind", list(figures.KINDS))
def test_empty_inputs_give_a_no_data_figure(tmp_path, kind):
    out = tmp_path / "out"
    figures.draw(kind, {"studies": [], "style": {}, "runs": {}}, [], out / f"{kind}.pdf", out / f"{kind}.png")
    assert_figure(out, kind)
    w, h = png_size(out / f"{kind}.png")
    assert (w, h) == (680, 320)  # style.no_data: 3.4 × 1.6 in at 200 dpi


def test_empty_tables_give_a_no_data_figure(tmp_path):
    d = tmp_path / "runs" / "eta-lr0.1"
    d.mkdir(parents=True)
    spectrum_table("eta-lr0.1", 0.1).iloc[:0].to_parquet(d / "spectrum.parquet", index=False)
    out = tmp_path / "out"
    figures.draw("grid", {"runs": {}}, [d / "spectrum.parquet"], out / "grid.pdf", out / "grid.png")
    assert png_size(out / "grid.png") == (680, 320)


def test_all_nan_run_does_not_crash(tmp_path):
    """A run that diverged before its first checkpoint: every value NaN."""
    d = tmp_path / "runs" / "eta-lr9"
    d.mkdir(parents=True)
    run, lr = "eta-lr9", 9.0
    paths = {"metrics": metrics_table(run, lr, diverge_at=0), "spectrum": spectrum_table(run, lr, 0),
             "alignment": alignment_table(run, lr, 0), "cross_sections": cross_sections_table(run, lr, 0),
             "decomposed": decomposed_table(run, lr, 0)}
    for kind, df in paths.items():
        df.to_parquet(d / f"{kind}.parquet", index=False)
    spec = {"runs": {"eta-lr9": run_meta("eta", 9.0)}}
    for kind in ("evolution", "grid", "fullbatch", "alignment", "cross_sections", "decomposed", "nsgd"):
        out = tmp_path / kind
        inputs = [d / f"{t}.parquet" for t in figures.KINDS[kind]]
        figures.draw(kind, spec, inputs, out / "f.pdf", out / "f.png")
        assert (out / "f.png").read_bytes()[:8] == PNG_MAGIC


def test_output_is_deterministic(study, tmp_path):
    spec, paths = study
    outs = []
    for i in range(2):
        out = tmp_path / str(i)
        figures.draw("grid", spec, inputs_for("grid", paths), out / "g.pdf", out / "g.png")
        outs.append(((out / "g.pdf").read_bytes(), (out / "g.png").read_bytes()))
    assert outs[0] == outs[1]


def test_failed_draw_leaves_previous_output_and_no_temp_files(study, tmp_path):
    spec, paths = study
    out = tmp_path / "out"
    figures.draw("grid", spec, inputs_for("grid", paths), out / "grid.pdf", out / "grid.png")
    before = (out / "grid.pdf").read_bytes()
    with pytest.raises(SharpflowError, match="not one of the tables read here"):
        figures.draw("grid", spec, paths["metrics"], out / "grid.pdf", out / "grid.png")
    assert (out / "grid.pdf").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["grid.pdf", "grid.png"]


def test_kind_resolution():
    assert figures.REGISTRY.resolve("grid", {}) == "grid"
    assert figures.REGISTRY.resolve("fig4_eta", {"kind": "grid"}) == "grid"
    with pytest.raises(SharpflowError, match="unknown figure kind"):
        figures.REGISTRY.resolve("nope", {})
    with pytest.raises(SharpflowError, match="spec says kind"):
        figures.REGISTRY.resolve("grid", {"kind": "evolution"})


def test_kinds_modules_and_captions_are_consistent():
    from sharpflow.analyses import TABLE_OWNERS

    root = Path(__file__).resolve().parents[1]
    reg = figures.REGISTRY
    assert set(figures.KINDS) == set(reg.modules) == set(reg.captions)
    for kind, module in reg.modules.items():
        assert (reg.directory / module).is_file(), module
        assert (root / reg.captions[kind]).is_file(), reg.captions[kind]
        assert set(figures.KINDS[kind]) <= {"metrics", "spectrum", "spectrum_best", *TABLE_OWNERS}
        for path in reg.code_files(kind):
            assert path.is_file(), path


def test_package_import_is_light():
    code = ("import json, sys, sharpflow.figures, sharpflow.tables; "
            "heavy = ('matplotlib', 'pandas', 'torch', 'numpy'); "
            "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(res.stdout) == []


@pytest.mark.parametrize("kind", ["grid", "evolution"])
def test_unconverged_eigenvalues_are_ringed(tmp_path, kind):
    """A pair the solver did not certify is drawn with a hollow ring and named in the legend;
    converged pairs are not ringed."""
    from sharpflow import results as _common
    from sharpflow.figures import evolution, grid, style

    spec, paths = write_study(tmp_path / "in", with_divergence=False)
    target = paths["spectrum"][1]  # eta-lr0.05
    sp = pd.read_parquet(target)
    bad_steps = CHECKPOINTS[-3:]
    sp.loc[sp.step.isin(bad_steps), "converged"] = False
    sp.to_parquet(target, index=False)
    data = _common.load(inputs_for(kind, paths), figures.KINDS[kind], spec)
    with style.context():
        fig = (grid if kind == "grid" else evolution).plot(data, {})
    rings = [ln for ax in fig.axes for ln in ax.lines if ln.get_gid() == "unconverged"]
    assert rings, "no unconverged marker drawn"
    ringed_x = sorted({float(x) for ln in rings for x in ln.get_xdata()})
    spe = STEPS_PER_EPOCH if kind == "grid" else 1  # grid plots epochs, evolution steps
    assert ringed_x == pytest.approx(sorted(s / spe for s in bad_steps))
    legends = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert "not converged (residual > tol)" in legends


def test_converged_eigenvalues_are_not_ringed(study):
    from sharpflow import results as _common
    from sharpflow.figures import grid, style

    spec, paths = study
    data = _common.load(inputs_for("grid", paths), figures.KINDS["grid"], spec)
    with style.context():
        fig = grid.plot(data, {})
    assert not [ln for ln in fig.axes[0].lines if ln.get_gid() == "unconverged"]
    assert "not converged (residual > tol)" not in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
