"""Worst-case, average-case and PAC-Bayes sharpness against closed forms on quadratics, and the analysis."""

from __future__ import annotations

import math

import pytest
import torch

from sharpflow.analyses.sharpness_kernels import average_case, pac_bayes_sigma, worst_case

DT = torch.float64


def _quadratic(eigs: list[float], seed: int = 0) -> tuple[torch.Tensor, callable]:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen, dtype=DT))
    a = (q * torch.tensor(eigs, dtype=DT)) @ q.T
    return a, lambda w: 0.5 * w @ a @ w


def test_worst_case_l2_is_rho_squared_lambda_max_over_two():
    _, loss = _quadratic([5.0, 2.0, 1.0, 0.5, 0.1])
    rho = 0.3
    values = worst_case(loss, torch.zeros(5, dtype=DT), rho, steps=60, step_size=0.5,
                        generator=torch.Generator().manual_seed(1))
    assert max(values) == pytest.approx(rho**2 * 5.0 / 2, rel=1e-6)
    assert values[-1] >= values[0]  # the ascent climbs from its random start


def test_worst_case_linf_on_a_diagonal_quadratic_is_a_corner():
    """½δᵀAδ with A diagonal, PSD, over the box |δ_i| ≤ ρ: every corner gives ½ρ² tr(A)."""
    diag = torch.tensor([3.0, 1.0, 0.5], dtype=DT)
    rho = 0.2
    values = worst_case(lambda w: 0.5 * (diag * w * w).sum(), torch.zeros(3, dtype=DT), rho, norm="linf", steps=5,
                        step_size=1.0, generator=torch.Generator().manual_seed(2))
    assert max(values) == pytest.approx(0.5 * rho**2 * float(diag.sum()), rel=1e-12)


def test_adaptive_worst_case_scales_the_ball_by_the_weights():
    """‖δ/|w|‖ ≤ ρ around w: L(w + δ) − L(w) for L = ½‖v‖² is the max of wᵀδ + ½‖δ‖² over δ = |w|⊙u,
    which for w = (c, 0, ...) puts everything on the first coordinate: ρc·c + ½ρ²c²."""
    w = torch.tensor([2.0, 0.0, 0.0], dtype=DT)
    rho = 0.1
    values = worst_case(lambda v: 0.5 * v @ v, w, rho, scale=w.abs() + 0.0, steps=30,
                        generator=torch.Generator().manual_seed(3))
    assert max(values) == pytest.approx(rho * 4.0 + 0.5 * rho**2 * 4.0, rel=1e-6)


def test_average_case_is_sigma_squared_trace_over_two():
    eigs = [4.0, 2.0, 1.0, 1.0, 0.5, 0.5]
    _, loss = _quadratic(eigs, seed=4)
    sigma = 0.1
    mean, se = average_case(loss, torch.zeros(6, dtype=DT), sigma, samples=4000,
                            generator=torch.Generator().manual_seed(5))
    truth = sigma**2 * sum(eigs) / 2
    assert abs(mean - truth) < 4 * se and se < 0.05 * truth


def test_pac_bayes_bisection_finds_the_crossing():
    # a drop that rises as σ²: σ′ with σ′² = 0.1, i.e. 0.3162…
    sigma, width, evals = pac_bayes_sigma(lambda s: s * s, 0.1, lo=1e-4, hi=1.0, tol=0.01)
    assert sigma <= math.sqrt(0.1) <= sigma * (1 + width) and width <= 0.01 and evals > 3
    assert pac_bayes_sigma(lambda s: 0.0, 0.1)[0] == 1.0  # flat everywhere: the top of the range


