"""The follow-up studies: the square loss, batch sharpness, the tiny subspace, the edge table and figures."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch.func import functional_call

from sharpflow.hessian import HessianOperator
from sharpflow.models import loss_for, mse_loss
from sharpflow.params import flat_params, unflatten

from .test_hessian import DT, data, tiny_mlp


def _dense_mse_hessian(model, batches, weight_decay: float = 0.0) -> torch.Tensor:
    """Truth: the Hessian of Σ_n ½‖z_n − onehot(y_n)‖² / N (+ wd/2‖θ‖²) by autograd's dense Hessian."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    like = {n: p.detach() for n, p in model.named_parameters()}

    def loss(theta: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, unflatten(theta, like), (x,))
        onehot = torch.nn.functional.one_hot(y, out.shape[-1]).to(out.dtype)
        return 0.5 * (out - onehot).square().sum() / x.shape[0] + 0.5 * weight_decay * theta.square().sum()

    return torch.autograd.functional.hessian(loss, flat_params(model))


# ----------------------------------------------------------------------------------- the square loss
def test_mse_loss_by_hand() -> None:
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.0, 2.0]])
    y = torch.tensor([0, 2])
    # example 1: ½(0² + 0² + 0²) = 0; example 2: ½(0.5² + 0² + 1²) = 0.625; mean 0.3125
    assert float(mse_loss(logits, y)) == pytest.approx(0.3125)
    assert loss_for("mse") is mse_loss and loss_for("cross_entropy") is not mse_loss
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        loss_for("hinge")


def test_mse_hessian_of_a_linear_model_is_the_input_covariance() -> None:
    """z = Wx: the Hessian of the mean ½‖Wx − y‖² is I_C ⊗ XᵀX/N, whatever the targets."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3, bias=False).to(DT)
    batches = data([6, 5], shape=(4,))
    x = torch.cat([b[0] for b in batches])
    truth = torch.kron(torch.eye(3, dtype=DT), x.T @ x / x.shape[0])
    op = HessianOperator(model, mse_loss, batches)
    assert torch.allclose(op.matvec(torch.eye(12, dtype=DT)), truth, atol=1e-10)


def test_mse_hessian_and_ggn_of_a_network_against_dense_truth() -> None:
    """A tanh MLP: the Hessian operator on the square loss matches autograd's dense Hessian, and the
    square loss's GGN is the dense JᵀJ/N (+ wd), not the Hessian."""
    from sharpflow.hessian.ggn import GGNOperator

    model, batches = tiny_mlp(seed=3), data([7, 4])
    dense = HessianOperator(model, mse_loss, batches, weight_decay=0.01).matvec(torch.eye(
        sum(p.numel() for p in model.parameters()), dtype=DT))
    truth = _dense_mse_hessian(model, batches, 0.01)
    assert torch.allclose(dense, truth, atol=1e-10)
    x = torch.cat([b[0] for b in batches])
    like = {n: p.detach() for n, p in model.named_parameters()}
    jac = torch.autograd.functional.jacobian(lambda t: functional_call(model, unflatten(t, like), (x,)),
                                             flat_params(model))
    jtj = torch.einsum("ncd,nce->de", jac, jac) / x.shape[0]
    eye = torch.eye(jtj.shape[0], dtype=DT)
    g = GGNOperator(model, batches, weight_decay=0.01, loss="mse").matvec(eye)
    assert torch.allclose(g, jtj + 0.01 * eye, atol=1e-10)
    assert (g - truth).abs().max() > 1e-3
    with pytest.raises(ValueError, match="unknown loss"):
        GGNOperator(model, batches, loss="hinge")


