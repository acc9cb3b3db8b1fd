"""What a training step keeps for its backward pass, lorakit vs PEFT, counted tensor by tensor.

Peak training memory is the weights, the adapters' optimizer state, and what autograd keeps
between forward and backward (plus short-lived workspace). The last part does not depend on the
device, so it can be counted on a CPU: every tensor saved for backward during one forward is
recorded once per storage (model parameters excluded), for the same batch on both sides.

The model is Llama-shaped at ``--shape`` (``1b``: the random 1.2 B Llama of ``train_vs_peft.py
--model random-1b``, bf16 weights under bf16 autocast, as on a GPU; ``135m``: SmolLM2-135M's shape
in fp32, as on this CPU), built with 2 and 4 layers so that the per-layer cost and the fixed part
(embeddings, head, loss) separate exactly; the full depth is then extrapolated. Sides:

    PEFT       get_peft_model + the model's own forward and loss, on a right-padded batch
    lorakit    get_lora_model + the trainer's path: padding-free rows, shared prefix, fused LoRA
               linear / SwiGLU / RMSNorm nodes, head and cross-entropy at supervised positions only
    lorakit, padded   the same kernels on PEFT's padded batch (what each kernel saves, on its own)
    lorakit + checkpointing   lorakit with ``train.gradient_checkpointing`` (each layer's input kept,
               the layer recomputed in backward: about a third more compute)

    python benchmarks/saved_memory.py [--shape 1b] [--batch 8] [--no-save]

Prints saved MiB per layer and in all, the predicted peak (weights + adapter, gradient and AdamW
state + saved tensors; workspace not included) and lorakit / PEFT, and appends the table to
benchmarks/RESULTS.md. A GPU run of ``train_vs_peft.py`` measures the real peak.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch

from results import LLAMA_SIZES, hf_batch

SHAPES = {
    "1b": ({**LLAMA_SIZES["1b"], "tie_word_embeddings": False}, torch.bfloat16),
    "135m": (dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, tie_word_embeddings=True), torch.float32),
}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def saved_bytes(fn: Callable[[], Any], exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs, less those in ``exclude``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def measure(side: str, layers: int, shape: str, rows: list[Any], pad: int, vocab: int) -> int:
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit
    from lorakit.attention import padding_free
    from lorakit.collate import collate, collate_flat
    from lorakit.loss import causal_lm_loss
    from lorakit.mlp import fused_mlp
    from lorakit.models import enable_checkpointing
    from lorakit.norm import fused_norms

    size, dtype = SHAPES[shape]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **{**size, "num_hidden_layers": layers})).to(dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    if side == "PEFT":
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **LORA))
        model.train()
        batch = hf_batch(collate(rows, pad))
        with autocast:
            return saved_bytes(lambda: model(**batch).loss, params)
    lorakit.get_lora_model(model, lorakit.LoraConfig(**LORA))
    model.train()
    if side.endswith("checkpointing"):
        enable_checkpointing(model)
    flat = side != "lorakit, padded"
    batch = collate_flat(rows) if flat else collate(rows, pad)
    with padding_free(model) if flat else contextlib.nullcontext(), fused_mlp(model), fused_norms(model), autocast:
        return saved_bytes(lambda: causal_lm_loss(model, batch), params)


def model_state_bytes(shape: str, vocab: int) -> tuple[int, int]:
    """(bytes of the full model's weights in its dtype, bytes of its LoRA adapters' fp32 values,
    gradients and AdamW moments), counted on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit

    size, dtype = SHAPES[shape]
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **size)).to(dtype)
        weights = sum(p.numel() for p in model.parameters()) * dtype.itemsize
        lorakit.get_lora_model(model, lorakit.LoraConfig(**LORA))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return weights, trainable * 4 * 4  # value, gradient, exp_avg, exp_avg_sq


def main() -> None:
    from pathlib import Path

    from lorakit.data import DataOptions, load_examples
    from lorakit.models import resolve_model_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=list(SHAPES), default="1b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m-instruct")[0])
    data = Path(__file__).parent.parent / "examples" / "extract" / "train.jsonl"
    rows = [[e] for e in load_examples(data, tok, DataOptions(max_seq_len=256))[: args.batch]]
    size, dtype = SHAPES[args.shape]
    depth = size["num_hidden_layers"]
    weights, adapter_state = model_state_bytes(args.shape, len(tok))
    table = []
    for side in ("PEFT", "lorakit, padded", "lorakit", "lorakit + checkpointing"):
        two, four = (measure(side, n, args.shape, rows, tok.pad_token_id, len(tok)) for n in (2, 4))
        per_layer, fixed = (four - two) / 2, two - (four - two)
        saved = fixed + depth * per_layer
        table.append((side, per_layer, fixed, saved, weights + adapter_state + saved))
    mib, gib = 2**20, 2**30
    peft_peak, peft_saved = table[0][4], table[0][3]
    real = sum(len(e.input_ids) for r in rows for e in r)
    lines = [f"## saved_memory.py — {time.strftime('%Y-%m-%d')}, {args.shape} Llama shape, "
             f"{'bf16 weights, bf16 autocast' if dtype == torch.bfloat16 else 'fp32'}, torch {torch.__version__}", "",
             f"`python benchmarks/saved_memory.py --shape {args.shape}{f' --batch {args.batch}' if args.batch != 8 else ''}`: one forward of a batch of {args.batch} "
             f"bundled rows ({real} real tokens), r=16 on all linear layers; tensors saved for backward counted "
             f"once per storage (weights excluded) at 2 and 4 layers, extrapolated to {depth}. Predicted peak = "
             f"weights ({weights / gib:.2f} GiB) + adapters with gradients and AdamW state "
             f"({adapter_state / gib:.2f} GiB) + saved tensors; backward workspace not counted.", "",
             "| side | saved MiB / layer | fixed MiB | saved, all layers | predicted peak | saved / PEFT | peak / PEFT |",
             "|---|---|---|---|---|---|---|"]
    for side, per_layer, fixed, saved, peak in table:
        lines.append(f"| {side} | {per_layer / mib:.1f} | {fixed / mib:.1f} | {saved / gib:.2f} GiB | "
                     f"{peak / gib:.2f} GiB | {saved / peft_saved:.2f}× | {peak / peft_peak:.2f}× |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_save:
        from results import append_entry

        append_entry(text)


if __name__ == "__main__":
    main()
