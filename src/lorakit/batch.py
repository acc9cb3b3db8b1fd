"""Mixed-adapter batches: one forward in which every row uses its own adapter (or none).

    with adapter_batch(model, ["sql", "chat", None, "sql"]):     # None / "base": the base model
        logits = model(input_ids).logits                         # also inside model.generate(...)

Inside the block every LoRA layer computes its update for all rows at once. Linear layers group
the rows by adapter and run two batched matmuls over the adapters' slots, each adapter's
(zero-padded, pre-scaled) A and B read once, in place from the layer's stacks when the slots from
the first present adapter to the last are few enough (``kernels.lora.grouped_lora``); when the
groups are so uneven that padding them to the largest would more than double the rank-r work,
they gather each row's A and B instead (``kernels.lora.gathered_lora``). Embeddings, convolutions and
``modules_to_save`` group rows by adapter. The base runs once for the whole batch. Meant for
inference (dropout is not applied).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lorakit.experts import ParamLora
from lorakit.inject import adapter_configs
from lorakit.layers import lora_layers
from lorakit.rows import RowPlan
from lorakit.saved import saved_modules

BASE_NAMES = (None, "base")


@contextmanager
def adapter_batch(model: nn.Module, adapter_ids: Sequence[str | None]) -> Iterator[nn.Module]:
    """Run forwards inside the block with row ``b`` using adapter ``adapter_ids[b]``."""
    known = adapter_configs(model)
    rows = [None if a in BASE_NAMES else a for a in adapter_ids]
    unknown = sorted({a for a in rows if a is not None and a not in known})
    if unknown:
        raise ValueError(f"no adapter named {unknown[0]!r}; this model has {sorted(known) or 'none'}")
    layers = [m for _, m in lora_layers(model)]
    experts = sorted({a for m in layers if isinstance(m, ParamLora) for a in m.adapter_names if a in rows})
    if experts:
        raise ValueError(f"adapter {experts[0]!r} adapts parameters (target_parameters), which a batch with an "
                         f"adapter per row cannot mix; run it on its own (set_adapter) or merge it")
    if any(layer.merged_adapters for layer in layers):
        raise ValueError("adapter_batch needs unmerged adapters; call unmerge(model) first")
    saved = [m for _, m in saved_modules(model)]
    # one model-wide slot order and one row index on the device, shared by every layer
    order = tuple(known)
    slots = {name: i for i, name in enumerate(order, 1)}
    device = next(model.parameters()).device
    plan = RowPlan.build(order, [slots[r] if r is not None else 0 for r in rows], device)
    # each forward's tokens per row, for layers that see the batch flattened to (B·T, …) tokens
    # (Llama 4's shared expert): read from the model's input as each forward starts
    width: dict[str, int] = {}

    def capture(_: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        ids = kwargs.get("inputs_embeds") if ids is None else ids
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
            width["tokens"] = ids.shape[1]

    hook = model.register_forward_pre_hook(capture, with_kwargs=True)
    for layer in layers:
        layer.__dict__["row_adapters"] = rows
        layer.__dict__["row_index"] = plan
        layer.__dict__["row_width"] = width
    for module in saved:
        module.__dict__["row_adapters"] = rows
    try:
        yield model
    finally:
        hook.remove()
        for module in [*layers, *saved]:
            module.__dict__.pop("row_adapters", None)
            module.__dict__.pop("row_index", None)
            module.__dict__.pop("row_width", None)
