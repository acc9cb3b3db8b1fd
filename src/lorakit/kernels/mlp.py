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

A DoRA projection p (``lorakit.dora``) outputs c_p ⊙ z_p with z_p the sum above and c_p = m_p / n_p
(n_p without gradient). The node then keeps z_p in place of the output (the same size: the output is
recomputed as c_p ⊙ z_p), plus z_d (N, H) for the down projection; ∂m_p = Σ_N (∂output ⊙ z_p) / n_p,
and ∂z_p = c_p ⊙ ∂output continues as above.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lorakit.kernels.gemm import mm

Proj = tuple  # (W, A, B, scale) for LoRA, or (W, A, B, scale, m, n) for DoRA (lorakit.dora)


def _rows_scale(m: torch.Tensor | None, n: torch.Tensor | None) -> torch.Tensor | None:
    """DoRA's c = m / n (out,) of a projection, or None for a LoRA one (no m)."""
    return None if m is None else m / n


def _scaled(z: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """c ⊙ z for a DoRA projection (formed in c's precision, rounded once to z's dtype), else z."""
    return z if c is None else (z * c).to(z.dtype)


class _LoraSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, wg: torch.Tensor, ag: torch.Tensor, bg: torch.Tensor,
                wu: torch.Tensor, au: torch.Tensor, bu: torch.Tensor, wd: torch.Tensor, ad: torch.Tensor,
                bd: torch.Tensor, scales: tuple[float, float, float], mg: torch.Tensor | None, ng: torch.Tensor | None,
                mu: torch.Tensor | None, nu: torch.Tensor | None, md: torch.Tensor | None,
                nd: torch.Tensor | None) -> torch.Tensor:
        """x2 (N, H) → y (N, H), a tensor of its own (the caller reshapes it, so that the model may
        modify the result in place). A projection with (m, n) is a DoRA one: its output is
        c ⊙ z with c = m / n, and z is what is kept (c ⊙ z is recomputed)."""
        sg, su, sd = scales
        cg, cu, cd = _rows_scale(mg, ng), _rows_scale(mu, nu), _rows_scale(md, nd)
        hg, hu = mm(x2, ag.T).mul_(sg), mm(x2, au.T).mul_(su)  # (N, r), scaled
        zg = mm(x2, wg.T, mm(hg, bg.T))  # (N, I): the rank-r update summed into the frozen product
        zu = mm(x2, wu.T, mm(hu, bu.T))
        a = F.silu(_scaled(zg, cg)).mul_(_scaled(zu, cu))
        hd = mm(a, ad.T).mul_(sd)
        zd = mm(a, wd.T, mm(hd, bd.T))  # (N, H)
        y = zd if cd is None else _scaled(zd, cd)
        ctx.save_for_backward(x2, zg, zu, hg, hu, hd, wg, ag, bg, wu, au, bu, wd, ad, bd,
                              zd if cd is not None else None, cg, cu, cd, ng, nu, nd)
        ctx.scales = scales
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, zg, zu, hg, hu, hd, wg, ag, bg, wu, au, bu, wd, ad, bd, zd, cg, cu, cd, ng, nu, nd = ctx.saved_tensors
        sg, su, sd = ctx.scales
        need = ctx.needs_input_grad
        # DoRA: ∂m = Σ_N (∂L/∂output ⊙ z) / n, and z's gradient is the output's times c
        grad_md = (grad * zd).sum(0, dtype=nd.dtype) / nd if cd is not None and need[15] else None
        gy = _scaled(grad, cd)  # (N, H)
        # elementwise passes in the activations' dtype, each rounded once (bf16 ops compute in fp32):
        # five passes over (N, I), a recomputed exactly as forward made it
        g, u = _scaled(zg, cg), _scaled(zu, cu)
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
        grad_mg = (dg * zg).sum(0, dtype=ng.dtype) / ng if cg is not None and need[11] else None
        grad_mu = (du * zu).sum(0, dtype=nu.dtype) / nu if cu is not None and need[13] else None
        dg, du = _scaled(dg, cg), _scaled(du, cu)  # ∂z_g, ∂z_u
        ghg, ghu = mm(dg, bg * sg), mm(du, bu * su)  # (N, r)
        grad_bg = mm(hg.T, dg).T if need[3] else None
        grad_bu = mm(hu.T, du).T if need[6] else None
        grad_ag = mm(ghg.T, x2) if need[2] else None
        grad_au = mm(ghu.T, x2) if need[5] else None
        grad_x = None
        if need[0]:
            low = mm(ghg, ag, mm(ghu, au))  # (N, H): the rank-r terms
            grad_x = mm(dg, wg, mm(du, wu, low))
        return (grad_x, None, grad_ag, grad_bg, None, grad_au, grad_bu, None, grad_ad, grad_bd, None,
                grad_mg, None, grad_mu, None, grad_md, None)


def lora_swiglu(x: torch.Tensor, gate: Proj, up: Proj, down: Proj) -> torch.Tensor:
    """``down(silu(gate(x)) ⊙ up(x))`` with a LoRA (or DoRA) term on each projection (see the module
    docstring); each of gate/up/down is (W, A, B, scale), or (W, A, B, scale, m, n) for a DoRA one,
    its output rescaled by m / n (n without gradient, ``lorakit.dora``). Base weights must be frozen."""
    (wg, ag, bg, sg, *dg), (wu, au, bu, su, *du), (wd, ad, bd, sd, *dd) = gate, up, down
    if wg.requires_grad or wu.requires_grad or wd.requires_grad:
        raise ValueError("lora_swiglu: the base weights must be frozen (no gradient is computed for them)")
    mg, ng = dg or (None, None)
    mu, nu = du or (None, None)
    md, nd = dd or (None, None)
    y = _LoraSwiGLU.apply(x.reshape(-1, x.shape[-1]), wg, ag, bg, wu, au, bu, wd, ad, bd, (sg, su, sd),
                          mg, ng, mu, nu, md, nd)
    return y.view(*x.shape[:-1], y.shape[-1])


def lora_swiglu_reference(x: torch.Tensor, gate: Proj, up: Proj, down: Proj) -> torch.Tensor:
    """The same in plain autograd ops: what ``lora_swiglu`` must equal."""
    def proj(t: torch.Tensor, p: Proj) -> torch.Tensor:
        w, a, b, s = p[:4]
        z = F.linear(t, w) + s * (t @ a.T @ b.T)
        c = _rows_scale(*p[4:6]) if len(p) == 6 else None
        return z if c is None else c * z

    return proj(F.silu(proj(x, gate)) * proj(x, up), down)
