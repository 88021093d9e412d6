"""Top eigenpairs of a symmetric operator, each certified by a true residual.

The default solver is thick-restart Lanczos (Krylov-Schur style) with full reorthogonalisation,
block capable, with explicit Rayleigh-Ritz over stored products W = H V. Keeping W makes every
reported residual ‖Hu − λu‖ a true residual, computed from actual operator products by linearity
(u = V s, Hu = W s), at no extra product. On CNN Hessians single-vector Lanczos needed the fewest
products (blocks needed more; see ``docs/measured/benchmarks.md``), so it is the default; its advantage over
ARPACK (``backend="arpack"``, also available) is mostly the cheaper product of
:class:`~sharpflow.hessian.operators.HessianOperator` and checking convergence every step.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .operators import LinearOperator

_TINY = 1e-30
_WARM_NOISE = 0.1  # norm of the random part of a warm start vector, relative to the rest
_WD = torch.float64  # working dtype of the Krylov basis and its products, whatever the operator's
_DROP_TOL = 1e-10  # columns with less than this fraction of their norm left are dependent
_GRAM_FLOOR = 1e-6  # below this relative residual, sᵀGs − θ² is cancellation noise: check vectors


@dataclass(frozen=True)
class EigenResult:
    """Top eigenpairs with their certificates (frozen: its fields cannot be reassigned).

    Rows are ordered by the ``which`` criterion, best first: algebraically descending for "LA",
    by magnitude descending for "LM". Eigenvalues are always signed.

    Attributes:
        eigenvalues: (k,) Rayleigh quotients uᵀHu of the returned vectors (float64; units of H,
            loss per parameter²).
        eigenvectors: (k, D) orthonormal rows u_i, in the operator's dtype.
        residuals: (k,) ‖H u_i − λ_i u_i‖, from actual Hessian products (same units as λ).
        rel_residuals: (k,) residual / max(|λ_i|, tiny). For a float32 operator they cannot go
            much below ~1e-7 · max|λ| / |λ_i| (rounding in the products themselves).
        converged: (k,) bool, rel_residual <= tol.
        matvecs: Hessian-vector products spent (a block of m counts m), verification included.
        seconds: wall time of the call.
        backend: "lanczos" or "arpack".
        which: "LA" or "LM".
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    rel_residuals: Tensor
    converged: Tensor
    matvecs: int
    seconds: float
    backend: str
    which: str


def top_eigenpairs(
    op: LinearOperator,
    k: int,
    tol: float = 1e-3,
    v0: Tensor | None = None,
    which: str = "LA",
    backend: str = "lanczos",
    max_matvecs: int | None = None,
    block_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
    *,
    max_basis: int | None = None,
    verify: bool = False,
) -> EigenResult:
    """Top-k eigenpairs of a symmetric operator, with true residuals.

    Args:
        op: a :class:`~sharpflow.hessian.operators.LinearOperator`: ``dim``, ``dtype``,
            ``device`` and ``matvec`` taking (D,) and (D, m). Products are requested in ``dtype``;
            the solver's own arithmetic is float64 on ``device``.
        k: number of eigenpairs.
        tol: convergence when ‖Hu − λu‖ <= tol · |λ| for each of the k pairs.
        v0: warm start: a (D,) vector or (k', D) rows, e.g. the eigenvectors at a nearby point.
            With ``block_size=1`` (and for arpack) the start vector is the sum of the normalised
            rows plus 10% noise; with blocks, the rows form the first block.
        which: "LA" (largest algebraic) or "LM" (largest magnitude).
        backend: "lanczos" (block Krylov, below) or "arpack" (``scipy.sparse.linalg.eigsh``).
        max_matvecs: budget of products (default 1000 + 50k). When it runs out the current
            pairs are returned with ``converged`` False where they are not, and a warning is
            issued. For "arpack" the budget is mapped to ARPACK restarts, so it is approximate.
        block_size: vectors per block product (lanczos); default 1, i.e. thick-restart Lanczos,
            which needed the fewest products on CNN Hessians (bench/hessian.py). Use a block at
            least as large as the multiplicity of an exactly repeated eigenvalue: a single-vector
            Krylov space holds only one vector of each eigenspace.
        seed: seed of the random start vectors.
        progress: show a tqdm bar of products.
        max_basis: lanczos basis size before a thick restart (default ``max(3k, k + 5b, 30)``).
            Memory: two (D, max_basis) float64 arrays.
        verify: recompute H u for the final vectors with k extra products, and report residuals
            from those. Without it residuals come from the stored products H V by linearity,
            which are true products as well; ``verify`` is an independent check.

    Returns:
        An :class:`EigenResult`.
    """
    if which not in ("LA", "LM"):
        raise ValueError(f"which must be 'LA' or 'LM', got {which!r}")
    if not 1 <= k <= op.dim:
        raise ValueError(f"need 1 <= k <= dim={op.dim}, got k={k}")
    if max_matvecs is None:
        max_matvecs = 1000 + 50 * k
    start = time.perf_counter()
    if backend == "lanczos":
        lam, vecs, res, rel, conv, count = _block_krylov(
            op, k, tol, _rows(v0, op.dim), which, max_matvecs, block_size, max_basis, seed, progress, verify
        )
    elif backend == "arpack":
        lam, vecs, res, rel, conv, count = _arpack(op, k, tol, _rows(v0, op.dim), which, max_matvecs, seed, progress)
    else:
        raise ValueError(f"backend must be 'lanczos' or 'arpack', got {backend!r}")
    return EigenResult(
        eigenvalues=lam,
        eigenvectors=vecs,
        residuals=res,
        rel_residuals=rel,
        converged=conv,
        matvecs=count,
        seconds=time.perf_counter() - start,
        backend=backend,
        which=which,
    )


