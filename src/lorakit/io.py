"""Adapters on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (adapter name
stripped), ``lora_embedding_A`` / ``lora_embedding_B`` for embeddings, ``lora_magnitude_vector`` for
DoRA's magnitudes, ``<module>[.base_layer…].lora_A.weight`` for ``target_parameters`` (one
``.base_layer`` per later targeted parameter of the module: ``lorakit.experts``), ``<module>.base_layer.bias`` for
trained biases of wrapped layers, and ``<module>.<param>`` for ``modules_to_save`` copies. So an
adapter saved here loads with ``peft.PeftModel.from_pretrained`` (and vLLM), and PEFT's load here.
Only safetensors are read: pickle files can run code and are refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit import inits
from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.experts import LoraExperts
from lorakit.inject import (
    adapter_configs,
    add_adapter,
    base_modules,
    delete_adapter,
    resolve_targets,
    set_adapter,
)
from lorakit.layers import LoraEmbedding, LoraLayer
from lorakit.saved import ModulesToSave

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


class AdapterLoadError(LorakitError, ValueError):
    """An adapter directory that cannot be loaded onto this model (message says why and what to do)."""


def adapter_state_dict(
    model: nn.Module, adapter_name: str = "default", *, loading: bool = False
) -> tuple[dict[str, nn.Parameter], set[str]]:
    """``{PEFT key: live parameter}`` for adapter ``adapter_name``, and the keys that may be absent.

    The same mapping serves saving (read the parameters) and loading (copy into them); when
    ``loading``, it also accepts the extra keys PEFT writes.
    """
    config = adapter_configs(model)[adapter_name]
    keys: dict[str, nn.Parameter] = {}
    optional: set[str] = set()
    for name, module in base_modules(model):
        path = PREFIX + name
        if isinstance(module, LoraLayer) and adapter_name in module.r:
            a_key, b_key = _factor_keys(name, module)
            if isinstance(module, LoraEmbedding):
                keys[a_key] = module.lora_embedding_A[adapter_name]
                keys[b_key] = module.lora_embedding_B[adapter_name]
                if loading:  # PEFT also stores the whole embedding matrix (for resized vocabularies)
                    keys[f"{path}.base_layer.weight"] = module.weight
                    optional.add(f"{path}.base_layer.weight")
            else:
                keys[a_key] = module.lora_A[adapter_name].weight
                keys[b_key] = module.lora_B[adapter_name].weight
                if module.is_dora(adapter_name):
                    keys[f"{path}.lora_magnitude_vector"] = module.lora_magnitude_vector[adapter_name]
        if isinstance(module, LoraExperts):
            keys.update(module.adapter_keys(path, adapter_name))
        if isinstance(module, ModulesToSave):
            if adapter_name in module.modules_to_save:
                for pname, p in module.modules_to_save[adapter_name].named_parameters():
                    keys[f"{path}.{pname}"] = p
            continue
        bias = module._parameters.get("bias")
        wrapped = isinstance(module, LoraLayer) and adapter_name in module.r
        if bias is not None and (config.bias == "all" or (config.bias == "lora_only" and wrapped)):
            key = f"{path}.base_layer.bias" if isinstance(module, LoraLayer) else f"{path}.bias"
            keys[key] = bias
            if config.bias == "lora_only":
                optional.add(key)  # PEFT itself omits these; the base bias then stays as it is
    return keys, optional


def _factor_keys(name: str, module: LoraLayer) -> tuple[str, str]:
    """PEFT's keys of module ``name``'s A and B factors."""
    path = PREFIX + name
    if isinstance(module, LoraEmbedding):
        return f"{path}.lora_embedding_A", f"{path}.lora_embedding_B"
    return f"{path}.lora_A.weight", f"{path}.lora_B.weight"


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", *,
                 convert: bool = True) -> Path:
    """Write adapter ``adapter_name`` to ``directory`` in PEFT's format (files replaced atomically).

    An adapter initialised by PiSSA or OLoRA, which moved part of the base weight into itself, is
    written (``convert``, the default) as the plain LoRA adapter of rank 2r that gives the same
    model on the original base, so PEFT, vLLM and ``lorakit serve`` use it as any other
    (``converted_lora``); ``convert=False`` writes the factors as they are (the trainer's
    checkpoints: the run rebuilds the residual base when it resumes).
    """
    if adapter_name not in adapter_configs(model):
        raise ValueError(f"no adapter named {adapter_name!r}; this model has {sorted(adapter_configs(model))}")
    config = adapter_configs(model)[adapter_name]
    params, _ = adapter_state_dict(model, adapter_name)
    tensors = {k: p.detach().to("cpu").contiguous() for k, p in params.items()}
    if convert and inits.mutates_base(config.init_lora_weights):
        config, tensors = converted_lora(model, adapter_name, tensors)
    payload = config.to_peft_dict()
    payload["target_modules"] = saved_targets(model, adapter_name)
    if payload["base_model_name_or_path"] is None:
        payload["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    metadata = {"format": "pt"}
    quant = model.__dict__.get("lorakit_quantization")
    if quant:  # the base it trained against; PEFT ignores metadata, `lorakit merge` rebuilds that base
        metadata["lorakit.quantization"] = json.dumps(quant)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata=metadata))
    atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(payload, indent=2, sort_keys=True)))
    return directory


def converted_lora(model: nn.Module, adapter_name: str,
                   tensors: dict[str, torch.Tensor]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A PiSSA/OLoRA adapter's ``(config, tensors)`` as a plain LoRA adapter on the original base.

    With initial factors A₀, B₀ the trained model is W_res + s·B A = W + s·(B A − B₀ A₀)
    = W + s·[B, −B₀] [A; A₀]: rank 2r at the same scale s (α doubled; × √2 under rsLoRA). Layers
    the initialisation did not touch (embeddings, convolutions) get zero rows and columns.
    """
    config = adapter_configs(model)[adapter_name]
    out = dict(tensors)
    for name, module in base_modules(model):
        if not (isinstance(module, LoraLayer) and adapter_name in module.r):
            continue
        a_key, b_key = _factor_keys(name, module)
        a, b = tensors[a_key], tensors[b_key]
        initial = module.__dict__.get("init_factors", {}).get(adapter_name)
        if initial is None:
            a0, b0 = torch.zeros_like(a), torch.zeros_like(b)
        else:
            a0, b0 = (t.detach().to("cpu", a.dtype) for t in initial)
        out[a_key] = torch.cat([a, a0], dim=0).contiguous()
        out[b_key] = torch.cat([b, -b0], dim=1).contiguous()
    mult = math.sqrt(2) if config.use_rslora else 2  # s = α/r = 2α/2r, or α/√r = √2·α/√(2r)
    config = dataclasses.replace(
        config, init_lora_weights=True, r=2 * config.r, lora_alpha=config.lora_alpha * mult,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * mult for k, v in config.alpha_pattern.items()},
    )
    return config, out


