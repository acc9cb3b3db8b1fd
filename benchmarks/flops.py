"""Achieved FLOP/s of one training step against this machine's matmul peak, measured in the same run.

The peak is the best of a large square matmul (2048³, fp32 on CPU / bf16 on GPU), through torch's
own matmul and, on a CPU, also through oneDNN (``kernels.gemm``, which lorakit's fused nodes use where
it is faster): the machine's peak is the better of the two. A step is the
forward + backward of one batch of 8 bundled examples (SmolLM2-135M-Instruct, LoRA r=16 on all
linear layers), done two ways on the same rows:

    lorakit         the trainer's path: padding-free row, shared prefix, fused LoRA-linear node,
                    output head and cross-entropy at supervised positions only
    PEFT            ``get_peft_model`` + the model's own loss on a right-padded batch (what
                    ``transformers.Trainer`` runs): every position through the head

FLOPs are counted by ``torch.utils.flop_counter`` on one step of each side (matrix products:
``mm``, ``addmm``, ``addmm_``, ``bmm`` and oneDNN's linear; attention scores on the CPU are not counted, a small share
at these lengths). "useful GFLOP/s" divides lorakit's count, the work the step needs, by each
side's time, so it compares the two directly; "% of peak" is each side's own count over its time.
A second table splits one profiled lorakit step into its parts (frozen projections, rank-r
products, output head, attention, the rest) with each matmul part's GFLOP/s.

    python benchmarks/flops.py [--steps 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from typing import Any

import torch

DATA = Path(__file__).parent.parent / "examples" / "extract" / "train.jsonl"


def _mm_flops(a_shape: Any, b_shape: Any) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _addmm_(self_shape: Any, a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return _mm_flops(a_shape, b_shape)


def _linear(x_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """oneDNN's linear x wᵀ, x (n, k), w (m, k): args (w, …) or, with a sum, (other, w, …)."""
    w = args[1] if len(args) > 1 and isinstance(args[1], (tuple, list, torch.Size)) else args[0]
    return 2 * x_shape[0] * x_shape[1] * w[0]


def flop_mapping() -> dict[Any, Any]:
    """FlopCounterMode's extra formulas: in-place addmm and oneDNN's linear (plain and with a sum)."""
    mapping: dict[Any, Any] = {torch.ops.aten.addmm_: _addmm_}
    with contextlib.suppress(AttributeError, RuntimeError):  # a torch build without oneDNN has no such op
        mapping[torch.ops.mkldnn._linear_pointwise] = _linear
    return mapping


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, n: int = 2048, reps: int = 8, onednn: bool = False) -> float:
    """Best GFLOP/s of an n×n×n matmul: torch's own, or with ``onednn`` through ``kernels.gemm``
    forced onto oneDNN."""
    from lorakit.kernels import gemm

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    before = gemm.CPU_GEMM
    gemm.CPU_GEMM = "onednn"
    try:
        with gemm.onednn_scope() if onednn else contextlib.nullcontext():
            for _ in range(reps):
                sync()
                t = time.perf_counter()
                gemm.mm(a, b)
                sync()
                best = min(best, time.perf_counter() - t)
    finally:
        gemm.CPU_GEMM = before
    return 2 * n**3 / best / 1e9


MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "mkldnn::_linear_pointwise")


def _matmul_flops(name: str, shapes: list[Any]) -> int:
    """FLOPs of one mm/addmm/addmm_/bmm or oneDNN linear call from its recorded input shapes."""
    if name == "mkldnn::_linear_pointwise":  # (x, w, …) or, with a sum, (x, other, w, …): x wᵀ
        x, w = shapes[0], shapes[2] if len(shapes) == 5 else shapes[1]
        return 2 * x[0] * x[1] * w[0]
    a, b = (shapes[0], shapes[1]) if name in ("aten::mm", "aten::bmm") else (shapes[1], shapes[2])
    return 2 * a[-2] * a[-1] * b[-1] * (a[0] if len(a) == 3 else 1)


