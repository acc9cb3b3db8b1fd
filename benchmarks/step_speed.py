"""lorakit's own training step, one fast path at a time, on the bundled data (one process).

Same model (SmolLM2-135M-Instruct, fp32 on CPU), same LoRA (the default recipe), same batches of
8 examples; each variant runs forward + backward of the same steps, interleaved in rounds so that
a slow spell of the machine hits all of them:

    padded, unfused     right-padded batches, base forward + LoRA term as separate ops (reference)
    padded              + the fused LoRA-linear autograd node
    flat                + padding-free batches (one row of real tokens, attention per example)
    flat + prefix       + the shared system-turn prefix stored once per batch
    + fused MLP         + each SwiGLU MLP as one LoRA node (lorakit.mlp)
    + flash segments    + per-segment attention as one node on ATen's CPU flash kernel, keeping
                        unpadded q, k, v for backward (lorakit.attention)
    + oneDNN products   + the fused nodes' fp32 products on oneDNN, token counts rounded up to a
                        multiple of 32 (kernels.gemm; what the trainer runs where ``uses_onednn``
                        says so: elsewhere this is the variant above plus the rounding)

    python benchmarks/step_speed.py [--steps 4] [--rounds 2]

Prints seconds per step, real tokens per second and the speed-up over the reference, checks that
every variant gives the same loss, and appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

import lorakit.attention
import lorakit.layers
from lorakit.attention import padding_free
from lorakit.collate import batches, collate, collate_flat
from lorakit.config import LoraConfig
from lorakit.data import DataOptions, load_examples
from lorakit.inject import get_lora_model
from lorakit.kernels.gemm import TOKEN_MULTIPLE, onednn_scope, uses_onednn
from lorakit.loss import causal_lm_loss
from lorakit.mlp import fused_mlp
from lorakit.models import load_model
from lorakit.train_config import DEFAULT_LORA
from results import append_entry, machine

HERE = Path(__file__).parent
DATA = HERE.parent / "examples" / "extract" / "train.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m-instruct", dtype=torch.float32, device=torch.device("cpu"))
    examples = load_examples(DATA, tok, DataOptions(max_seq_len=256))
    steps = batches([[e] for e in examples], 8, 0, 0)[: args.steps + 1]
    get_lora_model(model, LoraConfig(**DEFAULT_LORA))
    model.train()
    pad = tok.pad_token_id
    variants = {
        "padded, unfused": (False, lambda b: collate(b, pad)),
        "padded": (True, lambda b: collate(b, pad)),
        "flat": (True, lambda b: collate_flat(b, share_prefix=False)),
        "flat + prefix": (True, lambda b: collate_flat(b)),
        "+ fused MLP": ("mlp", lambda b: collate_flat(b)),
        "+ flash segments": ("flash", lambda b: collate_flat(b)),
        "+ oneDNN products": ("onednn", lambda b: collate_flat(b, multiple=TOKEN_MULTIPLE, pad_id=pad)),
    }

    def step(fused: bool | str, make, batch) -> float:
        lorakit.layers.FUSED_LINEAR = bool(fused)
        lorakit.attention.CPU_ATTENTION = "auto" if fused in ("flash", "onednn") else "sdpa"
        with (fused_mlp(model) if fused in ("mlp", "flash", "onednn") else contextlib.nullcontext(),
              onednn_scope() if fused == "onednn" else contextlib.nullcontext()):
            loss, n = causal_lm_loss(model, make(batch))
            (loss / n).backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach()) / n

    times: dict[str, list[float]] = {k: [] for k in variants}
    with padding_free(model):
        losses = {k: step(fused, make, steps[0]) for k, (fused, make) in variants.items()}  # also warms up
        for _ in range(args.rounds):
            for k, (fused, make) in variants.items():
                t = time.perf_counter()
                for b in steps[1:]:
                    step(fused, make, b)
                times[k].append((time.perf_counter() - t) / args.steps)
    tokens = statistics.mean(sum(len(r[0].input_ids) for r in b) for b in steps[1:])
    ref = statistics.median(times["padded, unfused"])
    spread = max(losses.values()) - min(losses.values())
    lines = ["| variant | s/step (median) | real tokens/s | speed-up |", "|---|---|---|---|"]
    for k, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {k} | {med:.2f} | {tokens / med:.0f} | {ref / med:.2f}× |")
    table = "\n".join(lines)
    print(table)
    print(f"loss spread across variants: {spread:.2e}")
    append_entry(f"## step_speed.py — {time.strftime('%Y-%m-%d')}, {machine()}, torch {torch.__version__}\n\n"
                 f"SmolLM2-135M-Instruct fp32, default LoRA (r16, all linear), batches of 8 bundled examples "
                 f"(oneDNN {'used' if uses_onednn(torch.device('cpu'), torch.float32) else 'not used here'} "
                 f"in the last variant) "
                 f"({tokens:.0f} real tokens per batch), {args.steps} steps × {args.rounds} interleaved rounds; "
                 f"loss equal across variants within {spread:.1e}.\n\n{table}\n")


if __name__ == "__main__":
    main()
