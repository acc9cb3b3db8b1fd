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
