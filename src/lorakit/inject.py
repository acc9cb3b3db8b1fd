"""Putting adapters into a model, choosing between them, and deciding what trains.

    model = get_lora_model(model, LoraConfig(r=16, target_modules="all-linear"))   # wraps in place
    add_adapter(model, other_config, "b"); set_adapter(model, ["default", "b"])     # outputs add up

Module matching follows PEFT: a list entry matches a module whose full name equals it or ends with
``"." + entry``; a string is a regex over the full name; ``"all-linear"`` is every ``nn.Linear`` /
``Conv1D`` except the output head. Trainability is decided by identity (the adapter's own
parameters, ``modules_to_save`` copies, biases per ``bias``), never by substring match on names.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterator, Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import inits
from lorakit.config import DEFAULT_TARGETS, LoraConfig
from lorakit.experts import LoraExperts, ParamLora, unwrap_empty
from lorakit.layers import (
    SUPPORTED_TYPES,
    LoraLayer,
    computes_linear,
    dora_refusal,
    init_refusal,
    lora_class_for,
    lora_layers,
)
from lorakit.models import is_state_space
from lorakit.saved import ModulesToSave, saved_modules

DEFAULT_LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")
SEQ_CLS_HEADS = ("classifier", "score")


# -- naming ----------------------------------------------------------------------------------------


def base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` without the adapters' own sub-modules (lora_A, modules_to_save copies, the
    ``lora_params`` of a module whose parameters carry adapters)."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave, LoraExperts)):
            skip.append(f"{name}." if name else "")
        yield name, module


def name_matches(name: str, spec: Sequence[str] | str) -> bool:
    """PEFT's rule: a string is a full-name regex; list entries match exactly or as a ``.``-suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in spec)


def layer_index(name: str, patterns: Sequence[str] | None) -> int | None:
    """The block index in a name like ``model.layers.3.mlp.up_proj`` (3), or None."""
    for pattern in patterns or DEFAULT_LAYER_PATTERNS:
        match = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", name)
        if match:
            return int(match.group(1))
    return None


def output_head_name(model: nn.Module, task_type: str | None = None) -> str | None:
    """Name of the output projection (``lm_head``), which ``all-linear`` leaves alone."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None:
        return next((n for n, m in model.named_modules() if m is head), None)
    if task_type == "SEQ_CLS":
        return next((n for n in SEQ_CLS_HEADS if getattr(model, n, None) is not None), None)
    return None


def block_pattern(name: str) -> str:
    """``model.layers.3.mlp`` → ``model.layers.*.mlp``."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def block_suffix(name: str) -> str:
    """The part of a name after its block index: ``model.layers.3.mlp.experts.down_proj`` →
    ``mlp.experts.down_proj`` (the name itself where there is no index)."""
    return block_pattern(name).rsplit("*.", 1)[-1]


def group_module_names(model: nn.Module) -> list[tuple[str, str, int]]:
    """(name pattern with block indices as ``*``, type name, count), in model order."""
    groups: dict[tuple[str, str], int] = {}
    for name, module in base_modules(model):
        if not name:
            continue
        key = (block_pattern(name), type(module).__name__)
        groups[key] = groups.get(key, 0) + 1
    return [(pattern, type_name, count) for (pattern, type_name), count in groups.items()]


def describe_targets(model: nn.Module, limit: int = 12) -> str:
    """A short, grouped list of the wrappable module names, for error messages."""
    leaves: dict[str, tuple[str, int]] = {}
    for name, module in base_modules(model):
        if isinstance(module, SUPPORTED_TYPES):
            leaf = name.rsplit(".", 1)[-1]
            type_name, count = leaves.get(leaf, (type(module).__name__, 0))
            leaves[leaf] = (type_name, count + 1)
    parts = [f"{leaf} ({t}{f' ×{c}' if c > 1 else ''})" for leaf, (t, c) in list(leaves.items())[:limit]]
    more = f", … {len(leaves) - limit} more" if len(leaves) > limit else ""
    return ", ".join(parts) + more


