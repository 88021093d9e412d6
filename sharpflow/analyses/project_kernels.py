"""The kernels of the ``project`` analysis (:mod:`.project`): how mini-batch gradients and SGD steps
meet the sharpest directions — their alignment with the top eigenvectors, loss cross-sections
along single directions and their widths, and the SGD step decomposed along single directions.

Pure functions on the conventions of :mod:`.gradients` (flat θ, (k, D) eigenvectors, mean losses,
a ``diverged`` column instead of an exception). The grids (section k values, step multipliers, width
thresholds) are the caller's: :class:`~.project.ProjectConfig` holds their defaults.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from ..params import LossFn
from .gradients import Batch, _is_finite, _losses_along, _random_unit_vectors, loss_at

# Columns that the caller may add to a table before summarising it; they become group keys.
_ID_COLUMNS = ("run", "step", "epoch")


# ----------------------------------------------------------------------------------------------
# 1. Alignment of gradients with the sharpest directions
# ----------------------------------------------------------------------------------------------
def random_cos_baseline(dim: int, *, exact: bool = False) -> float:
    """E|cos(g, r)| for r uniform on the unit sphere of R^dim (any fixed g ≠ 0).

    ``exact=False`` gives the large-dim approximation sqrt(2 / (π·dim)) used by the paper;
    ``exact=True`` gives Γ(dim/2) / (√π · Γ((dim+1)/2)) (e.g. 2/π for dim=2).
    """
    if exact:
        return math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)
    return math.sqrt(2.0 / (math.pi * dim))


def alignment(
    grads: Tensor,
    E: Tensor,
    full_grad: Tensor | None = None,
    *,
    n_random: int = 5,
    generator: torch.Generator | int = 0,
) -> pd.DataFrame:
    """Cosines between gradients and the top-k eigenvectors (and random directions).

    Args:
        grads: (B, D) mini-batch gradients.
        E: (k, D) orthonormal eigenvectors, row i-1 = e_i (descending eigenvalue).
        full_grad: optional (D,) full-batch gradient, reported as ``source="full"``.
        n_random: R random unit vectors (uniform on the sphere of R^D), the same R for every
            gradient, drawn from ``generator``.

    Returns:
        One row per (gradient, direction). Columns:

        - ``source``: "minibatch" or "full";
        - ``batch``: mini-batch index 0..B-1, or -1 for the full-batch gradient;
        - ``direction``: "e1".."ek", "rand1".."randR", or "subspace" (span of e_1..e_k);
        - ``kind``: "eigen", "random" or "subspace";
        - ``rank``: i for e_i, r for rand_r, k for the subspace;
        - ``cos``: signed cosine gᵀd / (‖g‖‖d‖); NaN on "subspace" rows;
        - ``abs_cos``: |cos|; on "subspace" rows the cosine between g and its projection onto
          the subspace, sqrt(frac_in_subspace);
        - ``frac_in_subspace``: fraction of ‖g‖² inside the span of the row's direction(s):
          cos² on single-direction rows, Σ_{i≤k} cos_i² on "subspace" rows (random level k/D);
        - ``grad_norm``: ‖g‖ (parameter-gradient units);
        - ``diverged``: the gradient has non-finite entries.

        A zero gradient gives NaN cosines (0/0), not an error.
    """
    g_all = grads if full_grad is None else torch.cat([grads, full_grad[None]])
    n_mb = grads.shape[0]
    k, dim = E.shape
    R = _random_unit_vectors(n_random, dim, generator, E)
    dirs = torch.cat([E, R]).double()
    dir_norm = dirs.norm(dim=1).cpu().numpy()

    # float64 in row chunks: precise cosines without a (B, D) float64 copy of all gradients.
    dots, norms, finite = [], [], []
    for s in range(0, g_all.shape[0], 64):
        g = g_all[s : s + 64].to(dirs.device).double()
        dots.append((g @ dirs.T).cpu())
        norms.append(g.norm(dim=1).cpu())
        finite.append(torch.isfinite(g).all(dim=1).cpu())
    dot = torch.cat(dots).numpy() if dots else np.zeros((0, k + n_random))
    gnorm = torch.cat(norms).numpy() if norms else np.zeros(0)
    ok = torch.cat(finite).numpy() if finite else np.zeros(0, dtype=bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (gnorm[:, None] * dir_norm[None, :])
    cos[~ok] = np.nan
    frac_sub = (cos[:, :k] ** 2).sum(axis=1) if k else np.zeros(len(gnorm))
    frac_sub[~ok | ~np.isfinite(frac_sub)] = np.nan

    n_g = len(gnorm)
    n_d = k + n_random + 1
    names = [f"e{i + 1}" for i in range(k)] + [f"rand{r + 1}" for r in range(n_random)] + ["subspace"]
    kinds = ["eigen"] * k + ["random"] * n_random + ["subspace"]
    ranks = [*range(1, k + 1), *range(1, n_random + 1), k]
    cos_full = np.concatenate([cos, np.full((n_g, 1), np.nan)], axis=1)
    abs_full = np.concatenate([np.abs(cos), np.sqrt(frac_sub)[:, None]], axis=1)
    frac_full = np.concatenate([cos**2, frac_sub[:, None]], axis=1)
    batch_idx = np.array([*range(n_mb), *([-1] if full_grad is not None else [])], dtype=np.int64)
    return pd.DataFrame({
        "source": np.repeat(np.where(batch_idx >= 0, "minibatch", "full"), n_d),
        "batch": np.repeat(batch_idx, n_d),
        "direction": np.tile(names, n_g),
        "kind": np.tile(kinds, n_g),
        "rank": np.tile(np.array(ranks, dtype=np.int64), n_g),
        "cos": cos_full.reshape(-1),
        "abs_cos": abs_full.reshape(-1),
        "frac_in_subspace": frac_full.reshape(-1),
        "grad_norm": np.repeat(gnorm, n_d),
        "diverged": np.repeat(~ok, n_d),
    })


# ----------------------------------------------------------------------------------------------
# 2. Loss cross-sections along single directions
# ----------------------------------------------------------------------------------------------
def typical_step(grads: Tensor, e: Tensor, lr: float) -> float:
    """Typical SGD step length projected on ``e``: lr · mean_m |g_mᵀe| (parameter units).

    Args:
        grads: (M, D) mini-batch gradients; e: (D,) unit direction; lr: learning rate η.
    """
    proj = grads.double() @ e.to(grads.device).double()
    return float(lr * proj.abs().mean())


def cross_sections(
    model: nn.Module,
    loss_fn: LossFn,
    theta: Tensor,
    directions: Mapping[str, Tensor],
    step_sizes: Mapping[str, float],
    batches: Sequence[Batch],
    ks: Sequence[float],
    *,
    chunk: int | None = None,
) -> pd.DataFrame:
    """Loss along lines θ + k·s_d·d through ``theta`` (one line per direction).

    Args:
        theta: (D,) centre.
        directions: name -> (D,) direction d (meant to be a unit vector, e.g. e_1, e_3, e_5).
        step_sizes: name -> s_d, the unit of k along d (e.g. :func:`typical_step`, so k=1 is one
            typical SGD step projected on d).
        batches: the fixed subset on which the loss is measured (exact example weighting).
        ks: multiples of s_d; k=0 is always added (it is the reference for ``rel_loss``).

    Returns:
        One row per (direction, k), sorted by k. Columns: ``direction``, ``k``, ``step_size``
        (s_d), ``offset`` (k·s_d, the signed distance along d for a unit d), ``loss`` (mean loss,
        the loss function's units), ``rel_loss`` (loss / loss at k=0), ``diverged`` (``theta`` not
        finite; then loss and rel_loss are NaN). The centre is evaluated once and shared by all
        directions.
    """
    names = list(directions)
    missing = [n for n in names if n not in step_sizes]
    if missing:
        raise KeyError(f"no step size for direction(s) {missing}")
    k_vals = sorted({float(k) for k in ks} | {0.0})
    k_nz = [k for k in k_vals if k != 0.0]
    theta = theta.detach()
    diverged = not _is_finite(theta)

    n_dir = len(names)
    if diverged or n_dir == 0:
        losses = np.full((n_dir, len(k_nz)), np.nan)
        centre = math.nan
    else:
        dirs = torch.stack([directions[n].detach().to(theta) for n in names] + [torch.zeros_like(theta)])
        idx = torch.tensor([*np.repeat(np.arange(n_dir), len(k_nz)), n_dir], device=theta.device)
        coef = torch.tensor(
            [k * float(step_sizes[n]) for n in names for k in k_nz] + [0.0], dtype=torch.float64
        )
        out = _losses_along(model, loss_fn, theta, dirs, idx, coef, batches, chunk).cpu().numpy()
        losses, centre = out[:-1].reshape(n_dir, len(k_nz)), float(out[-1])

    rows = []
    for i, n in enumerate(names):
        s = float(step_sizes[n])
        line = dict(zip(k_nz, losses[i], strict=True)) | {0.0: centre}
        for k in k_vals:
            rows.append({"direction": n, "k": k, "step_size": s, "offset": k * s, "loss": float(line[k]),
                         "rel_loss": float(line[k]) / centre, "diverged": diverged})
    cols = ["direction", "k", "step_size", "offset", "loss", "rel_loss", "diverged"]
    return pd.DataFrame(rows, columns=cols)


def cross_section_widths(df: pd.DataFrame, thresholds: Sequence[float]) -> pd.DataFrame:
    """Width of the valley along each direction: how far one must go before the loss rises.

    For each direction, threshold τ and side, scan the sampled k outwards from 0 and report the
    first |k| with loss > τ · loss(k=0). A non-finite loss away from the centre counts as
    exceeding (it comes from overflow far out along the line).

    Args:
        df: output of :func:`cross_sections` (extra ``run``/``step``/``epoch`` columns are kept
            as group keys).
        thresholds: τ values (> 1).

    Returns:
        One row per (direction, threshold, side). Columns: ``direction``, ``threshold``, ``side``
        ("+", "-", or "min" = the narrower of the two), ``width_k`` (the grid |k|; ``inf`` if the
        loss never exceeds τ on the sampled range — a lower bound "wider than max |k|"; NaN if the
        centre loss is not finite), ``width_k_interp`` (|k| where the linear interpolation of
        rel_loss between the last sample below τ and the first above crosses τ; same inf/NaN
        rules), ``step_size``, ``width`` (width_k · step_size, parameter-space distance for a unit
        direction), ``diverged``.
    """
    keys = [c for c in _ID_COLUMNS if c in df.columns] + ["direction"]
    rows = []
    for key, g in df.groupby(keys, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        ident = dict(zip(keys, key, strict=True))
        s = float(g["step_size"].iloc[0])
        diverged = bool(g["diverged"].any())
        centre = g.loc[g["k"] == 0.0, "loss"]
        centre_ok = len(centre) > 0 and np.isfinite(centre.iloc[0]) and not diverged
        for tau in thresholds:
            per_side: dict[str, tuple[float, float]] = {}
            for side, sign in (("+", 1.0), ("-", -1.0)):
                part = g[g["k"] * sign > 0].assign(absk=lambda d: d["k"].abs()).sort_values("absk")
                per_side[side] = (
                    _first_crossing(part["absk"].to_numpy(), part["rel_loss"].to_numpy(), tau)
                    if centre_ok else (math.nan, math.nan)
                )
            plus, minus = per_side["+"], per_side["-"]
            per_side["min"] = (float(np.fmin(plus[0], minus[0])), float(np.fmin(plus[1], minus[1])))
            for side, (wk, wi) in per_side.items():
                rows.append(ident | {"threshold": float(tau), "side": side, "width_k": wk,
                                     "width_k_interp": wi, "step_size": s, "width": wk * s,
                                     "diverged": diverged})
    cols = [*keys, "threshold", "side", "width_k", "width_k_interp", "step_size", "width", "diverged"]
    return pd.DataFrame(rows, columns=cols)


def _first_crossing(absk: np.ndarray, rel: np.ndarray, tau: float) -> tuple[float, float]:
    """(grid |k|, interpolated |k|) of the first sample with rel > tau, scanning outward from k=0."""
    prev_k, prev_r = 0.0, 1.0  # the centre, rel_loss = 1 by definition
    for k, r in zip(absk, rel, strict=True):
        if not np.isfinite(r) or r > tau:
            if not np.isfinite(r):
                return float(k), float(k)
            return float(k), float(prev_k + (tau - prev_r) / (r - prev_r) * (k - prev_k))
        prev_k, prev_r = float(k), float(r)
    return math.inf, math.inf


# ----------------------------------------------------------------------------------------------
# 3. The SGD step decomposed along single directions
# ----------------------------------------------------------------------------------------------
def decomposed_step(
    model: nn.Module,
    loss_fn: LossFn,
    theta: Tensor,
    grads: Tensor,
    E: Tensor,
    eigenvalues: Tensor,
    lr: float,
    batches: Sequence[Batch],
    *,
    multipliers: Sequence[float],
    n_random: int = 1,
    generator: torch.Generator | int = 0,
    chunk: int | None = None,
    direction_lr: Sequence[float] | None = None,
    full_steps: Tensor | None = None,
) -> pd.DataFrame:
    """Loss change from the SGD step restricted to one direction, for several step lengths.

    For each mini-batch gradient g_m, direction d and multiplier a (η' = a·lr):
    θ' = θ − η'(gᵀd)d for d = e_i or a random unit vector, and θ' = θ − η'g for "full" (the
    whole step). All (k + R + 1)·len(multipliers)·M points are evaluated in chunked vmap calls.
    On a quadratic with curvature λ_i along e_i and g the gradient of the measured loss, the
    change is −η'(gᵀe_i)²(1 − η'λ_i/2): positive (the step overshoots the 1-D minimum) exactly
    when ``eta_lambda_half`` = η'λ_i/2 > 1.

    Args:
        theta: (D,); grads: (M, D) mini-batch gradients at theta; E: (k, D) orthonormal;
        eigenvalues: (k,) matching E's rows; lr: η; batches: the fixed subset for the loss.
        n_random: R random unit directions (shared by all gradients), from ``generator``.
        direction_lr: (k,) the learning rate along each e_i (default ``lr`` for all), e.g. γη along
            the nudged directions of a Nudged-SGD run; random directions always use ``lr``.
        full_steps: (M, D) the update direction u_m of the whole step, θ' = θ − η'u_m (default the
            gradients; for Nudged-SGD the nudged gradient g − (1−γ)Σ(gᵀe_i)e_i).

    Returns:
        One row per (gradient, direction, multiplier). Columns: ``grad`` (0..M-1),
        ``direction`` ("e1".."ek", "rand1".."randR", "full"), ``kind`` ("eigen", "random",
        "full"), ``rank`` (i, r, or 0 for full), ``multiplier`` (a), ``lr_eff`` (η' = a·lr, with
        the direction's own lr for e_i),
        ``eigenvalue`` (λ_i; NaN otherwise), ``eta_lambda_half`` (η'λ_i/2; NaN otherwise),
        ``g_dot_d`` (gᵀd; for "full" d = g/‖g‖ so this is ‖g‖), ``loss_before`` (L(θ)),
        ``loss_after`` (L(θ')), ``rel_change_pct`` (100·(L(θ')−L(θ))/L(θ), percent),
        ``diverged`` (theta or that gradient not finite; values are then NaN).
    """
    theta = theta.detach()
    grads = grads.detach().to(theta)
    E = E.detach().to(theta)
    k, dim = E.shape
    M = grads.shape[0]
    mult = [float(a) for a in multipliers]
    A = len(mult)
    lam = eigenvalues.detach().double().cpu().numpy().reshape(-1)
    if lam.shape[0] != k:
        raise ValueError(f"{lam.shape[0]} eigenvalues for {k} eigenvectors")
    R = _random_unit_vectors(n_random, dim, generator, theta)
    theta_ok = _is_finite(theta)
    g_ok = torch.isfinite(grads).all(dim=1).cpu().numpy() & theta_ok

    n_fixed = k + n_random
    fixed = torch.cat([E, R])
    proj = (grads.double() @ fixed.double().T).cpu().numpy()  # (M, k+R)
    gnorm = grads.double().norm(dim=1).cpu().numpy()
    g_dot = np.concatenate([proj, gnorm[:, None]], axis=1)  # (M, k+R+1)

    # Point (m, j, a): θ + coef · dirs[idx], with dirs = [E; R; U] so "full" uses its own u_m.
    a_arr = np.asarray(mult)
    lr_dir = np.full(n_fixed + 1, float(lr))
    if direction_lr is not None:
        if len(direction_lr) != k:
            raise ValueError(f"{len(direction_lr)} direction learning rates for {k} eigenvectors")
        lr_dir[:k] = np.asarray(direction_lr, dtype=np.float64)
    steps_u = grads if full_steps is None else full_steps.detach().to(theta)
    if steps_u.shape != grads.shape:
        raise ValueError(f"full_steps has shape {tuple(steps_u.shape)}, the gradients {tuple(grads.shape)}")
    coef = np.empty((M, n_fixed + 1, A))
    coef[:, :n_fixed, :] = -lr_dir[None, :n_fixed, None] * a_arr[None, None, :] * proj[:, :, None]
    coef[:, n_fixed, :] = -lr * a_arr[None, :]
    idx = np.empty((M, n_fixed + 1, A), dtype=np.int64)
    idx[:, :n_fixed, :] = np.arange(n_fixed)[None, :, None]
    idx[:, n_fixed, :] = n_fixed + np.arange(M)[:, None]

    if theta_ok:
        base = float(loss_at(model, loss_fn, theta, batches, chunk=chunk)[0])
        keep = np.repeat(g_ok, (n_fixed + 1) * A)  # skip points built from non-finite gradients
        after = np.full(keep.shape[0], np.nan)
        if keep.any():
            dirs = torch.cat([fixed, torch.nan_to_num(steps_u)])
            after[keep] = _losses_along(
                model, loss_fn, theta, dirs,
                torch.from_numpy(idx.reshape(-1)[keep]).to(theta.device),
                torch.from_numpy(coef.reshape(-1)[keep]), batches, chunk,
            ).cpu().numpy()
    else:
        base = math.nan
        after = np.full(M * (n_fixed + 1) * A, np.nan)

    names = [f"e{i + 1}" for i in range(k)] + [f"rand{r + 1}" for r in range(n_random)] + ["full"]
    kinds = ["eigen"] * k + ["random"] * n_random + ["full"]
    ranks = np.array([*range(1, k + 1), *range(1, n_random + 1), 0], dtype=np.int64)
    eig = np.concatenate([lam, np.full(n_random + 1, np.nan)])
    n_d = n_fixed + 1
    rep = n_d * A
    lr_eff = np.tile((lr_dir[:, None] * a_arr[None, :]).reshape(-1), M)
    diverged = np.repeat(~g_ok, rep)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = 100.0 * (after - base) / base
    g_dot_rows = np.repeat(g_dot.reshape(-1), A)
    g_dot_rows[diverged] = np.nan
    return pd.DataFrame({
        "grad": np.repeat(np.arange(M, dtype=np.int64), rep),
        "direction": np.tile(np.repeat(names, A), M),
        "kind": np.tile(np.repeat(kinds, A), M),
        "rank": np.tile(np.repeat(ranks, A), M),
        "multiplier": np.tile(a_arr, M * n_d),
        "lr_eff": lr_eff,
        "eigenvalue": np.tile(np.repeat(eig, A), M),
        "eta_lambda_half": lr_eff * np.tile(np.repeat(eig, A), M) / 2.0,
        "g_dot_d": g_dot_rows,
        "loss_before": np.full(M * rep, base),
        "loss_after": after,
        "rel_change_pct": rel,
        "diverged": diverged,
    })