def test_sharpness_analysis_on_a_trained_run(tiny_data, tiny_dataset, tmp_path):
    from sharpflow.analyses.context import open_checkpoint
    from sharpflow.analyses.sharpness import SharpnessConfig, compute
    from sharpflow.train import train

    from .conftest import tiny_run

    run = tiny_run()
    train(run, tiny_dataset, run_name="r", data_dir=tiny_data, out_dir=tmp_path, progress=False, log=lambda *_: None)
    ck = sorted((tmp_path / "checkpoints").glob("*.pt"))[-1]
    from sharpflow.data import load_prepared

    ctx = open_checkpoint(run, "r", load_prepared(tiny_data), ck, torch.device("cpu"), log=lambda *_: None)
    cfg = SharpnessConfig(enabled=True, m=32, batches=3, ascent_steps=4, samples=8, pac_bayes=True, n=64)
    df = compute(ctx, cfg)["sharpness"]
    wc = df[df.measure == "worst_case"].iloc[0]
    ascent = df[df.measure == "worst_case_ascent"].sort_values("iteration")
    assert wc.value >= ascent.value.max() - 1e-12 and wc.units == 3 and list(ascent.iteration) == list(range(5))
    assert wc.value > 0 and df[df.measure == "average_case"].value.iloc[0] > 0
    sig = df[df.measure == "pac_bayes_sigma"].iloc[0]
    assert 0 < sig.value <= 1.0
    # more radius, more worst-case sharpness (the same batches and start)
    wide = compute(ctx, cfg.model_copy(update={"rho": 0.2, "pac_bayes": False}))["sharpness"]
    assert wide[wide.measure == "worst_case"].value.iloc[0] > wc.value


def test_blocks_analysis_against_the_dense_hessian_blocks(tiny_data, tiny_dataset, tmp_path):
    """Per-block spectra: each weight's top eigenvalue of H[b, b] against eigvalsh of the dense block of
    a trained tiny MLP's Hessian; the top eigenvector's energy per block is its squared norm there."""
    from sharpflow.analyses.blocks import BlocksConfig, parameter_blocks
    from sharpflow.analyses.blocks import compute as blocks
    from sharpflow.analyses.context import open_checkpoint
    from sharpflow.data import hessian_batches, load_prepared
    from sharpflow.train import train

    from .conftest import tiny_run
    from .test_hessian import dense_hessian

    run = tiny_run(model={"name": "mlp", "kwargs": {"hidden": [4]}})
    train(run, tiny_dataset, run_name="r", data_dir=tiny_data, out_dir=tmp_path, progress=False, log=lambda *_: None)
    data = load_prepared(tiny_data)
    ctx = open_checkpoint(run, "r", data, sorted((tmp_path / "checkpoints").glob("*.pt"))[-1], torch.device("cpu"),
                          log=lambda *_: None)
    model = ctx.model()
    h = dense_hessian(model.double(), [(x.double(), y) for x, y in hessian_batches(data, len(data.hessian_idx))])
    evals, evecs = torch.linalg.eigh(h)
    top = evecs[:, -1]
    ctx.eigvecs = {"eigenvalues": evals[-1:].flip(0), "eigenvectors": top[None].float()}
    out = blocks(ctx, BlocksConfig(enabled=True, tol=1e-6))
    names = [(n, p.numel()) for n, p in ctx.model().named_parameters()]
    want = parameter_blocks(names, [])
    assert list(out["blocks"]["block"]) == list(want) == [n for n, _ in names if n.endswith("weight")]
    for row in out["blocks"].itertuples():
        idx = want[row.block]
        truth = float(torch.linalg.eigvalsh(h[idx][:, idx])[-1])
        assert row.eigenvalue == pytest.approx(truth, rel=1e-3), row.block
        assert row.converged
    energy = out["block_energy"].set_index("block")["energy"]
    for b, idx in want.items():
        assert energy[b] == pytest.approx(float(top[idx].square().sum()), rel=1e-4, abs=1e-7)
    # patterns: one block for all weights, and a pattern that matches nothing is named
    one = blocks(ctx, BlocksConfig(enabled=True, tol=1e-6, patterns=["weight$"]))["blocks"]
    idx = [i for b in want.values() for i in b]
    assert one["eigenvalue"].iloc[0] == pytest.approx(float(torch.linalg.eigvalsh(h[idx][:, idx])[-1]), rel=1e-3)
    from sharpflow.errors import SharpflowError

    with pytest.raises(SharpflowError, match="matches no parameter"):
        blocks(ctx, BlocksConfig(enabled=True, patterns=["attn"]))


