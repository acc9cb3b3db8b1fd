"""Matrix products for the fused nodes, routed to the faster of the two CPU GEMM libraries torch has.

PyTorch multiplies fp32 matrices on the CPU with its BLAS (Intel oneMKL in the x86 wheels), which
chooses its code path by CPU vendor. On the 2-core AMD EPYC (Zen 5, 512-bit FMA units) this project
measures on, it reaches 193-240 GFLOP/s: what AVX2 code can do there, half of what the cores can.
The same wheels also carry oneDNN, which picks its kernels by instruction set: its fp32 products
run 2.1-2.4× oneMKL's on the projections of a SmolLM2 LoRA step (458-499 against 201-213 GFLOP/s),
1.6-1.9× on the rank-16 products and the 49k-row output head (``benchmarks/cpu_gemm.py``), both in
fp32 (largest relative error against float64: 3-8e-7 for oneMKL, 5e-7 to 1.3e-6 for oneDNN: the
order of the sums differs).

``mm(a, b, add)`` = ``a @ b + add`` through oneDNN's linear primitive (``b`` given to it as the
(out, in) weight ``bᵀ``, a view; ``add`` fused into its output) inside ``onednn_scope()`` where
``CPU_GEMM`` says so, else through ``torch.addmm`` / ``@``. It has no autograd formula of its own:
it is for the insides of ``autograd.Function`` nodes and for inference, and falls back to torch
wherever a gradient would have to flow through it.

Memory: oneDNN keeps ~0.3-0.65 MB for every product shape it has seen (its primitive cache and
generated kernels; measured: 100 new token counts on one projection retain 30-65 MB, never
freed). So it runs only inside ``onednn_scope()`` and on few shapes. The trainer enters it with
its token counts rounded up to a multiple of 32 (as for CPU bf16), and there only products whose
two varying sides (rows and the summed dimension) are either small (≤ 64) or multiples of 16 run
on oneDNN; any other product, such as a chunk of the output head sized by a batch's supervised
tokens, runs on the BLAS. Generation and serving (``plain.inference_on_onednn``: evaluation's
greedy answers, ``generate.generate``, the serving engine), whose row counts change with every
prompt and every step of a continuous batch, enter it with ``bucket_rows``: every product runs on
oneDNN with its rows padded up to ``row_bucket(rows)`` (at most 99 sizes, 8 per doubling). Demo
model, CPU: the engine on 16 adapters 1.42× the BLAS's tokens/s (``benchmarks/engine_gemm.py``),
``lorakit eval`` 51.7 → 36.1 s, the same tokens everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lorakit.kernels.dequant import float_weight

# "auto": oneDNN for fp32 CPU products where torch's BLAS is oneMKL on an AMD CPU with AVX-512
# (measured there; see the module docstring); "onednn": always where available; "blas": never
CPU_GEMM = os.environ.get("LORAKIT_CPU_GEMM", "auto")
CPUINFO = "/proc/cpuinfo"
# token counts are rounded up to a multiple of this where oneDNN takes the products (bounded shapes)
TOKEN_MULTIPLE = 32
_scopes: list[bool] = []  # the open onednn_scope() blocks' bucket_rows, innermost last


@functools.cache
def _linear_op() -> object | None:
    """``torch.ops.mkldnn._linear_pointwise`` where this torch build has it and oneDNN is usable."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None
    return op if torch.backends.mkldnn.is_available() else None


def cpu_flags(path: str = CPUINFO) -> tuple[str, set[str]]:
    """(vendor id, instruction-set flags) of this CPU from ``/proc/cpuinfo``; ("", set()) where unreadable."""
    vendor, flags = "", set()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return vendor, flags


@functools.cache
def _auto_onednn() -> bool:
    vendor, flags = cpu_flags()
    return vendor == "AuthenticAMD" and "avx512f" in flags and "BLAS_INFO=mkl" in torch.__config__.show()


