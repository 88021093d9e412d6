"""The Hessian's spectral density at chosen checkpoints, by stochastic Lanczos quadrature.

Table ``runs/{run}/density/step*.parquet`` (aggregated: ``runs/{run}/density.parquet``): one row per
(probe, node): ``probe``, ``node`` (a quadrature node, an eigenvalue estimate, loss per
parameter²), ``weight`` (its weight; a probe's weights sum to 1, padding nodes of a probe that
found an invariant subspace early have weight 0), ``steps`` (that probe's Lanczos steps),
``matvecs`` and ``seconds`` (of the whole checkpoint), ``n`` (Hessian examples), plus run, step,
epoch, status. A density is Σ weight·kernel(λ − node) / probes
(:meth:`sharpflow.hessian.density.SpectralDensity.density`). The operator is the spectrum's: the
loss over the run's Hessian subset plus weight decay, the model in eval mode.

Cost: probes × steps products per checkpoint (10 × 50 = 500 against the 12–48 of a warm-started
top-10 solve in the default suite), hence off by default and ``stride`` to thin the checkpoints.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pydantic import Field, PositiveInt

from ..configbase import Strict
from .base import Analysis, strided

if TYPE_CHECKING:
    import pandas as pd

    from .context import CheckpointContext


class DensityConfig(Strict):
    """Spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019) at chosen checkpoints."""

    enabled: bool = Field(False, description="Compute it (probes × steps products per checkpoint).")
    probes: PositiveInt = Field(10, description="Random probes (the spread of the estimate shrinks as 1/sqrt).")
    steps: PositiveInt = Field(50, description="Lanczos steps per probe (resolution ~ spectrum width / steps).")
    stride: PositiveInt = Field(1, description="Every stride-th checkpoint, plus the last.")
    n: PositiveInt | None = Field(None, description="Hessian examples (None: the dataset's hessian_subset).")
    seed: int = 0


def compute(ctx: CheckpointContext, cfg: DensityConfig) -> dict[str, pd.DataFrame]:
    import pandas as pd

    from ..hessian.density import spectral_density
    from .context import add_ident, finite

    model = ctx.model()
    n = cfg.n or len(ctx.data.hessian_idx)
    ident = ctx.ident
    if ctx.status == "diverged" or not finite(model):
        df = pd.DataFrame({"probe": [0], "node": [math.nan], "weight": [math.nan], "steps": [0], "matvecs": [0],
                           "seconds": [0.0], "n": [n]})
        add_ident(df, {**ident, "status": "diverged"})
        return {"density": df}
    op = ctx.hessian(model, n)
    sd = spectral_density(op, num_probes=cfg.probes, lanczos_steps=cfg.steps, seed=cfg.seed * 1_000_003 + ctx.step)
    p, m = sd.nodes.shape
    df = pd.DataFrame({
        "probe": [i for i in range(p) for _ in range(m)],
        "node": sd.nodes.reshape(-1).numpy(),
        "weight": sd.weights.reshape(-1).numpy(),
        "steps": [sd.steps[i] for i in range(p) for _ in range(m)],
        "matvecs": sd.matvecs,
        "seconds": sd.seconds,
        "n": n,
    })
    add_ident(df, ident)
    ctx.log(f"[{ctx.run_name}] step {ctx.step}: density from {p} probes × {m} steps, {sd.matvecs} HVPs, "
            f"{sd.seconds:.2f} s")
    return {"density": df}


ANALYSIS = Analysis(
    name="density",
    config=DensityConfig,
    compute=compute,
    select=strided,
    format_version=1,
    summary="spectral density by stochastic Lanczos quadrature (off by default)",
    distributed=True,
)