# ------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------


def _order(theta: Tensor, which: str) -> Tensor:
    """Indices of Ritz values, best first for ``which``."""
    key = theta if which == "LA" else theta.abs()
    return torch.argsort(key, descending=True, stable=True)


def _orthonormalize(x: Tensor, basis: Tensor, drop_tol: float, passes: int = 2) -> Tensor:
    """Rows of ``x`` (m, D) made orthonormal to the rows of ``basis`` (n, D) and to each other.

    Classical Gram-Schmidt against the basis, ``passes`` times as GEMMs ("twice is enough"), then
    modified Gram-Schmidt with re-orthogonalisation inside the block. A row whose norm falls
    below ``drop_tol`` times its norm before projection adds nothing new and is dropped.
    """
    norms0 = x.norm(dim=1).clamp_min(_TINY)
    if basis.shape[0]:
        for _ in range(passes):
            x = x - (x @ basis.T) @ basis
    rows: list[Tensor] = []
    for j in range(x.shape[0]):
        r = x[j]
        for _ in range(2):
            for q in rows:
                r = r - (q @ r) * q
        nrm = r.norm()
        if nrm > drop_tol * norms0[j]:
            rows.append(r / nrm)
    if not rows:
        return x[:0]
    return torch.stack(rows)


def _rows(v0: Tensor | None, dim: int) -> Tensor | None:
    if v0 is None:
        return None
    v0 = v0.reshape(1, -1) if v0.ndim == 1 else v0
    if v0.ndim != 2 or v0.shape[1] != dim:
        raise ValueError(f"v0 must have shape ({dim},) or (k', {dim}), got {tuple(v0.shape)}")
    return v0


