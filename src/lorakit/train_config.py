"""The training run's configuration: YAML + ``key=value`` overrides → typed, validated sections.

    model:  {name: smollm2-135m-instruct}
    lora:   {r: 16, lora_alpha: 16, target_modules: all-linear}     # any LoraConfig field
    method: lora                                                     # or full (full fine-tuning)
    data:   {train: examples/extract/train.jsonl, eval: examples/extract/eval.jsonl, max_seq_len: 256}
    train:  {epochs: 1, batch_size: 16, lr: 1.0e-3}
    eval:   {steps: 50, generate: true}
    output_dir: runs/extract
    seed: 0

Unknown keys are errors that name the key and the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit.config import LoraConfig
from lorakit.data import DataOptions
from lorakit.errors import LorakitError
from lorakit.models import DEFAULT_MODEL


class ConfigError(LorakitError, ValueError):
    """A config file or override that cannot be used (message names the key)."""


@dataclass
class ModelSection:
    name: str = DEFAULT_MODEL
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: float32 on cpu, bfloat16 on cuda
    quantize: str | None = None  # nf4 | fp4 | int8: QLoRA on a bitsandbytes-quantized base
    double_quant: bool = True
    compute_dtype: str = "auto"  # dtype of 4-bit matmuls: auto = the model dtype
    blocksize: int = 64
    # an adapter directory to start from (axolotl's lora_model_dir): method lora trains it further (its
    # adapter_config.json sets the LoRA; only lora.lora_dropout may be given), method full merges it into the
    # weights first; e.g. DPO from an SFT adapter, whose model is then also the reference
    adapter: str | None = None


@dataclass
class DataSection:
    train: str = ""
    eval: str | None = None
    eval_fraction: float = 0.0
    max_seq_len: int = 512
    overlong: str = "truncate"  # or drop
    packing: bool = False
    # auto | true | false: flatten each micro-batch into one row of real tokens (no padding), with
    # attention kept per example (lorakit.attention); auto = on for models that support it
    padding_free: bool | str = "auto"
    train_on_inputs: bool = False
    chat_template: bool | str = "auto"
    system_prompt: str | None = None


@dataclass
class TrainSection:
    epochs: int = 1
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 16  # rows per micro-batch; the demo measured 16 as good as 8 and 8% faster (README)
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.05
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    max_grad_norm: float = 1.0
    # LoRA+: B matrices (and 1-D parameters) at this multiple of lr; 0 = off (plain LoRA). Paper: ~16
    loraplus_lr_ratio: float = 0.0
    loraplus_lr_embedding: float = 1e-6  # LoRA+: the lr of an embedding's adapter (PEFT's default)
    neftune_noise_alpha: float = 0.0  # NEFTune: uniform noise α/√(L·d) on input embeddings; 0 = off (paper: 5)
    gradient_checkpointing: bool = False
    # auto | true | false: matmuls under bf16 autocast (weights and adapters stay in their dtype);
    # auto = on a GPU only (on CPUs with native bf16, true is ~1.4x faster; see lorakit.train)
    bf16: bool | str = "auto"
    logging_steps: int = 1
    save_steps: int = 0  # 0: only at each epoch end
    save_total_limit: int = 2
    resume: str = "auto"  # auto | never | path to a checkpoint directory
    tensorboard: bool = False
    distributed: str = "auto"  # auto | none | ddp | fsdp; auto = ddp when started by torchrun with >1 process


@dataclass
class EvalSection:
    steps: int = 0  # 0: only at the end
    generate: bool = False
    max_new_tokens: int = 64
    batch_size: int = 16
    max_examples: int = 0  # 0: all


@dataclass
class DpoSection:
    # objective: dpo — see lorakit.preference for the losses
    beta: float = 0.1  # how far the policy may move from the reference (TRL's default)
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo (IPO)
    label_smoothing: float = 0.0  # sigmoid only: the assumed fraction of flipped labels (conservative DPO)
    rpo_alpha: float = 0.0  # + α × the chosen answer's per-token NLL (RPO; TRL's name); 0 = off, paper: 1


@dataclass
class OrpoSection:
    # objective: orpo — lorakit.preference.orpo_loss
    beta: float = 0.1  # the weight of the log-odds-ratio term (the paper's λ; TRL's beta)


@dataclass
class SimpoSection:
    # objective: simpo — lorakit.preference.simpo_loss; defaults from the paper (γ/β = 0.5)
    beta: float = 2.0  # scale of the length-normalised reward
    gamma: float = 1.0  # target reward margin (TRL's simpo_gamma)
    label_smoothing: float = 0.0
    cpo_alpha: float = 0.0  # + α × the chosen answer's per-token NLL (CPO-SimPO; TRL's name)


@dataclass
class KtoSection:
    # objective: kto — lorakit.preference.kto_loss; answers judged one at a time (TRL's defaults)
    beta: float = 0.1
    desirable_weight: float = 1.0  # λ_D; TRL advises λ_D·n_desirable / (λ_U·n_undesirable) in [1, 4/3]
    undesirable_weight: float = 1.0  # λ_U


@dataclass
class RouterSection:
    # method: router — adapter name → adapter directory; the router learns per-token weights over them
    adapters: dict[str, str] = field(default_factory=dict)


# What a run learns from: answers (sft), preference pairs (dpo, orpo, simpo) or judged answers (kto)
OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "kto")

# The LoRA fields a run may change when it continues an adapter (model.adapter): the rest shape the adapter.
ADAPTER_OVERRIDES = ("lora_dropout",)

# The default LoRA recipe; chosen by the sweep recorded in the README.
DEFAULT_LORA: dict[str, Any] = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_LORA))
    method: str = "lora"  # lora | full | router: what trains
    objective: str = "sft"  # sft (next-token loss on answers) | dpo | orpo | simpo (preference pairs) | kto (judged answers)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    router: RouterSection = field(default_factory=RouterSection)
    dpo: DpoSection = field(default_factory=DpoSection)
    orpo: OrpoSection = field(default_factory=OrpoSection)
    simpo: SimpoSection = field(default_factory=SimpoSection)
    kto: KtoSection = field(default_factory=KtoSection)
    output_dir: str = "runs/lorakit"
    seed: int = 0

    def lora_config(self) -> LoraConfig:
        """The adapter this run trains: the ``lora`` section, or ``model.adapter``'s own config."""
        if self.model.adapter is None:
            return LoraConfig(**self.lora)
        from lorakit.inits import mutates_base
        from lorakit.io import AdapterLoadError, read_adapter_config

        try:
            config = read_adapter_config(self.model.adapter)
        except AdapterLoadError as err:
            raise ConfigError(f"model.adapter: {err}") from None
        if mutates_base(config.init_lora_weights):
            raise ConfigError(f"model.adapter: {self.model.adapter} was saved with init_lora_weights="
                              f"{config.init_lora_weights!r} and needs the residual base it was trained on; save it "
                              f"as a plain LoRA first (lorakit's final adapters are, its checkpoints are not)")
        extra = {k: v for k, v in self.lora.items() if k in ADAPTER_OVERRIDES}
        return dataclasses.replace(config, inference_mode=False, **extra)

    def data_options(self) -> DataOptions:
        d = self.data
        return DataOptions(max_seq_len=d.max_seq_len, overlong=d.overlong, train_on_inputs=d.train_on_inputs,
                           chat_template=d.chat_template, system_prompt=d.system_prompt)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that shapes the run's trajectory (not logging, eval or resume settings)."""
        d = self.to_dict()
        for key in ("logging_steps", "save_steps", "save_total_limit", "resume", "tensorboard", "max_steps", "epochs",
                    "distributed"):
            d["train"].pop(key)
        d.pop("eval")
        d.pop("output_dir")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def validate(self) -> None:
        if self.method not in ("lora", "full", "router"):
            raise ConfigError(f"method must be 'lora', 'full' or 'router', got {self.method!r}")
        if self.method == "router" and len(self.router.adapters) < 2:
            raise ConfigError("method: router needs router.adapters: a mapping of at least two adapter names to "
                              "their directories")
        if self.objective not in OBJECTIVES:
            names = ", ".join(f"'{o}'" for o in OBJECTIVES[:-1])
            raise ConfigError(f"objective must be {names} or '{OBJECTIVES[-1]}', got {self.objective!r}")
        if self.objective != "sft":
            self._validate_preference()
        if not self.data.train:
            raise ConfigError("data.train is not set: give a .jsonl/.json/.csv/.parquet file or a directory")
        t = self.train
        checks = [
            (t.lr > 0, "train.lr must be > 0"),
            (t.batch_size >= 1, "train.batch_size must be >= 1"),
            (t.grad_accum >= 1, "train.grad_accum must be >= 1"),
            (t.epochs >= 1 or t.max_steps > 0, "train.epochs must be >= 1 (or set train.max_steps)"),
            (t.schedule in ("cosine", "linear", "constant"), "train.schedule must be cosine, linear or constant"),
            (0 <= t.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)"),
            (len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas must be two numbers in [0, 1)"),
            (self.data.overlong in ("truncate", "drop"), "data.overlong must be truncate or drop"),
            (self.data.max_seq_len >= 8, "data.max_seq_len must be >= 8"),
            (0 <= self.data.eval_fraction < 1, "data.eval_fraction must be in [0, 1)"),
            (self.data.padding_free in (True, False, "auto"), "data.padding_free must be auto, true or false"),
            (t.bf16 in (True, False, "auto"), "train.bf16 must be auto, true or false"),
            (t.loraplus_lr_ratio >= 0, "train.loraplus_lr_ratio must be >= 0 (0 turns LoRA+ off; the paper uses ~16)"),
            (t.loraplus_lr_ratio == 0 or self.method == "lora",
             "train.loraplus_lr_ratio applies to method: lora (LoRA+ gives the adapters' B matrices their own lr)"),
            (t.loraplus_lr_embedding > 0, "train.loraplus_lr_embedding must be > 0"),
            (t.neftune_noise_alpha >= 0, "train.neftune_noise_alpha must be >= 0 (0 turns NEFTune off; the paper uses 5)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.model.adapter is not None and self.method == "router":
            raise ConfigError("model.adapter: method router takes its adapters from router.adapters")
        if self.method == "lora" or self.model.adapter is not None:
            self.lora_config()  # LoraConfig validates itself; model.adapter's is read (method full merges it)
        if self.model.quantize is not None:
            if self.model.quantize not in ("nf4", "fp4", "int8"):
                raise ConfigError(f"model.quantize must be nf4, fp4 or int8; got {self.model.quantize!r}")
            if self.method != "lora":
                raise ConfigError("model.quantize needs method: lora (a quantized base cannot be fully fine-tuned)")


    def _validate_preference(self) -> None:
        d, o, m, k, name = self.dpo, self.orpo, self.simpo, self.kto, self.objective
        checks = {  # the objective's own section only
            "dpo": [
                (d.beta > 0, f"dpo.beta must be > 0, got {d.beta}"),
                (d.loss_type in ("sigmoid", "ipo"), f"dpo.loss_type must be sigmoid or ipo, got {d.loss_type!r}"),
                (0 <= d.label_smoothing < 0.5, f"dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}"),
                (d.label_smoothing == 0 or d.loss_type == "sigmoid", "dpo.label_smoothing applies to loss_type: sigmoid"),
                (d.rpo_alpha >= 0, f"dpo.rpo_alpha must be >= 0 (0 turns the likelihood term off), got {d.rpo_alpha}"),
            ],
            "orpo": [(o.beta > 0, f"orpo.beta must be > 0, got {o.beta}")],
            "simpo": [
                (m.beta > 0, f"simpo.beta must be > 0, got {m.beta}"),
                (m.gamma >= 0, f"simpo.gamma must be >= 0 (the target margin), got {m.gamma}"),
                (0 <= m.label_smoothing < 0.5, f"simpo.label_smoothing must be in [0, 0.5), got {m.label_smoothing}"),
                (m.cpo_alpha >= 0, f"simpo.cpo_alpha must be >= 0 (0 turns the likelihood term off), got {m.cpo_alpha}"),
            ],
            "kto": [
                (k.beta > 0, f"kto.beta must be > 0, got {k.beta}"),
                (k.desirable_weight > 0 and k.undesirable_weight > 0,
                 f"kto.desirable_weight and kto.undesirable_weight must be > 0, got {k.desirable_weight} and "
                 f"{k.undesirable_weight}"),
            ],
        }[name] + [
            (not self.data.packing, f"data.packing: objective {name} keeps each answer in its own row (padding-free "
                                    f"batches already skip the padding); set data.packing=false"),
            (not self.data.train_on_inputs, f"data.train_on_inputs: {name} compares the answers given the prompt; "
                                            f"set data.train_on_inputs=false"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection, "eval": EvalSection,
            "router": RouterSection, "dpo": DpoSection, "orpo": OrpoSection, "simpo": SimpoSection,
            "kto": KtoSection}
SCALARS = ("method", "objective", "output_dir", "seed")


def _valid_keys() -> list[str]:
    keys = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    keys += [f"lora.{f.name}" for f in dataclasses.fields(LoraConfig)]
    return keys + list(SCALARS)


def _unknown(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, _valid_keys(), n=1, cutoff=0.5)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def set_key(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b`` in a nested dict."""
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["lora.r=16", "train.lr=1e-4"]`` → ``[("lora.r", 16), ("train.lr", 0.0001)]`` (values as YAML)."""
    out = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=1e-4)")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)
        out.append((key.strip(), value))
    return out


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_config(raw: dict[str, Any]) -> RunConfig:
    """A validated ``RunConfig`` from a nested dict; unknown keys are errors."""
    raw = dict(raw or {})
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS:
            cls = SECTIONS[key]
            names = {f.name: f for f in dataclasses.fields(cls)}
            if not isinstance(value, dict):
                raise ConfigError(f"{key!r} must be a section (a mapping), got {value!r}")
            for sub in value:
                if sub not in names:
                    raise _unknown(f"{key}.{sub}")
            kwargs[key] = cls(**{k: _coerce(names[k], v, f"{key}.{k}") for k, v in value.items()})
        elif key == "lora":
            if not isinstance(value, dict):
                raise ConfigError(f"'lora' must be a section (a mapping), got {value!r}")
            names = {f.name for f in dataclasses.fields(LoraConfig)}
            for sub in value:
                if sub not in names:
                    raise _unknown(f"lora.{sub}")
            kwargs["lora"] = value
        elif key in SCALARS:
            kwargs[key] = value
        else:
            raise _unknown(key)
    lora = kwargs.pop("lora", {})
    if kwargs.get("model") is not None and kwargs["model"].adapter is not None:
        shaping = sorted(set(lora) - set(ADAPTER_OVERRIDES))
        if shaping:
            raise ConfigError(f"model.adapter continues {kwargs['model'].adapter}, whose adapter_config.json sets "
                              f"the LoRA; remove lora.{', lora.'.join(shaping)} (only "
                              f"lora.{', lora.'.join(ADAPTER_OVERRIDES)} may change)")
        kwargs["lora"] = lora
    else:
        kwargs["lora"] = {**DEFAULT_LORA, **lora}
    config = RunConfig(**kwargs)
    config.validate()
    return config


def _coerce(f: dataclasses.Field, value: Any, key: str) -> Any:
    """YAML gives ``1e-3`` as a string; coerce numbers where the field is numeric."""
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(default, bool) or value is None:
        return value
    if isinstance(default, float) and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if isinstance(default, int) and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
        if number != int(number):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(number)
    return value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` (YAML), apply dotted overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the config must be a mapping of sections")
    for key, value in parse_overrides(overrides or []):
        set_key(raw, key, value)
    return build_config(raw)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
