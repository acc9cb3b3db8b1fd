"""A gated (SwiGLU) MLP whose three projections carry LoRA adapters, as one autograd node.

Shapes: x (N, H); gate and up W (I, H), A (r, H), B (I, r); down W (H, I), A (r, I), B (H, r).

    g = x W_gᵀ + s_g (x A_gᵀ) B_gᵀ        u = x W_uᵀ + s_u (x A_uᵀ) B_uᵀ
    a = silu(g) ⊙ u                        y = a W_dᵀ + s_d (a A_dᵀ) B_dᵀ

Layer by layer, autograd keeps four (N, I) tensors per MLP for the backward pass: g (for silu's
derivative), silu(g) and u (for the product) and a (for the down projection's A gradient). This
node keeps g and u only and recomputes silu(g) and a in backward, which costs a few elementwise
passes over (N, I) and saves 2·N·I values per layer: on a Llama-shaped model about a quarter of
a LoRA step's activation memory. The rank-r intermediates (N, r) are kept, the base weights are
frozen (no ∂W), and there is no dropout on the adapters' inputs (callers fall back otherwise).
With σ = sigmoid(g), g_y = ∂L/∂y:

    g_hd = s_d g_y B_d   ∂B_d = s_d g_yᵀ h_d   ∂A_d = g_hdᵀ a   ∂a = g_y W_d + g_hd A_d
    ∂u = ∂a ⊙ silu(g)    ∂g = ∂a ⊙ u ⊙ σ (1 + g (1 − σ))
    then for p in (gate, up): g_hp = s_p ∂p B_p, ∂B_p = s_p ∂pᵀ h_p, ∂A_p = g_hpᵀ x
    ∂x = ∂g W_g + ∂u W_u + g_hg A_g + g_hu A_u
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

Proj = tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]  # W, A, B, scale


class _LoraSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, wg: torch.Tensor, ag: torch.Tensor, bg: torch.Tensor,
                wu: torch.Tensor, au: torch.Tensor, bu: torch.Tensor, wd: torch.Tensor, ad: torch.Tensor,
                bd: torch.Tensor, scales: tuple[float, float, float]) -> torch.Tensor:
        sg, su, sd = scales
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        hg, hu = x2 @ ag.T, x2 @ au.T  # (N, r)
        g = (x2 @ wg.T).addmm_(hg, bg.T, alpha=sg)  # (N, I)
        u = (x2 @ wu.T).addmm_(hu, bu.T, alpha=su)
        a = F.silu(g).mul_(u)
        hd = a @ ad.T
        y = (a @ wd.T).addmm_(hd, bd.T, alpha=sd)  # (N, H)
        ctx.save_for_backward(x2, g, u, hg, hu, hd, wg, ag, bg, wu, au, bu, wd, ad, bd)
        ctx.scales, ctx.shape = scales, shape
        return y.reshape(*shape[:-1], wd.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, g, u, hg, hu, hd, wg, ag, bg, wu, au, bu, wd, ad, bd = ctx.saved_tensors
        sg, su, sd = ctx.scales
        need = ctx.needs_input_grad
        gy = grad.reshape(-1, grad.shape[-1])  # (N, H)
        # elementwise passes in the activations' dtype, each rounded once (bf16 ops compute in fp32):
        # five passes over (N, I), a recomputed exactly as forward made it
        silu = F.silu(g)
        a = silu * u
        ghd = gy @ (bd * sd)  # (N, r)
        grad_bd = gy.T @ (hd * sd) if need[9] else None
        grad_ad = ghd.T @ a if need[8] else None
        del a
        da = torch.mm(gy, wd).addmm_(ghd, ad)  # (N, I); rank-r terms are added in place
        du = da * silu
        del silu
        dg = torch.ops.aten.silu_backward(da.mul_(u), g)  # ∂a ⊙ u ⊙ σ (1 + g (1 − σ)), one fused pass
        del da
        ghg, ghu = dg @ (bg * sg), du @ (bu * su)  # (N, r)
        grad_bg = dg.T @ (hg * sg) if need[3] else None
        grad_bu = du.T @ (hu * su) if need[6] else None
        grad_ag = ghg.T @ x2 if need[2] else None
        grad_au = ghu.T @ x2 if need[5] else None
        grad_x = None
        if need[0]:
            grad_x = torch.mm(dg, wg).addmm_(du, wu).addmm_(ghg, ag).addmm_(ghu, au).reshape(ctx.shape)
        return grad_x, None, grad_ag, grad_bg, None, grad_au, grad_bu, None, grad_ad, grad_bd, None


def lora_swiglu(x: torch.Tensor, gate: Proj, up: Proj, down: Proj) -> torch.Tensor:
    """``down(silu(gate(x)) ⊙ up(x))`` with a LoRA term on each projection (see the module
    docstring); each of gate/up/down is (W, A, B, scale). Base weights must be frozen."""
    (wg, ag, bg, sg), (wu, au, bu, su), (wd, ad, bd, sd) = gate, up, down
    if wg.requires_grad or wu.requires_grad or wd.requires_grad:
        raise ValueError("lora_swiglu: the base weights must be frozen (no gradient is computed for them)")
    return _LoraSwiGLU.apply(x, wg, ag, bg, wu, au, bu, wd, ad, bd, (sg, su, sd))


def lora_swiglu_reference(x: torch.Tensor, gate: Proj, up: Proj, down: Proj) -> torch.Tensor:
    """The same in plain autograd ops: what ``lora_swiglu`` must equal."""
    def proj(t: torch.Tensor, p: Proj) -> torch.Tensor:
        w, a, b, s = p
        return F.linear(t, w) + s * (t @ a.T @ b.T)

    return proj(F.silu(proj(x, gate)) * proj(x, up), down)
