"""The serving engine's KV cache: layers that append in place vs concatenating every step.

``lorakit serve`` keeps the running batch's keys and values in ``engine._GrowingLayer`` buffers
with spare columns, so a decode step writes one token per layer. The peer is what transformers'
``DynamicCache`` does (and what the engine did before): ``torch.cat`` of the whole cache with the
new token, every step, every layer. Same engine, same prefilled rows (random prompts of
``--prompt-len`` tokens, no adapter, greedy), the cache layer class swapped; rounds alternate the
two, each from the same prefilled state. Prints the median decode step and the ratio, and appends
the table to benchmarks/RESULTS.md.

    python benchmarks/engine_cache.py [--rows 4] [--prompt-len 2048] [--steps 20] [--rounds 4]
    python benchmarks/engine_cache.py --model random-1b --tokenizer DIR --rows 32   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from lorakit.engine import Engine, Request, _GrowingLayer
from lorakit.generate import SamplingOptions
from lorakit.models import load_model
from lorakit.pool import AdapterPool

sys.path.insert(0, str(Path(__file__).parent))
from results import append_entry, machine, random_llama


class Concatenating(DynamicLayer):
    """A dynamic cache layer holding given keys and values: each update concatenates."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.keys, self.values = keys, values


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokenizer", help="tokenizer directory for random-* models")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model.startswith("random-"):  # a Llama of random weights built from config (nothing downloaded)
        from transformers import AutoTokenizer

        if not args.tokenizer:
            ap.error("--model random-* needs --tokenizer DIR")
        model, tok = random_llama(args.model, device, dtype), AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        model, tok = load_model(args.model, dtype=dtype, device=device)
    engine = Engine(model.eval(), tok, AdapterPool(model), max_batch=args.rows)
    engine.eos = set()  # every row decodes all steps
    g = torch.Generator().manual_seed(0)
    rows = [Request(torch.randint(100, 1000, (args.prompt_len,), generator=g).tolist(), None,
                    SamplingOptions(max_new_tokens=10**6), lambda _: None) for _ in range(args.rows)]
    engine._prefill(rows)
    cache, mask, generated = [(layer.keys.clone(), layer.values.clone()) for layer in engine.cache], \
        engine.mask.clone(), [list(r.generated) for r in rows]
    variants: dict[str, Any] = {"append in place (lorakit)": _GrowingLayer,
                                "concatenate (DynamicCache)": Concatenating}
    times: dict[str, list[float]] = {k: [] for k in variants}
    tokens: dict[str, list[list[int]]] = {}
    for i in range(args.rounds):
        for label in list(variants) if i % 2 == 0 else list(variants)[::-1]:
            engine.cache = [variants[label](k.clone(), v.clone()) for k, v in cache]  # no row joins or leaves
            engine.mask = mask.clone()
            for r, gen in zip(rows, generated, strict=True):
                r.generated = list(gen)
            steps = []
            for _ in range(args.steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                engine._decode(list(engine.rows))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                steps.append(time.perf_counter() - start)
            times[label].append(statistics.median(steps[2:]))
            tokens[label] = [list(r.generated) for r in rows]
    same = len({str(t) for t in tokens.values()}) == 1
    ours, theirs = (statistics.median(t) for t in times.values())
    lines = ["| cache layer | decode step ms (median) | each round, ms |", "|---|---|---|"]
    for label, ts in times.items():
        lines.append(f"| {label} | {statistics.median(ts) * 1e3:.1f} | {', '.join(f'{t * 1e3:.0f}' for t in ts)} |")
    text = (f"## {time.strftime('%Y-%m-%d')} — serving engine KV cache, {args.model} on {machine(device)}\n\n"
            f"`python benchmarks/engine_cache.py --rows {args.rows} --prompt-len {args.prompt_len} --steps {args.steps} "
            f"--rounds {args.rounds}`: {args.rows} rows with {args.prompt_len}-token prompts, {dtype}, greedy, "
            f"{args.steps} decode steps a round (median of steps 3 on), {args.rounds} alternating rounds; torch "
            f"{torch.__version__}. Same tokens from both: {same}.\n\n" + "\n".join(lines)
            + f"\n\nAppending in place: {theirs / ours:.2f}× the decode steps per second of concatenating.\n")
    print(text)
    if not args.no_save:
        append_entry(text)


if __name__ == "__main__":
    main()
