"""RMSNorms run as one autograd node while training (``kernels.norm.rms_norm``).

Inside ``fused_norms(model)``, every RMSNorm whose class computes exactly Llama's
``weight * round(x_f · rsqrt(mean(x_f²) + ε))`` (Llama, Mistral, Qwen2/3, SmolLM, Granite, Phi-3,
DeepSeek and a hundred more in transformers; recognised by its forward's code, not its name, so
Gemma's ``1 + weight`` variant and other look-alikes keep their own) runs through the node. The
forward is bit-identical; backward keeps the input in its own dtype instead of autograd's fp32
copy, which on a bf16 model halves what each norm holds for the backward pass. On fp32 inputs
autograd's "copy" is x itself, so there the module's own forward runs (it is ~2% faster on a CPU).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lorakit.kernels.norm import rms_norm
from lorakit.patch import forward_like, patched_forward, unfused


def is_llama_rms_norm(module: nn.Module) -> bool:
    """A module computing Llama's RMSNorm: its class's forward has the same code, and it holds a
    (H,) ``weight`` and a float ``variance_epsilon``."""
    weight = getattr(module, "weight", None)
    return (forward_like(module, LlamaRMSNorm) and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float))


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype == torch.float32:  # autograd keeps x itself then: nothing to save, and it is faster
        return unfused(self)(hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


@contextmanager
def fused_norms(model: nn.Module) -> Iterator[int]:
    """Within the block, Llama-style RMSNorms use the fused node; yields how many were switched."""
    with patched_forward([m for m in model.modules() if is_llama_rms_norm(m)], _fused_forward) as n:
        yield n
