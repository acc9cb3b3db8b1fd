"""LoRA on MoE expert weights (``target_parameters``): lorakit vs PEFT, one training step each.

The model is a random Qwen3-MoE built from config (nothing downloaded) at the per-layer shape of
Qwen3-30B-A3B (hidden 2048, 128 experts of intermediate 768, top-8 routing) with ``--layers``
layers and a small vocabulary, so that the experts dominate as they do in the real model. The
adapter is r=16 on q/k/v/o and on both expert weights. Sides, on the same weights,
adapter values and batch:

    PEFT                       get_peft_model(target_parameters=…): the experts run on W + s·B A
    lorakit                    per routed token: x W_eᵀ + s (x A_eᵀ) B_eᵀ (``experts.TOKENWISE``)
    lorakit, adapted weights   lorakit's reference path, PEFT's way (``TOKENWISE = False``)

Prints the median time of a forward + backward step, what autograd keeps for backward (distinct
storages, parameters excluded: ``saved_memory.saved_bytes``), the loss, and the ratios against
PEFT; appends the table to benchmarks/RESULTS.md.

    python benchmarks/moe_vs_peft.py [--layers 1] [--tokens 512] [--steps 5] [--no-save]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch

from results import machine, report
from saved_memory import saved_bytes

SHAPE = dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
             num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=8192)
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def step(model: torch.nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    import transformers as T
    from peft import LoraConfig as PeftConfig
    from peft import PeftModel

    import lorakit
    import lorakit.experts

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=512, help="tokens in the batch (rows of 256)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    config = T.Qwen3MoeConfig(**SHAPE, num_hidden_layers=args.layers)
    base = T.AutoModelForCausalLM.from_config(config, experts_implementation="grouped_mm").train()
    ids = torch.randint(0, SHAPE["vocab_size"], (max(1, args.tokens // 256), min(256, args.tokens)),
                        generator=torch.Generator().manual_seed(1))
    ours = lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(
        r=16, lora_alpha=32, target_modules=LINEAR, target_parameters=EXPERTS))
    with torch.no_grad():  # B starts at zero: give both sides the same non-zero adapter
        g = torch.Generator().manual_seed(2)
        for p in (p for p in ours.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    with tempfile.TemporaryDirectory() as tmp:
        lorakit.save_adapter(ours, tmp)
        assert PeftConfig.from_pretrained(tmp).target_parameters
        theirs = PeftModel.from_pretrained(base, tmp, is_trainable=True).train()
    sides = {"PEFT": (theirs, None), "lorakit": (ours, True), "lorakit, adapted weights": (ours, False)}
    rows = []
    for side, (model, tokenwise) in sides.items():
        if tokenwise is not None:
            lorakit.experts.TOKENWISE = tokenwise
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        with torch.no_grad():
            loss = float(model(input_ids=ids, labels=ids).loss)
        saved = saved_bytes(lambda m=model: m(input_ids=ids, labels=ids).loss, params)
        step(model, ids)  # warm-up
        times = [step(model, ids) for _ in range(args.steps)]
        rows.append((side, statistics.median(times), saved, loss))
    lorakit.experts.TOKENWISE = True
    peft_time, peft_saved = rows[0][1], rows[0][2]
    mib = 2**20
    lines = [f"## moe_vs_peft.py — {time.strftime('%Y-%m-%d')}, Qwen3-30B-A3B layer shape × {args.layers}, "
             f"{ids.numel()} tokens, fp32, torch {torch.__version__}", "",
             f"{machine()}. r=16 on q/k/v/o and both expert weights (128 experts, top-8); median of "
             f"{args.steps} forward + backward steps after one warm-up.", "",
             "| side | step (s) | speed vs PEFT | saved for backward (MiB) | vs PEFT | loss |",
             "|---|---|---|---|---|---|"]
    for side, t, saved, loss in rows:
        lines.append(f"| {side} | {t:.3f} | {peft_time / t:.2f}× | {saved / mib:.0f} | {saved / peft_saved:.2f}× | "
                     f"{loss:.6f} |")
    report(lines, not args.no_save)


if __name__ == "__main__":
    main()
