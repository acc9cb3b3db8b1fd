"""The optimizer and the learning-rate schedule of a training run.

AdamW over the trainable parameters (the adapters; every parameter under ``method: full``),
weight decay on matrices only, and a multiplier of the peak lr per step: a linear warm-up over
``warmup`` steps, then cosine or linear decay to 0 at ``total``, or constant.

LoRA+ (Hayou et al., 2024) gives B a larger learning rate than A: η_B = λ · η_A with λ =
``loraplus_lr_ratio`` (the paper finds λ ≈ 16 helps; A and B play different roles, B starts at zero).
Grouped as PEFT's ``create_loraplus_optimizer`` does: the B matrices and every 1-D trainable parameter
(biases, DoRA magnitudes) at λ·lr, both factors of an embedding's adapter at ``loraplus_lr_embedding``,
everything else at lr. The schedule multiplies every group alike, so the ratios hold at each step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lorakit.layers import LoraEmbedding, lora_layers


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at step ``s``: linear warm-up, then cosine / linear decay to 0, or constant."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) if schedule == "cosine" else max(0.0, 1 - progress)
    return f


def build_optimizer(params: Sequence[tuple[str, nn.Parameter]], cfg: Any,
                    lr_scales: dict[int, float] | None = None) -> torch.optim.AdamW:
    """AdamW; weight decay applies to matrices only (not to biases or norm weights). ``lr_scales``
    (``id(param)`` → multiplier of ``cfg.lr``, see ``loraplus_scales``) puts parameters in groups of
    their own lr; the first group always holds the matrices at ``cfg.lr``, the lr a run logs."""
    scales = lr_scales or {}
    grouped: dict[tuple[float, bool], list[nn.Parameter]] = {(1.0, True): [], (1.0, False): []}
    for _, p in params:
        grouped.setdefault((scales.get(id(p), 1.0), p.ndim >= 2), []).append(p)
    groups = [{"params": ps, "lr": cfg.lr * scale, "weight_decay": cfg.weight_decay if matrix else 0.0}
              for (scale, matrix), ps in grouped.items() if ps]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=_fusable([p for _, p in params]))


def loraplus_scales(model: nn.Module, ratio: float, lr: float, lr_embedding: float) -> dict[int, float]:
    """LoRA+'s lr multipliers by ``id(param)`` for ``build_optimizer``: ``ratio`` for the B matrices
    of LoRA layers and every 1-D trainable parameter, ``lr_embedding / lr`` for both factors of an
    embedding's adapter (PEFT's grouping); parameters not named keep lr."""
    embedding = {id(p) for _, layer in lora_layers(model) if isinstance(layer, LoraEmbedding)
                 for name in layer.adapter_names for p in layer.adapter_parameters(name)}
    b_factors = {id(layer.lora_B[name].weight) for _, layer in lora_layers(model)
                 if not isinstance(layer, LoraEmbedding) for name in layer.adapter_names}
    scales: dict[int, float] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding:
            scales[id(p)] = lr_embedding / lr
        elif id(p) in b_factors or p.ndim == 1:
            scales[id(p)] = ratio
    return scales


def _fusable(params: Sequence[torch.Tensor]) -> bool:
    """Whether AdamW's fused kernel (one pass over all parameters instead of a dozen ops per tensor:
    on the CPU demo 12 ms instead of 59 ms a step) can take these: plain floating-point tensors on
    the CPU or a GPU, not FSDP's sharded DTensors."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed
        DTensor = ()  # type: ignore[assignment]
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
                                and not isinstance(p, DTensor) for p in params)
