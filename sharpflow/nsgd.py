"""Nudged-SGD: SGD with its own learning rate along a chosen K-dimensional subspace.

NSGD (Jastrzębski et al. 2019, §5) takes steps with learning rate γη along the top-K Hessian
eigenvectors e_1..e_K and η everywhere else. With the subspace stacked as the rows of E (K, D),
orthonormal, the projector onto its complement scaled by γ is

    P = I + (γ − 1) EᵀE        (D, D; never formed: P u = u + (γ − 1) Eᵀ(E u))

Torch's momentum convention is used, so that γ = 1 *is* ``torch.optim.SGD``: a buffer
b ← m·b + g (b = g on the first step, dampening 0, no Nesterov) and θ ← θ − η·b, where
g = ∇L + wd·θ includes the weight decay. The paper writes the same thing with the velocity
v = m·v_prev − η·g = −η·b; the two agree exactly while η is constant (after a learning-rate
change torch applies the new η to the whole buffer, the paper's form only to new gradients).
The three variants are:

    "correct_v"    (paper default)  b ← m·b + g;    Δθ = −η·P b   (= v + (γ−1) Σ (vᵀe_k) e_k)
    "correct_g"                     b ← m·b + P g;  Δθ = −η·b
    "correct_both"                  b ← m·b + P g;  Δθ = −η·P b

The buffer always keeps the uncorrected velocity of its variant (``correct_v`` never stores
P b). With m = 0, ``correct_v`` and ``correct_g`` both give Δθ = −η[I − (1 − γ)EᵀE] g, while
``correct_both`` applies P twice (γ² along the subspace).

Flat coordinates: the subspace's D columns follow the optimizer's parameters in order
(param groups in order, then each group's parameters), skipping those with
``requires_grad=False``. For ``NudgedSGD(model.parameters(), ...)`` this is the order of
``sharpflow.params.trainable(model)``, i.e. the layout of the Hessian eigenvectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.sgd import sgd as _torch_sgd

VARIANTS = ("correct_v", "correct_g", "correct_both")

# Rows handed to set_subspace must be orthonormal to this tolerance (max |EEᵀ − I|): loose enough
# for eigenvectors from an iterative solver stored in float32, tight enough to catch unnormalised
# or non-orthogonal input, for which "γη along the subspace" would not hold.
ORTHONORMAL_ATOL = 1e-3


class NudgedSGD(torch.optim.Optimizer):
    """SGD with learning rate γ·lr along a K-dimensional subspace (Nudged-SGD).

    Args:
        params: parameters or parameter groups, as for any torch optimizer. Groups may differ in
            ``lr``, ``momentum`` and ``weight_decay``; ``gamma`` and ``variant`` must be shared.
        lr: learning rate η (≥ 0).
        gamma: γ, the factor on η along the subspace; γ = 1 is exactly ``torch.optim.SGD``.
        k: the largest subspace dimension accepted by :meth:`set_subspace`.
        momentum: m, as in ``torch.optim.SGD`` (dampening 0, no Nesterov).
        weight_decay: wd; the gradient becomes ∇L + wd·θ before anything else.
        variant: where the correction applies: ``"correct_v"``, ``"correct_g"`` or
            ``"correct_both"`` (see the module docstring).

    Without a subspace (or with γ = 1) a step is ``torch.optim.SGD``'s, operation for operation.
    Parameters without a gradient are left untouched, as SGD does; their entries count as a
    zero gradient in the projections.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        gamma: float = 1.0,
        k: int = 10,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        variant: str = "correct_v",
    ) -> None:
        _check_scalar("lr", lr, low=0.0)
        _check_scalar("gamma", gamma, low=0.0)
        _check_scalar("momentum", momentum, low=0.0)
        _check_scalar("weight_decay", weight_decay, low=0.0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "gamma": gamma,
            "variant": variant,
        }
        super().__init__(params, defaults)
        self.k = k
        self._subspace: Tensor | None = None

    # ------------------------------------------------------------------ subspace

    @property
    def subspace(self) -> Tensor | None:
        """The current subspace, (k', D) with orthonormal rows, on the parameters' device and
        dtype; ``None`` when none is set. Do not modify it in place."""
        return self._subspace

    def set_subspace(self, eigenvectors: Tensor | Sequence[Any] | None) -> None:
        """Set the directions e_1..e_k' along which the learning rate is γ·lr.

        Args:
            eigenvectors: ``None`` to clear (plain SGD); a (k', D) tensor (or one (D,) vector)
                in the optimizer's flat parameter order; or a list of k' directions, each a
                list of tensors or a dict of tensors (values in order), one per trainable
                parameter, shaped like it. Rows must be finite and orthonormal; k' ≤ k.
                The tensor is copied onto the parameters' device and dtype.

        Raises:
            ValueError: on a wrong D or shape, k' > k, non-finite entries, or rows that are
                not orthonormal.
        """
        if eigenvectors is None:
            self._subspace = None
            return
        entries = self._trainable()
        if not entries:
            raise ValueError("the optimizer has no trainable parameters to nudge")
        ref = entries[0][1]
        if any(p.dtype != ref.dtype or p.device != ref.device for _, p in entries):
            raise ValueError("NudgedSGD needs all trainable parameters on one device with one dtype")
        d = sum(p.numel() for _, p in entries)

        if isinstance(eigenvectors, Tensor):
            e = eigenvectors.detach()
            if e.dim() == 1:
                e = e.unsqueeze(0)
            if e.dim() != 2:
                raise ValueError(f"subspace must be a (k, D) tensor, got shape {tuple(e.shape)}")
        else:
            e = self._stack_per_parameter(eigenvectors, [p for _, p in entries])

        if e.shape[1] != d:
            raise ValueError(
                f"subspace has D={e.shape[1]} columns but the optimizer's trainable parameters "
                f"have D={d} entries (flat order: parameter groups, then parameters)"
            )
        if e.shape[0] > self.k:
            raise ValueError(
                f"subspace has k'={e.shape[0]} directions but this optimizer takes at most k={self.k}; "
                f"pass eigenvectors[:{self.k}]"
            )
        if e.shape[0] == 0:
            self._subspace = None
            return
        if e.is_complex() or not e.is_floating_point():
            raise ValueError(f"subspace must be a real floating-point tensor, got {e.dtype}")
        if not bool(torch.isfinite(e).all()):
            raise ValueError("subspace has non-finite entries (nan or inf)")
        e64 = e.to(torch.float64)
        gram_err = (e64 @ e64.T - torch.eye(e.shape[0], dtype=torch.float64, device=e.device)).abs().max()
        if gram_err > ORTHONORMAL_ATOL:
            raise ValueError(
                f"subspace rows are not orthonormal: max |EEᵀ − I| = {float(gram_err):.3g} > "
                f"{ORTHONORMAL_ATOL:g}; orthonormalise them first, e.g. E = torch.linalg.qr(E.T).Q.T"
            )
        self._subspace = e.to(device=ref.device, dtype=ref.dtype, copy=True).contiguous()

    def set_random_subspace(self, k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Set k random orthonormal directions (the paper's control) and return them, (k, D).

        Directions are the Q factor of a float64 Gaussian (D, k) matrix, uniform over k-frames.
        ``generator`` fixes them (the draw happens on the generator's device); k defaults to
        the optimizer's k.
        """
        k = self.k if k is None else k
        d = sum(p.numel() for _, p in self._trainable())
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(self.k, d):
            raise ValueError(f"random subspace needs 1 <= k <= min(k={self.k}, D={d}), got {k!r}")
        device = generator.device if generator is not None else torch.device("cpu")
        a = torch.randn(d, k, generator=generator, dtype=torch.float64, device=device)
        q, _ = torch.linalg.qr(a)
        self.set_subspace(q.T)
        assert self._subspace is not None
        return self._subspace

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gamma, variant = self._shared_options()
        if self._subspace is None or gamma == 1.0:
            # γ = 1 (or nothing to nudge): exactly torch.optim.SGD, through the very function it
            # calls, so the floating-point operations (single-tensor, foreach or fused kernels,
            # chosen the same way) are the same bit for bit.
            for group in self.param_groups:
                self._sgd_group(group)
        else:
            self._nudged_step(gamma, variant)
        return loss

    def _sgd_group(self, group: dict[str, Any]) -> None:
        """``torch.optim.SGD.step`` for one group with dampening 0, no Nesterov, no maximize."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        bufs: list[Tensor | None] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            params.append(p)
            grads.append(p.grad)
            if group["momentum"] != 0:
                bufs.append(self.state[p].get("momentum_buffer"))
        _torch_sgd(
            params,
            grads,
            bufs,
            has_sparse_grad=any(g.is_sparse for g in grads),
            foreach=None,
            fused=None,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=0.0,
            nesterov=False,
            maximize=False,
        )
        if group["momentum"] != 0:
            for p, buf in zip(params, bufs, strict=True):
                self.state[p]["momentum_buffer"] = buf

    def _nudged_step(self, gamma: float, variant: str) -> None:
        """The γ ≠ 1 update: one concatenation, two (k, D) mat-vecs per correction."""
        entries = self._trainable()
        params = [p for _, p in entries]
        sizes = [p.numel() for p in params]
        e = self._subspace_for(params, sizes)

        d_p = self._decayed_grads(entries)
        flat_g: Tensor | None = None
        if variant in ("correct_g", "correct_both"):
            # g ← g + (γ − 1) Eᵀ(E g), in place on a fresh flat copy (addmv: no (D,) temporary).
            flat_g = _cat(d_p, params)
            flat_g.addmv_(e.T, torch.mv(e, flat_g).mul_(gamma - 1.0))
            d_p = [
                None if d is None else v.view_as(p) for d, v, p in zip(d_p, flat_g.split(sizes), params, strict=True)
            ]

        u, any_momentum = self._momentum_update(entries, d_p)
        if variant in ("correct_v", "correct_both"):
            flat = flat_g if (flat_g is not None and not any_momentum) else _cat(u, params)
            self._apply_projected(entries, u, flat, e, gamma)
        else:
            self._apply_plain(entries, u)

    def _subspace_for(self, params: list[Tensor], sizes: list[int]) -> Tensor:
        """The subspace, checked against the parameters' D and moved to their device and dtype."""
        e = self._subspace
        assert e is not None
        if sum(sizes) != e.shape[1]:
            raise ValueError(
                f"subspace has D={e.shape[1]} columns but the trainable parameters now have "
                f"D={sum(sizes)}; set the subspace again"
            )
        if e.device != params[0].device or e.dtype != params[0].dtype:
            # The model moved (e.g. .to("cuda")) after set_subspace: follow it, once.
            e = self._subspace = e.to(device=params[0].device, dtype=params[0].dtype)
        return e

    @staticmethod
    def _decayed_grads(entries: list[tuple[dict[str, Any], Tensor]]) -> list[Tensor | None]:
        """g = ∇L + wd·θ per parameter (None: no gradient, the parameter stays put)."""
        d_p: list[Tensor | None] = []
        for group, p in entries:
            if p.grad is None:
                d_p.append(None)
                continue
            if p.grad.is_sparse:
                raise RuntimeError("NudgedSGD with a subspace does not support sparse gradients")
            wd = group["weight_decay"]
            d_p.append(p.grad.add(p, alpha=wd) if wd != 0 else p.grad)
        return d_p

    def _momentum_update(
        self, entries: list[tuple[dict[str, Any], Tensor]], d_p: list[Tensor | None]
    ) -> tuple[list[Tensor | None], bool]:
        """Momentum exactly as torch.optim.SGD: b = g.clone() first, then b ← m·b + g.

        Returns u per parameter (the buffer, or g itself without momentum) and whether any
        buffer was used."""
        u: list[Tensor | None] = []
        any_momentum = False
        for (group, p), d in zip(entries, d_p, strict=True):
            m = group["momentum"]
            if d is None or m == 0:
                u.append(d)
                continue
            any_momentum = True
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = d.detach().clone()
                state["momentum_buffer"] = buf
            else:
                buf.mul_(m).add_(d)
            u.append(buf)
        return u, any_momentum

    def _apply_projected(
        self,
        entries: list[tuple[dict[str, Any], Tensor]],
        u: list[Tensor | None],
        flat: Tensor,
        e: Tensor,
        gamma: float,
    ) -> None:
        """correct_v / correct_both: Δθ = v + (γ−1) Eᵀ(E v) with v = −lr·u, built in place on
        ``flat``, a fresh flat copy of u.

        One group: P u, then −lr on the way into θ. Several: v = −lr_group·u group by group
        first (a group's entries are contiguous in the flat order), then P v."""
        params = [p for _, p in entries]
        sizes = [p.numel() for p in params]
        sized = self._group_sizes(entries)
        alpha = -sized[0][0]["lr"] if len(sized) == 1 else 1.0
        if len(sized) > 1:
            start = 0
            for group, n in sized:
                flat[start : start + n].mul_(-group["lr"])
                start += n
        flat.addmv_(e.T, torch.mv(e, flat).mul_(gamma - 1.0))
        moved = [(p, dv.view_as(p)) for p, dv, x in zip(params, flat.split(sizes), u, strict=True) if x is not None]
        if moved:
            torch._foreach_add_([p for p, _ in moved], [dv for _, dv in moved], alpha=alpha)

    @staticmethod
    def _apply_plain(entries: list[tuple[dict[str, Any], Tensor]], u: list[Tensor | None]) -> None:
        """correct_g: θ ← θ − lr·u, one foreach add per group (few kernel launches on a GPU)."""
        per_group: dict[int, tuple[float, list[Tensor], list[Tensor]]] = {}
        for (group, p), x in zip(entries, u, strict=True):
            if x is not None:
                per_group.setdefault(id(group), (group["lr"], [], []))
                per_group[id(group)][1].append(p)
                per_group[id(group)][2].append(x)
        for lr, ps, us in per_group.values():
            torch._foreach_add_(ps, us, alpha=-lr)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer state plus ``"nsgd_subspace"`` ((k', D) tensor or None), so a resumed
        run gets its subspace back. Loadable with ``torch.load(..., weights_only=True)``."""
        sd = super().state_dict()
        sd["nsgd_subspace"] = self._subspace
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore momentum buffers, hyper-parameters and the subspace (validated again)."""
        sd = dict(state_dict)
        subspace = sd.pop("nsgd_subspace", None)
        super().load_state_dict(sd)
        for group in self.param_groups:  # a plain SGD state dict lacks these
            group.setdefault("gamma", self.defaults["gamma"])
            group.setdefault("variant", self.defaults["variant"])
        self.set_subspace(subspace)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["k"] = self.k
        state["_subspace"] = self._subspace
        return state

    # ------------------------------------------------------------------ helpers

    def _trainable(self) -> list[tuple[dict[str, Any], Tensor]]:
        """(group, parameter) pairs in flat order: groups in order, ``requires_grad`` only."""
        return [(g, p) for g in self.param_groups for p in g["params"] if p.requires_grad]

    @staticmethod
    def _group_sizes(entries: list[tuple[dict[str, Any], Tensor]]) -> list[tuple[dict[str, Any], int]]:
        """Each group with its number of flat entries, in flat order."""
        out: list[tuple[dict[str, Any], int]] = []
        for group, p in entries:
            if out and out[-1][0] is group:
                out[-1] = (group, out[-1][1] + p.numel())
            else:
                out.append((group, p.numel()))
        return out

    def _shared_options(self) -> tuple[float, str]:
        """γ and the variant, which must be the same in every group (the subspace is global)."""
        gamma = self.param_groups[0]["gamma"]
        variant = self.param_groups[0]["variant"]
        for g in self.param_groups[1:]:
            if g["gamma"] != gamma or g["variant"] != variant:
                raise ValueError("all parameter groups of NudgedSGD must share gamma and variant")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        _check_scalar("gamma", gamma, low=0.0)
        return float(gamma), variant

    @staticmethod
    def _stack_per_parameter(directions: Sequence[Any], params: list[Tensor]) -> Tensor:
        """(k', D) from k' directions given per parameter (lists or dicts of tensors)."""
        rows = []
        for i, direction in enumerate(directions):
            parts = list(direction.values()) if isinstance(direction, Mapping) else list(direction)
            if len(parts) != len(params):
                raise ValueError(
                    f"direction {i} has {len(parts)} tensors but the optimizer has {len(params)} trainable parameters"
                )
            for j, (t, p) in enumerate(zip(parts, params, strict=True)):
                if not isinstance(t, Tensor) or t.shape != p.shape:
                    shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(
                        f"direction {i}, parameter {j}: expected a tensor of shape {tuple(p.shape)}, got {shape}"
                    )
            rows.append(torch.cat([t.detach().reshape(-1) for t in parts]))
        if not rows:
            return params[0].new_zeros(0, sum(p.numel() for p in params))
        return torch.stack(rows)


def _cat(tensors: list[Tensor | None], like: list[Tensor]) -> Tensor:
    """One fresh (D,) vector from per-parameter tensors; ``None`` counts as zeros."""
    return torch.cat(
        [(p.new_zeros(p.numel()) if t is None else t.reshape(-1)) for t, p in zip(tensors, like, strict=True)]
    )


def _check_scalar(name: str, value: Any, *, low: float) -> None:
    """A finite real number ≥ low, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < low:
        raise ValueError(f"{name} must be a finite number >= {low:g}, got {value!r}")
