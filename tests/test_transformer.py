"""The transformer study: its figure (η(t)-scaled sharpness under warmup) on hand-made tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from sharpflow import figures
from sharpflow.figures import warmup
from sharpflow.results import load

STEPS = np.arange(0, 101, 20)


def _eta(step: float, w: int) -> float:
    return 0.01 * min(1.0, 0.1 + 0.9 * step / w)


def _tables(root, run: str, w: int, with_precond: bool = True) -> list:
    d = root / "runs" / run
    d.mkdir(parents=True)
    ids = {"run": run, "status": "ok"}
    batch = [{**ids, "step": s, "epoch": s / 10, "split": "batch", "loss": math.nan, "accuracy": math.nan,
              "lr": _eta(s, w)} for s in range(100)]
    train = [{**ids, "step": int(s), "epoch": s / 10, "split": "train", "loss": 3.0 / (1 + s / 20),
              "accuracy": 0.5, "lr": _eta(s, w)} for s in STEPS]
    pd.DataFrame(batch + train).to_parquet(d / "metrics.parquet", index=False)
    lam = 10.0 + STEPS / 5
    pd.DataFrame({**ids, "step": STEPS, "epoch": STEPS / 10, "rank": 1, "eigenvalue": lam, "converged": True,
                  "residual": 0.0, "rel_residual": 0.0}).to_parquet(d / "spectrum.parquet", index=False)
    paths = [d / "metrics.parquet", d / "spectrum.parquet"]
    if with_precond:
        lr = np.array([_eta(s, w) for s in STEPS])
        pd.DataFrame({**ids, "step": STEPS, "epoch": STEPS / 10, "rank": 1, "eigenvalue": 1000.0 + STEPS,
                      "converged": True, "lr": lr, "beta1": 0.9, "threshold": 38.0 / lr}).to_parquet(
            d / "precond.parquet", index=False)
        paths.append(d / "precond.parquet")
    return paths


def _spec(ws: dict[str, int]) -> dict:
    return {"runs": {run: {"study": "gpt", "lr": 0.01, "batch_size": 32, "optimizer": "adamw", "warmup_steps": w}
                     for run, w in ws.items()}}


def test_warmup_figure_plots_eta_t_times_the_sharpness(tmp_path):
    ws = {"gpt-wu10": 10, "gpt-wu50": 50}
    paths = [p for run, w in ws.items() for p in _tables(tmp_path, run, w)]
    data = load(paths, figures.KINDS["warmup"], _spec(ws))
    fig = warmup.plot(data, {})
    ax_h, ax_p = fig.axes[:2]
    lines = [ln for ln in ax_h.lines if len(ln.get_xdata()) == len(STEPS)]
    assert len(lines) == 2
    for line, w in zip(lines, ws.values(), strict=True):
        # η in force at every checkpoint (the last one from its evaluation row) times λ1/2
        want = [_eta(s, w) * (10.0 + s / 5) / 2 for s in STEPS]
        np.testing.assert_allclose(line.get_ydata(), want)
    # the preconditioned panel: η(t)·λ1(P⁻¹H), and the threshold η·38/η = 38 dotted
    dotted = [ln for ln in ax_p.lines if ln.get_linestyle() == ":"]
    assert dotted and all(np.allclose(ln.get_ydata(), 38.0) for ln in dotted)
    legend = [t.get_text() for t in fig.axes[3].get_legend().get_texts()]
    assert "W=10" in legend and "W=50" in legend  # the warmup length names the runs


def test_warmup_figure_without_precond_draws_the_rest(tmp_path):
    paths = _tables(tmp_path, "gpt-wu10", 10, with_precond=False)
    out = tmp_path / "out"
    figures.draw("warmup", _spec({"gpt-wu10": 10}), paths, out / "w.pdf", out / "w.png")
    assert (out / "w.png").stat().st_size > 1000


@pytest.mark.parametrize("kind", ["warmup"])
def test_warmup_kind_reads_precond_only_where_a_run_has_it(kind):
    assert "precond" in figures.REGISTRY.optional_for(kind)
