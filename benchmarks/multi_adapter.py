"""Mixed-adapter batches: lorakit's gathered LoRA vs PEFT's ``adapter_names=`` mixed batch.

Same base, same 16 random adapters (r=16, all linear layers, saved by lorakit and loaded by PEFT),
a batch of 32 rows using 1, 4 or 16 distinct adapters. Times one prefill of ``--prompt-len`` tokens
and one decode step on a KV cache of that length; each cost is also given relative to the same
library's single-adapter batch (the ordinary forward with one active adapter). Also: a merged
model vs the plain base (should be ≈ 1.00). lorakit's variants run as its server runs a forward
(``plain.inference_on_onednn``: fp32 CPU products on oneDNN where faster). Medians of ``--repeat`` runs; prints a table and
appends it to benchmarks/RESULTS.md.

    python benchmarks/multi_adapter.py                         # SmolLM2-135M-Instruct (CPU or GPU)
    python benchmarks/multi_adapter.py --model random-1b       # 1.2 B random Llama from config (GPU)
    python benchmarks/multi_adapter.py --decode-only --repeat 30   # decode steps only: many short rounds

On a GPU with triton installed, lorakit's mixed batches are also timed with its Triton kernel
(``lorakit.rows.MIXED_KERNEL = "triton"``: one segmented-gather kernel per layer, added into the
base output in place), and that kernel's logits are checked against the PyTorch path's.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import lorakit
import lorakit.layers
from lorakit.layers import lora_layers
from lorakit.plain import inference_on_onednn

sys.path.insert(0, str(Path(__file__).parent))
from results import add_random_adapters, machine, random_llama, report


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if name.startswith("random-"):
        return random_llama(name, device, dtype)
    from lorakit.models import load_model

    model, _ = load_model(name, dtype=dtype, device=device)
    return model.eval()


def once(device: torch.device, fn: Any, arg: Any) -> float:
    """Seconds of one ``fn(arg)`` without gradients (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        fn(arg)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(device: torch.device, variants: dict[str, tuple[Any, Any]], repeat: int, cache: Any,
                prefill: bool = True) -> dict[str, tuple[list[float], list[float]]]:
    """(prefill seconds, decode seconds) of each round, per variant. Every round times every variant
    once, in turn, so a slow spell of the machine falls on all of them alike; 2 warm-up rounds
    first. Odd rounds run the variants in reverse order, so that no variant always comes first or
    right after the same one (a fixed order put 4% between two variants running the same ops on a
    CPU). Each decode step gets the prefilled cache from ``cache()`` (not timed);
    ``prefill=False`` times decode steps only (prefill lists stay empty)."""
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in variants}
    for i in range(repeat + 2):
        for label, (pre_fn, dec_fn) in list(variants.items())[::-1 if i % 2 else 1]:
            pre = once(device, pre_fn, None) if prefill else None
            dec = once(device, dec_fn, cache())
            if i >= 2:
                if pre is not None:
                    times[label][0].append(pre)
                times[label][1].append(dec)
    return times


def prefilled_cache(model: torch.nn.Module, ids: torch.Tensor) -> Any:
    """The KV cache of a prefill of ``ids``: a static cache with room for one more token where
    transformers has one that can be rewound (``rewound``), else its dynamic cache."""
    with torch.no_grad():
        try:
            from transformers import StaticCache

            cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 1)
            model(ids, past_key_values=cache, use_cache=True)
            if all(hasattr(layer, "cumulative_length") for layer in cache.layers):
                return cache
        except (ImportError, TypeError, AttributeError):
            pass
        return model(ids, use_cache=True).past_key_values


def rewound(cache: Any, length: int) -> Any:
    """``cache`` as it was after the prefill, for the next decode step. A static cache is rewound in
    place (its next write lands on the same slot; nothing is allocated); a dynamic one is copied,
    since each step appends to it (a fresh buffer per layer whose page faults, timed with the
    step, vary with the allocator's state by tens of ms on a CPU)."""
    if getattr(cache, "layers", None) and hasattr(cache.layers[0], "cumulative_length"):
        for layer in cache.layers:
            layer.cumulative_length.fill_(length)
        return cache
    return copy.deepcopy(cache)


