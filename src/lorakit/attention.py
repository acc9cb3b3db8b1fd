"""Padding-free attention: a batch flattened into one row of real tokens, attention kept per example.

The trainer concatenates a micro-batch's examples into one (1, N) row with ``position_ids``
restarting at each example and ``cu_seq_lens`` = [0, n₀, n₀+n₁, …] marking where each one starts.
Every linear layer then runs on the N real tokens only (no padding FLOPs), and attention, the one
operation that mixes tokens, is computed per example:

    q, k, v (1, H, N, D) → gathered into (S, H, L, D), L = longest example, padded at the end
    → causal SDPA (padding sits after every real token, so no real query sees it) → the real
    queries' rows gathered back, (1, N, H, D).

Registered with transformers' attention interface as ``"lorakit_varlen"``; a forward without
``cu_seq_lens_q`` (evaluation, generation) runs transformers' SDPA path with its usual mask, so
the model behaves exactly as before outside padding-free training.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NAME = "lorakit_varlen"
FLASH_CPU = True  # False: autograd through SDPA on CPU too (the path other devices take)


def segment_index(cu_seqlens: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For S segments: ``gather`` (S, L) token positions (padding slots point at position 0) and
    ``valid`` (S, L) bool, with L = ``max_len``."""
    starts, lengths = cu_seqlens[:-1].long(), cu_seqlens.diff().long()
    offsets = torch.arange(max_len, device=cu_seqlens.device)
    valid = offsets[None, :] < lengths[:, None]
    gather = torch.where(valid, starts[:, None] + offsets[None, :], torch.zeros_like(valid, dtype=torch.long))
    return gather, valid


@dataclass(frozen=True)
class SegmentPlan:
    """Where each segment's queries and keys sit in a packed row of N tokens.

    ``queries`` (S, L) and ``keys`` (S, Lk) are token positions (padding slots point at position 0);
    ``mask`` (S, 1, L, Lk) bool says which keys each query sees, or None for plain causal attention
    (Lk = L); ``rows`` and ``cols`` (N,) give, in token order, the (segment, slot) of every real query.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor | None
    rows: torch.Tensor
    cols: torch.Tensor


def plan_segments(cu_seqlens: torch.Tensor, max_len: int, prefix: int = 0) -> SegmentPlan:
    """The ``SegmentPlan`` of a row with segments ``cu_seqlens`` (S+1,). With ``prefix`` = P > 0 the
    first segment, tokens [0, P), is a prefix every later segment attends to: each later segment's
    keys are the P prefix tokens followed by its own, and the prefix itself is segment 0, whose
    queries see only the prefix keys causally (its own-key half is masked)."""
    if not prefix:
        gather, valid = segment_index(cu_seqlens, max_len)
        rows, cols = valid.nonzero(as_tuple=True)
        return SegmentPlan(gather, gather, None, rows, cols)
    if int(cu_seqlens[1]) != prefix:
        raise ValueError(f"shared prefix of {prefix} tokens but the first segment has {int(cu_seqlens[1])}")
    dev = cu_seqlens.device
    length = max(max_len, prefix)
    gather, valid = segment_index(cu_seqlens, length)  # segment 0 is the prefix itself
    s = gather.shape[0]
    keys = torch.cat([torch.arange(prefix, device=dev).expand(s, prefix), gather], dim=1)
    i = torch.arange(length, device=dev)[:, None]
    j = torch.arange(prefix + length, device=dev)[None, :]
    head = j < prefix  # (1, Lk): the prefix keys
    own = (j - prefix <= i) & torch.cat([torch.zeros(s, prefix, dtype=torch.bool, device=dev), valid], 1)[:, None, :]
    own[0] = False  # segment 0's own keys are the prefix keys again: seen once, through the head
    # padded query rows (i ≥ the segment's length) still see the prefix: no all-masked row, no NaN
    mask = torch.where(torch.arange(s, device=dev)[:, None, None] == 0, head & (j <= i), head | own)
    rows, cols = valid.nonzero(as_tuple=True)
    return SegmentPlan(gather, keys, mask[:, None], rows, cols)


def _pad(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(1, h, N, D) → (S, h, cols, D): the tokens at ``index`` (S, cols)."""
    return t[0].index_select(1, index.reshape(-1)).unflatten(1, index.shape).transpose(0, 1)