def test_training_on_the_square_loss(tiny_data, tiny_dataset, tmp_path) -> None:
    """A run with loss: mse logs its mean ½‖z − onehot(y)‖², which it lowers, and its spectrum is
    the square loss's (λ1 from the spectrum stage = the dense Hessian's)."""
    from sharpflow.analyses.context import open_checkpoint
    from sharpflow.analyses.spectrum import compute as spectrum
    from sharpflow.config import SpectrumConfig
    from sharpflow.data import hessian_batches, load_prepared
    from sharpflow.train import train

    from .conftest import tiny_run

    run = tiny_run(loss="mse", optimizer__lr=0.2)
    train(run, tiny_dataset, run_name="m", data_dir=tiny_data, out_dir=tmp_path / "m", progress=False,
          log=lambda *_: None)
    met = pd.read_parquet(tmp_path / "m" / "metrics.parquet")
    tr = met[met["split"] == "train"].sort_values("step")
    assert tr["loss"].iloc[0] > tr["loss"].iloc[-1]
    data = load_prepared(tiny_data)
    ctx = open_checkpoint(run, "m", data, tmp_path / "m" / "checkpoints" / "step00000040.pt", torch.device("cpu"),
                          log=lambda *_: None)
    model = ctx.model().double()
    x, y = data.train.x[:200], data.train.y[:200]
    with torch.no_grad():
        direct = float(mse_loss(model(x.double()), y))
    from sharpflow.train import evaluate

    assert evaluate(model, x.double(), y, 64, loss_for("mse"))[0] == pytest.approx(direct, rel=1e-9)
    sp, _ = spectrum(ctx, SpectrumConfig(k=1, tol=1e-6), log=lambda *_: None)
    batches = [(b.double(), t) for b, t in hessian_batches(data, len(data.hessian_idx))]
    lam = torch.linalg.eigvalsh(_dense_mse_hessian(model, batches))
    assert float(sp["eigenvalue"].iloc[0]) == pytest.approx(float(lam[-1]), rel=1e-4)


# -------------------------------------------------------------------------------- batch sharpness
def test_batch_sharpness_against_the_dense_batch_hessian() -> None:
    """Per batch, g_Bᵀ H_B g_B/‖g_B‖² with H_B and g_B from autograd's dense Hessian and gradient of
    that batch alone, with weight decay; the cross-entropy and the square loss."""
    from sharpflow.analyses.batch_sharpness import batch_sharpness
    from sharpflow.models import loss_fn

    from .test_hessian import dense_hessian

    model, batches = tiny_mlp(seed=5), data([9, 6, 9])
    wd = 0.02
    got = batch_sharpness(model, loss_fn, batches, weight_decay=wd)
    got_mse = batch_sharpness(model, mse_loss, batches)
    like = {n: p.detach() for n, p in model.named_parameters()}
    theta = flat_params(model)
    for b, value, value_mse in zip(batches, got, got_mse, strict=True):
        h = dense_hessian(model, [b], weight_decay=wd)

        def loss(t, b=b):
            out = functional_call(model, unflatten(t, like), (b[0],))
            return torch.nn.functional.cross_entropy(out, b[1]) + 0.5 * wd * t.square().sum()

        g = torch.autograd.functional.jacobian(loss, theta)
        assert value == pytest.approx(float(g @ h @ g / (g @ g)), rel=1e-9)
        hm = _dense_mse_hessian(model, [b])

        def loss_m(t, b=b):
            return mse_loss(functional_call(model, unflatten(t, like), (b[0],)), b[1])

        gm = torch.autograd.functional.jacobian(loss_m, theta)
        assert value_mse == pytest.approx(float(gm @ hm @ gm / (gm @ gm)), rel=1e-9)
    assert len(set(np.round(got, 6))) == 3  # the batches differ


