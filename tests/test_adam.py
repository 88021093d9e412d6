"""Adam and AdamW runs: resume, the checkpointed preconditioner, and preconditioned sharpness."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sharpflow.checkpoints import load_checkpoint
from sharpflow.errors import SharpflowError
from sharpflow.hessian import DenseOperator, DiagonalOperator, top_eigenpairs
from sharpflow.train import train

from .conftest import tiny_run


def _quiet(*_):
    pass


def _adam(name: str = "adam", **over):
    return tiny_run(optimizer__name=name, optimizer__lr=0.01, optimizer__weight_decay=0.01, **over)


def test_preconditioned_eigenvalues_on_a_quadratic() -> None:
    """λ(P^{-1}H) for a fixed diagonal P, as the symmetric P^{-1/2}HP^{-1/2}: the dense eigenvalues of
    the non-symmetric P^{-1}H."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    h = a @ a.T / 30
    p = torch.rand(30, generator=gen, dtype=torch.float64) * 10 + 0.1
    truth = np.sort(np.linalg.eigvals((torch.diag(1 / p) @ h).numpy()).real)[::-1][:3]
    d = DiagonalOperator(p.rsqrt())
    res = top_eigenpairs(d @ DenseOperator(h) @ d, k=3, tol=1e-10)
    np.testing.assert_allclose(res.eigenvalues.numpy(), truth, rtol=1e-8)
    with pytest.raises(ValueError, match="compose"):
        DiagonalOperator(p[:3]) @ DenseOperator(h)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_resume_is_bitwise_and_checkpoints_hold_the_preconditioner(tiny_data, tiny_dataset, tmp_path, name):
    run = _adam(name)
    ref = train(run, tiny_dataset, run_name="r", data_dir=tiny_data, out_dir=tmp_path / "ref", progress=False,
                log=_quiet)
    out = tmp_path / "crash"
    train(run, tiny_dataset, run_name="r", data_dir=tiny_data, out_dir=out, progress=False, log=_quiet, stop_after=17)
    state = torch.load(out / ".resume" / "state.pt", weights_only=True)  # the resume state at step 16
    for p in (out / "checkpoints").glob("step*.pt"):
        p.unlink()
    again = train(run, tiny_dataset, run_name="r", data_dir=tiny_data, out_dir=out, progress=False, log=_quiet)
    drop = ["wall_s", "refresh_s"]
    pd.testing.assert_frame_equal(ref.drop(columns=drop).reset_index(drop=True),
                                  again.drop(columns=drop).reset_index(drop=True))
    for s in (16, 40):
        a = load_checkpoint(tmp_path / "ref" / "checkpoints" / f"step{s:08d}.pt")
        b = load_checkpoint(out / "checkpoints" / f"step{s:08d}.pt")
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert "precond" not in load_checkpoint(tmp_path / "ref" / "checkpoints" / "step00000000.pt")
    # the step-16 checkpoint's preconditioner is sqrt(v / (1 − β2^16)) + ε of the optimizer state there
    st = state["optimizer"]["state"]
    by_hand = torch.cat([(st[i]["exp_avg_sq"] / (1 - 0.999 ** float(st[i]["step"]))).sqrt().reshape(-1) + 1e-8
                         for i in sorted(st)])
    ck = load_checkpoint(tmp_path / "ref" / "checkpoints" / "step00000016.pt")
    assert torch.allclose(ck["precond"], by_hand, rtol=1e-6) and float(st[0]["step"]) == 16


def test_adam_config_checks() -> None:
    from sharpflow.config import OptimizerConfig

    with pytest.raises(ValueError, match="betas"):
        OptimizerConfig(name="adam", betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="momentum"):
        OptimizerConfig(name="adam", momentum=0.9)
    assert "betas" not in OptimizerConfig(name="adam").model_dump()  # defaults stay out of run dumps
    assert OptimizerConfig(name="adamw").adaptive and not OptimizerConfig().adaptive