def breakdown(step: Any, rank: int, vocab: int, cuda: bool) -> list[tuple[str, float, float]]:
    """Where one step's time goes: (part, ms, GFLOP) for the frozen projections' matmuls, the rank-r
    products, the output head and cross-entropy, attention, and everything else, from the self
    times of a ``torch.profiler`` trace (device time on a GPU). An op inside lorakit's attention or
    cross-entropy node (forward or backward) belongs to that part; other matmuls are told apart by
    shape: a rank-r side is LoRA, a vocabulary-sized side is the head."""

    with torch.profiler.profile(record_shapes=True) as prof:
        step()
        sync()
    head, attention, lora, frozen = ("output head + cross-entropy", "attention", "LoRA rank-r products",
                                     "frozen projections (matmuls)")
    rest = "the rest: norms, rotary, SiLU, residuals, copies, autograd"
    parts: dict[str, list[float]] = {k: [0.0, 0.0] for k in (frozen, lora, head, attention, rest)}
    for e in prof.events():
        ms = (getattr(e, "self_device_time_total", 0) if cuda else e.self_cpu_time_total) / 1e3
        names, parent = [], e
        while parent is not None:
            names.append(parent.name)
            parent = parent.cpu_parent
        dims = {d for shape in e.input_shapes or [] for d in (shape or []) if isinstance(d, int)}
        gflop = _matmul_flops(e.name, e.input_shapes) / 1e9 if e.name in MATMULS else 0.0
        if any("Segments" in n or "scaled_dot_product" in n for n in names):
            part = attention
        elif any("CrossEntropy" in n for n in names) or (gflop and vocab in dims):
            part = head
        elif gflop:
            part = lora if rank in dims else frozen
        else:
            part = rest
        parts[part][0] += ms
        parts[part][1] += gflop
    return [(k, ms, gflop) for k, (ms, gflop) in parts.items()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-save", action="store_true", help="print the table only")
    args = ap.parse_args()

    import peft
    from torch.utils.flop_counter import FlopCounterMode

    import lorakit
    from lorakit.attention import padding_free
    from lorakit.collate import batches, collate, collate_flat
    from lorakit.data import DataOptions, load_examples
    from lorakit.kernels.cast import cached_casts
    from lorakit.kernels.gemm import onednn_scope, uses_onednn
    from lorakit.loss import causal_lm_loss
    from lorakit.mlp import fused_mlp
    from lorakit.models import load_model
    from lorakit.norm import fused_norms
    from lorakit.train_config import DEFAULT_LORA
    from results import append_entry, hf_batch, machine

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    ours, tok = load_model("smollm2-135m-instruct", dtype=dtype, device=torch.device(device))
    theirs, _ = load_model("smollm2-135m-instruct", dtype=dtype, device=torch.device(device))
    lora = {**DEFAULT_LORA, "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
    lorakit.get_lora_model(ours, lorakit.LoraConfig(**lora))
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(task_type="CAUSAL_LM", **{k: lora[k] for k in
                                 ("r", "lora_alpha", "lora_dropout", "target_modules")}))
    ours.train()
    theirs.train()
    examples = load_examples(DATA, tok, DataOptions(max_seq_len=256))
    steps = batches([[e] for e in examples], 8, 0, 0)[: args.steps + 1]
    onednn = not cuda and uses_onednn(torch.device("cpu"), dtype)
    multiple = 32 if onednn else 1  # the trainer's token-count rounding where its products run on oneDNN

    def to(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def step_ours(rows: Any) -> None:  # with the trainer's fast paths (Trainer.fast_paths) and batches
        with padding_free(ours), fused_mlp(ours), fused_norms(ours), cached_casts(), onednn_scope():
            loss, n = causal_lm_loss(ours, to(collate_flat(rows, multiple=multiple)))
            (loss / n).backward()
        ours.zero_grad(set_to_none=True)

    def step_theirs(rows: Any) -> None:
        theirs(**hf_batch(to(collate(rows, tok.pad_token_id)))).loss.backward()
        theirs.zero_grad(set_to_none=True)

    sides = {"lorakit": step_ours, "PEFT": step_theirs}
    flops = {}
    for name, step in sides.items():
        with FlopCounterMode(display=False, custom_mapping=flop_mapping()) as counter:
            step(steps[0])  # also the warm-up
        flops[name] = counter.get_total_flops()
    peak, peak_onednn, times = [], [], {k: [] for k in sides}
    for _ in range(args.rounds):  # interleaved, so a slow spell of the machine hits every measurement
        peak.append(matmul_peak(device, dtype))
        if onednn:
            peak_onednn.append(matmul_peak(device, dtype, onednn=True))
        for name, step in sides.items():
            sync()
            t = time.perf_counter()
            for rows in steps[1:]:
                step(rows)
            sync()
            times[name].append((time.perf_counter() - t) / args.steps)
    best_peak = max(peak + peak_onednn)
    lines = ["| side | GFLOP per step (counted) | s/step (median) | achieved GFLOP/s | % of matmul peak | "
             "useful GFLOP/s |", "|---|---|---|---|---|---|"]
    for name in sides:
        s = statistics.median(times[name])
        lines.append(f"| {name} | {flops[name] / 1e9:.0f} | {s:.2f} | {flops[name] / s / 1e9:.1f} | "
                     f"{100 * flops[name] / s / 1e9 / best_peak:.0f}% | {flops['lorakit'] / s / 1e9:.1f} |")
    floor = flops["lorakit"] / 1e9 / best_peak  # lorakit's counted FLOPs at the matmul peak
    ceiling = (f"At the matmul peak lorakit's step would take {floor:.2f} s: the most it can be ahead of PEFT's "
               f"measured step on these FLOPs is {statistics.median(times['PEFT']) / floor:.2f}× "
               f"(now {statistics.median(times['PEFT']) / statistics.median(times['lorakit']):.2f}×).")
    parts = breakdown(lambda: step_ours(steps[1]), lora["r"], ours.config.vocab_size, cuda)
    total = sum(ms for _, ms, _ in parts)
    rows = ["| part of lorakit's step | ms | share | GFLOP | GFLOP/s | % of matmul peak |", "|---|---|---|---|---|---|"]
    for part, ms, gflop in parts:
        rate = gflop / ms * 1e3  # GFLOP/s
        matmul = f"{gflop:.1f} | {rate:.0f} | {100 * rate / best_peak:.0f}%" if gflop else "– | – | –"
        rows.append(f"| {part} | {ms:.0f} | {100 * ms / total:.1f}% | {matmul} |")
    where = (f"Where one lorakit step goes (`torch.profiler`, {'device' if cuda else 'self CPU'} time of one step, "
             f"{total:.0f} ms with the profiler on):\n\n" + "\n".join(rows))
    table = "\n".join(lines) + "\n\n" + ceiling + "\n\n" + where
    peaks = (f"torch's matmul {max(peak):.1f} GFLOP/s" + (f", oneDNN's {max(peak_onednn):.1f} (lorakit's fp32 "
             f"products run on oneDNN, kernels.gemm; PEFT's on torch's)" if peak_onednn else ""))
    print(f"matmul peak: {best_peak:.1f} GFLOP/s ({dtype}; {peaks})")
    print(table)
    if not args.no_save:
        append_entry(f"## flops.py — {time.strftime('%Y-%m-%d')}, {machine()}, torch {torch.__version__}, "
                     f"peft {peft.__version__}\n\nSmolLM2-135M-Instruct {str(dtype).split('.')[-1]}, LoRA r=16 all linear, "
                     f"batches of 8 bundled examples, {args.steps} steps × {args.rounds} interleaved rounds; matmul "
                     f"peak (2048³, best of the run) {best_peak:.1f} GFLOP/s ({peaks}).\n\n{table}\n")


if __name__ == "__main__":
    main()