def _kernel_read_projections(model: nn.Module) -> set[str]:
    """Full names of linear layers whose weight a fused kernel reads without calling the module: the
    ``out_proj`` of Mamba / Mamba-2 mixers (a module with ``in_proj``, ``conv1d``, ``out_proj`` and
    the SSM's ``A_log``; mamba-ssm's scan takes ``out_proj.weight`` as an argument). PEFT refuses
    these too."""
    return {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
            if is_state_space(m) and isinstance(getattr(m, "out_proj", None), nn.Module) and hasattr(m, "in_proj")
            and hasattr(m, "conv1d")}


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the modules ``config`` wraps in ``model``; raises when nothing matches."""
    spec = config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if config.target_parameters and (spec == [] or (spec is None and model_type not in DEFAULT_TARGETS)):
        return []  # parameters only (PEFT's rule: an unset target_modules still takes the type's default)
    if spec is None:
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"LoraConfig.target_modules is not set and there is no default for model type "
                f"{model_type!r}; set it, e.g. target_modules='all-linear'. Wrappable modules: {describe_targets(model)}"
            )
        spec = DEFAULT_TARGETS[model_type]
    saved = config.modules_to_save or []
    candidates = [(n, m) for n, m in base_modules(model) if n and not name_matches(n, saved)]
    kernel_read = _kernel_read_projections(model)
    if spec == "all-linear":
        head = output_head_name(model, config.task_type)
        linear = [(n, m) for n, m in candidates if isinstance(m, (nn.Linear, Conv1D)) and n != head and n not in kernel_read]
        names = [n for n, m in linear if not isinstance(m, nn.Linear) or computes_linear(m)]
        skipped = [f"{n} ({type(m).__name__})" for n, m in linear if n not in names]
        if skipped:
            warnings.warn(f"all-linear skips {len(skipped)} nn.Linear subclasses whose forward computes more than "
                          f"x Wᵀ + b: {', '.join(skipped[:3])}{', …' if len(skipped) > 3 else ''}", stacklevel=3)
        experts = [f"{n}.{p}" for n, m in candidates if not isinstance(m, SUPPORTED_TYPES)
                   for p, w in m.named_parameters(recurse=False) if w.ndim == 3]
        frozen = [e for e in experts if not name_matches(e, config.target_parameters or [])]
        if frozen:  # transformers' fused MoE experts: (E, out, in) weights, no nn.Linear
            warnings.warn(f"all-linear adapts linear layers only: {len(frozen)} fused expert weights stay frozen; "
                          f"to adapt them too, set target_parameters: {sorted({block_suffix(e) for e in frozen})}",
                          stacklevel=3)
    else:
        names = [n for n, _ in candidates if name_matches(n, spec)]
    if config.exclude_modules:
        names = [n for n in names if not name_matches(n, config.exclude_modules)]
    bypassed = [n for n in names if n in kernel_read]
    if bypassed:
        raise ValueError(f"target_modules picks {bypassed[0]}, the output projection of a Mamba mixer, whose fused "
                         f"GPU kernel reads the weight directly, so an adapter there would be ignored; leave out "
                         f"'out_proj' (exclude_modules) or use 'all-linear', which skips these")
    if spec != "all-linear":  # (all-linear left these out above)
        modules = dict(candidates)
        for n in names:
            m = modules[n]
            if isinstance(m, nn.Linear) and not computes_linear(m):
                raise ValueError(f"module {n!r} is a {type(m).__name__}, an nn.Linear whose forward computes more "
                                 f"than x Wᵀ + b (a router's scores, say), so LoRA cannot add to it; leave it out of "
                                 f"target_modules")
    if config.layers_to_transform is not None:
        names = [n for n in names if layer_index(n, config.layers_pattern) in config.layers_to_transform]
    if not names:
        raise ValueError(
            f"target_modules={spec!r} matched no module of {type(model).__name__}. "
            f"Wrappable modules: {describe_targets(model)}. Use these names, a regex string or 'all-linear'; "
            f"`lorakit inspect` lists them all."
        )
    if isinstance(spec, list):
        unmatched = [t for t in spec if not any(n == t or n.endswith(f".{t}") for n in names)]
        if unmatched:
            warnings.warn(f"target_modules entries {unmatched} matched no module and were ignored", stacklevel=3)
    return names


def resolve_parameters(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names (``module.param``) of the parameters ``config.target_parameters`` picks, each
    held directly by a module that is not a linear layer; raises when an entry picks a linear
    layer's weight or nothing matches at all (naming what can be picked)."""
    spec = config.target_parameters or []
    if not spec:
        return []
    found, candidates = [], []
    for name, module in base_modules(model):
        for pname, w in module._parameters.items():
            full = f"{name}.{pname}" if name else pname
            if w is None or not name_matches(full, spec):
                if w is not None and w.ndim in (2, 3) and not isinstance(module, (*SUPPORTED_TYPES, ModulesToSave)):
                    candidates.append(full)
                continue
            if isinstance(module, (*SUPPORTED_TYPES, LoraLayer, ModulesToSave)):
                raise ValueError(f"target_parameters picks {full}, the weight of a {type(module).__name__}; "
                                 f"put {name.rsplit('.', 1)[-1]!r} in target_modules instead")
            if w.ndim not in (2, 3) or not w.is_floating_point():
                raise ValueError(f"target_parameters picks {full}, a {w.ndim}-D {w.dtype} tensor; LoRA adapts "
                                 f"2-D (out, in) and 3-D (experts, out, in) floating-point weights")
            found.append(full)
    if not found:
        shown = sorted({block_suffix(c) for c in candidates})
        raise ValueError(f"target_parameters={spec!r} matched no parameter of {type(model).__name__}; "
                         f"parameters it can take: {', '.join(shown[:12]) or 'none'}")
    unmatched = [t for t in spec if not any(name_matches(n, [t]) for n in found)]
    if unmatched:
        warnings.warn(f"target_parameters entries {unmatched} matched no parameter and were ignored", stacklevel=3)
    if config.layers_to_transform is not None:
        warnings.warn("layers_to_transform does not restrict target_parameters (as in PEFT): every layer's "
                      "matching parameters are adapted; list full names (model.layers.0.mlp.experts.down_proj) "
                      "to pick layers", stacklevel=3)
    return found


