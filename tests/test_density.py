"""Spectral density by stochastic Lanczos quadrature, against exact spectra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from sharpflow.hessian import DenseOperator, HessianOperator
from sharpflow.hessian.density import spectral_density, w1_bound
from sharpflow.models import loss_fn

from .test_hessian import DT, data, dense_hessian, tiny_mlp


def test_quadrature_is_exact_for_moments_up_to_2m_minus_1() -> None:
    """Diagonal operator with a known spectrum: per probe Σ τ θ^p = vᵀH^p v/‖v‖² for p ≤ 2m − 1
    (the probes are redrawn here from the same seed), and the average estimates tr(H^p)/D."""
    lam = torch.linspace(-1.0, 3.0, 60, dtype=DT) ** 3 / 9
    op = DenseOperator(torch.diag(lam))
    m = 6
    sd = spectral_density(op, num_probes=3, lanczos_steps=m, seed=5)
    gen = torch.Generator().manual_seed(5)
    for probe in range(3):
        v = torch.randn(60, generator=gen, dtype=DT)
        w = (v / v.norm()) ** 2
        for p in range(2 * m):
            quad = float((sd.weights[probe] * sd.nodes[probe] ** p).sum())
            assert quad == pytest.approx(float((w * lam**p).sum()), rel=1e-9, abs=1e-12), (probe, p)
    # beyond 2m − 1 the quadrature is no longer exact in general
    v = torch.randn(60, generator=torch.Generator().manual_seed(5), dtype=DT)
    w = (v / v.norm()) ** 2
    assert abs(float((sd.weights[0] * sd.nodes[0] ** 16).sum()) - float((w * lam**16).sum())) > 1e-9
    assert sd.matvecs == 3 * m and sd.steps == [m] * 3
    assert torch.allclose(sd.weights.sum(dim=1), torch.ones(3, dtype=DT))


def test_small_spectrum_is_found_exactly() -> None:
    """Four distinct eigenvalues: Lanczos stops after 4 steps (invariant subspace) with nodes = λ."""
    lam = torch.tensor([5.0, -1.0, 2.0, 2.0, 0.5, 5.0], dtype=DT)
    sd = spectral_density(DenseOperator(torch.diag(lam)), num_probes=2, lanczos_steps=10, seed=0)
    assert sd.steps == [4, 4]
    assert torch.allclose(sd.nodes[0, :4], torch.tensor([-1.0, 0.5, 2.0, 5.0], dtype=DT), atol=1e-9)
    assert float(sd.weights[0, 4:].abs().sum()) == 0.0


def test_density_of_a_model_hessian_within_the_w1_bound() -> None:
    """Tiny MLP (D = 147): W1 between the SLQ measure and the dense Hessian's eigenvalues is within
    the bound π(b−a)/(4m) + (b−a)/sqrt(2n(D+2)) (the random part's bound is on the mean; we allow
    3×) for 2 and 32 probes, and over 4 seeds the mean distance with 32 probes is below that with 2."""
    model, batches = tiny_mlp(seed=2), data([40])
    lam = torch.linalg.eigvalsh(dense_hessian(model, batches)).numpy()
    op = HessianOperator(model, loss_fn, batches)
    m = 12
    width, dim = float(lam.max() - lam.min()), len(lam)
    det = np.pi * width / (4 * m)
    mean = {}
    for probes in (2, 32):
        dists = []
        for seed in range(4):
            sd = spectral_density(op, num_probes=probes, lanczos_steps=m, seed=seed)
            dists.append(wasserstein_distance(sd.nodes.reshape(-1).numpy(), lam,
                                              u_weights=sd.weights.reshape(-1).numpy()))
        assert max(dists) <= det + 3 * (w1_bound(lam.min(), lam.max(), probes, m, dim) - det), probes
        mean[probes] = float(np.mean(dists))
    assert mean[32] < mean[2]


def test_smoothed_density_integrates_to_one_and_peaks_at_the_spectrum() -> None:
    lam = torch.cat([torch.zeros(50, dtype=DT), torch.tensor([10.0], dtype=DT)])
    sd = spectral_density(DenseOperator(torch.diag(lam)), num_probes=4, lanczos_steps=5, seed=1)
    grid = torch.linspace(-2, 12, 2801, dtype=DT)
    dens = sd.density(grid, sigma=0.1)
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-6)
    assert abs(float(grid[int(dens.argmax())])) < 0.05  # the bulk at 0
    with pytest.raises(ValueError):
        sd.density(grid, sigma=0.0)
    with pytest.raises(ValueError):
        spectral_density(DenseOperator(torch.diag(lam)), num_probes=0)


def test_density_analysis_on_a_trained_run(tiny_data, tiny_dataset, tmp_path) -> None:
    """The analysis on a real checkpoint: per-probe weights sum to 1, the largest node is λ1 of the
    certified spectrum (Lanczos converges to the extremes first), the selection strides, and the
    figure draws it."""
    from sharpflow import figures
    from sharpflow.analyses import strided as select
    from sharpflow.analyses.context import open_checkpoint
    from sharpflow.analyses.density import DensityConfig
    from sharpflow.analyses.density import compute as density
    from sharpflow.analyses.spectrum import compute as spectrum
    from sharpflow.config import SpectrumConfig
    from sharpflow.data import load_prepared
    from sharpflow.train import train

    from .conftest import tiny_run

    run = tiny_run()
    train(run, tiny_dataset, run_name="r", data_dir=tiny_data, out_dir=tmp_path / "r", progress=False,
          log=lambda *_: None)
    ctx = open_checkpoint(run, "r", load_prepared(tiny_data), tmp_path / "r" / "checkpoints" / "step00000040.pt",
                          torch.device("cpu"), log=lambda *_: None)
    sp, _ = spectrum(ctx, SpectrumConfig(k=3, tol=1e-6), log=lambda *_: None)
    cfg = DensityConfig(enabled=True, probes=4, steps=30)
    df = density(ctx, cfg)["density"]
    assert set(df.groupby("probe")["weight"].sum().round(9)) == {1.0}
    assert float(df["node"].max()) == pytest.approx(float(sp["eigenvalue"].max()), rel=1e-4)
    assert df["matvecs"].iloc[0] == 4 * 30 and (df["step"] == 40).all()
    assert select(cfg.model_copy(update={"stride": 4}), "r", [0, 5, 10, 15, 16, 32, 40]) == [0, 16, 40]
    assert select(DensityConfig(), "r", [0, 5]) == []  # off by default
    runs = tmp_path / "results" / "runs" / "r"
    runs.mkdir(parents=True)
    df.to_parquet(runs / "density.parquet")
    sp.to_parquet(runs / "spectrum.parquet")
    out = tmp_path / "fig"
    spec = {"kind": "density", "studies": ["s"], "runs": {"r": {"study": "s", "lr": 0.1}}}
    figures.draw("density", spec, [runs / "density.parquet", runs / "spectrum.parquet"], out / "d.pdf", out / "d.png")
    assert (out / "d.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------
# The generalised Gauss-Newton matrix
# ---------------------------------------------------------------------------------------------
def _dense_ggn(model, batches) -> torch.Tensor:
    """Truth: (1/N) Σ_n J_nᵀ (diag(p_n) − p_n p_nᵀ) J_n with J from torch.autograd.functional.jacobian."""
    from torch.func import functional_call

    from sharpflow.params import flat_params, unflatten

    x = torch.cat([b[0] for b in batches])
    like = {n: p.detach() for n, p in model.named_parameters()}
    theta = flat_params(model)
    jac = torch.autograd.functional.jacobian(lambda t: functional_call(model, unflatten(t, like), (x,)), theta)
    with torch.no_grad():
        p = torch.softmax(functional_call(model, like, (x,)), dim=-1)
    g = torch.zeros(len(theta), len(theta), dtype=DT)
    for n in range(x.shape[0]):
        h_out = torch.diag(p[n]) - torch.outer(p[n], p[n])
        g += jac[n].T @ h_out @ jac[n]
    return g / x.shape[0]


def test_ggn_against_the_dense_jacobian_product() -> None:
    from sharpflow.hessian.ggn import GGNOperator

    model, batches = tiny_mlp(seed=4), data([7, 5])
    truth = _dense_ggn(model, batches)
    op = GGNOperator(model, batches, weight_decay=0.01, chunk_size=4)
    eye = torch.eye(op.dim, dtype=DT)
    dense = op.matvec(eye)
    assert torch.allclose(dense, truth + 0.01 * eye, atol=1e-10)
    assert op.matvecs == op.dim
    assert torch.allclose(dense, dense.T, atol=1e-10)
    assert float(torch.linalg.eigvalsh(truth).min()) > -1e-10  # positive semi-definite
    # and it is not the Hessian of this nonlinear model
    assert (dense - 0.01 * eye - dense_hessian(model, batches)).abs().max() > 1e-3


def test_ggn_equals_the_hessian_for_a_linear_model() -> None:
    from sharpflow.hessian import top_eigenpairs
    from sharpflow.hessian.ggn import GGNOperator

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).to(DT)
    batches = data([9, 4])
    g = GGNOperator(model, batches).matvec(torch.eye(18, dtype=DT))
    assert torch.allclose(g, dense_hessian(model, batches), atol=1e-10)
    residual = HessianOperator(model, loss_fn, batches) - GGNOperator(model, batches)
    assert float(residual.matvec(torch.randn(18, dtype=DT)).abs().max()) < 1e-10
    res = top_eigenpairs(GGNOperator(model, batches), k=2, tol=1e-8)
    assert torch.allclose(res.eigenvalues, torch.linalg.eigvalsh(g).flip(0)[:2], rtol=1e-6)


def test_ggn_analysis_on_a_trained_run(tiny_data, tiny_dataset, tmp_path) -> None:
    """On a real checkpoint: G's top eigenvalues match the dense Jacobian product over the Hessian
    subset, the residual's pairs are certified, the overlap with H's top-k is a fraction; and the
    outlier count of a hand-made spectrum."""
    from sharpflow.analyses.context import open_checkpoint
    from sharpflow.analyses.ggn import GGNConfig, outliers
    from sharpflow.analyses.ggn import compute as ggn
    from sharpflow.analyses.spectrum import compute as spectrum
    from sharpflow.config import SpectrumConfig
    from sharpflow.data import hessian_batches, load_prepared
    from sharpflow.train import train

    from .conftest import tiny_run

    run = tiny_run()
    train(run, tiny_dataset, run_name="r", data_dir=tiny_data, out_dir=tmp_path / "r", progress=False,
          log=lambda *_: None)
    data = load_prepared(tiny_data)
    ctx = open_checkpoint(run, "r", data, tmp_path / "r" / "checkpoints" / "step00000040.pt", torch.device("cpu"),
                          log=lambda *_: None)
    _, ev = spectrum(ctx, SpectrumConfig(k=4, tol=1e-6), log=lambda *_: None)
    ctx.eigvecs = ev
    df = ggn(ctx, GGNConfig(enabled=True, k=4, tol=1e-6))["ggn"]
    g = df[df["matrix"] == "ggn"].sort_values("rank")
    model = ctx.model().double()
    batches = [(x.double(), y) for x, y in hessian_batches(data, len(data.hessian_idx))]
    truth = torch.linalg.eigvalsh(_dense_ggn(model, batches)).flip(0)[:4].numpy()
    np.testing.assert_allclose(g["eigenvalue"].to_numpy(), truth, rtol=1e-3)
    res = df[df["matrix"] == "residual"]
    assert len(res) == 4 and res["converged"].all()
    assert 0.0 <= float(df["overlap"].iloc[0]) <= 1.0 + 1e-6
    assert outliers([10.0, 9.0, 8.0, 1.0, 0.9]) == 3 and outliers([1.0]) == 0
