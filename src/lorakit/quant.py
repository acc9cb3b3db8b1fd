"""QLoRA: a frozen base quantized with bitsandbytes (NF4 / FP4 / int8), LoRA trained on top.

``quantize_model(model, "nf4")`` replaces every ``nn.Linear`` except the output head by a
bitsandbytes ``Linear4bit`` (or ``Linear8bitLt`` for int8). Blockwise 4-bit quantization stores,
per block of ``blocksize`` weights, one scale ``absmax``: w ≈ absmax · code[q] with q a 4-bit index
into the NF4 (normal-quantile) or FP4 code book; double quantization also quantizes the scales.
LoRA layers then wrap the quantized layers unchanged (``LoraLinear4bit`` subclasses bitsandbytes'
class) and train in fp32 on the CPU / bf16 autocast on the GPU.

Merging never writes into 4-bit storage: ``dequantized_weight`` gives the base the adapter was
trained against, and ``merge_and_unload`` turns each quantized LoRA layer into a plain
``nn.Linear`` holding dequantize(W) + s·BA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.errors import LorakitError
from lorakit.inject import base_modules, output_head_name, replace_module
from lorakit.layers import LoraLayer, keep_4bit_layout

METHODS = ("nf4", "fp4", "int8")


class QuantizationError(LorakitError, ValueError):
    """Quantization cannot be done as asked (missing package, unsupported layer or method)."""


def require_bnb() -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise QuantizationError("quantization needs bitsandbytes: pip install bitsandbytes") from None
    return bnb


def is_quantized(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") or any(
        c.__name__ in ("Linear4bit", "Linear8bitLt") for c in type(module).__mro__)


def quantize_model(
    model: nn.Module,
    method: str = "nf4",
    *,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    blocksize: int = 64,
    skip_modules: tuple[str, ...] = (),
) -> list[str]:
    """Quantize the frozen base's Linear layers in place (not the output head, not embeddings).

    Returns the names of the quantized modules. Call it before adding adapters.
    """
    if method not in METHODS:
        raise QuantizationError(f"model.quantize must be one of {', '.join(METHODS)}; got {method!r}")
    bnb = require_bnb()
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise QuantizationError("quantize the base model before adding LoRA adapters")
    head = output_head_name(model)
    unsupported = [n for n, m in base_modules(model) if isinstance(m, Conv1D)]
    if unsupported:
        raise QuantizationError(
            f"{unsupported[0]} is a GPT-2 Conv1D, which bitsandbytes cannot quantize; QLoRA needs nn.Linear layers"
        )
    names = []
    for name, module in list(base_modules(model)):
        if type(module) is not nn.Linear or name == head or name in skip_modules:
            continue
        replace_module(model, name, _quantized(bnb, module, method, double_quant, compute_dtype, blocksize))
        names.append(name)
    if not names:
        raise QuantizationError(f"{type(model).__name__} has no nn.Linear layer to quantize")
    model.__dict__["lorakit_quantization"] = {"method": method, "double_quant": double_quant, "blocksize": blocksize}
    return names


def _quantized(bnb: Any, linear: nn.Linear, method: str, double_quant: bool, compute_dtype: torch.dtype,
               blocksize: int) -> nn.Module:
    device = linear.weight.device
    weight = linear.weight.data.detach().to("cpu", torch.float32 if device.type == "cpu" else torch.float16)
    has_bias = linear.bias is not None
    if method == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                threshold=6.0)
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=method)
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=method, blocksize=blocksize,
                                     compress_statistics=double_quant, module=q)
    if has_bias:
        q.bias = nn.Parameter(linear.bias.data.detach().clone(), requires_grad=False)
    keep_4bit_layout(q)
    return q.to(device)  # moving the parameter quantizes it


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The float weight (out, in) a quantized Linear computes with."""
    bnb = require_bnb()
    w = module.weight
    if type(w).__name__ == "Params4bit":
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    if type(w).__name__ == "Int8Params":
        return bnb.functional.int8_vectorwise_dequant(w.data, w.SCB).float()
    return w.data.float()


def weight_memory_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters, buffers and 4-bit quantization states."""
    total, seen = 0, set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        total += _state_bytes(getattr(t, "quant_state", None))
        scb = getattr(t, "SCB", None)
        total += scb.numel() * scb.element_size() if torch.is_tensor(scb) else 0
    return total


def _state_bytes(state: Any) -> int:
    if state is None:
        return 0
    n = sum(x.numel() * x.element_size() for x in (state.absmax, state.code) if torch.is_tensor(x))
    return n + _state_bytes(getattr(state, "state2", None))


def unload_quantized(layer: LoraLayer, adapter_names: list[str]) -> nn.Linear:
    """A plain ``nn.Linear`` with the adapters merged into dequantize(W) (W + Σ s·BA, DoRA's
    rows rescaled): how a QLoRA layer is merged."""
    weight = dequantized_weight(layer)
    unmerged = weight.clone()
    for name in adapter_names:
        if name in layer.r:
            weight = layer.merged_weight(weight, name, unmerged)[0]
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device)
    with torch.no_grad():
        out.weight.copy_(weight)
        if layer.bias is not None:
            out.bias.copy_(layer.bias.float())
    out.requires_grad_(False)
    return out