def _finish(vecs: Tensor, hvecs: Tensor, tol: float, which: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Rayleigh quotients, true residuals and order for columns u (D, k) with products Hu (D, k).

    Returns (λ, u as (k, D) rows, ‖Hu − λu‖, relative residuals, converged), best first.
    Computed in float64.
    """
    vecs, hvecs = vecs.double(), hvecs.double()
    nrm = vecs.norm(dim=0).clamp_min(_TINY)
    u = vecs / nrm
    hu = hvecs / nrm
    lam = (u * hu).sum(dim=0)
    res = (hu - u * lam).norm(dim=0)
    idx = _order(lam, which)
    lam, u, res = lam[idx], u[:, idx], res[idx]
    rel = res / lam.abs().clamp_min(_TINY)
    return lam, u.T.contiguous(), res, rel, rel <= tol


class _Progress:
    """A tqdm bar of products (its total is the budget), or nothing."""

    def __init__(self, show: bool, total: int) -> None:
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="hvp", desc="eigenpairs", leave=False)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------
# Thick-restart (block) Lanczos
# ------------------------------------------------------------------------------------------------


def _block_krylov(
    op: LinearOperator,
    k: int,
    tol: float,
    v0: Tensor | None,
    which: str,
    max_matvecs: int,
    block_size: int | None,
    max_basis: int | None,
    seed: int,
    progress: bool,
    verify: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    """(Block) Lanczos with full reorthogonalisation, explicit Rayleigh-Ritz and thick restart.

    The basis V (D, n) is orthonormal and W = H V holds the products. Each step adds the next
    Krylov block, (I − VVᵀ) H X, and does Rayleigh-Ritz on T = Vᵀ W: Ritz pairs (θ, u = V s) have
    Hu = W s, so residuals ‖W s − θ V s‖ are true ones. They are tracked cheaply through the Gram
    matrix G = WᵀW (‖r‖² = sᵀGs − θ², no pass over D-vectors) and, once that says the pairs have
    converged, confirmed from the vectors themselves. When V is full it is compressed to the best
    Ritz vectors (V ← VS, W ← WS, a Krylov-Schur restart), which costs no product.

    V and W are kept in float64 whatever the operator's dtype: float32 inner products over
    D ~ 10⁵-10⁶ entries err by ~1e-5 relative, which would put a floor of that order under the
    residuals; vectors are rounded to the operator's dtype only to be multiplied.
    """
    dim, device = op.dim, op.device
    b, nmax, keep = _krylov_sizes(dim, k, v0, block_size, max_basis)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(m: int) -> Tensor:
        return torch.randn(m, dim, generator=gen, dtype=_WD).to(device)

    x = _start_block(v0, b, nmax, randn, device)
    count = 0
    tick = _Progress(progress, max_matvecs)
    space = _KrylovSpace(nmax, dim, device)
    hit_budget = False
    passes = 2
    while True:
        x = _orthonormalize(x, space.basis[: space.n], _DROP_TOL, passes)
        if x.shape[0] == 0:  # the Krylov space is invariant: continue from a random direction
            x = _orthonormalize(randn(b), space.basis[: space.n], _DROP_TOL)
            if x.shape[0] == 0:
                break  # V spans the whole space
        x = x[: max(0, max_matvecs - count)]
        m = x.shape[0]
        if m == 0:
            hit_budget = True
            break
        hx = _apply(op, x)
        count += m
        tick(m)
        x = space.extend(x, hx)
        passes = 1

        theta, s = torch.linalg.eigh(space.proj)
        order = _order(theta, which)
        if space.n < k:
            continue
        if space.converged(theta, s, order[:k], tol):
            break
        if count >= max_matvecs:
            hit_budget = True
            break
        if space.n + x.shape[0] > nmax:  # thick restart: keep the best Ritz vectors and their products
            space.restart(s[:, order[:keep]], theta[order[:keep]])
            passes = 2  # x is orthogonal to the old, larger basis; one more pass costs little

    u, hu = space.ritz_pairs(k, which)
    if verify:
        u = u / u.norm(dim=1, keepdim=True).clamp_min(_TINY)
        hu = _apply(op, u)
        count += u.shape[0]
        tick(u.shape[0])
    tick.close()
    lam, vecs, res, rel, conv = _finish(u.T, hu.T, tol, which)
    if hit_budget and not bool(conv.all()):
        warnings.warn(
            f"top_eigenpairs: max_matvecs={max_matvecs} reached with {int((~conv).sum())} of {k} "
            f"pairs above tol={tol} (worst relative residual {float(rel.max()):.2e})",
            RuntimeWarning,
            stacklevel=3,
        )
    return lam, vecs.to(op.dtype), res, rel, conv, count


def _krylov_sizes(
    dim: int, k: int, v0: Tensor | None, block_size: int | None, max_basis: int | None
) -> tuple[int, int, int]:
    """(block size b, basis size before a restart, vectors kept by a restart)."""
    b = max(1, min(block_size or 1, dim))
    if v0 is not None and b > 1:
        b = max(b, v0.shape[0])  # the rows are the first block of a block Krylov space
    nmax = min(dim, max_basis or max(3 * k, k + 5 * b, 30))
    if nmax <= k and nmax < dim:
        raise ValueError(f"max_basis={nmax} must exceed k={k}")
    keep = max(k, min(nmax - b, max(k + b, (nmax + k) // 2)))
    return b, nmax, keep


def _start_block(v0: Tensor | None, b: int, nmax: int, randn: Callable[[int], Tensor], device: torch.device) -> Tensor:
    """The first Krylov block (rows, float64): random, or from the warm-start rows ``v0``."""
    if v0 is None:
        return randn(b)
    if b == 1:
        # One Lanczos run from the sum of the previous vectors: it is rich in every one of them,
        # and a Krylov space grown from one vector beats a block. A little noise keeps every
        # direction reachable (an eigenvector new to the top k).
        rows = v0.to(dtype=_WD, device=device)
        start = (rows / rows.norm(dim=1, keepdim=True).clamp_min(_TINY)).sum(dim=0)
        z = randn(1)[0]
        return (start / start.norm().clamp_min(_TINY) + _WARM_NOISE * z / z.norm())[None]
    x = v0.to(dtype=_WD, device=device)[: nmax - b]
    if x.shape[0] < b:
        x = torch.cat([x, randn(b - x.shape[0])])
    return x


def _apply(op: LinearOperator, rows: Tensor) -> Tensor:
    """H applied to float64 rows (m, D): rounded to the operator's dtype, returned as float64 rows."""
    return op.matvec(rows.T.to(op.dtype)).to(dtype=_WD, device=op.device).T


class _KrylovSpace:
    """The orthonormal basis V and its products W = H V, as row-major buffers filled in place
    (``basis[:n]`` is Vᵀ, ``prods[:n]`` is Wᵀ), with T = VᵀHV (``proj``, the symmetric part of
    V Wᵀ) and G = WᵀW (``gram``), all float64."""

    def __init__(self, nmax: int, dim: int, device: torch.device) -> None:
        self.dim = dim
        self.basis = torch.empty(nmax, dim, dtype=_WD, device=device)
        self.prods = torch.empty(nmax, dim, dtype=_WD, device=device)
        self.n = 0
        self.proj = torch.zeros(0, 0, dtype=_WD, device=device)
        self.gram = torch.zeros(0, 0, dtype=_WD, device=device)

    def extend(self, x: Tensor, hx: Tensor) -> Tensor:
        """Append orthonormal rows ``x`` (m, D) with their products ``hx``; return the next
        Krylov block, projected once against the basis (the orthonormalisation adds the second pass)."""
        n, m = self.n, x.shape[0]
        basis, prods = self.basis, self.prods
        cross = basis[:n] @ hx.T  # (n, m): Vᵀ H x
        back = prods[:n] @ torch.cat([x, hx]).T  # (n, 2m): (HV)ᵀx and (HV)ᵀHx, one pass over W
        # T must be exactly the symmetric part of V Wᵀ (float32 products are not exactly
        # symmetric), else the Gram residual estimate floors at √(asymmetry) ≈ 3e-4.
        self.proj = _grow(self.proj, 0.5 * (cross + back[:, :m]), x @ hx.T)
        self.gram = _grow(self.gram, back[:, m:], hx @ hx.T)
        basis[n : n + m] = x
        prods[n : n + m] = hx
        nxt = hx - cross.T @ basis[:n] - (x @ hx.T).T @ x
        self.n = n + m
        return nxt

    def converged(self, theta: Tensor, s: Tensor, want: Tensor, tol: float) -> bool:
        """Whether the Ritz pairs ``want`` (indices into the eigenpairs (θ, s) of T) are within
        ``tol``: estimated from G, then confirmed on the vectors; or the basis spans the space."""
        n = self.n
        sw, tw = s[:, want], theta[want]
        est = ((sw * (self.gram @ sw)).sum(dim=0) - tw.square()).clamp_min(0).sqrt() / tw.abs().clamp_min(_TINY)
        done = n >= self.dim
        if not done and bool((est <= max(tol, _GRAM_FLOOR)).all()):
            # Confirm on the vectors: the Gram estimate cannot resolve residuals below ~1e-7.
            res = (sw.T @ self.prods[:n] - tw[:, None] * (sw.T @ self.basis[:n])).norm(dim=1)
            done = bool((res <= tol * tw.abs()).all())
        return done

    def restart(self, sk: Tensor, theta_kept: Tensor) -> None:
        """Compress to the Ritz vectors V sk (Krylov-Schur); their Ritz values make T diagonal."""
        n, keep = self.n, sk.shape[1]
        self.basis[:keep] = sk.T @ self.basis[:n]
        self.prods[:keep] = sk.T @ self.prods[:n]
        self.n = keep
        self.proj = torch.diag(theta_kept)
        self.gram = sk.T @ self.gram @ sk

    def ritz_pairs(self, k: int, which: str) -> tuple[Tensor, Tensor]:
        """The best k Ritz vectors u = V s and their products Hu = W s, as (k, D) rows."""
        theta, s = torch.linalg.eigh(self.proj)
        ss = s[:, _order(theta, which)[:k]]
        return ss.T @ self.basis[: self.n], ss.T @ self.prods[: self.n]


def _grow(mat: Tensor, cross: Tensor, corner: Tensor) -> Tensor:
    """Symmetric [[mat, cross], [crossᵀ, corner]] with the corner symmetrised."""
    n, m = cross.shape
    out = torch.empty(n + m, n + m, dtype=mat.dtype, device=mat.device)
    out[:n, :n] = mat
    out[:n, n:] = cross
    out[n:, :n] = cross.T
    out[n:, n:] = 0.5 * (corner + corner.T)
    return out


# ------------------------------------------------------------------------------------------------
# ARPACK
# ------------------------------------------------------------------------------------------------


def _arpack(
    op: LinearOperator,
    k: int,
    tol: float,
    v0: Tensor | None,
    which: str,
    max_matvecs: int,
    seed: int,
    progress: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    """scipy's ARPACK (implicitly restarted Lanczos, the paper's method), then k true residuals."""
    import numpy as np
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh
    from scipy.sparse.linalg import LinearOperator as ScipyOperator

    dim = op.dim
    dtype, device = op.dtype, op.device
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    count = 0
    tick = _Progress(progress, max_matvecs)

    def mv(x: np.ndarray) -> np.ndarray:
        nonlocal count
        count += 1
        tick(1)
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np_dtype).reshape(-1)).to(device)
        return op.matvec(v).detach().cpu().numpy().astype(np_dtype, copy=False)

    lin = ScipyOperator((dim, dim), matvec=mv, dtype=np_dtype)
    start = np.random.default_rng(seed).standard_normal(dim)
    if v0 is not None:  # as for lanczos: the sum of the normalised rows, plus 10% noise
        rows = v0.to(dtype=torch.float64).cpu()
        warm = (rows / rows.norm(dim=1, keepdim=True).clamp_min(_TINY)).sum(dim=0).numpy()
        start = warm / max(np.linalg.norm(warm), _TINY) + _WARM_NOISE * start / np.linalg.norm(start)
    ncv = min(dim, max(2 * k + 1, 20))
    # ARPACK counts restarts, not products: about ncv - k products per restart after the first ncv.
    maxiter = max(1, (max_matvecs - ncv) // max(1, ncv - k) + 1)
    try:
        _, vecs = eigsh(lin, k=k, which=which, tol=tol, v0=start.astype(np_dtype), ncv=ncv, maxiter=maxiter)
        hit_budget = False
    except ArpackNoConvergence as err:
        vecs = err.eigenvectors
        hit_budget = True
    u = torch.from_numpy(np.ascontiguousarray(vecs)).to(dtype=dtype, device=device)
    if u.shape[1] == 0:
        raise RuntimeError(f"ARPACK converged no eigenpair within max_matvecs={max_matvecs}")
    hu = op.matvec(u).to(device=device)
    count += u.shape[1]
    tick(u.shape[1])
    tick.close()
    lam, vecs_t, res, rel, conv = _finish(u, hu, tol, which)
    if hit_budget or not bool(conv.all()):
        warnings.warn(
            f"top_eigenpairs(arpack): {int(conv.sum())} of {k} pairs within tol={tol} after {count} products",
            RuntimeWarning,
            stacklevel=3,
        )
    return lam, vecs_t.to(dtype), res, rel, conv, count


__all__ = ["EigenResult", "top_eigenpairs"]
