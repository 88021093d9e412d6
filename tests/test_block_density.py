"""The blocks analysis's optional SLQ density of each diagonal Hessian block (``blocks.density``), against
the dense blocks H[b, b] of a trained tiny MLP's Hessian (``torch.autograd.functional.hessian`` on the
flat parameters, sliced to each block's coordinates).

With Lanczos steps ≥ a block's size, each probe's quadrature is exact: its nodes are eigenvalues of
H_bb and Σ_j w_j θ_j^p = vᵀH_bb^p v for its unit probe v, an unbiased estimate of tr(H_bb^p)/size.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

from sharpflow.analyses.blocks import (
    DENSE_UP_TO,
    DENSITY_COLUMNS,
    BlockDensityConfig,
    BlocksConfig,
    block_density,
    density_seed,
    parameter_blocks,
)
from sharpflow.analyses.blocks import compute as blocks

IDENT = ["run", "step", "epoch", "status"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny products: one thread is fastest, and keeps the tests quick on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tiny_data, tiny_dataset, tmp_path_factory):
    """(ctx, dense float64 Hessian, [(name, numel)]) of a trained MLP with one hidden layer of 4."""
    from sharpflow.analyses.context import open_checkpoint
    from sharpflow.data import hessian_batches, load_prepared
    from sharpflow.train import train

    from .conftest import tiny_run
    from .test_hessian import dense_hessian

    out = tmp_path_factory.mktemp("block_density")
    run = tiny_run(model={"name": "mlp", "kwargs": {"hidden": [4]}})
    train(run, tiny_dataset, run_name="r", data_dir=tiny_data, out_dir=out, progress=False, log=lambda *_: None)
    data = load_prepared(tiny_data)
    ctx = open_checkpoint(run, "r", data, sorted((out / "checkpoints").glob("*.pt"))[-1], torch.device("cpu"),
                          log=lambda *_: None)
    batches = [(x.double(), y) for x, y in hessian_batches(data, len(data.hessian_idx))]
    h = dense_hessian(ctx.model().double(), batches, weight_decay=run.optimizer.weight_decay)
    names = [(n, p.numel()) for n, p in ctx.model().named_parameters()]
    return ctx, h, names, batches


def _probes(seed: int, probes: int, dim: int) -> list[torch.Tensor]:
    """The unit probes spectral_density draws from ``seed`` (Gaussian, float64, normalised, in order)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(probes):
        v = torch.randn(dim, generator=gen, dtype=torch.float64)
        out.append(v / v.norm())
    return out


def test_block_slq_against_the_dense_blocks(trained):
    """Each weight block (160 and 40 coordinates), float64 products, steps ≥ size: every node an eigenvalue
    of H_bb, weights summing to 1, each probe's moments vᵀH_bb^p v exactly, and their mean over probes
    within 4 standard errors of tr(H_bb^p)/size (p = 1, 2)."""
    from sharpflow.hessian import BlockOperator, HessianOperator

    ctx, h, names, batches = trained
    op = HessianOperator(ctx.model().double(), ctx.loss_fn, batches, weight_decay=ctx.run.optimizer.weight_decay)
    probes, step = 8, ctx.step
    measured = {}
    for i, (b, idx) in enumerate(parameter_blocks(names, []).items()):
        size = len(idx)
        assert size > DENSE_UP_TO
        hb = h[idx][:, idx]
        lam = torch.linalg.eigvalsh(hb)
        scale = float(lam.abs().max())
        seed = density_seed(step, i)
        sd, exact = block_density(BlockOperator(op, torch.tensor(idx)), probes, size + 5, seed)
        assert not exact and sd.nodes.shape == (probes, size) and sd.matvecs == sum(sd.steps) <= probes * size
        # j = 0: a probe's weights sum to 1
        assert torch.allclose(sd.weights.sum(dim=1), torch.ones(probes, dtype=torch.float64), atol=1e-12, rtol=0)
        # nodes: eigenvalues of H_bb (padding nodes repeat the probe's last)
        gap = (sd.nodes.reshape(-1, 1) - lam.reshape(1, -1)).abs().min(dim=1).values
        assert float(gap.max()) < 1e-6, (b, float(gap.max()))
        vs = _probes(seed, probes, size)
        for p in (1, 2):
            per_probe = (sd.weights * sd.nodes.pow(p)).sum(dim=1)
            exact_q = torch.stack([v @ torch.linalg.matrix_power(hb, p) @ v for v in vs])
            assert torch.allclose(per_probe, exact_q, rtol=1e-8, atol=1e-10 * scale**p), (b, p)
            truth = float(lam.pow(p).mean())
            mean, se = float(per_probe.mean()), float(per_probe.std() / probes**0.5)
            assert abs(mean - truth) <= 4 * se + 1e-12 * scale**p, (b, p, mean, truth, se)
            assert sd.moment(p) == pytest.approx(mean, rel=1e-12)
            measured[(b, p)] = (mean, truth, se, float(gap.max()))
    print("block, p: SLQ mean, tr(H_bb^p)/size, standard error, largest node-to-eigenvalue gap:",
          {k: tuple(f"{x:.4g}" for x in v) for k, v in measured.items()})


