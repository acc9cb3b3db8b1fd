"""Does ``torch.compile`` pay for a LoRA training step on this CPU? (one process)

Same model (SmolLM2-135M-Instruct, fp32), same LoRA (the default recipe), the same padding-free
batches of 8 bundled examples, forward + backward per step:

    lorakit, eager          the trainer's fast paths (``train.fast_paths``): fused LoRA / SwiGLU
                            nodes, per-segment attention, fp32 products on oneDNN where faster
    plain ops, eager        LoRA as separate ops on torch's own products, per-segment attention
    plain ops, compiled     the same with every decoder layer ``torch.compile``d (inductor)

The fused nodes call oneDNN's linear op directly, which inductor cannot lower, so compilation is
measured on the plain ops. Compilation time (the first steps) is reported apart from the median.

    python benchmarks/compile_step.py [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import lorakit.layers
from lorakit.attention import padding_free
from lorakit.collate import batches, collate_flat
from lorakit.config import LoraConfig
from lorakit.data import DataOptions, load_examples
from lorakit.inject import get_lora_model
from lorakit.kernels import gemm
from lorakit.loss import causal_lm_loss
from lorakit.models import load_model
from lorakit.train import fast_paths
from lorakit.train_config import DEFAULT_LORA
from results import append_entry, machine

DATA = Path(__file__).parent.parent / "examples" / "extract" / "train.jsonl"
WARMUP = 3  # steps left out of the median (compilation, oneDNN primitive creation)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant after the warm-up")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    cpu = torch.device("cpu")
    model, tok = load_model("smollm2-135m-instruct", dtype=torch.float32, device=cpu)
    examples = load_examples(DATA, tok, DataOptions(max_seq_len=256))
    steps = batches([[e] for e in examples], 8, 0, 0)[: WARMUP + args.steps]
    get_lora_model(model, LoraConfig(**DEFAULT_LORA))
    model.train()

    def run(paths: Callable[[], object]) -> tuple[list[float], float]:
        times, loss_sum = [], 0.0
        with paths():  # type: ignore[attr-defined]
            for b in steps:
                t = time.perf_counter()
                loss, n = causal_lm_loss(model, collate_flat(b, multiple=gemm.TOKEN_MULTIPLE, pad_id=tok.pad_token_id))
                (loss / n).backward()
                model.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t)
                loss_sum += float(loss.detach()) / n
        return times, loss_sum

    def plain() -> object:
        lorakit.layers.FUSED_LINEAR = False
        gemm.CPU_GEMM = "blas"
        return padding_free(model)

    rows = {"lorakit, eager": run(lambda: fast_paths(model, padding_free=True, bf16=False, device=cpu))}
    rows["plain ops, eager"] = run(plain)
    for layer in model.model.layers:  # type: ignore[union-attr]
        layer.compile()
    rows["plain ops, compiled"] = run(plain)
    ref = statistics.median(rows["lorakit, eager"][0][WARMUP:])
    lines = ["| variant | first 3 steps, s | s/step (median of the rest) | × lorakit eager |", "|---|---|---|---|"]
    for name, (times, _) in rows.items():
        med = statistics.median(times[WARMUP:])
        lines.append(f"| {name} | {', '.join(f'{t:.1f}' for t in times[:WARMUP])} | {med:.3f} | {ref / med:.2f}× |")
    spread = max(s for _, s in rows.values()) - min(s for _, s in rows.values())
    table = "\n".join(lines)
    print(table)
    print(f"summed loss spread across variants: {spread:.1e}")
    if not args.no_save:
        append_entry(f"## compile_step.py — {time.strftime('%Y-%m-%d')}, {machine()}, torch {torch.__version__}\n\n"
                     f"`python benchmarks/compile_step.py --steps {args.steps}`: SmolLM2-135M-Instruct fp32, default "
                     f"LoRA, padding-free batches of 8 bundled examples, {WARMUP} warm-up + {args.steps} timed steps "
                     f"per variant; summed loss equal across variants within {spread:.1e}.\n\n{table}\n")


if __name__ == "__main__":
    main()
