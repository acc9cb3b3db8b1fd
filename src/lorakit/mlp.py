"""Gated MLPs run as one fused LoRA node while training (``kernels.mlp.lora_swiglu``).

Inside ``fused_mlp(model)``, every Llama-style MLP (``down_proj(silu(gate_proj(x)) * up_proj(x))``,
as in Llama, Mistral, Qwen2/3, SmolLM and over a hundred more in transformers, recognised by its
forward's code) whose three projections carry LoRA runs through the
fused node, which keeps 2 fewer (N, I) activations per layer for the backward pass. A call that
the node cannot take (adapters disabled or merged, several active adapters, dropout, a quantized
or trained base, biases) runs the module's own forward, so results never change, only memory.
Under autocast the node runs on operands cast to the autocast dtype, as each unfused matmul would.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP

from lorakit.kernels.cast import cast_frozen
from lorakit.kernels.dequant import is_4bit
from lorakit.kernels.mlp import lora_swiglu
from lorakit.layers import _LinearLora, autocast_dtype
from lorakit.models import is_checkpointing
from lorakit.patch import forward_like, patched_forward, unfused

_LAST = "_lorakit_last_mlp"  # on the model, inside fused_mlp: its last gated MLP
_ROWS = "_lorakit_rows"  # on that MLP, inside mlp_rows: the token rows to compute


def is_gated_mlp(module: nn.Module) -> bool:
    """A module computing Llama's MLP: its class's forward has the code of ``LlamaMLP.forward``
    (recognised by code, not name: look-alikes with multipliers, clamps, an inner norm or dropout
    keep their own), its ``act_fn`` is a SiLU, and its three projections are LoRA-wrapped."""
    act = getattr(module, "act_fn", None)
    return (forward_like(module, LlamaMLP) and type(act).__name__ in ("SiLU", "SiLUActivation")
            and all(isinstance(getattr(module, n, None), _LinearLora) for n in ("gate_proj", "up_proj", "down_proj")))


def _projection(layer: _LinearLora, x: torch.Tensor, cast: torch.dtype | None) -> tuple | None:
    """(W, A, B, scale), or for a DoRA adapter (W, A, B, scale, m, n), when ``layer`` can join the
    fused node for input ``x`` (under autocast to ``cast``, or None), else None."""
    name = layer._fused_adapter(x, cast)
    if name is None or layer.bias is not None or layer.weight.requires_grad \
            or is_4bit(layer.weight):  # type: ignore[attr-defined]  # a 4-bit base: the projections' own fused nodes
        return None
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, nn.Dropout) and dropout.p > 0 and layer.training:
        return None
    weight = layer.weight if cast is None else cast_frozen(layer.weight, cast)  # type: ignore[attr-defined]
    weight = weight if layer.base_class is nn.Linear else weight.T
    proj = (weight, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])
    if layer.is_dora(name):  # DoRA: its magnitude and row norms, kept in their precision under autocast
        proj += (layer.lora_magnitude_vector[name], layer.dora_norm(name))
    return proj


def _fused_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    rows, tokens = self.__dict__.get(_ROWS, (None, 0))
    if rows is not None and not args and not kwargs and x[..., 0].numel() == tokens:
        # the last layer's MLP, of which only these token rows are read: (N, H) gathered, the rest 0
        flat = x.reshape(-1, x.shape[-1])
        out = _fused_forward_all(self, flat.index_select(0, rows))
        full = out.new_zeros(flat.shape[0], out.shape[-1]).index_copy(0, rows, out)
        return full.view(*x.shape[:-1], out.shape[-1])
    return _fused_forward_all(self, x, *args, **kwargs)


def _fused_forward_all(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    cast = autocast_dtype(x)
    parts = [_projection(getattr(self, n), x, cast) for n in ("gate_proj", "up_proj", "down_proj")] \
        if not args and not kwargs else [None]
    if any(p is None for p in parts):
        return unfused(self)(x, *args, **kwargs)
    if cast is None:
        return lora_swiglu(x, *parts)
    # autocast: every operand in its dtype once, then the node runs with autocast off
    cast_parts = [(w.to(cast), a.to(cast), b.to(cast), s, *dora) for w, a, b, s, *dora in parts]  # type: ignore[misc]
    with torch.autocast(x.device.type, enabled=False):
        return lora_swiglu(x.to(cast), *cast_parts)


@contextmanager
def fused_mlp(model: nn.Module) -> Iterator[int]:
    """Within the block, gated MLPs with LoRA on all three projections use the fused node; yields
    how many MLPs were switched. The last of them (the last decoder layer's) is remembered for
    ``mlp_rows``."""
    mlps = [m for m in model.modules() if is_gated_mlp(m)]
    last = _last_layer_mlp(model)
    mark = last is not None and last in mlps and _LAST not in model.__dict__
    with patched_forward(mlps, _fused_forward) as n:
        if mark:
            model.__dict__[_LAST] = last
        try:
            yield n
        finally:
            if mark:
                model.__dict__.pop(_LAST, None)


def _last_layer_mlp(model: nn.Module) -> nn.Module | None:
    """The ``mlp`` of the last entry of the decoder's ``layers`` (transformers' layout), if any."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return getattr(layers[-1], "mlp", None) if isinstance(layers, nn.ModuleList) and len(layers) else None


@contextmanager
def mlp_rows(model: nn.Module, read: torch.Tensor) -> Iterator[bool]:
    """Within the block, the last decoder layer's MLP (inside ``fused_mlp``) runs only at the
    positions the loss reads, ``read`` (B, T-1) bool over a batch of B rows of T tokens (position t
    predicts token t+1), and gives 0 elsewhere; yields whether it applies. (An input of another
    token count than B·T, which a model that adds tokens of its own would give, runs whole.)

    After the last MLP nothing mixes tokens (the final norm and the head act per token), so when
    only the hidden states at ``rows`` are read, as the loss at supervised positions reads them,
    the MLP's work at every other row (3/4 of a Llama layer's FLOPs) is wasted: here it is not
    done. The hidden states at ``rows`` and every gradient are those of the full computation;
    the other rows' final hidden states are not (do not read them). Not under gradient
    checkpointing, whose recomputation in the backward pass must see the same rows."""
    last = model.__dict__.get(_LAST)
    if last is None or is_checkpointing(model):  # its recompute runs outside
        yield False
        return
    b, t = read.nonzero(as_tuple=True)
    width = read.shape[1] + 1
    last.__dict__[_ROWS] = (b * width + t, read.shape[0] * width)  # flat token indices, token count
    try:
        yield True
    finally:
        last.__dict__.pop(_ROWS, None)