def _unpad_grad(g: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Adjoint of ``_pad``: (S, h, cols, D) summed back into (1, h, n, D)."""
    flat = g.transpose(0, 1).flatten(1, 2)  # (h, S·cols, D)
    return flat.new_zeros(flat.shape[0], n, flat.shape[2]).index_add_(1, index.reshape(-1), flat)[None]


def _rows(out: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """(S, H, L, D) → (1, N, H, D): the real queries' outputs in token order, contiguous."""
    return out[plan.rows, :, plan.cols][None]


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if mask is None else torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf"))


class _FlashSegments(torch.autograd.Function):
    """Per-segment attention on CPU through ATen's flash kernel, keeping only q, k, v (unpadded,
    (1, h, N, D)), the output (1, N, H, D), the log-sum-exp (S, H, L) and the integer/bool
    ``SegmentPlan`` for the backward pass.

    Autograd around ``F.scaled_dot_product_attention`` on gathered inputs keeps the padded copies
    of q, k and v (k and v widened to all H heads) and a padded output besides the one the output
    projection keeps: about three times the memory. Here the padded tensors are gathered again in
    backward, and the output is returned in the (1, N, H, D) layout the output projection reads,
    so saving it costs nothing. Padded query rows get a zero output gradient, so (with the flash
    backward's Dᵢ = rowsum(dOᵢ ⊙ Oᵢ) = 0 and dS = P ⊙ (dP − D) = 0 there) they add nothing to
    any gradient.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SegmentPlan,
                scale: float | None) -> torch.Tensor:
        mask = _additive(plan.mask, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _pad(q, plan.queries), _pad(k, plan.keys), _pad(v, plan.keys), 0.0, mask is None, attn_mask=mask,
            scale=scale)
        y = _rows(out, plan)
        ctx.save_for_backward(q, k, v, y, lse)
        ctx.plan, ctx.scale = plan, scale
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, y, lse = ctx.saved_tensors
        plan = ctx.plan
        mask = _additive(plan.mask, q.dtype)  # rebuilt: the float mask is 4× the plan's bool one
        s, length = plan.queries.shape

        def padded(t: torch.Tensor) -> torch.Tensor:  # (1, N, H, D) → (S, H, L, D), zeros in padding
            full = t.new_zeros(s, length, *t.shape[2:])
            full[plan.rows, plan.cols] = t[0]
            return full.transpose(1, 2)

        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            padded(gy), _pad(q, plan.queries), _pad(k, plan.keys), _pad(v, plan.keys), padded(y), lse, 0.0,
            mask is None, attn_mask=mask, scale=ctx.scale)
        n = q.shape[2]
        return (_unpad_grad(dq, plan.queries, n), _unpad_grad(dk, plan.keys, n), _unpad_grad(dv, plan.keys, n),
                None, None)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                     scale: float | None = None, dropout_p: float = 0.0, prefix: int = 0) -> torch.Tensor:
    """Causal attention within each segment of a packed row.

    q (1, H, N, D), k and v (1, Hkv, N, D) with H a multiple of Hkv (grouped-query attention);
    ``cu_seqlens`` (S+1,) cumulative segment lengths ending at N. Returns (1, N, H, D), the layout
    transformers' attention output has.

    ``prefix`` = P > 0 says the first segment, tokens [0, P), is a prefix shared by every other
    segment (see ``data.collate_flat``): it attends causally to itself, and each later segment
    attends to all P prefix keys plus its own keys up to itself, exactly as if the prefix had been
    repeated in front of it.

    On CPU without dropout this runs ``_FlashSegments`` (less memory kept for backward); elsewhere
    autograd differentiates SDPA on the gathered segments. Both compute the same function.
    """
    plan = plan_segments(cu_seqlens, max_len, prefix)
    if FLASH_CPU and q.device.type == "cpu" and dropout_p == 0:
        # the result in the dtype SDPA would give (under autocast its dtype; rotary leaves q, k in
        # fp32 beside a bf16 v), computed in fp32 or wider: ATen's CPU flash backward runs bf16
        # inputs ~3× slower than fp32 ones (AVX512-BF16 CPU, SmolLM2 segments: a 12% faster bf16 step)
        out = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
        work = torch.promote_types(out, torch.float32)
        return _FlashSegments.apply(q.to(work), k.to(work), v.to(work), plan, scale).to(out)
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    out = F.scaled_dot_product_attention(_pad(q, plan.queries), _pad(k, plan.keys), _pad(v, plan.keys),
                                         attn_mask=plan.mask, is_causal=plan.mask is None, scale=scale,
                                         dropout_p=dropout_p, **gqa)
    return _rows(out, plan)


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               scale: float | None = None, prefix: int = 0) -> torch.Tensor:
    """Segment by segment with an explicit causal softmax (the shared prefix, if any, literally
    prepended to each segment's keys and values): what ``varlen_attention`` must equal, (1, N, H, D)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs = []
    for start, end in itertools.pairwise(cu_seqlens.tolist()):
        keys = list(range(prefix)) if prefix and start >= prefix else []
        keys += list(range(start, end))
        qs, ks, vs = q[..., start:end, :], k[..., keys, :], v[..., keys, :]
        scores = (qs @ ks.transpose(-1, -2)) * scale
        n, m = end - start, len(keys)
        allowed = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)  # bottom-right aligned
        outs.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vs)
    return torch.cat(outs, dim=2).transpose(1, 2)


def _interface_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature; returns (B, N, H, D) as its callers expect."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = varlen_attention(query, key, value, cu, int(kwargs["max_length_q"]), scaling, dropout,
                           int(kwargs.get("shared_prefix") or 0))
    return out, None


def register() -> None:
    """Make ``"lorakit_varlen"`` a transformers attention implementation (idempotent)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(NAME, _interface_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def supports_padding_free(model: nn.Module) -> bool:
    """True for transformers models that route attention through the attention interface and use
    SDPA or eager attention (the two this module stands in for)."""
    config = getattr(model, "config", None)
    return (bool(getattr(type(model), "_supports_attention_backend", False)) and config is not None
            and getattr(config, "_attn_implementation", None) in ("sdpa", "eager", NAME))


@contextmanager
def padding_free(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, forwards given ``cu_seq_lens_q``/``max_length_q`` attend per segment."""
    register()
    config = model.config  # type: ignore[attr-defined]
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield model
    finally:
        config._attn_implementation = before
