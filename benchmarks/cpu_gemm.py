"""fp32 matrix products on the CPU: torch's BLAS against oneDNN, on the shapes of a LoRA step.

lorakit's fused nodes run their fp32 CPU products through ``kernels.gemm.mm``, which picks oneDNN
where torch's BLAS is oneMKL on an AMD CPU with AVX-512 (oneMKL runs its AVX2 kernels on non-Intel
CPUs). This script measures both libraries on every product shape of one SmolLM2-135M LoRA step
(r=16, all linear layers; ``--tokens`` rows, about a batch of 16 bundled examples) and a 2048³
square, in the orientations the nodes use, and checks both against float64.

    python benchmarks/cpu_gemm.py [--tokens 896] [--reps 20] [--no-save]

Prints GFLOP/s per library and their ratio (median of ``--reps`` timed calls after warm-up) and
appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lorakit.kernels import gemm


def median_s(fn: Callable[[], torch.Tensor], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def shapes(n: int, hidden: int = 576, inter: int = 1536, kv: int = 192, r: int = 16,
           vocab: int = 49152, supervised: int = 368) -> list[tuple[str, tuple[int, int], tuple[int, int], bool]]:
    """(what, a's shape, b's shape, a transposed view?) for ``a @ b`` as the fused nodes call it."""
    rows = [("2048³ square", (2048, 2048), (2048, 2048), False)]
    for out, inp in ((inter, hidden), (hidden, inter), (hidden, hidden), (kv, hidden)):
        rows.append((f"frozen forward x Wᵀ, {inp}→{out}", (n, inp), (inp, out), False))
        rows.append((f"frozen backward g W, {out}→{inp}", (n, out), (out, inp), False))
    rows += [(f"LoRA x Aᵀ, {hidden}→{r}", (n, hidden), (hidden, r), False),
             (f"LoRA h Bᵀ, {r}→{inter}", (n, r), (r, inter), False),
             (f"LoRA ∂A = g_hᵀ x, sum over {n} tokens", (r, n), (n, hidden), True),
             (f"head logits h Wᵀ, {supervised} rows", (supervised, hidden), (hidden, vocab), False),
             (f"head ∂h = G W, {supervised} rows", (supervised, vocab), (vocab, hidden), False)]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=896, help="token rows of the step (a multiple of 32)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if gemm._linear_op() is None:
        raise SystemExit("this torch build has no oneDNN linear")
    g = torch.Generator().manual_seed(0)
    lines = ["| product | BLAS GFLOP/s | oneDNN GFLOP/s | oneDNN / BLAS | max rel. error vs float64 (BLAS, oneDNN) |",
             "|---|---|---|---|---|"]
    before = gemm.CPU_GEMM
    try:
        for what, sa, sb, transposed in shapes(args.tokens):
            a = torch.randn(sa[::-1] if transposed else sa, generator=g)
            a = a.T if transposed else a
            b = torch.randn(sb, generator=g)
            want = a.double() @ b.double()
            flop = 2 * sa[0] * sa[1] * sb[1]
            rates, errors = [], []
            for backend in ("blas", "onednn"):
                gemm.CPU_GEMM = backend
                with gemm.onednn_scope():
                    assert gemm.onednn_applies(a, b) is (backend == "onednn"), what
                    rates.append(flop / median_s(lambda a=a, b=b: gemm.mm(a, b), args.reps) / 1e9)
                    errors.append(float((gemm.mm(a, b).double() - want).abs().max() / want.abs().max()))
            lines.append(f"| {what} | {rates[0]:.0f} | {rates[1]:.0f} | {rates[1] / rates[0]:.2f}× | "
                         f"{errors[0]:.1e}, {errors[1]:.1e} |")
    finally:
        gemm.CPU_GEMM = before
    from results import append_entry, machine

    vendor, _ = gemm.cpu_flags()
    config = torch.__config__.show()
    blas = next((p.split("=")[1] for p in config.replace(",", " ").split() if p.startswith("BLAS_INFO=")), "?")
    text = (f"## {time.strftime('%Y-%m-%d')} — fp32 CPU products, torch's BLAS vs oneDNN, {machine()}\n\n"
            f"`python benchmarks/cpu_gemm.py --tokens {args.tokens}`: the products of one SmolLM2-135M LoRA step "
            f"(r=16, {args.tokens} token rows), median of {args.reps} calls; CPU vendor {vendor or '?'}, torch "
            f"{torch.__version__} (BLAS: {blas}); lorakit's choice here (`LORAKIT_CPU_GEMM=auto`): "
            f"{'oneDNN' if gemm.uses_onednn(torch.device('cpu'), torch.float32) else 'the BLAS'}.\n\n"
            + "\n".join(lines) + "\n")
    print(text)
    if not args.no_save:
        append_entry(text)


if __name__ == "__main__":
    main()
