"""Plain linear layers (the ones LoRA does not wrap) run their products through ``kernels.gemm``.

With LoRA on some projections only (``q_proj`` and ``v_proj``, say) the others stay plain
``nn.Linear`` modules, frozen (bitsandbytes 4-bit ones under QLoRA); under full fine-tuning every
projection is one, trainable. Autograd runs their forward and gradient products on torch's BLAS.
Inside ``plain_linears(model)`` each such layer (exactly ``nn.Linear``, fp32 on a CPU where
``gemm.uses_onednn``), and a 4-bit one computing in fp32, runs ``gemm.linear`` instead
(``layers.gemm_linear``, as LoRA layers do for their base): the same function and gradients, the
products on oneDNN inside ``onednn_scope()`` (the trainer's). Under autocast the layer's own
forward runs (autocast rounds its products); elsewhere nothing is switched. Generation and serving
use the same switch, with every row count padded to a few sizes (``inference_on_onednn``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lorakit.kernels.dequant import runs_dequantized
from lorakit.kernels.gemm import onednn_scope, uses_onednn
from lorakit.layers import LoraLayer, find_modules, gemm_linear
from lorakit.patch import patched_forward, unfused


def _is_plain_linear(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    if type(module) is nn.Linear:
        return uses_onednn(weight.device, weight.dtype)
    # a bitsandbytes 4-bit layer (QLoRA's base outside the adapter's targets) computing in fp32
    return (isinstance(module, nn.Linear) and not isinstance(module, LoraLayer)
            and runs_dequantized(weight, module.bias, getattr(module, "compute_dtype", None), torch.float32)
            and uses_onednn(weight.device, torch.float32))


def _forward(self: nn.Linear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    out = None if args or kwargs else gemm_linear(x, self.weight, self.bias, getattr(self, "compute_dtype", None))
    return out if out is not None else unfused(self)(x, *args, **kwargs)  # autocast, another dtype: its own


@contextmanager
def plain_linears(model: nn.Module) -> Iterator[int]:
    """Within the block, fp32 CPU ``nn.Linear`` layers, frozen or trainable, run ``gemm.linear``
    where oneDNN applies; yields how many were switched (0 elsewhere)."""
    linears = [m for _, m in find_modules(model, nn.Linear) if _is_plain_linear(m)]  # LoRA layers not walked into
    with patched_forward(linears, _forward) as n:
        yield n


@contextmanager
def inference_on_onednn(model: nn.Module) -> Iterator[None]:
    """For generation and serving: within the block the plain layers' fp32 CPU products run on
    oneDNN where it is the faster GEMM, their rows padded up to ``gemm.row_bucket`` sizes (prompts
    of any length and batches of any size meet oneDNN in few shapes; ``gemm.onednn_scope``)."""
    with plain_linears(model), onednn_scope(bucket_rows=True):
        yield