def median_ratio(a: list[float], b: list[float]) -> float:
    """The median over rounds of a/b, each round's pair timed back to back (nan without rounds)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True)) if a else math.nan


def cell(value: float, fmt: str) -> str:
    return "–" if math.isnan(value) else format(value, fmt)


def main() -> None:
    import peft

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--decode-only", action="store_true", help="time decode steps only (more rounds in less time)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = build_model(args.model, device, dtype)
    n_adapters = 16
    ours = copy.deepcopy(base)
    tmp = Path(tempfile.mkdtemp())
    g = torch.Generator().manual_seed(0)
    add_random_adapters(ours, n_adapters, g)
    for i in range(n_adapters):
        lorakit.save_adapter(ours, tmp / f"a{i}", adapter_name=f"a{i}")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp / "a0", adapter_name="a0")
    for i in range(1, n_adapters):
        theirs.load_adapter(tmp / f"a{i}", adapter_name=f"a{i}")
    theirs.eval()

    ids = torch.randint(0, 1000, (args.batch, args.prompt_len), generator=g).to(device)
    step_ids = torch.randint(0, 1000, (args.batch, 1), generator=g).to(device)
    prefill_cache = prefilled_cache(base, ids)  # same cache for every variant

    def served(fn: Any) -> Any:
        """``fn`` as lorakit's generation and server run a forward: fp32 CPU products on oneDNN with
        bucketed rows where it is the faster GEMM (``plain.inference_on_onednn``), else unchanged."""
        def run(arg: Any) -> Any:
            with inference_on_onednn(ours):
                return fn(arg)
        return run

    def ours_fn(rows: list[str], kernel: str = "torch") -> tuple[Any, Any]:
        def prefill(_: Any) -> None:
            lorakit.rows.MIXED_KERNEL = kernel
            with lorakit.adapter_batch(ours, rows):
                ours(ids, use_cache=False)

        def decode(cache: Any) -> None:
            lorakit.rows.MIXED_KERNEL = kernel
            with lorakit.adapter_batch(ours, rows):
                ours(step_ids, past_key_values=cache, use_cache=True)
        return served(prefill), served(decode)

    def peft_fn(rows: list[str]) -> tuple[Any, Any]:
        return (lambda _: theirs(input_ids=ids, adapter_names=rows, use_cache=False),
                lambda cache: theirs(input_ids=step_ids, adapter_names=rows, past_key_values=cache, use_cache=True))

    def single(model: Any, activate: Any) -> tuple[Any, Any]:
        activate()  # once: the mixed variants leave each model's active adapter as it was (checked below)
        return (lambda _: model(ids, use_cache=False),
                lambda cache: model(step_ids, past_key_values=cache, use_cache=True))

    def cache() -> Any:
        return rewound(prefill_cache, args.prompt_len)

    # correctness first: both libraries give the same mixed-batch logits
    rows16 = [f"a{i % n_adapters}" for i in range(args.batch)]
    with torch.no_grad(), lorakit.adapter_batch(ours, rows16[:4]):
        a = ours(ids[:4]).logits.float()
    with torch.no_grad():
        b = theirs(input_ids=ids[:4], adapter_names=rows16[:4]).logits.float()
    max_diff = float((a - b).abs().max())
    kernels = ["torch"] + (["triton"] if device.type == "cuda" and importlib.util.find_spec("triton") else [])
    notes = []
    if "triton" in kernels:
        lorakit.rows.MIXED_KERNEL = "triton"
        with torch.no_grad(), lorakit.adapter_batch(ours, rows16):
            t = ours(ids).logits.float()
        with torch.no_grad(), lorakit.adapter_batch(ours, rows16):
            lorakit.rows.MIXED_KERNEL = "torch"
            c = ours(ids).logits.float()
        notes.append(f"Triton kernel vs PyTorch path, 16-adapter logits: max |diff| {float((t - c).abs().max()):.2e} "
                     f"(max |logit| {float(c.abs().max()):.1f}).")

    variants = {"lorakit single": tuple(map(served, single(ours, lambda: lorakit.set_adapter(ours, "a0")))),
                "peft single": single(theirs, lambda: theirs.set_adapter("a0"))}
    for k in (1, 4, 16):
        rows = [f"a{i % k}" for i in range(args.batch)]
        for kernel in kernels:
            variants[f"lorakit mixed {k}" + ("" if kernel == "torch" else f" ({kernel})")] = ours_fn(rows, kernel)
        variants[f"peft mixed {k}"] = peft_fn(rows)
    merged = lorakit.merge_and_unload(copy.deepcopy(ours), adapter_names=["a0"])
    variants["merged (a0)"] = (lambda _: merged(ids, use_cache=False),
                               lambda c: merged(step_ids, past_key_values=c, use_cache=True))
    variants["plain base"] = (lambda _: base(ids, use_cache=False),
                              lambda c: base(step_ids, past_key_values=c, use_cache=True))
    rounds = interleaved(device, variants, args.repeat, cache, prefill=not args.decode_only)
    results = {k: tuple(statistics.median(t) if t else math.nan for t in v) for k, v in rounds.items()}
    lorakit.rows.MIXED_KERNEL = "torch"
    assert theirs.active_adapter == "a0" and all(layer.active_adapters == ["a0"] for _, layer in lora_layers(ours))

    lines = [f"## {time.strftime('%Y-%m-%d')} — mixed-adapter batches, {args.model} on {machine(device)}", "",
             f"`python benchmarks/multi_adapter.py --model {args.model}{' --decode-only' if args.decode_only else ''} "
             f"--repeat {args.repeat}`: batch {args.batch}, prompt {args.prompt_len} tokens, 16 adapters r=16 on all "
             f"linear layers, {dtype}, torch {torch.__version__}, peft {peft.__version__}; {args.repeat} rounds, each "
             f"timing every variant in turn: medians of the times, and of each round's ratio to the variant's "
             f"own single-adapter batch. Decode steps on a {type(prefill_cache).__name__} of the prompt. "
             f"lorakit's forwards run as its server runs them (fp32 CPU products on oneDNN where faster). "
             f"Mixed-batch logits lorakit vs PEFT: max |diff| {max_diff:.2e}.", "",
             "| variant | prefill ms | decode step ms | prefill / own single | decode / own single |",
             "|---|---|---|---|---|"]
    for label, (pre, dec) in results.items():
        own = "peft single" if label.startswith("peft") else "lorakit single"
        own = "plain base" if label in ("merged (a0)", "plain base") else own
        ratios = [median_ratio(rounds[label][j], rounds[own][j]) for j in (0, 1)]
        lines.append(f"| {label} | {cell(pre * 1e3, '.2f')} | {dec * 1e3:.2f} | {cell(ratios[0], '.2f')} | "
                     f"{ratios[1]:.2f} |")

    def versus(ours_label: str) -> str:
        parts = []
        for k in (1, 4, 16):
            theirs_k, ours_k = results[f"peft mixed {k}"], results[ours_label % k]
            pre = "" if args.decode_only else f"prefill {theirs_k[0] / ours_k[0]:.2f}×, "
            parts.append(f"{k} adapters: {pre}decode {theirs_k[1] / ours_k[1]:.2f}×")
        return "; ".join(parts)

    lines += ["", "lorakit mixed vs PEFT mixed (time ratio PEFT / lorakit): " + versus("lorakit mixed %d") + "."]
    if "triton" in kernels:
        lines += ["", "lorakit mixed (triton) vs PEFT mixed: " + versus("lorakit mixed %d (triton)") + ". "
                  + " ".join(notes)]
    lines.append("")
    report(lines, save=not args.no_save)


if __name__ == "__main__":
    main()