def test_batch_sharpness_analysis_on_a_trained_run(tiny_data, tiny_dataset, tmp_path) -> None:
    """On a checkpoint: the mean and standard error of the per-batch values (recomputed here from the
    same batches), the threshold 2/η, λ1 from the eigenvector file; one batch for a full-batch run,
    where it is the Rayleigh quotient of the full gradient (≤ λ1)."""
    from sharpflow.analyses.batch_sharpness import BatchSharpnessConfig, batch_sharpness
    from sharpflow.analyses.batch_sharpness import compute as bs_compute
    from sharpflow.analyses.context import open_checkpoint
    from sharpflow.analyses.spectrum import compute as spectrum
    from sharpflow.config import SpectrumConfig
    from sharpflow.data import load_prepared
    from sharpflow.train import mix_seed, train

    from .conftest import tiny_run

    data = load_prepared(tiny_data)
    run = tiny_run()
    train(run, tiny_dataset, run_name="r", data_dir=tiny_data, out_dir=tmp_path / "r", progress=False,
          log=lambda *_: None)
    ctx = open_checkpoint(run, "r", data, tmp_path / "r" / "checkpoints" / "step00000040.pt", torch.device("cpu"),
                          log=lambda *_: None)
    _, ctx.eigvecs = spectrum(ctx, SpectrumConfig(k=1, tol=1e-6), log=lambda *_: None)
    df = bs_compute(ctx, BatchSharpnessConfig(enabled=True, batches=6))["batch_sharpness"]
    gen = torch.Generator().manual_seed(mix_seed(40, 7))
    view = ctx.view
    batches = []
    for _ in range(6):
        idx = torch.randperm(view.n, generator=gen)[:20]
        batches.append((view.x[idx], view.y[idx]))
    model = ctx.model().eval()
    vals = np.array(batch_sharpness(model, ctx.loss_fn, batches))
    row = df.iloc[0]
    assert row["batch_sharpness"] == pytest.approx(vals.mean(), rel=1e-6)
    assert row["batch_sharpness_se"] == pytest.approx(vals.std(ddof=1) / math.sqrt(6), rel=1e-6)
    assert row["batches"] == 6 and row["batch_size"] == 20 and row["threshold"] == pytest.approx(2 / 0.1)
    assert row["ratio"] == pytest.approx(0.1 * vals.mean() / 2, rel=1e-6)
    assert row["lambda1"] == pytest.approx(float(ctx.eigvecs["eigenvalues"][0]))
    # full batch: one "batch", the whole training set, whose Rayleigh quotient is at most λ1 of its Hessian
    full = tiny_run(optimizer__batch_size="full", steps=3, checkpoints__every_epochs=1)
    train(full, tiny_dataset, run_name="f", data_dir=tiny_data, out_dir=tmp_path / "f", progress=False,
          log=lambda *_: None)
    fctx = open_checkpoint(full, "f", data, tmp_path / "f" / "checkpoints" / "step00000003.pt",
                           torch.device("cpu"), log=lambda *_: None)
    frow = bs_compute(fctx, BatchSharpnessConfig(enabled=True, batches=6))["batch_sharpness"].iloc[0]
    assert frow["batches"] == 1 and math.isnan(frow["batch_sharpness_se"])
    assert frow["batch_size"] == len(data.train.x) and math.isnan(frow["lambda1"])  # no eigenvectors given


# ------------------------------------------------------------------------------- the tiny subspace
def test_gradient_fractions_and_overlaps_by_hand() -> None:
    from sharpflow.analyses.subspace import gradient_fractions, subspace_overlaps

    e = torch.eye(4)
    assert gradient_fractions(e[:3], torch.tensor([3.0, 0.0, 4.0, 0.0])) == pytest.approx([9 / 25, 9 / 25, 1.0])
    assert all(math.isnan(f) for f in gradient_fractions(e[:2], torch.zeros(4)))
    # the same plane, its two axes swapped: disjoint at k = 1, identical at k = 2
    assert subspace_overlaps(e[[0, 1]], e[[1, 0]]) == pytest.approx([0.0, 1.0])
    # rotated by 60° within the plane: cos² 60° = 0.25 at k = 1
    c, s = math.cos(math.pi / 3), math.sin(math.pi / 3)
    rot = torch.tensor([[c, s, 0.0, 0.0], [-s, c, 0.0, 0.0]])
    assert subspace_overlaps(e[:2], rot) == pytest.approx([0.25, 1.0])