def test_precond_analysis_against_the_dense_preconditioned_hessian(tiny_data, tiny_dataset, tmp_path) -> None:
    from sharpflow.analyses.context import open_checkpoint
    from sharpflow.analyses.precond import PrecondConfig, adam_threshold
    from sharpflow.analyses.precond import compute as precond
    from sharpflow.data import hessian_batches, load_prepared

    from .test_hessian import dense_hessian

    run = _adam()
    train(run, tiny_dataset, run_name="r", data_dir=tiny_data, out_dir=tmp_path, progress=False, log=_quiet)
    data = load_prepared(tiny_data)
    ctx = open_checkpoint(run, "r", data, tmp_path / "checkpoints" / "step00000040.pt", torch.device("cpu"), log=_quiet)
    df = precond(ctx, PrecondConfig(enabled=True, k=2, tol=1e-6))["precond"]
    model = ctx.model().double()
    batches = [(x.double(), y) for x, y in hessian_batches(data, len(data.hessian_idx))]
    h = dense_hessian(model, batches, weight_decay=0.01)
    p = ctx.checkpoint["precond"].double()
    truth = np.sort(np.linalg.eigvals((torch.diag(1 / p) @ h).numpy()).real)[::-1][:2]
    np.testing.assert_allclose(df["eigenvalue"].to_numpy(), truth, rtol=1e-3)
    assert df["threshold"].iloc[0] == pytest.approx(adam_threshold(0.01, 0.9)) == pytest.approx(3800.0)  # 38/η
    assert df["converged"].all()
    # the figure draws it with its threshold line at 38/η
    from sharpflow import figures

    d = tmp_path / "res" / "runs" / "r"
    d.mkdir(parents=True)
    df.to_parquet(d / "precond.parquet")
    spec = {"kind": "precond", "studies": ["s"], "runs": {"r": {"study": "s", "lr": 0.01, "optimizer": "adam"}}}
    figures.draw("precond", spec, [d / "precond.parquet"], tmp_path / "f.pdf", tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    # step 0: no preconditioner yet, NaN rows; an SGD run: a clear error
    ctx0 = open_checkpoint(run, "r", data, tmp_path / "checkpoints" / "step00000000.pt", torch.device("cpu"))
    assert precond(ctx0, PrecondConfig(enabled=True))["precond"]["eigenvalue"].isna().all()
    sgd = open_checkpoint(tiny_run(), "r", data, tmp_path / "checkpoints" / "step00000040.pt", torch.device("cpu"))
    with pytest.raises(SharpflowError, match="Adam or AdamW"):
        precond(sgd, PrecondConfig(enabled=True))


def test_adamw_preconditioned_sharpness_leaves_out_the_decoupled_decay(tiny_data, tiny_dataset, tmp_path) -> None:
    """AdamW's decay is not in the loss it preconditions: λ(P⁻¹H) of the loss alone (dense truth), not
    of H + wd·I, whose tiny-gradient coordinates would give eigenvalues near wd/ε."""
    from sharpflow.analyses.context import open_checkpoint
    from sharpflow.analyses.precond import PrecondConfig
    from sharpflow.analyses.precond import compute as precond
    from sharpflow.data import hessian_batches, load_prepared

    from .test_hessian import dense_hessian

    run = tiny_run(optimizer__name="adamw", optimizer__lr=0.01, optimizer__weight_decay=0.1)
    train(run, tiny_dataset, run_name="r", data_dir=tiny_data, out_dir=tmp_path, progress=False, log=_quiet)
    data = load_prepared(tiny_data)
    ctx = open_checkpoint(run, "r", data, tmp_path / "checkpoints" / "step00000040.pt", torch.device("cpu"), log=_quiet)
    df = precond(ctx, PrecondConfig(enabled=True, k=1, tol=1e-6))["precond"]
    batches = [(x.double(), y) for x, y in hessian_batches(data, len(data.hessian_idx))]
    h = dense_hessian(ctx.model().double(), batches, weight_decay=0.0)
    p = ctx.checkpoint["precond"].double()
    truth = np.sort(np.linalg.eigvals((torch.diag(1 / p) @ h).numpy()).real)[::-1][:1]
    np.testing.assert_allclose(df["eigenvalue"].to_numpy(), truth, rtol=1e-3)