def saved_targets(model: nn.Module, adapter_name: str = "default") -> list[str] | str:
    """``target_modules`` as ``adapter_config.json`` records it: the modules the adapter wraps, not
    the rule that chose them, so that PEFT and vLLM wrap exactly those (PEFT expands ``all-linear``
    by its own rules, which on a transformers MoE model also take the expert weights). The sorted
    leaf names, as PEFT writes them ("q_proj", …), where those pick exactly the wrapped modules
    under the adapter's other fields (``exclude_modules``, ``layers_to_transform``); otherwise a
    regular expression matching the wrapped modules' full names and nothing else."""
    config = adapter_configs(model)[adapter_name]
    wrapped = sorted(n for n, m in base_modules(model) if isinstance(m, LoraLayer) and adapter_name in m.r)
    if not wrapped:
        return []  # target_parameters only ([], not None: PEFT would take the model type's default)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    try:
        if sorted(resolve_targets(model, dataclasses.replace(config, target_modules=leaves))) == wrapped:
            return leaves
    except ValueError:
        pass
    return "(?:" + "|".join(re.escape(n) for n in wrapped) + ")"


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it to ``path``: a reader sees the
    old file or the whole new one, and a failed write leaves no temporary file behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """An adapter directory's ``adapter_config.json`` as a ``LoraConfig`` (errors name the file)."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise AdapterLoadError(f"adapter directory {directory} does not exist")
    if not config_path.exists():
        raise AdapterLoadError(f"{directory} has no {CONFIG_NAME}")
    try:
        return LoraConfig.from_dict(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise AdapterLoadError(f"{config_path}: {err}") from None


def read_adapter(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and check an adapter directory: its config and tensors (no model needed)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterLoadError(f"adapter directory {directory} does not exist")
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        pickled = [n for n in PICKLE_NAMES if (directory / n).exists()]
        if pickled:
            raise AdapterLoadError(
                f"{directory / pickled[0]} is a pickle file, which can run arbitrary code; lorakit loads "
                f"{WEIGHTS_NAME} only. Re-save it with PEFT's save_pretrained(safe_serialization=True)."
            )
        raise AdapterLoadError(f"{directory} has no {WEIGHTS_NAME}")
    config = read_adapter_config(directory)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise AdapterLoadError(f"{weights} is not a readable safetensors file: {err}") from None
    return config, _normalise_peft_keys(tensors)


def adapter_quantization(directory: str | os.PathLike) -> dict | None:
    """The quantization of the base an adapter was trained on (``None``: a float base)."""
    from safetensors import safe_open

    with safe_open(str(Path(directory) / WEIGHTS_NAME), framework="pt") as f:
        value = (f.metadata() or {}).get("lorakit.quantization")
    return json.loads(value) if value else None


def _normalise_peft_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT with ``bias='all'`` also writes the frozen originals of ``modules_to_save``; drop those."""
    out = {}
    for key, value in tensors.items():
        if ".original_module." in key:
            continue
        out[key.replace(".modules_to_save.", ".")] = value
    return out


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    activate: bool = True,
    config: LoraConfig | None = None,
) -> nn.Module:
    """Load a PEFT-format adapter onto ``model`` (in place) as ``adapter_name``.

    Keys are checked strictly: a missing or unexpected key, or a shape mismatch, raises
    ``AdapterLoadError`` naming the module and shapes, and leaves the model as it was.
    ``config`` replaces the file's config (a run that trains the adapter further with another
    dropout); its shapes must be the file's.
    """
    saved, tensors = read_adapter(directory)
    config = dataclasses.replace(config if config is not None else saved)
    if adapter_name in adapter_configs(model):
        raise AdapterLoadError(f"adapter {adapter_name!r} is already loaded; pick another adapter_name")
    config.inference_mode = not is_trainable
    try:
        add_adapter(model, config, adapter_name, trainable=is_trainable, loading=True)
    except ValueError as err:
        raise AdapterLoadError(f"adapter {directory} does not fit this model: {err}") from None
    try:
        params, optional = adapter_state_dict(model, adapter_name, loading=True)
        missing = sorted(set(params) - set(tensors) - optional)
        unexpected = sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise AdapterLoadError(
                f"adapter {directory} does not match the model: missing keys {_few(missing)}, "
                f"unexpected keys {_few(unexpected)} (was it trained on another base model?)"
            )
        for key, param in params.items():
            if key in tensors and tensors[key].shape != param.shape:
                module = key[len(PREFIX):].rsplit(".", 1)[0]
                raise AdapterLoadError(
                    f"adapter {directory}: {module} has shape {tuple(tensors[key].shape)} in the file but "
                    f"{tuple(param.shape)} in the model (different rank or base model?)"
                )
        with torch.no_grad():
            for key, param in params.items():
                if key in tensors:
                    param.copy_(tensors[key].to(param.dtype))
    except AdapterLoadError:
        delete_adapter(model, adapter_name)
        raise
    if activate:
        set_adapter(model, adapter_name)
    return model


def load_adapters(model: nn.Module, directories: Sequence[str | os.PathLike]) -> list[str]:
    """Load each directory as ``adapter0``, ``adapter1``… and make them all active (updates add up)."""
    names = [f"adapter{i}" for i in range(len(directories))]
    for name, directory in zip(names, directories):
        load_adapter(model, directory, adapter_name=name, activate=False)
    if names:
        set_adapter(model, names)
    return names


def _few(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "none"
    shown = ", ".join(k[len(PREFIX):] if k.startswith(PREFIX) else k for k in keys[:n])
    return f"{shown}{f' (+{len(keys) - n} more)' if len(keys) > n else ''}"
