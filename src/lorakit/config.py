"""`LoraConfig`: what to adapt and how, with PEFT's field names and defaults.

A LoRA adapter replaces a frozen weight ``W`` (out × in) by ``W + s · B A`` where ``A`` is r × in,
``B`` is out × r and the scale ``s = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA).
The fields below follow ``peft.LoraConfig`` so a PEFT user's config (and an ``adapter_config.json``
written by PEFT) carries over unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from lorakit import inits

BIAS_MODES = ("none", "all", "lora_only")

# Default targets by `config.model_type` when `target_modules` is None, as PEFT does.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{key: ["q_proj", "v_proj"] for key in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2",
                                             "gemma3_text", "opt", "gptj", "stablelm")},
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    **{key: ["query_key_value"] for key in ("gpt_neox", "falcon", "bloom")},
    "mpt": ["Wqkv"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
}

# Fields of PEFT's LoraConfig that select features lorakit does not implement: loading a config
# that turns one on must fail loudly, not silently train or serve something else.
UNSUPPORTED_WHEN_SET: dict[str, Any] = {
    "lora_bias": False,
    "layer_replication": None,
    "trainable_token_indices": None,
    "use_qalora": False,
}


@dataclass
class LoraConfig:
    """Hyper-parameters of one LoRA adapter (PEFT names and defaults).

    Attributes:
        r: rank of ``A`` (r × in) and ``B`` (out × r).
        lora_alpha: numerator of the scale ``s = alpha / r`` (``alpha / sqrt(r)`` when ``use_rslora``).
        lora_dropout: dropout probability applied to the adapter's input only, in [0, 1).
        target_modules: module names to wrap. A list matches a module whose full name equals an entry
            or ends with ``"." + entry``; a string is a regular expression that must match the full
            name; ``"all-linear"`` wraps every ``nn.Linear``/``Conv1D`` except the output head.
            ``None`` takes the usual default for the model type (e.g. ``q_proj, v_proj`` for Llama).
        exclude_modules: names (same matching rules) never wrapped.
        target_parameters: parameters to adapt that no linear module holds, chiefly a transformers MoE
            layer's fused expert weights (``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``):
            an entry matches a parameter whose full name (``model.layers.0.mlp.experts.down_proj``)
            equals it or ends with ``"." + entry``. Each expert gets its own rank-r pair (see
            ``lorakit.experts``). As in PEFT: no dropout, DoRA or PiSSA-like init there, and
            ``layers_to_transform`` / ``exclude_modules`` do not apply to them. With
            ``target_modules`` unset the model type's default modules are wrapped too; ``[]`` wraps none.
        bias: ``"none"``, ``"all"`` (every bias trains) or ``"lora_only"`` (biases of wrapped layers).
        modules_to_save: modules (e.g. a classifier head) trained in full and saved with the adapter.
        fan_in_fan_out: the base stores its weight as in × out (GPT-2 ``Conv1D``); set automatically
            for ``Conv1D`` layers.
        init_lora_weights: ``True`` (A kaiming-uniform, B zero: the adapter starts as a no-op),
            ``"gaussian"`` (A ~ N(0, 1/r²), B zero), ``False`` (both random: for tests only), or on
            linear layers ``"pissa"`` / ``"pissa_niter_K"`` / ``"olora"`` (the adapter starts as W's
            principal part, the base keeps the residual) or ``"orthogonal"`` (B A = 0 from orthogonal
            halves); see ``lorakit.inits``. Other layer kinds take the default. ``"eva"`` adapters
            load (their weights are read from the file) but cannot be initialised here.
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
        use_dora: weight-decomposed LoRA (DoRA) on linear layers and convolutions: the adapted
            weight's rows (a kernel's output channels) are rescaled to a trained magnitude,
            ``W' = m ⊙ (W + s B A) / ‖W + s B A‖_row`` with ``m`` (out,) starting at ``‖W‖_row``
            (see ``lorakit.dora``).
        layers_to_transform: only wrap modules inside these layer indices.
        layers_pattern: name of the layer list (``"layers"``, ``"h"``...) used with ``layers_to_transform``.
        rank_pattern: ``{regex: rank}`` overriding ``r`` for modules whose name matches.
        alpha_pattern: ``{regex: alpha}`` overriding ``lora_alpha`` likewise.
        task_type: PEFT's task type string (``"CAUSAL_LM"``, ``"SEQ_CLS"``...), kept for the file format.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    use_dora: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = sorted(self.target_parameters)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.layers_pattern, str):
            self.layers_pattern = [self.layers_pattern]
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that holds an impossible value."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer (e.g. 8 or 16), got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"LoraConfig.lora_alpha must be > 0 (commonly r or 2*r), got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig.bias must be one of {', '.join(BIAS_MODES)}; got {self.bias!r}")
        if not inits.valid(self.init_lora_weights) and self.init_lora_weights not in inits.LOAD_ONLY:
            raise ValueError(f"LoraConfig.init_lora_weights must be {inits.ACCEPTED}, got {self.init_lora_weights!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraConfig.use_dora must be true or false, got {self.use_dora!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("LoraConfig.layers_pattern is only used together with layers_to_transform")
        for name, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"LoraConfig.rank_pattern[{name!r}] must be a positive integer, got {rank!r}")
        for name, alpha in self.alpha_pattern.items():
            if not isinstance(alpha, (int, float)) or alpha <= 0:
                raise ValueError(f"LoraConfig.alpha_pattern[{name!r}] must be > 0, got {alpha!r}")
        for pattern in (*self.rank_pattern, *self.alpha_pattern):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"LoraConfig rank/alpha pattern {pattern!r} is not a valid regex: {err}") from None
        self._validate_parameters()
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ValueError(f"LoraConfig.target_modules regex {self.target_modules!r} is invalid: {err}") from None

    def _validate_parameters(self) -> None:
        """``target_parameters``: a list of names, and none of the features PEFT refuses there."""
        spec = self.target_parameters
        if spec is None:
            return
        if not isinstance(spec, list) or not all(isinstance(t, str) and t for t in spec):
            raise ValueError(f"LoraConfig.target_parameters must be a list of parameter names such as "
                             f"['mlp.experts.gate_up_proj', 'mlp.experts.down_proj'], got {spec!r}")
        if not spec:
            return
        why = ("lora_dropout must be 0" if self.lora_dropout else "use_dora must be false" if self.use_dora
               else f"init_lora_weights={self.init_lora_weights!r} applies to linear layers only"
               if inits.is_structured(self.init_lora_weights) else None)
        if why:
            raise ValueError(f"LoraConfig.target_parameters is set, so {why} (an expert weight's update "
                             f"is added to the weight itself, as in PEFT); change it or drop target_parameters")

    # -- per-module values -------------------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        """Rank of the module ``module_name``: ``rank_pattern`` overrides ``r``."""
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling(self, rank: int, alpha: float) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    # -- serialisation -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` payload, readable by ``peft.LoraConfig.from_pretrained``."""
        d = self.to_dict()
        d["inference_mode"] = True
        d.update(peft_type="LORA", revision=None, **UNSUPPORTED_WHEN_SET)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        """Build from a dict (e.g. PEFT's ``adapter_config.json``), ignoring PEFT-only bookkeeping keys
        but refusing PEFT features that lorakit does not implement."""
        peft_type = d.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"adapter config has peft_type={peft_type!r}; lorakit loads LoRA adapters only")
        for key, default in UNSUPPORTED_WHEN_SET.items():
            if d.get(key, default) not in (default, {}, []):
                raise ValueError(f"adapter config sets {key}={d[key]!r}, which lorakit does not support")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        for key in ("rank_pattern", "alpha_pattern"):
            if kwargs.get(key) is None:
                kwargs[key] = {}
        return cls(**kwargs)


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """The first pattern matching ``module_name`` as a whole name or as a trailing ``.``-suffix."""
    for pattern in patterns:
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module_name):
            return pattern
    return None