# -- adapters --------------------------------------------------------------------------------------


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """``{adapter name: LoraConfig}`` of the adapters in ``model`` (empty for a plain model)."""
    return model.__dict__.setdefault("lora_configs", {})


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def add_adapter(model: nn.Module, config: LoraConfig, adapter_name: str = "default", *,
                trainable: bool = True, loading: bool = False) -> list[str]:
    """Inject adapter ``adapter_name`` into ``model`` in place; returns the wrapped module names.

    The new adapter is not made active (see ``set_adapter``). Base parameters are frozen; the
    adapter's parameters train when ``trainable``. ``loading``: its weights are about to be read
    from a file, so an initialisation lorakit cannot run (EVA's) is no obstacle.
    """
    configs = adapter_configs(model)
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter it first or pick another name")
    init = config.init_lora_weights
    if init in inits.LOAD_ONLY:
        if not loading:
            raise ValueError(f"init_lora_weights={init!r} needs activations from data, which lorakit does not "
                             f"compute; adapters saved that way load, new ones use {inits.ACCEPTED}")
        config = dataclasses.replace(config, init_lora_weights=True)
    targets = resolve_targets(model, config)
    parameters = resolve_parameters(model, config)
    _check_targets(model, targets, config.use_dora, init, adapter_name)
    if not configs:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLayer):
            cls = lora_class_for(type(module))
            if cls is None:
                kinds = ", ".join(t.__name__ for t in SUPPORTED_TYPES)
                raise ValueError(f"module {name!r} is a {type(module).__name__}; LoRA supports {kinds}")
            module = cls.from_base(module)
            replace_module(model, name, module)
        rank, alpha = config.rank_for(name), config.alpha_for(name)
        module.update_layer(adapter_name, rank, alpha, config.scaling(rank, alpha),
                            config.lora_dropout, config.init_lora_weights, config.use_dora)
        for p in module.adapter_parameters(adapter_name):
            p.requires_grad_(trainable)
    for full in parameters:
        owner_name, _, param_name = full.rpartition(".")
        owner = model.get_submodule(owner_name)
        if not isinstance(owner, LoraExperts):
            owner = LoraExperts.from_base(owner)
            replace_module(model, owner_name, owner)
        lora = owner.param_lora(param_name)
        rank, alpha = config.rank_for(full), config.alpha_for(full)
        lora.update_layer(adapter_name, rank, alpha, config.scaling(rank, alpha), 0.0, config.init_lora_weights)
        for p in lora.adapter_parameters(adapter_name):
            p.requires_grad_(trainable)
    for name, module in list(base_modules(model)):
        if name and config.modules_to_save and name_matches(name, config.modules_to_save):
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave.from_base(module)
                replace_module(model, name, module)
            for p in module.add_copy(adapter_name).parameters():
                p.requires_grad_(trainable)
    if trainable and config.bias != "none":
        for _, module in base_modules(model):
            if isinstance(module, ModulesToSave):
                continue
            wrapped = isinstance(module, LoraLayer) and adapter_name in module.r
            bias = module._parameters.get("bias")
            if bias is not None and (config.bias == "all" or wrapped):
                bias.requires_grad_(True)
    configs[adapter_name] = config
    return targets


