"""Mixed-adapter LoRA for inference as one Triton kernel per layer (segmented gather matmul).

A batch of B rows × T tokens where row b uses adapter slot s_b (0: none). The stacks hold every
adapter of the layer, zero-padded to rank R, with the scale folded into B: A (S, R, K), B (S, N, R).
The rows with an adapter are listed sorted by slot (``rows``), in P segments (start, length, slot).
For every token t of a row b in segment p, in place on the base output y (B·T, N):

    y[t] ← round_y( y[t] + (x[t] A_{s_p}ᵀ) B_{s_p}ᵀ )          products and the sum in fp32

One program takes BM tokens of one segment: it forms the (BM, R) shrink x A_{s_p}ᵀ over K in BK
steps, then for each of its BN-column blocks multiplies by that (R, BN) block of B_{s_p}ᵀ and adds
into y; each (token, column) has exactly one writer, so no atomics. The columns are split over
``n_split`` programs per token block, chosen so that about ``programs`` run in all: a decode step
(few tokens) spreads the columns (each program redoes the small shrink), a prefill (many token
blocks) keeps them in one program and forms each shrink once. Each adapter's A and B are read straight
from the stacks (no per-row or per-group copies, no padding of uneven groups, rows without an
adapter are never touched), and the base output is updated in place: one launch per layer in
place of the grouped path's gathers, two batched matmuls, scatter and add.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it against the
plain-PyTorch reference). The kernel is compiled on first use, so the environment variable is read
then, not at import.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from itertools import accumulate
from typing import Any

import torch


def available(x: torch.Tensor) -> bool:
    """Whether the kernel can run on ``x``: Triton is installed and x is on a CUDA device, or the
    interpreter is on (``TRITON_INTERPRET=1``) for CPU tensors."""
    if not (x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def segmented_lora(x, a, b, y, rows, seg_start, seg_len, seg_slot, tokens_per_row, K, N, R, n_split,
                       sxm, sxk, sas, sar, sak, sbs, sbn, sbr, sym, syn,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        p = tl.program_id(0)
        length = tl.load(seg_len + p) * tokens_per_row
        if tl.program_id(1) * BM >= length:
            return
        start = tl.load(seg_start + p)
        slot = tl.load(seg_slot + p).to(tl.int64)
        m = tl.program_id(1) * BM + tl.arange(0, BM)
        m_ok = m < length
        row = tl.load(rows + start + m // tokens_per_row, mask=m_ok, other=0).to(tl.int64)
        token = row * tokens_per_row + m % tokens_per_row  # (BM,) rows of x and y
        r = tl.arange(0, BR)
        h = tl.zeros((BM, BR), dtype=tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            xv = tl.load(x + token[:, None] * sxm + k[None, :] * sxk, mask=m_ok[:, None] & (k[None, :] < K),
                         other=0.0).to(tl.float32)  # (BM, BK)
            av = tl.load(a + slot * sas + r[None, :] * sar + k[:, None] * sak, mask=(r[None, :] < R) & (k[:, None] < K),
                         other=0.0).to(tl.float32)  # (BK, BR) = A_sᵀ block
            h += tl.dot(xv, av, input_precision="ieee")
        for n0 in range(tl.program_id(2) * BN, N, n_split * BN):  # this program's column blocks
            n = n0 + tl.arange(0, BN)
            bv = tl.load(b + slot * sbs + n[None, :] * sbn + r[:, None] * sbr, mask=(r[:, None] < R) & (n[None, :] < N),
                         other=0.0).to(tl.float32)  # (BR, BN) = B_sᵀ block
            update = tl.dot(h, bv, input_precision="ieee")
            out = y + token[:, None] * sym + n[None, :] * syn
            ok = m_ok[:, None] & (n[None, :] < N)
            old = tl.load(out, mask=ok, other=0.0).to(tl.float32)
            tl.store(out, (old + update).to(y.dtype.element_ty), mask=ok)

    return segmented_lora


def _pow2(n: int, least: int) -> int:
    return max(least, 1 << (max(n, 1) - 1).bit_length())


def segmented_lora_add_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor,
                        seg_start: torch.Tensor, seg_len: torch.Tensor, seg_slot: torch.Tensor,
                        max_len: int, programs: int | None = None) -> torch.Tensor:
    """Add each row's LoRA update into ``y`` in place (see the module docstring) and return y.

    y (B, T, N) and x (B, T, K) as the layer's output and input; a (S, R, K), b (S, N, R) the
    stacks (slot 0 unused here); rows (U,) the rows with an adapter sorted by slot; seg_start,
    seg_len, seg_slot (P,) each present slot's run in ``rows``; max_len the longest run (rows);
    programs: how many programs to aim for (default: 4 per streaming multiprocessor on CUDA).
    """
    batch, tokens, n_out = y.shape
    k_in, rank = x.shape[-1], a.shape[1]
    y2, x2 = y.view(batch * tokens, n_out), x.reshape(batch * tokens, k_in)
    if len(seg_len) == 0:
        return y
    block_m = 16  # tl.dot's smallest tile; a decode step's segments are a few rows
    block_n = 64 if n_out <= 4096 else 128
    if programs is None:
        programs = 4 * torch.cuda.get_device_properties(y.device).multi_processor_count if y.is_cuda else 1
    token_blocks, col_blocks = len(seg_len) * -(-max_len * tokens // block_m), -(-n_out // block_n)
    n_split = min(col_blocks, max(1, -(-programs // token_blocks)))
    grid = (len(seg_len), -(-max_len * tokens // block_m), n_split)
    _kernel()[grid](x2, a, b, y2, rows, seg_start, seg_len, seg_slot, tokens, k_in, n_out, rank, n_split,
                    x2.stride(0), x2.stride(1), a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1),
                    b.stride(2), y2.stride(0), y2.stride(1),
                    BM=block_m, BN=block_n, BK=64, BR=_pow2(rank, 16))
    return y


def segments(row_slots: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor, int]:
    """(rows, seg_start, seg_len, seg_slot, max_len) for ``segmented_lora_add_`` from each row's
    slot (0: no adapter)."""
    rows = sorted((i for i, s in enumerate(row_slots) if s), key=lambda i: row_slots[i])  # stable: in order
    counts = Counter(row_slots[i] for i in rows)
    slots = sorted(counts)
    lengths = [counts[s] for s in slots]
    starts = list(accumulate(lengths, initial=0))[:-1]

    def t(v: list[int]) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.int32, device=device)

    return t(rows), t(starts), t(lengths), t(slots), max(lengths, default=0)
