"""A learned router over frozen adapters: per token, a softmax over the adapters weighs their updates.

Every LoRA layer that holds some of the routed adapters a = 1…n gets a small gate
``G: in → n`` (a linear layer) and computes, for each token x,

    y = base(x) + Σ_a softmax(G x)_a · s_a B_a A_a x          (adapters absent in the layer add 0)

(computed by ``LoraLayer._routed_term``).
Only the gates train (``method: router`` in ``lorakit train``); the base and the adapters stay
frozen. Gates start at zero, so an untrained router averages the adapters. On disk a router is a
directory beside its adapters: ``router_config.json`` (the adapters by name and path, the gated
modules) and ``router.safetensors`` (the gates), loaded again with ``load_router``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.errors import LorakitError
from lorakit.experts import ParamLora
from lorakit.io import load_adapter
from lorakit.layers import _adapter_dtype, lora_layers

CONFIG_FILE = "router_config.json"
WEIGHTS_FILE = "router.safetensors"


class RouterError(LorakitError, ValueError):
    """A router that cannot be built or loaded (the message says why)."""


def add_router(model: nn.Module, adapters: list[str]) -> list[str]:
    """Gate ``adapters`` (already in ``model``) in every LoRA layer that has any of them; returns the
    gated module names. The gates are trainable, everything else is frozen."""
    if len(adapters) < 2:
        raise RouterError(f"a router needs at least two adapters, got {adapters}")
    layers = [(n, layer) for n, layer in lora_layers(model) if any(a in layer.r for a in adapters)]
    if not layers:
        raise RouterError(f"no LoRA layer holds any of {adapters}; load the adapters first")
    experts = [n for n, layer in layers if isinstance(layer, ParamLora)]
    if experts:
        raise RouterError(f"{experts[0].replace('.lora_params.', '.')} carries an adapter through target_parameters; "
                          f"the router gates adapters on layers only (route adapters without target_parameters)")
    dora = sorted({a for _, layer in layers for a in adapters if layer.is_dora(a)})
    if dora:
        raise RouterError(f"adapter {dora[0]!r} is a DoRA adapter; the router mixes LoRA adapters only "
                          f"(merge it into the base first, or route plain LoRA adapters)")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in layers:
        weight = layer.base_weight
        gate = nn.Linear(layer.in_features, len(adapters), device=weight.device, dtype=_adapter_dtype(weight))  # type: ignore[attr-defined]
        nn.init.zeros_(gate.weight)
        nn.init.zeros_(gate.bias)
        layer.lora_router = gate
        layer.__dict__["router_adapters"] = list(adapters)
    return [n for n, _ in layers]


def remove_router(model: nn.Module) -> None:
    """Take the gates off: the adapters stay, and the active one applies alone again."""
    for _, layer in lora_layers(model):
        if "lora_router" in layer._modules:
            del layer._modules["lora_router"]
        layer.__dict__.pop("router_adapters", None)


def router_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v for n, layer in lora_layers(model) if "lora_router" in layer._modules
            for k, v in layer._modules["lora_router"].state_dict().items()}


def save_router(model: nn.Module, directory: str | os.PathLike, adapter_paths: dict[str, str]) -> Path:
    """Write the gates and a config naming each routed adapter's directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = next((layer.__dict__["router_adapters"] for _, layer in lora_layers(model)
                  if "router_adapters" in layer.__dict__), None)
    if names is None:
        raise RouterError("this model has no router; add_router first")
    tensors = {k: v.detach().contiguous().cpu() for k, v in router_weights(model).items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {"adapters": {n: str(Path(adapter_paths[n]).resolve()) for n in names},
              "modules": sorted({k.rsplit(".", 2)[0] for k in tensors})}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return directory


def load_router(model: nn.Module, directory: str | os.PathLike, *, load_adapters: bool = True) -> list[str]:
    """Load a saved router (and, by default, the adapters it routes) into ``model``; returns the
    adapter names, in gate order."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists():
        raise RouterError(f"{directory} holds no {CONFIG_FILE}: not a router directory")
    config = json.loads((directory / CONFIG_FILE).read_text())
    names = list(config["adapters"])
    if load_adapters:
        for name, path in config["adapters"].items():
            load_adapter(model, path, adapter_name=name, activate=False)
    add_router(model, names)
    load_router_weights(model, directory)
    return names


def load_router_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Copy the gates saved in ``directory`` into the router already in ``model``."""
    tensors = load_file(str(Path(directory) / WEIGHTS_FILE))
    mine = router_weights(model)
    if set(tensors) != set(mine):
        raise RouterError(f"{directory} gates other modules than this model has ({len(tensors)} vs {len(mine)} "
                          f"tensors)")
    with torch.no_grad():
        for key, value in mine.items():
            value.copy_(tensors[key])
