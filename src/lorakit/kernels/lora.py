"""The LoRA update of a linear layer, ``s · B(A(dropout(x)))``, and the whole LoRA linear layer fused.

Shapes: x (..., in), W (out, in), A (r, in), B (out, r) → (..., out).
The scale is applied to the rank-r intermediate (…, r) rather than the (…, out) result: the same
product, one fewer full-width temporary.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lorakit.kernels.dequant import float_weight
from lorakit.kernels.gemm import mm


def lora_linear(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """``scale · dropout(x) Aᵀ Bᵀ``; dropout is skipped entirely (no copy) when ``dropout_p == 0``."""
    if dropout_p > 0:
        x = F.dropout(x, dropout_p, training=True)
    return F.linear(F.linear(x, a) * scale, b)


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                          b: torch.Tensor, scale: float, x_lora: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + bias + s · x_lora Aᵀ Bᵀ`` in plain autograd ops: what ``fused_lora_linear`` must equal."""
    x_lora = x if x_lora is None else x_lora
    return F.linear(x, weight, bias) + scale * (x_lora @ a.T @ b.T)


def _forward(x2: torch.Tensor, xl2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
             b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (N, out), h (N, r)) for 2-d x and x_lora: h = s · x_l Aᵀ first (scaled in its small
    (N, r) form), then its update h Bᵀ, into which x Wᵀ (+ bias) is summed by the frozen product
    itself (``gemm.mm``'s ``add``)."""
    h = mm(xl2, a.T).mul_(scale)  # (N, r)
    update = mm(h, b.T) if bias is None else torch.addmm(bias, h, b.T)  # (N, out)
    return mm(x2, weight.T, update), h


class _FusedLoraLinear(torch.autograd.Function):
    """One autograd node for ``y = x Wᵀ + bias + s · x_l Aᵀ Bᵀ`` (x_l = dropout(x), or x itself).

    Forward: h = s · x_l Aᵀ (N, r) first, then y = x Wᵀ + h Bᵀ, the update summed into the frozen
    product as it is written (``gemm.mm(x, Wᵀ, add)``). Saved: x_l and h (N·r) for the adapter
    gradients, plus W only when x needs a gradient; x itself only when W is trained.
    Backward with g = ∂L/∂y (N, out) and g_h = s · g B (N, r):

        ∂L/∂B = gᵀ h      ∂L/∂A = g_hᵀ x_l      ∂L/∂x = g W + g_h A   (the rank-r term summed into g W)
    """

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, xl2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        """x2, xl2 (N, in) → y (N, out), a tensor of its own (the caller reshapes it: a view made
        inside the node could not be modified in place, as some models do with a layer's output)."""
        w = float_weight(weight, x2.dtype)
        y, h = _forward(x2, xl2, w, bias, a, b, scale)
        ctx.scale, ctx.same = scale, xl2 is x2
        ctx.save_for_backward(x2 if weight.requires_grad else None, xl2, h, weight, a, b)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, xl2, h, weight, a, b = ctx.saved_tensors
        s = ctx.scale
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        needs = ctx.needs_input_grad
        if needs[0]:  # a 4-bit base: dequantized again rather than kept in float
            weight = float_weight(weight, g.dtype)
        gh = mm(g, b * s)  # (N, r); the scale folded into the small operand (one rounding in bf16)
        grad_b = mm(h.T, g).T if needs[5] else None  # h carries the scale; (hᵀ g)ᵀ, as the wide gᵀ would be copied
        grad_a = mm(gh.T, xl2) if needs[4] else None
        grad_x = grad_xl = None
        if needs[0] and ctx.same:
            grad_x = mm(g, weight, mm(gh, a))  # g W + g_h A, the rank-r term summed into the product
        else:
            grad_x = mm(g, weight) if needs[0] else None
            grad_xl = mm(gh, a) if needs[1] else None
        grad_w = g.T @ x2 if needs[2] else None
        grad_bias = g.sum(0) if needs[3] else None
        return grad_x, grad_xl, grad_w, grad_bias, grad_a, grad_b, None


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                      b: torch.Tensor, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """``x Wᵀ + bias + s · dropout(x) Aᵀ Bᵀ`` as one autograd node (see ``_FusedLoraLinear``).

    All tensors must share one dtype and device, but ``weight`` may instead be a frozen bitsandbytes
    4-bit parameter (``dequant.is_4bit``): dequantized to x's dtype in forward and again in backward,
    only the packed weight kept (QLoRA). With ``dropout_p == 0`` the input is not copied and only x
    and the rank-r intermediate are kept for the backward pass. With gradients off
    (inference) the same ops run without the autograd node.
    """
    x_lora = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
    if not torch.is_grad_enabled():  # inference: the same ops without an autograd node's overhead
        x2 = x.reshape(-1, x.shape[-1])
        w = float_weight(weight, x.dtype)
        y, _ = _forward(x2, x_lora.reshape(-1, x.shape[-1]) if x_lora is not x else x2, w, bias, a, b, scale)
        return y.reshape(*x.shape[:-1], w.shape[0])
    x2 = x.reshape(-1, x.shape[-1])
    xl2 = x2 if x_lora is x else x_lora.reshape(-1, x.shape[-1])
    y = _FusedLoraLinear.apply(x2, xl2, weight, bias, a, b, scale)
    return y.view(*x.shape[:-1], y.shape[-1])


def gathered_lora(x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-row LoRA updates for a batch whose rows use different adapters, in two batched matmuls.

    x (B, T, in); a_stack (N, r_max, in) and b_stack (N, out, r_max) hold every adapter of the layer,
    zero-padded to the largest rank, with the scale folded into B and slot 0 all zeros ("no adapter");
    index (B,) picks each row's slot. Returns (B, T, out) = x_b A_{i_b}ᵀ B_{i_b}ᵀ per row b.
    Zero padding adds exact zeros, so mixed ranks give the same result as each adapter alone.
    """
    a = a_stack.index_select(0, index)  # (B, r_max, in)
    b = b_stack.index_select(0, index)  # (B, out, r_max)
    return torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))


def grouped_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor,
                 inverse: torch.Tensor, bare: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row LoRA updates for a mixed batch with the rows grouped by adapter: two batched matmuls
    over P adapter slots, each adapter's weights read once and never copied per row.

    x (B, T, in); a (P, r, in) and b (P, out, r) the slots' adapters (zero-padded to rank r, scale
    folded into B; may be a slice of a larger stack, slots no row uses included); groups (P, G) the
    rows of each slot, padded to the largest group G with any row (the padding's results are never
    read; a slot no row uses is all padding); inverse (B,) each row's place p·G + g in the grouped
    result (any place for a row without an adapter); bare: the rows without an adapter, or None:

        x_p = x[groups[p]] (G·T, in)    y_p = x_p a_pᵀ b_pᵀ (G·T, out)    out[b] = y[inverse[b]]
        out[bare] = 0

    With one slot (P = 1) the rows are not regrouped at all: x a_0ᵀ b_0ᵀ for every row.
    ``gathered_lora`` instead copies A and B once per row (B·r·(in+out) values a layer), which
    costs more than the products themselves in a decode step (T = 1).
    """
    n, g = groups.shape
    if n == 1:  # one adapter: every row in place, no gather or scatter (rows without one zeroed after)
        out = (x @ a[0].T) @ b[0].T
        return out if bare is None else out.index_fill_(0, bare, 0.0)
    tokens, n_in = x.shape[1], x.shape[2]
    xs = x.index_select(0, groups.reshape(-1)).reshape(n, g * tokens, n_in)
    # h = (a x_pᵀ)ᵀ: with A as the left operand its rows stream contiguously (CPU decode, 16 slots:
    # 22 vs 30 µs a layer with the weights in DRAM, the read itself ~17 µs; prefill: the same)
    h = torch.bmm(a, xs.transpose(1, 2)).transpose(1, 2)  # (P, G·T, r)
    y = torch.bmm(h, b.transpose(1, 2)).reshape(n * g, tokens, -1)
    out = y.index_select(0, inverse)
    return out if bare is None else out.index_fill_(0, bare, 0.0)


def gathered_lora_reference(x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                            index: torch.Tensor) -> torch.Tensor:
    """Row by row, the plain way: the reference ``gathered_lora`` is tested against."""
    return torch.stack([x[i] @ a_stack[j].T @ b_stack[j].T for i, j in enumerate(index.tolist())])