def test_subspace_analysis_in_a_chain_uses_the_previous_checkpoint(tiny_data, tiny_dataset, tmp_path) -> None:
    """Through run_chain over a whole run (two warm-start chains): the fraction is that of the full
    gradient over the Hessian subset in the published eigenvectors; the overlap is with the checkpoint
    just before, across the chain boundary too, and NaN only at the first; the stash key depends on
    the previous checkpoint's eigenvectors (a job starting later recomputes, with NaN there)."""
    from sharpflow.analyses import REGISTRY
    from sharpflow.analyses.stage import Planned, run_chain
    from sharpflow.analyses.subspace import SubspaceConfig, subspace_overlaps
    from sharpflow.config import SpectrumConfig
    from sharpflow.data import hessian_batches, load_prepared
    from sharpflow.models import loss_fn
    from sharpflow.train import train

    from .conftest import tiny_run

    run = tiny_run()
    train(run, tiny_dataset, run_name="r", data_dir=tiny_data, out_dir=tmp_path / "r", progress=False,
          log=lambda *_: None)
    cks = sorted((tmp_path / "r" / "checkpoints").glob("step*.pt"))
    steps = [int(p.stem[4:]) for p in cks]
    res = tmp_path / "res"
    plan = Planned(REGISTRY["subspace"], SubspaceConfig(enabled=True), set(steps))
    spec = SpectrumConfig(k=4, tol=1e-6)
    run_chain(run, run_name="r", data_dir=tiny_data, checkpoints=cks, spectrum=spec, analyses=[plan],
              results=res, chain_starts=[steps[0], steps[3]], aggregate=True, log=lambda *_: None)
    sub = pd.read_parquet(res / "runs" / "r" / "subspace.parquet")
    first = sub[sub["step"] == steps[0]]
    assert first["overlap"].isna().all() and (first["previous_step"] == -1).all()
    data = load_prepared(tiny_data)
    for i in (1, 3, len(steps) - 1):  # 3: the first of the second warm-start chain
        ev = torch.load(res / "runs" / "r" / "eigvecs" / f"step{steps[i]:08d}.pt", weights_only=True)
        prev = torch.load(res / "runs" / "r" / "eigvecs" / f"step{steps[i - 1]:08d}.pt", weights_only=True)
        rows = sub[sub["step"] == steps[i]].sort_values("k")
        assert (rows["previous_step"] == steps[i - 1]).all()
        assert rows["overlap"].to_numpy() == pytest.approx(subspace_overlaps(ev["eigenvectors"], prev["eigenvectors"]),
                                                           abs=1e-6)
        from sharpflow.checkpoints import load_checkpoint, restore_model

        model = restore_model(load_checkpoint(cks[i]), run, data, cks[i])
        g = HessianOperator(model, loss_fn, hessian_batches(data, len(data.hessian_idx))).gradient().double()
        v = ev["eigenvectors"].double()
        expect = np.cumsum((v @ g).square().numpy()) / float(g @ g)
        assert rows["fraction"].to_numpy() == pytest.approx(expect, rel=1e-5)
        assert np.all(np.diff(rows["fraction"].to_numpy()) >= 0) and rows["fraction"].max() <= 1 + 1e-9
    # a job that starts at the fourth checkpoint has no previous one: NaN there, recomputed
    res2 = tmp_path / "res2"
    run_chain(run, run_name="r", data_dir=tiny_data, checkpoints=cks[3:], spectrum=spec, analyses=[plan],
              results=res2, aggregate=True, log=lambda *_: None)
    sub2 = pd.read_parquet(res2 / "runs" / "r" / "subspace.parquet")
    assert sub2[sub2["step"] == steps[3]]["overlap"].isna().all()


