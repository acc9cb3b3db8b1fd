"""Merged export: base + weighted adapters → a plain model directory that transformers loads, or
one GGUF file for llama.cpp / Ollama (``lorakit.gguf_export``).

For adapters a with weights w_a the exported weight is W + Σ_a w_a · s_a · B_a A_a (a DoRA
adapter, weight 1 only, rescales the rows as well: ``lorakit.dora``). An adapter
trained on a quantized base (recorded in its file) is merged into the *dequantized* weights of
that same quantization, never into 4-bit storage; the deviation between the unmerged (QLoRA)
model and the merged one is measured on a probe batch and reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.errors import LorakitError
from lorakit.gguf_export import GgufReport, source_pre_tokenizer, write_gguf
from lorakit.inject import adapter_configs
from lorakit.io import adapter_quantization, load_adapters
from lorakit.layers import lora_layers
from lorakit.merge import merge_and_unload
from lorakit.models import load_model, source_gguf

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GGUF_ONLY = ("q8_0", "q4_0")  # ggml block quantizations, for a .gguf output


@dataclass
class MergeReport:
    out: Path
    adapters: list[tuple[str, float]]
    quantization: dict | None
    max_abs_diff: float  # |logits(unmerged) − logits(merged)| on a probe batch, fp32
    dtype: str
    gguf: GgufReport | None = None  # set when ``out`` is a .gguf file


def parse_adapter_arg(text: str) -> tuple[str, float]:
    """``dir`` or ``dir:0.7`` → (dir, weight)."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def export_merged(model_name: str, adapters: list[tuple[str, float]], out: str | Path, *,
                  dtype: str | None = None, safe: bool = False, tokenizer_pre: str | None = None) -> MergeReport:
    """Load ``model_name``, apply the weighted adapters, merge, and save the full model to ``out``: a
    Hugging Face directory, or one GGUF file when ``out`` ends in ``.gguf`` (``tokenizer_pre``: see
    ``gguf_export.write_gguf``; by default the base's own GGUF file's). ``dtype``: fp32 for a
    directory, fp16 for a GGUF file unless given."""
    gguf = str(out).endswith(".gguf")
    dtype = dtype or ("fp16" if gguf else "fp32")  # llama.cpp's converter also writes f16 by default
    allowed = (*DTYPES, *GGUF_ONLY) if gguf else tuple(DTYPES)
    if dtype not in allowed:
        hint = f"; {', '.join(GGUF_ONLY)} are for a .gguf --out" if dtype in GGUF_ONLY else ""
        raise LorakitError(f"--dtype must be one of {', '.join(allowed)}; got {dtype!r}{hint}")
    if not adapters:
        raise LorakitError("give at least one --adapter DIR[:WEIGHT]")
    quants = {str(q) for q in (adapter_quantization(path) for path, _ in adapters)}
    if len(quants) > 1:
        raise LorakitError("the adapters were trained on differently quantized bases; merge them separately")
    quant = adapter_quantization(adapters[0][0])
    model, tokenizer = load_model(model_name, dtype=torch.float32)
    if quant:
        from lorakit.quant import quantize_model

        quantize_model(model, quant["method"], double_quant=quant["double_quant"], blocksize=quant["blocksize"])
    names = load_adapters(model, [path for path, _ in adapters])
    for name, (path, weight) in zip(names, adapters):
        if adapter_configs(model)[name].use_dora and weight != 1:
            raise LorakitError(f"{path} is a DoRA adapter: its trained magnitudes set each row's length, which a "
                               f"weight cannot scale like a LoRA delta; merge it with weight 1 (or give no :WEIGHT)")
        for _, layer in lora_layers(model):
            if name in layer.scaling:
                layer.scaling[name] *= weight
    probe = tokenizer("The quick brown fox jumps over the lazy dog. 0123456789", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        unmerged = model(probe).logits.float()
    merged = merge_and_unload(model, safe_merge=safe, adapter_names=names)
    with torch.no_grad():
        diff = float((merged(probe).logits.float() - unmerged).abs().max())
    out = Path(out)
    if gguf:
        pre = tokenizer_pre or source_pre_tokenizer(source_gguf(model_name))
        written = write_gguf(merged, tokenizer, out, dtype=dtype, tokenizer_pre=pre)
        return MergeReport(out, adapters, quant, diff, dtype, written)
    merged.to(DTYPES[dtype]).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return MergeReport(out, adapters, quant, diff, dtype)
