"""A frozen 4-bit base layer's product, its weight dequantized on the fly, through ``gemm.mm``.

bitsandbytes' ``Linear4bit`` on a CPU computes ``x Wᵀ`` as dequantize(Q) followed by torch's
matmul, in forward and again in its backward (``MatMul4Bit``: only the packed Q is kept). That
matmul runs on torch's BLAS. ``dequant_linear`` does the same steps, with both products on
``gemm.mm`` instead (oneDNN inside the trainer's ``onednn_scope()`` where it is faster): the QLoRA
demo step spent 63% of its time in those BLAS products. It keeps Q (already held by the layer),
never the fp32 weight: the 4-bit base's memory stays 4-bit between forward and backward. The fused
LoRA-linear node (``kernels.lora``) dequantizes its 4-bit base the same way (``dequantize``);
``dequant_linear`` serves the 4-bit layers without one (not targeted, or in a mixed-adapter batch).
"""

from __future__ import annotations

from typing import Any

import torch

from lorakit.kernels.gemm import mm


def is_4bit(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a bitsandbytes 4-bit parameter with its quantization state."""
    return type(weight).__name__ == "Params4bit" and getattr(weight, "quant_state", None) is not None


def dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W (out, in) in ``dtype`` from the packed 4-bit ``weight`` (NF4 / FP4, blockwise absmax)."""
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)


class _DequantLinear(torch.autograd.Function):
    """y = x dequant(Q)ᵀ + b; ∂L/∂x = G dequant(Q) (Q frozen: no gradient of its own)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        w = dequantize(weight, x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        add = None if bias is None else bias.to(x.dtype).expand(x2.shape[0], w.shape[0]).contiguous()
        return mm(x2, w.T, add).reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        w = dequantize(weight, grad.dtype)
        grad_x = mm(grad.reshape(-1, grad.shape[-1]), w).reshape(*grad.shape[:-1], w.shape[1])
        return grad_x, None, None


def dequant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize(weight).T + bias`` for a frozen 4-bit ``weight`` (``is_4bit``), computed in
    x's dtype: x (…, in) → (…, out)."""
    if bias is not None and bias.requires_grad:
        raise ValueError("dequant_linear: the bias of a quantized base must be frozen")
    return _DequantLinear.apply(x, weight, bias)
