"""Frozen plain linear layers run their products through ``kernels.gemm`` while training and
generating.

With LoRA on some projections only (``q_proj`` and ``v_proj``, say), the other linear layers are
frozen ``nn.Linear`` modules whose forward and input-gradient products autograd runs on torch's
BLAS. Inside ``frozen_linears(model)`` each such layer (exactly ``nn.Linear``, weight and bias
needing no gradient, fp32 on a CPU where ``gemm.uses_onednn``) runs ``gemm.frozen_linear``: the
same function, its two products on oneDNN inside the trainer's ``onednn_scope()``. Under autocast
the layer's own forward runs (autocast rounds its products); elsewhere nothing is switched.
Generation uses the same switch for its decode steps only (``decode_on_onednn``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lorakit.kernels.gemm import frozen_linear, onednn_scope, uses_onednn
from lorakit.patch import patched_forward, unfused


def _is_frozen_linear(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    return (type(module) is nn.Linear and isinstance(weight, torch.Tensor) and not weight.requires_grad
            and (bias is None or not bias.requires_grad) and uses_onednn(weight.device, weight.dtype))


def _forward(self: nn.Linear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if args or kwargs or x.dtype != self.weight.dtype or torch.is_autocast_enabled(x.device.type):  # autocast: its own
        return unfused(self)(x, *args, **kwargs)
    return frozen_linear(x, self.weight, self.bias)


@contextmanager
def frozen_linears(model: nn.Module) -> Iterator[int]:
    """Within the block, frozen fp32 CPU ``nn.Linear`` layers run ``gemm.frozen_linear`` where
    oneDNN applies; yields how many were switched (0 elsewhere)."""
    with patched_forward([m for m in model.modules() if _is_frozen_linear(m)], _forward) as n:
        yield n


@contextmanager
def decode_on_onednn(model: nn.Module, max_rows: int) -> Iterator[None]:
    """For generation: within the block the frozen layers' fp32 CPU products of at most
    ``max_rows`` rows (the decode steps: one row per sequence) run on oneDNN where it applies, and
    longer ones (the prompts, of any length: unbounded shapes) on torch's BLAS."""
    with frozen_linears(model), onednn_scope(max_rows=max_rows):
        yield
