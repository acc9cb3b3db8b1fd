"""Padding-free attention: a batch flattened into one row of real tokens, attention kept per example.

The trainer concatenates a micro-batch's examples into one (1, N) row with ``position_ids``
restarting at each example and ``cu_seq_lens`` = [0, n₀, n₀+n₁, …] marking where each one starts.
Every linear layer then runs on the N real tokens only (no padding FLOPs), and attention, the one
operation that mixes tokens, is computed per example:

    q, k, v (1, H, N, D) → gathered into (S, H, L, D), L = longest example, padded at the end
    → causal SDPA (padding sits after every real token, so no real query sees it) → scattered back.

Registered with transformers' attention interface as ``"lorakit_varlen"``; a forward without
``cu_seq_lens_q`` (evaluation, generation) runs transformers' SDPA path with its usual mask, so
the model behaves exactly as before outside padding-free training.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NAME = "lorakit_varlen"


def segment_index(cu_seqlens: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For S segments: ``gather`` (S, L) token positions (padding slots point at position 0) and
    ``valid`` (S, L) bool, with L = ``max_len``."""
    starts, lengths = cu_seqlens[:-1].long(), cu_seqlens.diff().long()
    offsets = torch.arange(max_len, device=cu_seqlens.device)
    valid = offsets[None, :] < lengths[:, None]
    gather = torch.where(valid, starts[:, None] + offsets[None, :], torch.zeros_like(valid, dtype=torch.long))
    return gather, valid


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                     scale: float | None = None, dropout_p: float = 0.0, prefix: int = 0) -> torch.Tensor:
    """Causal attention within each segment of a packed row.

    q (1, H, N, D), k and v (1, Hkv, N, D) with H a multiple of Hkv (grouped-query attention);
    ``cu_seqlens`` (S+1,) cumulative segment lengths ending at N. Returns (1, H, N, D).

    ``prefix`` = P > 0 says the first segment, tokens [0, P), is a prefix shared by every other
    segment (see ``data.collate_flat``): it attends causally to itself, and each later segment
    attends to all P prefix keys plus its own keys up to itself, exactly as if the prefix had been
    repeated in front of it.
    """
    if prefix:
        if int(cu_seqlens[1]) != prefix:
            raise ValueError(f"shared prefix of {prefix} tokens but the first segment has {int(cu_seqlens[1])}")
        head = _causal(q[..., :prefix, :], k[..., :prefix, :], v[..., :prefix, :], scale, dropout_p)
        return torch.cat([head, _segments(q, k, v, cu_seqlens[1:], max_len, scale, dropout_p, prefix)], dim=2)
    return _segments(q, k, v, cu_seqlens, max_len, scale, dropout_p, 0)


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, dropout_p: float,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                          dropout_p=dropout_p, **gqa)


def _segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
              scale: float | None, dropout_p: float, prefix: int) -> torch.Tensor:
    """Segments [cu[i], cu[i+1]) gathered into (S, h, L, D); with ``prefix`` P the keys of every
    segment are the P prefix tokens followed by its own (an explicit (S, 1, L, P+L) mask)."""
    gather, valid = segment_index(cu_seqlens, max_len)
    s, length = gather.shape

    def pad(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # (1, h, N, D) → (S, h, cols, D)
        return t[0].index_select(1, index.reshape(-1)).unflatten(1, index.shape).transpose(0, 1)

    mask = None
    keys = gather
    if prefix:
        keys = torch.cat([torch.arange(prefix, device=gather.device).expand(s, prefix), gather], dim=1)
        i = torch.arange(length, device=gather.device)[:, None]
        j = torch.arange(prefix + length, device=gather.device)[None, :]
        # padded query rows (i ≥ the segment's length) still see the prefix: no all-masked row, no NaN
        mask = ((j < prefix) | (j - prefix <= i))[None, None] & torch.cat(
            [torch.ones(s, prefix, dtype=torch.bool, device=valid.device), valid], dim=1)[:, None, None, :]
    out = _causal(pad(q, gather), pad(k, keys), pad(v, keys), scale, dropout_p, mask)  # (S, H, L, D)
    flat = out.transpose(0, 1).flatten(1, 2)  # (H, S·L, D)
    keep = valid.reshape(-1).nonzero().squeeze(1)  # segment order = token order
    return flat.index_select(1, keep)[None]


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               scale: float | None = None, prefix: int = 0) -> torch.Tensor:
    """Segment by segment with an explicit causal softmax (the shared prefix, if any, literally
    prepended to each segment's keys and values): what ``varlen_attention`` must equal."""
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
    return torch.cat(outs, dim=2)


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
    return out.transpose(1, 2).contiguous(), None


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
