"""A merged model as one GGUF file, the format llama.cpp, Ollama and LM Studio run.

``lorakit merge --out model.gguf`` writes the merged weights (``lorakit.export``) straight to GGUF
instead of a Hugging Face directory, so a fine-tune reaches llama.cpp without its conversion
script. What goes in:

* the architecture's hyper-parameters under llama.cpp's keys (``llama.block_count``, …);
* every weight under its GGUF name (``blk.3.attn_q.weight``; the ``gguf`` package's name map),
  1-D tensors (norms, biases) in F32 and matrices in the chosen type: F32, F16, BF16, or the
  block quantizations Q8_0 / Q4_0 (a row whose length is not a multiple of the 32-wide block
  falls back to F16);
* for the ``llama`` architecture the rows of ``q_proj`` and ``k_proj`` interleaved per head
  (``rope_interleave``): transformers rotates the dimension pairs (i, i + d/2) of each head,
  ggml's rope the adjacent pairs (2i, 2i + 1);
* the tokenizer: a byte-level BPE vocabulary (``tokenizer.ggml.model = gpt2``) with its merges,
  token types, special token ids and chat template. llama.cpp also needs the pre-tokenizer's
  name (``tokenizer.ggml.pre``), which selects its text-splitting regexes: given (``--tokenizer-pre``),
  taken from the GGUF file the base came from (the embedded model), or detected from the Hugging Face
  tokenizer's own splitting steps (``detect_pre_tokenizer``: GPT-2, SmolLM, Llama 3 and Qwen2 splits);
* rope: the base frequency, and ``linear``, ``yarn`` (default β) or Llama 3.1's ``llama3`` scaling; the
  last as ``rope_freqs.weight``, the per-frequency divisors llama.cpp's llama architecture reads.

The output head is left out when it is tied to the embeddings (llama.cpp reuses
``token_embd.weight``). The file is written under a temporary name and renamed when complete.

``write_gguf_adapter`` writes a LoRA adapter on its own as llama.cpp's adapter GGUF (``llama-cli
--lora``, ``llama-server`` with per-request adapter scales, Ollama's ``ADAPTER``), for a base GGUF
of the same model: ``blk.N.attn_q.weight.lora_a`` holds A (r × in) and ``….lora_b`` holds B
(out × r), ``adapter.lora.alpha`` the α that llama.cpp divides by each B's r; B's rows take the
base's q/k reordering. Where the scale is not one α/r for every module (rank or alpha patterns,
rsLoRA), each B carries its own s·r and α is written as 1, which llama.cpp scales back to s.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.io import PREFIX, atomic_write, read_adapter

# Hugging Face model_type → GGUF architecture (llama.cpp runs Mistral's dense models as llama)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
INTERLEAVED = {"llama"}  # GGUF architectures whose q/k rows llama.cpp stores per rope pair
TYPES = ("fp32", "fp16", "bf16", "q8_0", "q4_0")
# pre-tokenizer names llama.cpp knows, for the error message (its list is longer)
KNOWN_PRE = ("smollm", "llama-bpe", "qwen2", "gpt-2", "deepseek-llm", "olmo", "tekken")
# The text splits of the Hugging Face tokenizers whose llama.cpp name is known: each name selects the
# same splitting regexes inside llama.cpp. GPT-2's regex is the ByteLevel step's own (use_regex).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
PRE_TOKENIZERS = {
    ("gpt-2 regex",): "gpt-2",
    ("single digits", "gpt-2 regex"): "smollm",
    (LLAMA3_SPLIT,): "llama-bpe",
    (QWEN2_SPLIT,): "qwen2",
}


class GgufExportError(LorakitError, ValueError):
    """A model or tokenizer this exporter cannot write to GGUF (message says what to do instead)."""


@dataclass
class GgufReport:
    path: Path
    architecture: str
    tensors: int
    types: dict[str, int]  # GGML type name → number of tensors
    bytes: int


def rope_interleave(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a (n_heads·d, …) q or k projection from transformers' rope layout to ggml's.

    Within each head, transformers pairs row i with row i + d/2; ggml pairs rows 2i and 2i + 1.
    Row h·d + 2i + j of the result is row h·d + j·d/2 + i of ``weight`` (j ∈ {0, 1}, i < d/2).
    """
    d = weight.shape[0] // n_heads
    return weight.reshape(n_heads, 2, d // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _qtype(kind: str) -> Any:
    from gguf import GGMLQuantizationType as Q

    return {"fp32": Q.F32, "fp16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[kind]


def _file_type(kind: str) -> Any:
    from gguf import LlamaFileType as F

    return {"fp32": F.ALL_F32, "fp16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0}[kind]


def source_pre_tokenizer(gguf_file: Path | None) -> str | None:
    """``tokenizer.ggml.pre`` of the GGUF file a base model was loaded from, if any."""
    if gguf_file is None:
        return None
    from gguf import GGUFReader

    field = GGUFReader(gguf_file).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def _encode(tensor: torch.Tensor, kind: str) -> tuple[np.ndarray, Any]:
    """(array to write, GGML type) for one tensor: 1-D in F32, matrices in ``kind`` where its blocks fit."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    qtype = _qtype(kind) if array.ndim > 1 else GGMLQuantizationType.F32
    blocks = qtype in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0)
    if blocks and array.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        qtype = GGMLQuantizationType.F16
    if qtype == GGMLQuantizationType.F32:
        return array, qtype
    if qtype == GGMLQuantizationType.F16:
        return array.astype(np.float16), qtype
    return quants.quantize(array, qtype), qtype


def _tokenizer_fields(tokenizer: Any, spec: dict[str, Any], n_vocab: int) -> dict[str, Any]:
    """The GGUF tokenizer metadata of a byte-level BPE ``tokenizer`` (transformers fast tokenizer;
    ``spec``: its ``_spec``)."""
    from gguf import TokenType

    model = spec.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))
    if model.get("type") != "BPE" or not byte_level:
        raise GgufExportError(
            "GGUF export writes byte-level BPE tokenizers (SmolLM, Llama 3, Qwen, GPT-2); this one is "
            f"{model.get('type') or type(tokenizer).__name__}. Merge to a directory (lorakit merge --out DIR) "
            f"and convert it with llama.cpp's convert_hf_to_gguf.py")
    size = len(tokenizer)
    if size > n_vocab:
        raise GgufExportError(f"the tokenizer has {size} tokens but the model's embeddings only {n_vocab} rows")
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    types = [TokenType.NORMAL] * size
    for i, token in tokenizer.added_tokens_decoder.items():
        types[i] = TokenType.CONTROL if token.special else TokenType.USER_DEFINED
    tokens += [f"[PAD{i}]" for i in range(size, n_vocab)]  # embedding rows past the tokenizer (padded vocab)
    types += [TokenType.UNUSED] * (n_vocab - size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    byte_levels = [p for p in _components(spec.get("pre_tokenizer")) if p.get("type") == "ByteLevel"]
    probe = tokenizer("a")["input_ids"]
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    return {"tokens": tokens, "types": [int(t) for t in types], "merges": merges, "special": special,
            "add_bos": bool(probe) and special["bos"] is not None and probe[0] == special["bos"],
            "add_space_prefix": any(p.get("add_prefix_space", False) for p in byte_levels),
            "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None}


def _components(node: dict | None) -> list[dict]:
    """A tokenizers pipeline step and, for a Sequence, its steps, flattened."""
    if not node:
        return []
    return [node] + [c for step in node.get("pretokenizers", []) for c in _components(step)]


def _splits(pre_tokenizer: dict | None) -> tuple[str, ...]:
    """The text-splitting steps of a tokenizers pre-tokenizer, in order: a Split's regex, ``single digits``
    (Digits), ``gpt-2 regex`` (ByteLevel with use_regex); ByteLevel's byte mapping alone splits nothing."""
    steps = []
    for step in _components(pre_tokenizer):
        kind = step.get("type")
        if kind == "Sequence" or (kind == "ByteLevel" and not step.get("use_regex", True)):
            continue
        if kind == "ByteLevel":
            steps.append("gpt-2 regex")
        elif kind == "Digits":
            steps.append("single digits" if step.get("individual_digits") else "digit runs")
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            steps.append(str((step.get("pattern") or {}).get("Regex")))
        else:
            steps.append(json.dumps(step, sort_keys=True))  # matches no known name
    return tuple(steps)


def _spec(tokenizer: Any) -> dict[str, Any]:
    """A transformers fast tokenizer's ``tokenizer.json`` as a dict ({} for a slow one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def detect_pre_tokenizer(tokenizer: Any, spec: dict[str, Any] | None = None) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a Hugging Face fast tokenizer (``spec``: its
    ``_spec``, when already read), from how its pre-tokenizer splits text (``PRE_TOKENIZERS``); None
    when it splits in a way not listed there, or is not a fast tokenizer."""
    spec = _spec(tokenizer) if spec is None else spec
    return PRE_TOKENIZERS.get(_splits(spec.get("pre_tokenizer"))) if spec else None


def _rope_parameters(config: Any) -> dict[str, Any]:
    """The config's rope settings as one dict (transformers ≥ 5 ``rope_parameters``, earlier ``rope_scaling``
    plus ``rope_theta``), with ``rope_type`` always set."""
    params = {"rope_theta": getattr(config, "rope_theta", None)}
    params.update(getattr(config, "rope_scaling", None) or {})
    params.update(getattr(config, "rope_parameters", None) or {})
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if params["rope_theta"] is None:
        params["rope_theta"] = 10000.0
    return params


def llama3_rope_factors(params: dict[str, Any], head_dim: int) -> torch.Tensor:
    """The (head_dim/2,) divisors of the rope frequencies under Llama 3.1's ``llama3`` rope scaling.

    With θ_i = base^(−2i/d) and wavelength λ_i = 2π/θ_i, against the original context L (``original_
    max_position_embeddings``), factor f and the low/high frequency factors l, h: frequencies with λ_i < L/h
    are kept (divisor 1), those with λ_i > L/l are divided by f, and in between the divisor is
    1 / ((1 − t)/f + t) with t = (L/λ_i − l)/(h − l). ggml's rope divides θ_i by this tensor
    (``rope_freqs.weight``), which is how llama.cpp runs these models.
    """
    base, factor = float(params["rope_theta"]), float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    context = float(params["original_max_position_embeddings"])
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelength = 2 * torch.pi / theta
    t = ((context / wavelength - low) / (high - low)).clamp(0, 1)
    divisor = 1 / ((1 - t) / factor + t)
    divisor = torch.where(wavelength < context / high, 1.0, divisor)
    divisor = torch.where(wavelength > context / low, factor, divisor)
    return divisor.float()


# YaRN settings llama.cpp's defaults reproduce (measured against transformers; other values are refused)
YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0}
YARN_UNSUPPORTED = ("attention_factor", "mscale", "mscale_all_dim")


def _add_rope(writer: Any, config: Any, arch: str, head_dim: int) -> torch.Tensor | None:
    """Write the rope keys; return the ``rope_freqs.weight`` tensor a ``llama3``-scaled model needs.

    Plain rope, ``linear`` scaling (positions divided by the factor) and ``yarn`` (with its default
    β_fast = 32, β_slow = 1 and attention scale 0.1·ln(factor) + 1, as Qwen2.5 documents it) are keys every
    architecture reads; ``llama3`` scaling is the per-frequency divisors llama.cpp's llama architecture
    loads. Anything else is refused.
    """
    from gguf import RopeScalingType

    params = _rope_parameters(config)
    rope_type = params["rope_type"]
    custom_yarn = [k for k in YARN_UNSUPPORTED if params.get(k) is not None] + [
        k for k, v in YARN_DEFAULTS.items() if params.get(k, v) != v]
    if rope_type == "yarn" and custom_yarn:
        raise GgufExportError(f"GGUF export writes yarn rope with its default settings; this model sets "
                              f"{', '.join(custom_yarn)}. Merge to a directory and convert it with llama.cpp's "
                              f"convert_hf_to_gguf.py")
    if not (rope_type in ("default", "linear", "yarn") or (rope_type == "llama3" and arch == "llama")):
        raise GgufExportError(f"GGUF export writes plain, linear, yarn and (for Llama) llama3 rope; this {arch} "
                              f"model has rope_type {rope_type!r}. Merge to a directory and convert it with "
                              f"llama.cpp's convert_hf_to_gguf.py")
    writer.add_rope_freq_base(float(params["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    if rope_type in ("linear", "yarn"):
        writer.add_rope_scaling_type(RopeScalingType.LINEAR if rope_type == "linear" else RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(params["factor"]))
    if rope_type == "yarn":
        original = params.get("original_max_position_embeddings") or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
    return llama3_rope_factors(params, head_dim) if rope_type == "llama3" else None


def _save(writer: Any, path: Path) -> None:
    """Write out what ``writer`` holds to ``path``, atomically."""
    def write(tmp: Path) -> None:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def _add_tensor(writer: Any, name: str, tensor: torch.Tensor, dtype: str, types: Counter[str]) -> None:
    """Add one tensor in ``dtype`` (``_encode``), counting its GGML type in ``types``."""
    array, qtype = _encode(tensor, dtype)
    writer.add_tensor(name, array, raw_dtype=qtype)
    types[qtype.name] += 1


def _ggml_rows(module: str, tensor: torch.Tensor, arch: str, config: Any) -> torch.Tensor:
    """``tensor``, whose rows are ``module``'s outputs, in llama.cpp's row order: the q and k
    projections of the INTERLEAVED architectures reordered per head for ggml's rope."""
    leaf = module.rsplit(".", 1)[-1]
    if arch not in INTERLEAVED or leaf not in ("q_proj", "k_proj"):
        return tensor
    n_heads, n_kv = _heads(config)
    return rope_interleave(tensor, n_heads if leaf == "q_proj" else n_kv)


def _architecture(config: Any) -> str:
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise GgufExportError(f"GGUF export writes {', '.join(sorted(ARCHITECTURES))} models; this one is "
                              f"{model_type!r}. Merge to a directory (lorakit merge --out DIR) and convert it with "
                              f"llama.cpp's convert_hf_to_gguf.py")
    return arch


def _heads(config: Any) -> tuple[int, int]:
    """(attention heads, key/value heads)."""
    return config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads


def write_gguf(model: nn.Module, tokenizer: Any, path: str | Path, *, dtype: str = "fp16",
               tokenizer_pre: str | None = None, name: str | None = None) -> GgufReport:
    """Write a plain (merged) causal LM and its tokenizer to one GGUF file at ``path``.

    ``dtype``: the matrices' type (``fp32``, ``fp16``, ``bf16``, ``q8_0``, ``q4_0``); ``tokenizer_pre``:
    llama.cpp's name for the tokenizer's pre-tokenizer (``smollm``, ``llama-bpe``, ``qwen2`` …).
    """
    import gguf

    if dtype not in TYPES:
        raise GgufExportError(f"GGUF --dtype must be one of {', '.join(TYPES)}; got {dtype!r}")
    config = model.config
    arch = _architecture(config)
    spec = _spec(tokenizer)
    tokenizer_pre = tokenizer_pre or detect_pre_tokenizer(tokenizer, spec)
    if not tokenizer_pre:
        raise GgufExportError(f"GGUF export needs llama.cpp's name for this tokenizer's pre-tokenizer, which splits "
                              f"text in a way lorakit does not know (it knows {', '.join(PRE_TOKENIZERS.values())}): "
                              f"give --tokenizer-pre NAME (llama.cpp's names include {', '.join(KNOWN_PRE)})")
    n_heads, n_kv = _heads(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    n_vocab = model.get_input_embeddings().weight.shape[0]
    fields = _tokenizer_fields(tokenizer, spec, n_vocab)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)

    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(name or Path(str(getattr(config, "_name_or_path", "") or "model")).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope_freqs = _add_rope(writer, config, arch, head_dim)
    if head_dim != config.hidden_size // n_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(_file_type(dtype))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    for key, value in fields["special"].items():
        if value is not None:
            getattr(writer, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
                             "pad": "add_pad_token_id"}[key])(value)
    writer.add_add_bos_token(fields["add_bos"])
    writer.add_add_space_prefix(fields["add_space_prefix"])
    if fields["chat_template"]:
        writer.add_chat_template(fields["chat_template"])
    types: Counter[str] = Counter()
    if rope_freqs is not None:
        _add_tensor(writer, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_freqs, dtype, types)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and tied:
            continue
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GgufExportError(f"{key} has no GGUF name for architecture {arch}; "
                                  f"convert the merged directory with llama.cpp's convert_hf_to_gguf.py")
        _add_tensor(writer, gguf_name, _ggml_rows(key.rsplit(".", 1)[0], tensor, arch, config), dtype, types)
    path = Path(path)
    _save(writer, path)
    return GgufReport(path, arch, sum(types.values()), dict(types), path.stat().st_size)


ADAPTER_TYPES = ("fp32", "fp16", "bf16")


def write_gguf_adapter(directory: str | Path, base_config: Any, path: str | Path, *, dtype: str = "fp16",
                       name: str | None = None) -> GgufReport:
    """Write the LoRA adapter in ``directory`` (PEFT format) as a llama.cpp adapter GGUF at ``path``.

    ``base_config``: the base model's transformers config (architecture, heads, layer count).
    Adapters llama.cpp cannot apply as A and B pairs on linear weights are refused by name: DoRA,
    ``modules_to_save``, trained biases, embedding adapters.
    """
    import gguf

    if dtype not in ADAPTER_TYPES:
        raise GgufExportError(f"an adapter GGUF's --dtype must be one of {', '.join(ADAPTER_TYPES)}; got {dtype!r}")
    config, tensors = read_adapter(directory)
    arch = _architecture(base_config)
    refusals = [(config.use_dora, "is a DoRA adapter (llama.cpp applies plain B·A products only)"),
                (bool(config.modules_to_save), f"trains modules_to_save {config.modules_to_save} in full"),
                (config.bias != "none", f"trains biases (bias={config.bias!r})")]
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, _, leaf = key.removeprefix(PREFIX).rpartition(".lora_")
        if leaf not in ("A.weight", "B.weight"):
            refusals.append((True, f"has {key.removeprefix(PREFIX)} (an embedding adapter or a module trained in "
                                   f"full), which llama.cpp's adapter format does not hold"))
            break
        pairs.setdefault(module, {})[leaf[0]] = value
    for refused, why in refusals:
        if refused:
            raise GgufExportError(f"{directory} {why}; merge it instead: lorakit merge --adapter {directory} "
                                  f"--out model.gguf")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], base_config.num_hidden_layers)
    scales = {m: (config.rank_for(m), config.scaling(config.rank_for(m), config.alpha_for(m))) for m in pairs}
    uniform = not config.use_rslora and len({(r, config.alpha_for(m)) for m, (r, _) in scales.items()}) == 1
    alpha = float(config.alpha_for(next(iter(pairs)))) if uniform else 1.0  # 1: each B carries s·r

    writer = gguf.GGUFWriter(None, arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    writer.add_name(name or Path(directory).name)
    types: Counter[str] = Counter()
    for module in sorted(pairs):
        a, b = pairs[module]["A"].float(), pairs[module]["B"].float()
        gguf_name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise GgufExportError(f"{module} has no GGUF name for architecture {arch}")
        rank, scale = scales[module]
        if not uniform:
            b = b * (scale * rank)  # llama.cpp multiplies by α / r = 1 / r
        _add_tensor(writer, f"{gguf_name}.lora_a", a, dtype, types)
        _add_tensor(writer, f"{gguf_name}.lora_b", _ggml_rows(module, b, arch, base_config), dtype, types)
    path = Path(path)
    _save(writer, path)
    return GgufReport(path, arch, sum(types.values()), dict(types), path.stat().st_size)