def uses_onednn(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``onednn_scope()`` would route products of ``dtype`` tensors on ``device`` to oneDNN:
    fp32 on a CPU, and ``CPU_GEMM`` "onednn" or "auto" on a CPU where it was measured faster."""
    if CPU_GEMM == "blas" or device.type != "cpu" or dtype != torch.float32 or _linear_op() is None:
        return False
    return CPU_GEMM == "onednn" or _auto_onednn()


@contextmanager
def onednn_scope(bucket_rows: bool = False) -> Iterator[None]:
    """Within the block fp32 CPU products may run on oneDNN (``uses_onednn``). Without
    ``bucket_rows`` callers promise row counts from a bounded set (the trainer's, rounded up to
    ``TOKEN_MULTIPLE``) and only products with bounded sides do (see the module docstring); with
    it, products of any row count do, their rows padded with zeros up to ``row_bucket(rows)`` (the
    padding's rows dropped from the result): generation and serving, whose row counts change freely."""
    _scopes.append(bucket_rows)
    try:
        yield
    finally:
        _scopes.pop()


def _bounded(n: int) -> bool:
    return n <= 64 or n % 16 == 0


def row_bucket(n: int) -> int:
    """``n`` rounded up to one of a few sizes: 1, 2, 4, 8, then multiples of 8 up to 64, then of
    2^(bits(n) − 4): 8 sizes per doubling, at most 1/8 of the rows padding above 64 (100 → 104,
    1000 → 1024), 99 sizes up to 2^17 rows. Single rows stay single: oneDNN's one-row product (a
    GEMV) is 1.6-2.8× faster than its 8-row one on the demo model's projections and head."""
    if n <= 8:
        return 1 << max(0, n - 1).bit_length()
    step = 1 << max(3, n.bit_length() - 4)
    return -(-n // step) * step


def onednn_applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``mm(a, b)`` runs on oneDNN: inside ``onednn_scope()``, fp32 CPU matrices with
    bounded varying sides, no gradient to track, and ``uses_onednn``."""
    if not _scopes or a.dtype != torch.float32 or b.dtype != torch.float32:
        return False
    if not ((_scopes[-1] or _bounded(a.shape[0])) and _bounded(a.shape[1])):
        return False
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return False
    return uses_onednn(a.device, a.dtype)


def row_multiple(a: torch.Tensor, b: torch.Tensor) -> int:
    """16 where ``a @ b`` with ``a``'s rows padded to a multiple of 16 would run on oneDNN, else 1:
    what a caller whose row count varies freely pads to, to get oneDNN's rate with bounded shapes."""
    return 16 if onednn_applies(a[:16], b) else 1


def mm(a: torch.Tensor, b: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` (+ ``add``): a (n, k), b (k, m), add (n, m) of a's dtype → (n, m). Any strides.
    Computed in the operands' dtype, also under autocast (callers cast what they want rounded)."""
    if onednn_applies(a, b) and (add is None or (add.dtype == a.dtype and add.shape == (a.shape[0], b.shape[1]))):
        op = _linear_op()
        weight = b.t()  # oneDNN's linear computes x wᵀ with w (out, in)
        rows = a.shape[0]
        extra = row_bucket(rows) - rows if _scopes[-1] else 0
        if extra:
            a = torch.cat([a, a.new_zeros(extra, a.shape[1])])
            add = None if add is None else torch.cat([add, add.new_zeros(extra, add.shape[1])])
        out = op(a, weight, None, "none", [], "") if add is None else op.binary(a, add, weight, None, "add")  # type: ignore[operator, attr-defined]
        return out[:rows] if extra else out
    device = a.device.type
    with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext():
        return a @ b if add is None else torch.addmm(add, a, b)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (…, in) Wᵀ + b through ``mm`` → (…, out)."""
    x2 = x.reshape(-1, x.shape[-1])
    add = None if bias is None else bias.expand(x2.shape[0], weight.shape[0]).contiguous()
    y = mm(x2, weight.T, add)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


class _Linear(torch.autograd.Function):
    """y = x Wᵀ + b with every product through ``mm``: forward, ∂L/∂x = G W, and, where W needs
    one, ∂L/∂W = Gᵀ x (rows: W's out features; summed: the tokens). Keeps W, and x only where W
    trains: what autograd keeps for ``F.linear``. A 4-bit W is kept packed and dequantized again
    for ∂L/∂x."""

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x2 (N, in) → (N, out), a tensor of its own (``linear`` reshapes it outside the node)."""
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, weight)
        ctx.has_bias = bias is not None
        return _linear(x2, float_weight(weight, x2.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        g = grad  # (N, out)
        w = float_weight(weight, g.dtype) if need_x else weight
        grad_x = mm(g, w) if need_x else None
        grad_w = mm(g.T, x).to(weight.dtype) if need_w else None
        grad_b = g.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with its products (and its gradients' products) on ``mm``:
    oneDNN inside ``onednn_scope()`` where it applies. x (…, in), weight (out, in), bias (out,).
    ``weight`` may be a frozen bitsandbytes 4-bit parameter: dequantized to x's dtype for each
    product, only the packed weight kept (``kernels.dequant``)."""
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad
                                           or (bias is not None and bias.requires_grad)):
        return _linear(x, float_weight(weight, x.dtype), bias)  # no autograd node (~14 µs a call) to build
    y = _Linear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], y.shape[-1])