def test_the_analysis_writes_blocks_density(trained):
    """The analysis end to end (float32 products, as a run's): an exact small block (a 4-coordinate bias),
    an SLQ block (the last weight, 40 coordinates, steps ≥ size) against the dense blocks; the
    per-block seed; the blocks table unchanged by the option; disabled: an empty table, same columns."""
    ctx, h, names, _ = trained
    bias = next(n for n, k in names if n.endswith("bias") and k <= DENSE_UP_TO)
    last = [n for n, _ in names if n.endswith("weight")][-1]
    patterns = [f"^{re.escape(bias)}$", f"^{re.escape(last)}$"]
    cfg = BlocksConfig(enabled=True, tol=1e-6, patterns=patterns,
                       density=BlockDensityConfig(enabled=True, probes=3, steps=50))
    out = blocks(ctx, cfg)
    df = out["blocks_density"]
    assert list(df.columns) == [*IDENT, *DENSITY_COLUMNS]
    want = parameter_blocks(names, patterns)
    assert list(dict.fromkeys(df["block"])) == patterns
    for b, idx in want.items():
        rows = df[df.block == b]
        lam = torch.linalg.eigvalsh(h[idx][:, idx])
        tol = 1e-4 * float(lam.abs().max()) + 1e-7
        assert (rows["size"] == len(idx)).all() and (rows["n"] == len(ctx.data.hessian_idx)).all()
        for _, probe in rows.groupby("probe"):
            assert probe["weight"].sum() == pytest.approx(1.0, abs=1e-12)
        nodes = torch.tensor(rows["node"].to_numpy())
        assert float((nodes[:, None] - lam[None]).abs().min(dim=1).values.max()) < tol, b
        if len(idx) <= DENSE_UP_TO:  # exact: the eigenvalues, weight 1/size, one probe
            assert rows["exact"].all() and (rows["probe"] == 0).all() and (rows["steps"] == len(idx)).all()
            assert torch.allclose(nodes, lam, atol=tol, rtol=0)
            assert rows["weight"].tolist() == pytest.approx([1 / len(idx)] * len(idx))
        else:
            assert not rows["exact"].any() and sorted(set(rows["probe"])) == [0, 1, 2]
            assert (rows["steps"] <= len(idx)).all() and len(rows) == 3 * len(idx)
    # the per-block seed: block 1's probes are block_density's with density_seed(step, 1), bit for bit
    from sharpflow.hessian import BlockOperator

    sd, _ = block_density(BlockOperator(ctx.hessian(ctx.model()), torch.tensor(want[patterns[1]])), 3, 50,
                          density_seed(ctx.step, 1))
    assert df[df.block == patterns[1]]["node"].tolist() == sd.nodes.reshape(-1).tolist()
    # off: the blocks table is the same, blocks_density empty with the same columns
    off = blocks(ctx, cfg.model_copy(update={"density": BlockDensityConfig()}))
    assert off["blocks"]["eigenvalue"].tolist() == out["blocks"]["eigenvalue"].tolist()
    assert len(off["blocks_density"]) == 0 and list(off["blocks_density"].columns) == list(df.columns)


def test_a_diverged_checkpoint_has_nan_rows_with_the_same_columns(trained):
    ctx, _, names, _ = trained
    bad = copy.copy(ctx)
    bad.checkpoint = {**ctx.checkpoint, "status": "diverged"}
    cfg = BlocksConfig(enabled=True, density=BlockDensityConfig(enabled=True))
    df = blocks(bad, cfg)["blocks_density"]
    assert list(df.columns) == [*IDENT, *DENSITY_COLUMNS]
    assert list(df["block"]) == list(parameter_blocks(names, [])) and df["node"].isna().all()
    assert (df["status"] == "diverged").all()
    assert len(blocks(bad, BlocksConfig(enabled=True))["blocks_density"]) == 0


def test_the_option_is_left_out_of_the_dumped_config_at_its_default():
    """Existing blocks sections dump as before (no rerun, same stash key); set, it is dumped and read back."""
    from pydantic import ValidationError

    assert "density" not in BlocksConfig(enabled=True).model_dump(mode="json")
    on = BlocksConfig(enabled=True, density={"enabled": True, "probes": 5})
    dumped = on.model_dump(mode="json")
    assert dumped["density"] == {"enabled": True, "probes": 5, "steps": 20}
    assert BlocksConfig.model_validate(dumped) == on
    a, b = BlocksConfig(), BlocksConfig()
    a.density.probes = 7  # the default is not shared between instances
    assert b.density == BlockDensityConfig()
    with pytest.raises(ValidationError):
        BlocksConfig(density={"enabled": True, "bins": 3})
    with pytest.raises(ValidationError):
        BlocksConfig(density={"steps": 0})


def test_the_tables_write_and_aggregate(trained, tmp_path):
    """A run's per-checkpoint blocks_density files (computed, diverged; or all empty, the option off) go
    through Parquet and the run's aggregation like every table."""
    from sharpflow.io import write_parquet
    from sharpflow.results import aggregate

    ctx, _, names, _ = trained
    bad = copy.copy(ctx)
    bad.checkpoint = {**ctx.checkpoint, "status": "diverged"}
    bias = next(n for n, k in names if n.endswith("bias") and k <= DENSE_UP_TO)
    on = BlocksConfig(enabled=True, patterns=[re.escape(bias)], density=BlockDensityConfig(enabled=True))
    for label, cfg in (("on", on), ("off", on.model_copy(update={"density": BlockDensityConfig()}))):
        files = []
        for i, c in enumerate((ctx, bad)):
            files.append(tmp_path / label / f"step{i:08d}.parquet")
            write_parquet(files[-1], blocks(c, cfg)["blocks_density"])
        df = aggregate(files, tmp_path / f"{label}.parquet")
        assert list(df.columns) == [*IDENT, *DENSITY_COLUMNS]
        assert len(df) == (0 if label == "off" else 4 + 1)  # 4 eigenvalues; one NaN row when diverged