def test_blocks_figure_is_a_heatmap_of_log_eigenvalues(tmp_path):
    import numpy as np
    import pandas as pd

    from sharpflow import figures
    from sharpflow.figures import blocks as fig_blocks
    from sharpflow.results import load

    paths = []
    for run in ("b-lr0.1", "b-lr0.2"):
        d = tmp_path / "runs" / run
        d.mkdir(parents=True)
        rows = [{"run": run, "step": s, "epoch": s / 10, "status": "ok", "block": b, "size": 4,
                 "eigenvalue": (i + 1) * 10.0 ** (s / 100) if b != "fc2.weight" or s else -1.0, "converged": True}
                for s in (0, 100, 200) for i, b in enumerate(("fc1.weight", "fc2.weight"))]
        pd.DataFrame(rows).to_parquet(d / "blocks.parquet", index=False)
        paths.append(d / "blocks.parquet")
    spec = {"runs": {r: {"study": "b", "lr": lr} for r, lr in (("b-lr0.1", 0.1), ("b-lr0.2", 0.2))}}
    fig = fig_blocks.plot(load(paths, figures.KINDS["blocks"], spec), {})
    grid = fig.axes[0].images[0].get_array()
    want = np.log10([[1, 10, 100], [np.nan, 20, 200]])  # λ ≤ 0 left blank
    np.testing.assert_allclose(np.ma.filled(grid.astype(float), np.nan), want)
    figures.draw("blocks", spec, paths, tmp_path / "f.pdf", tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_third_order_terms_on_a_cubic_by_hand():
    """L(θ) = ½θᵀAθ + Σ c_i θ_i³/6: H = A + diag(c⊙θ), ∇³L[u, u] = c⊙u², g = Aθ + c⊙θ²/2."""
    from sharpflow.analyses.selfstab import third_order_terms

    gen = torch.Generator().manual_seed(7)
    a, _ = _quadratic([3.0, 1.0, 0.5, 0.2])
    c = torch.randn(4, generator=gen, dtype=DT)
    theta = torch.randn(4, generator=gen, dtype=DT)
    u = torch.randn(4, generator=gen, dtype=DT)
    u = u / u.norm()
    out = third_order_terms(lambda w: 0.5 * w @ a @ w + (c * w**3).sum() / 6, theta, u)
    h = a + torch.diag(c * theta)
    g = a @ theta + c * theta**2 / 2
    grad_s = c * u**2
    assert out["lambda1"] == pytest.approx(float(u @ h @ u), rel=1e-12)
    assert out["grad_curvature"] == pytest.approx(float(g @ h @ g / (g @ g)), rel=1e-12)
    assert out["alpha"] == pytest.approx(-float(g @ grad_s), rel=1e-12)
    assert out["beta"] == pytest.approx(float(grad_s @ grad_s), rel=1e-12)


def test_selfstab_analysis_against_finite_differences_of_hessian_products(tiny_data, tiny_dataset, tmp_path):
    """∇S = ∇³L[u, u] of a trained tanh MLP against central differences of uᵀH(θ ± εe)u along random e."""
    from sharpflow.analyses.context import open_checkpoint
    from sharpflow.analyses.selfstab import SelfStabConfig
    from sharpflow.analyses.selfstab import compute as selfstab
    from sharpflow.data import hessian_batches, load_prepared
    from sharpflow.hessian import HessianOperator
    from sharpflow.models import loss_fn
    from sharpflow.params import flat_params, set_flat_params
    from sharpflow.train import train

    from .conftest import tiny_run

    run = tiny_run(model={"name": "mlp", "kwargs": {"hidden": [6], "activation": "tanh"}}, optimizer__batch_size="full")
    train(run, tiny_dataset, run_name="r", data_dir=tiny_data, out_dir=tmp_path, progress=False, log=lambda *_: None)
    data = load_prepared(tiny_data)
    ctx = open_checkpoint(run, "r", data, sorted((tmp_path / "checkpoints").glob("*.pt"))[-1], torch.device("cpu"),
                          log=lambda *_: None)
    model = ctx.model().double().eval()
    batches = [(x.double(), y) for x, y in hessian_batches(data, 64)]
    op = HessianOperator(model, loss_fn, batches)
    vals, vecs = torch.linalg.eigh(op @ torch.eye(op.dim, dtype=DT))
    u = vecs[:, -1]
    ctx.eigvecs = {"eigenvalues": vals[-1:], "eigenvectors": u[None]}
    row = selfstab(ctx, SelfStabConfig(enabled=True, n=64))["selfstab"].iloc[0]
    assert row.lambda1 == pytest.approx(float(vals[-1]), rel=1e-8)
    # β = ‖∇S‖²: compare ∇S·e with finite differences along e = ∇S/‖∇S‖ and a random direction
    theta = flat_params(model).detach().clone()
    eps = 1e-4

    def s_at(t):
        set_flat_params(model, t)
        return float(u @ HessianOperator(model, loss_fn, batches).matvec(u))

    gen = torch.Generator().manual_seed(0)
    e = torch.randn(op.dim, generator=gen, dtype=DT)
    e = e / e.norm()
    from sharpflow.analyses.selfstab import third_order_terms
    from sharpflow.params import loss_of_params, unflatten

    f, like = loss_of_params(model, loss_fn), {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    terms = third_order_terms(lambda t: f(unflatten(t, like), x, y), theta, u)
    assert terms["beta"] == pytest.approx(row.beta, rel=1e-8)
    # the directional derivative of S along e from the terms: recover ∇S by autograd on the same S
    th = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(unflatten(th, like), x, y), th, create_graph=True)
    (hu,) = torch.autograd.grad(g @ u, th, create_graph=True)
    (grad_s,) = torch.autograd.grad(hu @ u, th)
    fd = (s_at(theta + eps * e) - s_at(theta - eps * e)) / (2 * eps)
    set_flat_params(model, theta)
    assert float(grad_s @ e) == pytest.approx(fd, rel=1e-4, abs=1e-7)
    assert float(grad_s @ grad_s) == pytest.approx(row.beta, rel=1e-8)


def test_sharpness_figure_draws_the_table_and_the_quadratic_model(tmp_path):
    """The worst-case line is the table's values; the dotted line is ρ²λ1/2 from the spectrum; the
    σ′ panel appears only with PAC-Bayes rows."""
    import pandas as pd

    from sharpflow.figures import sharpness as fig_sharpness
    from sharpflow.results import load

    d = tmp_path / "runs" / "eta-lr0.1"
    d.mkdir(parents=True)
    steps = [0, 100, 200, 300]
    lam = [5.0, 20.0, 30.0, 25.0]
    pd.DataFrame([{"run": "eta-lr0.1", "step": s, "epoch": s / 100, "status": "ok", "rank": 1, "eigenvalue": v,
                   "converged": True} for s, v in zip(steps, lam, strict=True)]).to_parquet(d / "spectrum.parquet")
    rows = []
    for v in lam:
        rows.append({"measure": "worst_case", "value": 0.05**2 * v / 2 * 1.1, "se": 1e-4, "radius": 0.05})
        rows.append({"measure": "average_case", "value": 1e-3 * v, "se": 1e-4, "radius": 0.01})
    sh = pd.DataFrame([{**r, "run": "eta-lr0.1", "step": s, "epoch": s / 100, "status": "ok", "iteration": -1,
                        "units": 4} for s, r in zip(sorted(steps * 2), rows, strict=True)])
    sh.to_parquet(d / "sharpness.parquet")
    spec = {"runs": {"eta-lr0.1": {"study": "eta", "lr": 0.1}}}
    fig = fig_sharpness.plot(load([d / "sharpness.parquet", d / "spectrum.parquet"], ("sharpness", "spectrum"),
                                  spec), {})
    assert len(fig.axes) == 2  # no PAC-Bayes rows: two panels
    lines = {ln.get_gid(): ln for ln in fig.axes[0].lines if ln.get_gid()}
    quad = lines["quadratic:eta-lr0.1"]
    assert list(quad.get_ydata()) == pytest.approx([0.05**2 * v / 2 for v in lam])
    worst = lines["worst_case:eta-lr0.1"]
    assert list(worst.get_ydata()) == pytest.approx([0.05**2 * v / 2 * 1.1 for v in lam])


def test_gap_figure_plots_the_end_of_each_run_against_its_gap(tmp_path):
    """One point per run at its last checkpoint: x the measure (1/σ′² for PAC-Bayes), y the train − test gap in
    points; each panel's τ is Kendall's τ-b of its points; a run without the sharpness table is in the λ_max
    panel only, a diverged run nowhere."""
    import numpy as np
    import pandas as pd

    from sharpflow.claims.intervals import kendall
    from sharpflow.figures import gap as fig_gap
    from sharpflow.results import load

    runs = {f"eta-lr0.0{i}": {"study": "eta" if i < 4 else "bs", "lr": i / 100} for i in range(1, 7)}
    lam = {r: 10.0 + 3 * i for i, r in enumerate(runs)}
    gap = {r: g for r, g in zip(runs, [5.0, 3.0, 4.0, 1.0, 2.0, 6.0], strict=True)}
    paths = []
    for i, run in enumerate(runs):
        d = tmp_path / "runs" / run
        d.mkdir(parents=True)
        status = "diverged" if i == 5 else "ok"
        pd.DataFrame([{"run": run, "step": s, "epoch": s / 10, "status": "ok" if s == 0 else status, "rank": 1,
                       "eigenvalue": v, "converged": True} for s, v in ((0, 1.0), (100, lam[run]))]
                     ).to_parquet(d / "spectrum.parquet")
        pd.DataFrame([{"run": run, "step": 100, "epoch": 10.0, "split": split, "loss": 1.0, "accuracy": acc,
                       "status": status} for split, acc in (("train", 0.9), ("test", 0.9 - gap[run] / 100))]
                     ).to_parquet(d / "metrics.parquet")
        paths += [d / "spectrum.parquet", d / "metrics.parquet"]
        if i == 0:
            continue  # no sharpness table: λ_max only
        pd.DataFrame([{"run": run, "step": 100, "epoch": 10.0, "status": status, "measure": m, "iteration": -1,
                       "value": v, "se": 0.0} for m, v in (("worst_case", 0.01 * lam[run] ** 2),
                                                           ("average_case", 1 / lam[run]),
                                                           ("pac_bayes_sigma", 0.1 * (i + 1)))]
                     ).to_parquet(d / "sharpness.parquet")
        paths.append(d / "sharpness.parquet")
    data = load(paths, ("metrics", "spectrum", "sharpness"), {"runs": runs})
    fig = fig_gap.plot(data, {})
    panels = fig.axes[:4]
    ok = [r for r in runs if r != "eta-lr0.06"]  # the diverged run is left out
    want = {"lambda_max": {r: lam[r] for r in ok},
            "worst_case": {r: 0.01 * lam[r] ** 2 for r in ok[1:]},
            "average_case": {r: 1 / lam[r] for r in ok[1:]},
            "pac_bayes": {r: 1 / (0.1 * (i + 1)) ** 2 for i, r in enumerate(ok) if i}}
    for ax, expect in zip(panels, want.values(), strict=True):
        xy = sorted((float(x), float(y)) for c in ax.collections for x, y in c.get_offsets())
        assert np.allclose(xy, sorted((v, gap[r]) for r, v in expect.items()))
        tau = kendall(list(expect.values()), [gap[r] for r in expect])
        assert f"τ = {tau:.2f} ({len(expect)} runs)" in ax.get_title(loc="left")
        assert math.isfinite(tau)
