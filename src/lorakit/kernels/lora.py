"""The LoRA update of a linear layer, ``s · B(A(dropout(x)))``.

Shapes: x (..., in), A (r, in), B (out, r) → (..., out).
The scale is applied to the rank-r intermediate (…, r) rather than the (…, out) result: the same
product, one fewer full-width temporary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """``scale · dropout(x) Aᵀ Bᵀ``; dropout is skipped entirely (no copy) when ``dropout_p == 0``."""
    if dropout_p > 0:
        x = F.dropout(x, dropout_p, training=True)
    return F.linear(F.linear(x, a) * scale, b)


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


def gathered_lora_reference(x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                            index: torch.Tensor) -> torch.Tensor:
    """Row by row, the plain way: the reference ``gathered_lora`` is tested against."""
    return torch.stack([x[i] @ a_stack[j].T @ b_stack[j].T for i, j in enumerate(index.tolist())])