# ------------------------------------------------------------------------------- table and figures
def _runs_tree(root):
    """eos: η·λ1/2 = 0.5 for 5 checkpoints then 1.1; adam: ratio 0.9; eta: BS ratio 1.0, share 0.8."""
    out, meta = [], {}
    steps = list(range(0, 100, 10))

    def write(run, kind, df):
        d = root / "runs" / run
        d.mkdir(parents=True, exist_ok=True)
        df.assign(run=run).to_parquet(d / f"{kind}.parquet", index=False)
        out.append(d / f"{kind}.parquet")

    def spectrum(lams):
        return pd.DataFrame([{"step": s, "epoch": float(s), "status": "ok", "rank": 1, "eigenvalue": lam,
                              "converged": True} for s, lam in zip(steps, lams, strict=True)])

    meta["eos-lr0.1"] = {"study": "eos", "lr": 0.1, "batch_size": "full", "optimizer": "sgd", "seed": 0, "loss": "mse"}
    write("eos-lr0.1", "spectrum", spectrum([10.0] * 5 + [22.0] * 5))
    write("eos-lr0.1", "metrics", pd.DataFrame(
        [{"step": s, "epoch": float(s), "split": "train", "loss": 1.0 / (s + 1), "accuracy": 0.5, "status": "ok"}
         for s in steps]
        + [{"step": s, "epoch": float(s), "split": "batch", "loss": (1.0 + 0.1 * (s % 2)) / (s + 1), "accuracy": 0.5,
            "status": "ok"} for s in range(90)]))
    meta["adam-lr0.001"] = {"study": "adam", "lr": 0.001, "batch_size": "full", "optimizer": "adam", "seed": 0,
                            "loss": "mse"}
    write("adam-lr0.001", "spectrum", spectrum([5.0] * 10))
    write("adam-lr0.001", "precond", pd.DataFrame([{"step": s, "epoch": float(s), "status": "ok", "rank": 1,
                                                    "ratio": 0.9, "eigenvalue": 0.9 * 38000.0, "threshold": 38000.0,
                                                    "converged": True} for s in steps]))
    meta["eta-lr0.05"] = {"study": "eta", "lr": 0.05, "batch_size": 32, "optimizer": "sgd", "seed": 0,
                          "loss": "cross_entropy"}
    write("eta-lr0.05", "spectrum", spectrum([30.0] * 10))
    write("eta-lr0.05", "batch_sharpness", pd.DataFrame([{
        "step": s, "epoch": float(s), "status": "ok", "batch_sharpness": 40.0, "batch_sharpness_se": 2.0,
        "ratio": 1.0, "lr": 0.05, "lambda1_ratio": 0.75} for s in steps]))
    write("eta-lr0.05", "subspace", pd.DataFrame([{
        "step": s, "epoch": float(s), "status": "ok", "k": k, "fraction": 0.08 * k,
        "overlap": math.nan if s == 0 else 0.6} for s in steps for k in range(1, 11)]))
    return out, meta


def test_edge_table_by_hand(tmp_path) -> None:
    from sharpflow.tables import make_table

    inputs, meta = _runs_tree(tmp_path)
    spec = {"kind": "edge", "studies": ["eos", "adam", "eta"], "runs": meta}
    out = tmp_path / "t"
    from sharpflow.tables import KINDS

    make_table("edge", spec, [p for p in inputs if p.stem in KINDS["edge"]], out / "e.md", out / "e.tex", out / "e.csv")
    t = pd.read_csv(out / "e.csv").set_index("run")
    assert list(t.index) == ["eos-lr0.1", "adam-lr0.001", "eta-lr0.05"]  # the studies' order
    # second half: steps 50..90 (≥ 90/2), η·λ1/2 = 0.1·22/2 = 1.1
    assert t.loc["eos-lr0.1", "eta_lambda"] == pytest.approx(1.1)
    assert math.isnan(t.loc["adam-lr0.001", "eta_lambda"]) and t.loc["adam-lr0.001", "adam_ratio"] == pytest.approx(0.9)
    assert t.loc["eta-lr0.05", "eta_lambda"] == pytest.approx(0.75) and t.loc["eta-lr0.05", "eta_bs"] == 1.0
    assert t.loc["eta-lr0.05", "share"] == pytest.approx(0.8) and t.loc["eta-lr0.05", "overlap"] == 0.6
    assert t.loc["eos-lr0.1", "loss"] == "MSE" and math.isnan(t.loc["eos-lr0.1", "share"])
    md = (out / "e.md").read_text()
    assert "grad. share top-10" in md and "| – |" in md


