"""Frozen plain linear layers run their products through ``kernels.gemm`` while training and
generating.

With LoRA on some projections only (``q_proj`` and ``v_proj``, say), the other linear layers are
frozen ``nn.Linear`` modules whose forward and input-gradient products autograd runs on torch's
BLAS. Inside ``frozen_linears(model)`` each such layer (exactly ``nn.Linear``, weight and bias
needing no gradient, fp32 on a CPU where ``gemm.uses_onednn``) runs ``gemm.frozen_linear``: the
same function, its two products on oneDNN inside the trainer's ``onednn_scope()``. Under autocast
the layer's own forward runs (autocast rounds its products); elsewhere nothing is switched.
Generation and serving use the same switch, with every row count padded to a few sizes
(``inference_on_onednn``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lorakit.kernels.gemm import frozen_linear, onednn_scope, uses_onednn
from lorakit.layers import find_modules
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
    linears = [m for _, m in find_modules(model, nn.Linear) if _is_frozen_linear(m)]  # LoRA layers not walked into
    with patched_forward(linears, _forward) as n:
        yield n


@contextmanager
def inference_on_onednn(model: nn.Module) -> Iterator[None]:
    """For generation and serving: within the block the frozen layers' fp32 CPU products run on
    oneDNN where it is the faster GEMM, their rows padded up to ``gemm.row_bucket`` sizes (prompts
    of any length and batches of any size meet oneDNN in few shapes; ``gemm.onednn_scope``)."""
    with frozen_linears(model), onednn_scope(bucket_rows=True):
        yield
