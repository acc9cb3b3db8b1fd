"""Folding adapters into the base weights and back out.

``merge``: W ← W + Σ_a s_a B_a A_a for the active adapters (the forward then skips them: no
overhead). ``unmerge`` subtracts the same deltas. ``merge_and_unload`` merges and returns the model
with every LoRA layer replaced by a plain module of its original class, ready for
``save_pretrained`` and for plain transformers. A quantized (QLoRA) base is merged into its
dequantized weights and exported as plain float ``nn.Linear`` layers, never written back to 4-bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lorakit.experts import ParamLora, experts_modules
from lorakit.inject import active_adapters, adapter_configs, replace_module
from lorakit.layers import LoraLayer, lora_layers
from lorakit.quant import is_quantized, unload_quantized
from lorakit.saved import saved_modules


def merged_adapters(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, layer in lora_layers(model):
        names += [n for n in layer.merged_adapters if n not in names]
    return names


def merge(model: nn.Module, adapter_names: Sequence[str] | None = None, *, safe_merge: bool = False) -> None:
    """Add the adapters' deltas (default: the active ones) into the base weights, in place.

    With ``safe_merge`` each merged weight is computed out of place and checked first: a NaN or Inf
    raises ``ValueError`` naming the module and adapter, and the model is left as it was.
    """
    names = list(adapter_names) if adapter_names is not None else active_adapters(model)
    layers = lora_layers(model)
    _refuse_tied(model, layers, names)
    quantized = [n for n, layer in layers if is_quantized(layer) and any(a in layer.r for a in names)]
    if quantized:
        raise ValueError(
            f"{quantized[0]} is quantized: merging into 4-bit/8-bit storage would lose the adapter's precision. "
            f"Use merge_and_unload, which merges into the dequantized weights"
        )
    if safe_merge:
        for module_name, layer in layers:
            for name in names:
                if name in layer.r and name not in layer.merged_adapters:
                    merged = layer.merge_preview(name)
                    if not torch.isfinite(merged).all():
                        raise ValueError(
                            f"merging adapter {name!r} into {module_name} gives NaN/Inf weights; the adapter "
                            f"is broken (check its training), nothing was merged"
                        )
    for _, layer in layers:
        for name in names:
            if name in layer.r and name not in layer.merged_adapters:
                layer.merge_adapter(name)


def _refuse_tied(model: nn.Module, layers: list[tuple[str, LoraLayer]], names: Sequence[str]) -> None:
    """Merging into a weight that another module shares (tied input/output embeddings) would
    change that module too, so it is refused before anything is touched."""
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{module_name}.{pname}" if module_name else pname)
    for module_name, layer in layers:
        if not any(n in layer.r and n not in layer.merged_adapters for n in names):
            continue
        if isinstance(layer, ParamLora):  # its weight is its owner's
            module_name = module_name.rsplit(".lora_params.", 1)[0]
        others = [o.rsplit(".", 1)[0] for o in owners[id(layer.base_weight)] if o.rsplit(".", 1)[0] != module_name]
        if others:
            raise ValueError(
                f"{module_name} shares its weight with {', '.join(sorted(set(others)))} (tied embeddings): merging "
                f"would change both. Keep the adapter unmerged, or untie the weights before merging"
            )


def unmerge(model: nn.Module) -> None:
    """Subtract every merged adapter's delta again (last merged first)."""
    for _, layer in lora_layers(model):
        for name in reversed(list(layer.merged_adapters)):
            layer.unmerge_adapter(name)


def merge_and_unload(model: nn.Module, *, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> nn.Module:
    """Merge the active adapters and return ``model`` as a plain model of the original module types.

    ``modules_to_save`` wrappers are replaced by the active adapter's trained copy.
    """
    names = list(adapter_names) if adapter_names is not None else active_adapters(model)
    quantized = [(n, layer) for n, layer in lora_layers(model) if is_quantized(layer)]
    for module_name, layer in quantized:
        plain = unload_quantized(layer, names)
        if safe_merge and not torch.isfinite(plain.weight).all():
            raise ValueError(f"merging into {module_name} gives NaN/Inf weights; the adapter is broken")
        replace_module(model, module_name, plain)
    merge(model, names, safe_merge=safe_merge)
    for module_name, layer in lora_layers(model):
        if not isinstance(layer, ParamLora):  # (those go with their module, below)
            replace_module(model, module_name, layer.to_base())
    for module_name, module in experts_modules(model):
        replace_module(model, module_name, module.to_base())
    for module_name, module in list(model.named_modules()):
        if is_quantized(module):  # the rest of a QLoRA base: plain float weights for export
            replace_module(model, module_name, unload_quantized(module, []))
    model.__dict__.pop("lorakit_quantization", None)
    for module_name, saved in saved_modules(model):
        chosen = next((n for n in names if n in saved.modules_to_save), None)
        replace_module(model, module_name, saved.to_base(chosen))
    adapter_configs(model).clear()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (merged adapters are unmerged, then re-merged)."""
    merged = merged_adapters(model)
    if merged:
        unmerge(model)
    modules = [m for _, m in [*lora_layers(model), *saved_modules(model)]]
    for module in modules:
        module.adapters_disabled = True
    try:
        yield model
    finally:
        for module in modules:
            module.adapters_disabled = False
        if merged:
            merge(model, merged)
