"""Initialisations of a linear layer's A (r × in) and B (out × r) beyond the default, as PEFT names them.

All work on the base weight as rows ``W`` (out × in) with the adapter's scale ``s``:

- ``"pissa"`` (PiSSA): the top r singular triplets of ``W = U S Vᵀ`` become the adapter,
  ``B = U_r √(S_r/s)``, ``A = √(S_r/s) V_rᵀ``, so ``s·B A`` is W's best rank-r approximation, and the
  base keeps the rest, ``W_res = W − s·B A``: the model computes exactly what it did, but training
  starts on the principal directions. ``"pissa_niter_K"`` takes the triplets from a randomised SVD
  with K subspace iterations (``torch.svd_lowrank``), much faster on large weights.
- ``"olora"`` (OLoRA): ``W = Q R`` (QR), ``B = Q[:, :r]``, ``A = R[:r]``; again ``W_res = W − s·B A``.
- ``"orthogonal"``: A's rows and B's columns drawn from two halves of one random orthogonal r × r
  matrix, so that ``B A = 0`` exactly in real arithmetic and the base is left alone (r must be even).

PiSSA and OLoRA change the base weight (``mutates_base``). An adapter trained that way is only
right on the residual base, so ``lorakit.io.save_adapter`` writes it, by default, as the plain LoRA
adapter of rank 2r that gives the same model on the original base (PEFT's conversion):
``W_res + s·B A = W + s·[B, −B₀] [A; A₀]`` with ``A₀, B₀`` the initial factors (``lorakit.io.converted_lora``).
"""

from __future__ import annotations

import re

import torch

MUTATING = ("pissa", "olora")  # and pissa_niter_K
_NITER = re.compile(r"pissa_niter_(\d+)")
# Set by PEFT features lorakit reads but does not run: weights are overwritten on loading anyway.
LOAD_ONLY = ("eva",)
ACCEPTED = "True, False, 'gaussian', 'pissa', 'pissa_niter_K', 'olora' or 'orthogonal'"


def is_structured(init: bool | str) -> bool:
    """Whether ``init`` is one of this module's initialisations (linear layers only)."""
    return isinstance(init, str) and (init in ("pissa", "olora", "orthogonal") or bool(_NITER.fullmatch(init)))


def mutates_base(init: bool | str) -> bool:
    """Whether ``init`` moves part of the base weight into the adapter (PiSSA, OLoRA)."""
    return isinstance(init, str) and (init in MUTATING or bool(_NITER.fullmatch(init)))


def valid(init: object) -> bool:
    return init is True or init is False or init == "gaussian" or is_structured(init)  # type: ignore[arg-type]


def factors(init: str, w: torch.Tensor, r: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (r × in), B (out × r))`` for rows ``w`` (out × in, fp32 or fp64) under ``init``."""
    out, n_in = w.shape
    if init == "orthogonal":
        return orthogonal(out, n_in, r, w.dtype, w.device)
    if r > min(out, n_in):
        raise ValueError(f"init_lora_weights={init!r} needs r ≤ min(out, in) = {min(out, n_in)}, got r={r}")
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    niter = _NITER.fullmatch(init)
    if niter:
        u, sv, v = torch.svd_lowrank(w, q=r, niter=int(niter.group(1)))
        vh = v.T
    else:
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    root = (sv[:r] / s).sqrt()
    return (root[:, None] * vh[:r]).contiguous(), (u[:, :r] * root).contiguous()


def orthogonal(out: int, n_in: int, r: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A = (G₁ Q_odd)ᵀ (r × in), B = G₂ Q_even (out × r) for Gaussian G₁ (in × r/2), G₂ (out × r/2) and
    Q = qr(N(0, 1) r × r).Q: Q's rows are orthonormal, so ``B A = G₂ Q_even Q_oddᵀ G₁ᵀ = 0``. Scaled by
    1/10, as PEFT does."""
    if r % 2:
        raise ValueError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}")
    q, _ = torch.linalg.qr(torch.randn(r, r, dtype=torch.float64))
    g1 = torch.randn(n_in, r // 2, dtype=torch.float64)
    g2 = torch.randn(out, r // 2, dtype=torch.float64)
    a = (g1 @ q[0::2]).T / 10
    b = (g2 @ q[1::2]) / 10
    return a.to(dtype=dtype, device=device).contiguous(), b.to(dtype=dtype, device=device).contiguous()

