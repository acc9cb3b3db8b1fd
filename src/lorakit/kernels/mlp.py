"""A gated (SwiGLU) MLP whose three projections carry LoRA adapters, as one autograd node.

Shapes: x (N, H); gate and up W (I, H), A (r, H), B (I, r); down W (H, I), A (r, I), B (H, r).

    g = x W_gᵀ + s_g (x A_gᵀ) B_gᵀ        u = x W_uᵀ + s_u (x A_uᵀ) B_uᵀ
    a = silu(g) ⊙ u                        y = a W_dᵀ + s_d (a A_dᵀ) B_dᵀ

Layer by layer, autograd keeps four (N, I) tensors per MLP for the backward pass: g (for silu's
derivative), silu(g) and u (for the product) and a (for the down projection's A gradient). This
node keeps g and u only and recomputes silu(g) and a in backward, which costs a few elementwise
passes over (N, I) and saves 2·N·I values per layer: on a Llama-shaped model about a quarter of
a LoRA step's activation memory. The rank-r intermediates h_p = s_p · (input) A_pᵀ (N, r) are kept,
the base weights are frozen (no ∂W), and there is no dropout on the adapters' inputs (callers fall back otherwise).
Every product runs through ``gemm.mm``, the rank-r terms summed into the frozen products as
those are written. With σ = sigmoid(g), g_y = ∂L/∂y:

    g_hd = s_d g_y B_d   ∂B_d = g_yᵀ h_d   ∂A_d = g_hdᵀ a   ∂a = g_y W_d + g_hd A_d
    ∂u = ∂a ⊙ silu(g)    ∂g = ∂a ⊙ u ⊙ σ (1 + g (1 − σ))
    then for p in (gate, up): g_hp = s_p ∂p B_p, ∂B_p = ∂pᵀ h_p, ∂A_p = g_hpᵀ x
    ∂x = ∂g W_g + ∂u W_u + g_hg A_g + g_hu A_u
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lorakit.kernels.gemm import mm

Proj = tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]  # W, A, B, scale


class _LoraSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, wg: torch.Tensor, ag: torch.Tensor, bg: torch.Tensor,
                wu: torch.Tensor, au: torch.Tensor, bu: torch.Tensor, wd: torch.Tensor, ad: torch.Tensor,
                bd: torch.Tensor, scales: tuple[float, float, float]) -> torch.Tensor:
        """x2 (N, H) → y (N, H), a tensor of its own (the caller reshapes it, so that the model may
        modify the result in place)."""
        sg, su, sd = scales
        hg, hu = mm(x2, ag.T).mul_(sg), mm(x2, au.T).mul_(su)  # (N, r), scaled
        g = mm(x2, wg.T, mm(hg, bg.T))  # (N, I): the rank-r update summed into the frozen product
        u = mm(x2, wu.T, mm(hu, bu.T))
        a = F.silu(g).mul_(u)
        hd = mm(a, ad.T).mul_(sd)
        y = mm(a, wd.T, mm(hd, bd.T))  # (N, H)
        ctx.save_for_backward(x2, g, u, hg, hu, hd, wg, ag, bg, wu, au, bu, wd, ad, bd)
        ctx.scales = scales
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, g, u, hg, hu, hd, wg, ag, bg, wu, au, bu, wd, ad, bd = ctx.saved_tensors
        sg, su, sd = ctx.scales
        need = ctx.needs_input_grad
        gy = grad  # (N, H)
        # elementwise passes in the activations' dtype, each rounded once (bf16 ops compute in fp32):
        # five passes over (N, I), a recomputed exactly as forward made it
        silu = F.silu(g)
        a = silu * u
        ghd = mm(gy, bd * sd)  # (N, r)
        grad_bd = mm(hd.T, gy).T if need[9] else None  # the h's carry their scales; (hᵀ g)ᵀ: no (H, N) copy
        grad_ad = mm(ghd.T, a) if need[8] else None
        del a
        da = mm(gy, wd, mm(ghd, ad))  # (N, I); rank-r terms are summed into the frozen products
        du = da * silu
        del silu
        dg = torch.ops.aten.silu_backward(da.mul_(u), g)  # ∂a ⊙ u ⊙ σ (1 + g (1 − σ)), one fused pass
        del da
        ghg, ghu = mm(dg, bg * sg), mm(du, bu * su)  # (N, r)
        grad_bg = mm(hg.T, dg).T if need[3] else None
        grad_bu = mm(hu.T, du).T if need[6] else None
        grad_ag = mm(ghg.T, x2) if need[2] else None
        grad_au = mm(ghu.T, x2) if need[5] else None
        grad_x = None
        if need[0]:
            low = mm(ghg, ag, mm(ghu, au))  # (N, H): the rank-r terms
            grad_x = mm(dg, wg, mm(du, wu, low))
        return grad_x, None, grad_ag, grad_bg, None, grad_au, grad_bu, None, grad_ad, grad_bd, None


def lora_swiglu(x: torch.Tensor, gate: Proj, up: Proj, down: Proj) -> torch.Tensor:
    """``down(silu(gate(x)) ⊙ up(x))`` with a LoRA term on each projection (see the module
    docstring); each of gate/up/down is (W, A, B, scale). Base weights must be frozen."""
    (wg, ag, bg, sg), (wu, au, bu, su), (wd, ad, bd, sd) = gate, up, down
    if wg.requires_grad or wu.requires_grad or wd.requires_grad:
        raise ValueError("lora_swiglu: the base weights must be frozen (no gradient is computed for them)")
    y = _LoraSwiGLU.apply(x.reshape(-1, x.shape[-1]), wg, ag, bg, wu, au, bu, wd, ad, bd, (sg, su, sd))
    return y.view(*x.shape[:-1], y.shape[-1])


def lora_swiglu_reference(x: torch.Tensor, gate: Proj, up: Proj, down: Proj) -> torch.Tensor:
    """The same in plain autograd ops: what ``lora_swiglu`` must equal."""
    def proj(t: torch.Tensor, p: Proj) -> torch.Tensor:
        w, a, b, s = p
        return F.linear(t, w) + s * (t @ a.T @ b.T)

    return proj(F.silu(proj(x, gate)) * proj(x, up), down)