@pytest.mark.parametrize("kind", ["eos", "batch_sharpness", "subspace"])
def test_followup_figures_draw(tmp_path, kind) -> None:
    from sharpflow import figures

    inputs, meta = _runs_tree(tmp_path)
    studies = {"eos": ["eos"], "batch_sharpness": ["eta"], "subspace": ["eta"]}[kind]
    mine = [p for p in inputs if p.stem in figures.KINDS[kind] and meta[p.parent.name]["study"] in studies]
    spec = {"kind": kind, "studies": studies, "runs": {r: m for r, m in meta.items() if m["study"] in studies}}
    out = tmp_path / "fig"
    figures.draw(kind, spec, mine, out / "f.pdf", out / "f.png")
    assert (out / "f.png").read_bytes()[:4] == b"\x89PNG" and (out / "f.pdf").stat().st_size > 1000


def test_optional_tables_are_read_tables() -> None:
    """A kind's optional tables are among those it reads, and every other table it reads is required:
    the edge table needs only the spectrum of a run."""
    from sharpflow import figures, tables
    from sharpflow.kinds import OPTIONAL_TABLES

    for pkg in (figures, tables):
        for kind, opt in pkg.REGISTRY.optional.items():
            assert opt <= set(pkg.KINDS[kind]), (pkg.__name__, kind)
    assert set(tables.KINDS["edge"]) - tables.REGISTRY.optional_for("edge") == {"spectrum"}
    assert figures.REGISTRY.optional_for("eos") == OPTIONAL_TABLES | {"selfstab"}


def test_eos_figure_draws_the_self_stabilization_terms(tmp_path) -> None:
    """With selfstab rows the eos figure gains a third panel whose α and β lines are the table's values;
    without them it keeps its two panels."""
    from sharpflow.figures import eos
    from sharpflow.results import load

    inputs, meta = _runs_tree(tmp_path)
    steps = list(range(0, 100, 10))
    alpha = [0.5 * (s - 40) for s in steps]  # changes sign: progressive sharpening, then not
    beta = [2.0 + s for s in steps]
    d = tmp_path / "runs" / "eos-lr0.1"
    pd.DataFrame([{"run": "eos-lr0.1", "step": s, "epoch": float(s), "status": "ok", "alpha": a, "beta": b,
                   "lambda1": 22.0, "grad_norm": 1.0, "grad_curvature": 10.0, "eta_lambda_half": 1.1}
                  for s, a, b in zip(steps, alpha, beta, strict=True)]).to_parquet(d / "selfstab.parquet", index=False)
    eos_inputs = [p for p in inputs if p.parent.name == "eos-lr0.1"]
    spec = {"runs": {"eos-lr0.1": meta["eos-lr0.1"]}}
    fig = eos.plot(load([*eos_inputs, d / "selfstab.parquet"], ("metrics", "spectrum", "selfstab"), spec), {})
    assert len(fig.axes) == 3
    lines = {ln.get_gid(): ln for ln in fig.axes[2].lines if ln.get_gid()}
    assert list(lines["alpha"].get_ydata()) == alpha and list(lines["beta"].get_ydata()) == beta
    assert fig.axes[2].get_yscale() == "symlog"
    assert len(eos.plot(load(eos_inputs, ("metrics", "spectrum", "selfstab"), spec), {}).axes) == 2
