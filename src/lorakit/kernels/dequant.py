"""A frozen bitsandbytes 4-bit weight as the fused nodes take it: dequantized on the fly.

bitsandbytes' ``Linear4bit`` on a CPU computes ``x Wᵀ`` as dequantize(Q) followed by torch's
matmul, in forward and again in its backward (``MatMul4Bit``: only the packed Q is kept). That
matmul runs on torch's BLAS. ``gemm.linear`` and the fused LoRA-linear node (``kernels.lora``)
accept such a weight in place of W and do the same steps with their products on ``gemm.mm``
(oneDNN inside the trainer's ``onednn_scope()`` where it is faster): the QLoRA demo step spent 63%
of its time in those BLAS products. They keep Q (already held by the layer), never the fp32
weight: the 4-bit base's memory stays 4-bit between forward and backward.
"""

from __future__ import annotations

import torch


def is_4bit(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a bitsandbytes 4-bit parameter with its quantization state."""
    return type(weight).__name__ == "Params4bit" and getattr(weight, "quant_state", None) is not None


def runs_dequantized(weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype | None,
                     dtype: torch.dtype) -> bool:
    """Whether a layer with this 4-bit ``weight``, ``bias`` and bitsandbytes ``compute_dtype``
    computes as dequantize + product in ``dtype`` (its input's): it computes in that dtype, and its
    bias, if any, is frozen and of that dtype."""
    return (is_4bit(weight) and compute_dtype in (None, dtype)
            and (bias is None or (bias.dtype == dtype and not bias.requires_grad)))


def dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W (out, in) in ``dtype`` from the packed 4-bit ``weight`` (NF4 / FP4, blockwise absmax)."""
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)


def float_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` itself, or, for a frozen 4-bit one (``is_4bit``), W dequantized to ``dtype``."""
    return dequantize(weight, dtype) if is_4bit(weight) else weight
