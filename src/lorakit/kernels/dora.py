"""A DoRA linear layer (``lorakit.dora``) as one autograd node.

Shapes: x (N, in), W (out, in), A (r, in), B (out, r), m and n (out,) → y (N, out):

    h = s · x Aᵀ (N, r)      z = x Wᵀ + h Bᵀ (N, out)      y = (m / n) ⊙ z + bias

n = ‖W + s B A‖_row comes from the caller, computed without gradient: a constant here, as in the
paper and PEFT. The plain composition (base layer, LoRA term, DoRA's rescaling as separate ops)
keeps two (N, out) tensors per layer for backward and runs five elementwise passes over them;
this node keeps z alone (m's gradient needs it) and runs one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lorakit.kernels.dequant import float_weight
from lorakit.kernels.gemm import mm


def dora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                          b: torch.Tensor, scale: float, magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``(m / n) ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + bias`` in plain autograd ops: what ``fused_dora_linear``
    must equal."""
    return (magnitude / norm) * (F.linear(x, weight) + scale * (x @ a.T @ b.T)) + (0 if bias is None else bias)


class _FusedDoraLinear(torch.autograd.Function):
    """One autograd node for ``y = g ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + bias`` with g = m / n.

    Saved: x, h = s · x Aᵀ (N, r) and z = x Wᵀ + h Bᵀ (N, out). Backward with G = ∂L/∂y (N, out),
    G_z = G ⊙ g and G_h = s · G_z B (N, r):

        ∂L/∂m = Σ_N (G ⊙ z) / n    ∂L/∂B = G_zᵀ h    ∂L/∂A = G_hᵀ x    ∂L/∂x = G_z W + G_h A
    """

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scale: float, magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        w = float_weight(weight, x2.dtype)
        h = mm(x2, a.T).mul_(scale)  # (N, r)
        z = mm(x2, w.T, mm(h, b.T))  # (N, out): the update summed into the frozen product
        g = magnitude / norm  # in m's dtype: under autocast the product is rounded once, as in PEFT
        y = (z * g if bias is None else torch.addcmul(bias, z, g)).to(z.dtype)
        ctx.scale = scale
        ctx.save_for_backward(x2, h, z, weight, a, b, g, norm)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, h, z, weight, a, b, g, norm = ctx.saved_tensors
        needs = ctx.needs_input_grad
        gz = (grad * g).to(grad.dtype)  # (N, out)
        gh = mm(gz, b * ctx.scale)  # (N, r)
        grad_x = mm(gz, float_weight(weight, gz.dtype), mm(gh, a)) if needs[0] else None
        grad_bias = grad.sum(0) if needs[2] else None
        grad_a = mm(gh.T, x2) if needs[3] else None
        grad_b = mm(h.T, gz).T if needs[4] else None
        grad_m = (grad * z).sum(0, dtype=norm.dtype) / norm if needs[6] else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, grad_m, None


def fused_dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                      b: torch.Tensor, scale: float, magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``(m / n) ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + bias`` for x (…, in) as one autograd node (see
    ``_FusedDoraLinear``); W is frozen (a bitsandbytes 4-bit one is dequantized in forward and
    again in backward). x, W, bias, A and B share one dtype; m and n may be wider (fp32 under
    autocast: g ⊙ z is then formed in fp32 and rounded once). No dropout: the caller falls back
    to the plain composition for that."""
    x2 = x.reshape(-1, x.shape[-1])
    if not torch.is_grad_enabled():  # inference: the same ops without an autograd node's overhead
        y = _FusedDoraLinear.forward(_NoContext(), x2, weight, bias, a, b, scale, magnitude, norm)
    else:
        y = _FusedDoraLinear.apply(x2, weight, bias, a, b, scale, magnitude, norm)
    return y.view(*x.shape[:-1], y.shape[-1])


class _NoContext:
    """Stands in for autograd's ctx when the forward runs on its own (nothing is saved)."""

    def save_for_backward(self, *_: Any) -> None:
        pass