def _check_targets(model: nn.Module, targets: list[str], use_dora: bool, init: bool | str, adapter_name: str) -> None:
    """Refuse, before anything is wrapped, a target DoRA cannot go on (``layers.dora_refusal``) or a
    linear one the initialisation cannot (``layers.init_refusal``: PiSSA/OLoRA and other adapters)."""
    owners: dict[int, list[str]] = {}  # a weight's id → the modules holding it (tied weights: several)
    if inits.mutates_base(init):
        for owner, sub in model.named_modules():
            weight = sub._parameters.get("weight")
            if weight is not None:
                owners.setdefault(id(weight), []).append(owner)
    for name in targets:
        module = model.get_submodule(name)
        reason = dora_refusal(module) if use_dora else None
        if reason:
            raise ValueError(f"use_dora: module {name!r} {reason}")
        reason = init_refusal(module, init) if isinstance(module, (nn.Linear, Conv1D)) else None
        tied = [o for o in owners.get(id(module._parameters.get("weight")), []) if o != name]
        if reason is None and tied:
            reason = (f"shares its weight with {tied[0]!r} (tied weights), which the residual base would change too; "
                      f"leave it out of target_modules or use the default init")
        if reason:
            what = f"init_lora_weights={init!r}" if inits.mutates_base(init) else f"adapter {adapter_name!r}"
            raise ValueError(f"{what}: module {name!r} {reason}")


def get_lora_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Wrap ``model`` in place with one trainable adapter, make it active, and return the model."""
    add_adapter(model, config, adapter_name)
    set_adapter(model, adapter_name)
    return model


def _check_names(model: nn.Module, names: Sequence[str]) -> None:
    known = adapter_configs(model)
    for name in names:
        if name not in known:
            raise ValueError(f"no adapter named {name!r}; this model has {sorted(known) or 'none'}")


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapters; with several, their updates add up."""
    names = [names] if isinstance(names, str) else list(names)
    _check_names(model, names)
    for _, module in [*lora_layers(model), *saved_modules(model)]:
        module.active_adapters = [n for n in names if n in module.adapter_names]


def active_adapters(model: nn.Module) -> list[str]:
    active: list[str] = []
    for _, module in [*lora_layers(model), *saved_modules(model)]:
        active += [n for n in module.active_adapters if n not in active]
    return active


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left with no adapter become plain base layers again."""
    _check_names(model, [name])
    for module_name, module in [*lora_layers(model), *saved_modules(model)]:
        if name in getattr(module, "merged_adapters", ()):
            raise ValueError(f"adapter {name!r} is merged into {module_name}; unmerge(model) before deleting it")
        module.remove_adapter(name)
        if not module.adapter_names and not isinstance(module, ParamLora):
            replace_module(model, module_name, module.to_base())
    unwrap_empty(model, replace_module)
    del adapter_configs(model)[name]


# -- reporting -------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, counted as PEFT does (packed 4-bit weights count twice)."""
    trainable = total = 0
    for _, param in model.named_parameters():
        n = param.numel()
        if type(param).__name__ == "Params4bit":
            n *= 2 * getattr(getattr(param, "quant_storage", None), "itemsize", 1)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: … || all params: … || trainable%: …`` in PEFT's exact form."""
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
