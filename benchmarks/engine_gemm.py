"""The serving engine's fp32 CPU products: oneDNN with bucketed row counts vs torch's BLAS.

``lorakit serve`` runs continuous batching: the running batch gains and loses rows at every step
and prefills come in any length, so its products have a new row count almost every step. On a
CPU where oneDNN is the faster fp32 GEMM (``kernels.gemm``), the engine runs all of them on
oneDNN with their rows padded up to ``gemm.row_bucket`` sizes (8 per doubling: oneDNN keeps state
for every shape it meets). This times the whole engine on the same work each way: requests with
16 distinct adapters (r=16, all linear layers, random weights), random prompts of 16-96 tokens and
16-64 new tokens each (greedy, EOS ignored, so every variant produces the same tokens' count), all
submitted at once to an engine of ``--max-batch`` rows, so rows join and leave the batch step by
step. Variants alternate round by round; each reports completion tokens per second (median over
rounds), whether its tokens equal the BLAS variant's, and how many distinct product shapes
reached oneDNN. The third variant is oneDNN on every product as it comes, rows unpadded: what the
padding costs in time and saves in shapes (each kept by oneDNN for good).

    python benchmarks/engine_gemm.py [--requests 64] [--max-batch 32] [--rounds 3] [--no-save]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

import lorakit
from lorakit.engine import Engine, Request
from lorakit.generate import SamplingOptions
from lorakit.kernels import gemm
from lorakit.memory import resident_bytes
from lorakit.models import load_model
from lorakit.pool import AdapterPool

sys.path.insert(0, str(Path(__file__).parent))
from results import add_random_adapters, append_entry, machine

ROW_BUCKET = gemm.row_bucket
# label: (gemm.CPU_GEMM, gemm.row_bucket)
VARIANTS: dict[str, tuple[str, Any]] = {
    "BLAS (oneMKL)": ("blas", ROW_BUCKET),
    "oneDNN, rows bucketed (lorakit)": ("auto", ROW_BUCKET),
    "oneDNN, rows unpadded": ("auto", lambda n: n),
}


class CountingOp:
    """Stands in for oneDNN's linear op: records each product's (rows, in, out), then runs it."""

    def __init__(self, op: Any) -> None:
        self.op, self.shapes = op, set()

    def __call__(self, a: torch.Tensor, w: torch.Tensor, *rest: Any) -> torch.Tensor:
        self.shapes.add((a.shape[0], *w.shape))
        return self.op(a, w, *rest)

    def binary(self, a: torch.Tensor, add: torch.Tensor, w: torch.Tensor, *rest: Any) -> torch.Tensor:
        self.shapes.add((a.shape[0], *w.shape))
        return self.op.binary(a, add, w, *rest)


def peak_gib() -> float:
    """The process's peak resident set (VmHWM), GiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


def run(engine: Engine, requests: list[tuple[list[int], str, int]]) -> tuple[float, list[list[int]]]:
    """Submit every request at once; (seconds until the last finished, each request's tokens)."""
    done = threading.Semaphore(0)
    made = [Request(ids, adapter, SamplingOptions(max_new_tokens=n), lambda e: e[0] == "done" and done.release())
            for ids, adapter, n in requests]
    start = time.perf_counter()
    for r in made:
        engine.submit(r)
    for _ in made:
        done.acquire()
    return time.perf_counter() - start, [r.generated for r in made]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", type=int, nargs="+", default=list(range(len(VARIANTS))),
                    help="which variants to run (0 = BLAS, 1 = lorakit, 2 = oneDNN unpadded); one alone gives its "
                         "process's peak memory")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if not gemm.uses_onednn(torch.device("cpu"), torch.float32):
        sys.exit("oneDNN is not the faster fp32 GEMM on this machine (gemm.uses_onednn): nothing to compare")
    model, tok = load_model(args.model, dtype=torch.float32, device=torch.device("cpu"))
    model.requires_grad_(False)
    tmp = Path(tempfile.mkdtemp())
    g = torch.Generator().manual_seed(0)
    n_adapters = 16
    add_random_adapters(model, n_adapters, g)
    pool = AdapterPool(model, max_loaded=n_adapters)
    for i in range(n_adapters):
        lorakit.save_adapter(model, tmp / f"a{i}", adapter_name=f"a{i}")
        pool.register(f"a{i}", tmp / f"a{i}")
        pool.loaded[f"a{i}"] = None  # already in the model
    requests = [(torch.randint(100, 10000, (int(torch.randint(16, 97, (1,), generator=g)),), generator=g).tolist(),
                 f"a{i % n_adapters}", int(torch.randint(16, 65, (1,), generator=g))) for i in range(args.requests)]
    engine = Engine(model, tok, pool, max_batch=args.max_batch)
    engine.eos = set()  # every request produces exactly its max_new_tokens
    engine.start()
    tokens = sum(n for *_, n in requests)
    outputs: dict[str, list[list[int]]] = {}
    order = [list(VARIANTS)[i] for i in args.variants]
    times: dict[str, list[float]] = {k: [] for k in order}
    ops = {label: CountingOp(gemm._linear_op()) for label in VARIANTS}
    run(engine, requests[:4])  # warm-up
    for i in range(args.rounds):
        for label in order if i % 2 == 0 else order[::-1]:
            gemm.CPU_GEMM, gemm.row_bucket = VARIANTS[label]
            gemm._linear_op = lambda label=label: ops[label]
            seconds, out = run(engine, requests)
            times[label].append(seconds)
            outputs.setdefault(label, out)
    engine.stop()
    blas = order[0]  # the reference for ratios and tokens (BLAS unless left out)
    lines = ["| products | completion tok/s (median) | each round, s | × BLAS | same tokens as BLAS | oneDNN shapes |",
             "|---|---|---|---|---|---|"]
    for label, ts in times.items():
        rate = tokens / statistics.median(ts)
        ratio = statistics.median(times[blas]) / statistics.median(ts)
        lines.append(f"| {label} | {rate:.1f} | {', '.join(f'{t:.1f}' for t in ts)} | {ratio:.2f} | "
                     f"{outputs[label] == outputs[blas]} | {len(ops[label].shapes)} |")
    text = (f"## {time.strftime('%Y-%m-%d')} — serving engine, oneDNN vs BLAS products, {args.model} on "
            f"{machine(torch.device('cpu'))}\n\n"
            f"`python benchmarks/engine_gemm.py --requests {args.requests} --max-batch {args.max_batch} --rounds "
            f"{args.rounds}`: {args.requests} requests over {n_adapters} adapters (r=16, all linear), prompts of "
            f"16-96 tokens, 16-64 new tokens each ({tokens} in all), fp32, greedy, all submitted at once to an "
            f"engine of {args.max_batch} rows; torch {torch.__version__}.\n\n" + "\n".join(lines)
            + f"\n\nResident set at the end: {resident_bytes() / 2**30:.2f} GiB; peak {peak_gib():.2f} GiB.\n")
    print(text)
    if not args.no_save:
        append_entry(text)


if __name__ == "__main__":
    main()
