"""RMSNorm as one autograd node that keeps its input in its own dtype.

Shapes: x (…, H), weight (H,). With x_f = x in fp32 and ε the module's epsilon:

    ρ = rsqrt(mean_H(x_f²) + ε)   (…, 1)        n = round_x(x_f ρ)        y = w ⊙ n

which is Llama's ``RMSNorm.forward`` op for op (fp32 statistics, the normalised value rounded to
x's dtype, then the weight), so the forward is bit-identical to it. Autograd would keep the fp32
copy x_f (4 bytes per element) for ``pow``'s and the product's backward; on a bf16 model that is
twice the input itself, twice per layer. This node keeps x as it came (2 bytes per element in
bf16) and ρ, and recomputes n_f = x_f ρ in backward. With g_y = ∂L/∂y and g = g_y ⊙ w in fp32:

    ∂x = ρ (g − n_f · mean_H(g ⊙ n_f))          ∂w = Σ_{…} g_y ⊙ n

(the rounding of n to x's dtype passes the gradient straight through, as autograd's cast does).
Its plain-PyTorch reference is transformers' ``LlamaRMSNorm`` itself (tests: bit-identical in
bf16, and float64 math in fp32).
"""

from __future__ import annotations

from typing import Any

import torch


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (…, 1)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, rstd = ctx.saved_tensors
        nf = x.to(torch.float32) * rstd  # (…, H) fp32
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * nf.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad * weight).to(x.dtype).to(torch.float32)  # autograd rounds ∂n to n's dtype too
            grad_x = g.sub_(nf * (g * nf).mean(-1, keepdim=True)).mul_(rstd).to(x.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight ⊙ round_x(x_f · rsqrt(mean(x_f²) + eps))`` keeping only x and the (…, 1) factor
    for backward (see the module docstring)."""
    return _RMSNorm.apply(x, weight, eps)
