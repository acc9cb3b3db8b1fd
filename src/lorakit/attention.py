"""Padding-free attention: a batch flattened into one row of real tokens, attention kept per example.

The trainer concatenates a micro-batch's examples into one (1, N) row with ``position_ids``
restarting at each example and ``cu_seq_lens`` = [0, n₀, n₀+n₁, …] marking where each one starts.
Every linear layer then runs on the N real tokens only (no padding FLOPs), and attention, the one
operation that mixes tokens, is computed per example:

    q, k, v (1, H, N, D) → gathered into (S, H, L, D), L = longest example, padded at the end
    → causal attention (padding sits after every real token, so no real query sees it) → the
    real queries' rows gathered back, (1, N, H, D).

Registered with transformers' attention interface as ``"lorakit_varlen"``; a forward without
``cu_seq_lens_q`` (padded batches, evaluation, generation) runs transformers' SDPA path with its
usual mask, so the model behaves as before outside padding-free training. Under CPU autocast
such a padded batch instead runs its rows as segments of the math node below (``padded_plan``),
or SDPA in fp32 where that does not apply: ATen's CPU flash backward is ~3× slower on bf16.
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

from lorakit.errors import LorakitError
from lorakit.models import config_value, evaluating, sequence_mixers

NAME = "lorakit_varlen"
# CPU kernel for per-segment attention: "auto" (16-bit compute with one layer's fp32 scores within
# MATH_BYTES: "math", else "flash"), "flash" (_FlashSegments), "math" (_MathSegments), or "sdpa"
# (autograd through SDPA on the gathered segments, the path other devices take)
CPU_ATTENTION = "auto"
MATH_BYTES = 32 * 2**20
# attention-interface arguments that change the function beyond the masks this module builds: a
# model passing one is refused (``supports_padding_free`` says no up front where its config shows it)
UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks")
UNSUPPORTED_CONFIG = ("attn_logit_softcapping", "attention_chunk_size")


class AttentionError(LorakitError, NotImplementedError):
    """A model asks lorakit's attention for something it does not compute."""


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


def plan_segments(cu_seqlens: torch.Tensor, max_len: int, prefix: int = 0, window: int | None = None) -> SegmentPlan:
    """The ``SegmentPlan`` of a row with segments ``cu_seqlens`` (S+1,). With ``prefix`` = P > 0 the
    first segment, tokens [0, P), is a prefix every later segment attends to: each later segment's
    keys are the P prefix tokens followed by its own, and the prefix itself is segment 0, whose
    queries see only the prefix keys causally (its own-key half is masked).

    ``window`` = W (a sliding-window layer, transformers' convention) further hides every key more
    than W − 1 positions before its query: query position i sees key position j iff i − W < j ≤ i.
    A later segment's positions continue after the prefix (its slot t is position P + t), so a
    prefix key j lies P + t − j positions back. No mask is built where no distance reaches W."""
    dev = cu_seqlens.device
    reach = max_len + prefix  # one more than the largest query-key distance in the row
    if window is not None and window >= reach:
        window = None
    if not prefix:
        gather, valid = segment_index(cu_seqlens, max_len)
        rows, cols = valid.nonzero(as_tuple=True)
        mask = None
        if window is not None:
            i = torch.arange(max_len, device=dev)[:, None]
            j = torch.arange(max_len, device=dev)[None, :]
            mask = ((j <= i) & (i - j < window)).expand(gather.shape[0], 1, max_len, max_len)
        return SegmentPlan(gather, gather, mask, rows, cols)
    if int(cu_seqlens[1]) != prefix:
        raise ValueError(f"shared prefix of {prefix} tokens but the first segment has {int(cu_seqlens[1])}")
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
    first = torch.arange(s, device=dev)[:, None, None] == 0
    mask = torch.where(first, head & (j <= i), head | own)
    if window is not None:
        # key column j is position j in every segment (prefix keys 0..P-1, then own slot t at P + t);
        # queries sit at position i in segment 0 and at P + i in the others
        near = torch.where(first, i - j < window, prefix + i - j < window)
        # a padded query row may now see nothing: let it see the prefix's last key (its output is unused)
        mask = mask & near
        mask[:, :, prefix - 1] |= ~mask.any(-1)
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
    """(S, H, L, D) → (N, H, D): the real queries' outputs in token order, a tensor of its own (the
    nodes below return it so; callers add the leading batch dimension outside them, so that a
    model may modify the result in place)."""
    return out[plan.rows, :, plan.cols]


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if mask is None else torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf"))


class _FlashSegments(torch.autograd.Function):
    """Per-segment attention on CPU through ATen's flash kernel, keeping only q, k, v (unpadded,
    (1, h, N, D)), the output (N, H, D), the log-sum-exp (S, H, L) and the integer/bool
    ``SegmentPlan`` for the backward pass.

    Autograd around ``F.scaled_dot_product_attention`` on gathered inputs keeps the padded copies
    of q, k and v (k and v widened to all H heads) and a padded output besides the one the output
    projection keeps: about three times the memory. Here the padded tensors are gathered again in
    backward, and the output is returned in the (N, H, D) layout the output projection reads,
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

        def padded(t: torch.Tensor) -> torch.Tensor:  # (N, H, D) → (S, H, L, D), zeros in padding
            full = t.new_zeros(s, length, *t.shape[1:])
            full[plan.rows, plan.cols] = t
            return full.transpose(1, 2)

        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            padded(gy), _pad(q, plan.queries), _pad(k, plan.keys), _pad(v, plan.keys), padded(y), lse, 0.0,
            mask is None, attn_mask=mask, scale=ctx.scale)
        n = q.shape[2]
        return (_unpad_grad(dq, plan.queries, n), _unpad_grad(dk, plan.keys, n), _unpad_grad(dv, plan.keys, n),
                None, None)


class _MathSegments(torch.autograd.Function):
    """Per-segment attention as batched matmuls, for short segments (CPU).

    With g = H / Hkv query heads per key/value head, each segment's queries are grouped by their
    key/value head, so one batched product serves the g heads that share it:

        q (S, Hkv, g·L, D)   k, v (S, Hkv, Lk, D)
        z = s · q kᵀ, −∞ where hidden (fp32)     lse = logsumexp(z)     P = exp(z − lse)     O = P v

    and backward recomputes P from q, k and the saved lse (nothing of size L·Lk is kept):

        D = rowsum(∂O ⊙ O)   ∂v = Pᵀ ∂O   ∂z = P ⊙ (∂O vᵀ − D)   ∂q = s · ∂z k   ∂k = s · ∂zᵀ q

    The products run in the inputs' dtype (bf16 under autocast: ~4× the fp32 rate on CPUs with
    native bf16), the softmax in fp32. Saved: q, k, v unpadded, the output and the lse, as
    ``_FlashSegments`` keeps. Padded query rows get a zero output gradient, hence zero ∂z.
    """

    @staticmethod
    def _scores(qg: torch.Tensor, kp: torch.Tensor, mask: torch.Tensor, groups: int, scale: float) -> torch.Tensor:
        """z = s · q kᵀ + mask in fp32 (or wider): (S, Hkv, g·L, Lk), −∞ at the keys a query must not see."""
        s, hkv, rows, _ = qg.shape
        z = torch.matmul(qg, kp.transpose(-1, -2)).to(torch.promote_types(qg.dtype, torch.float32)).mul_(scale)
        z.view(s, hkv, groups, rows // groups, -1).add_(mask[:, :, None])
        return z

    @staticmethod
    def _probabilities(z: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """exp(max(z − shift, −80)) in z's buffer. ATen's CPU exp takes a slow path for −∞ and for
        results below fp32's normal range (~3× and ~15× the time); with the floor a hidden key
        weighs e⁻⁸⁰ ≈ 2e-35 instead of 0, beneath the resolution of any sum it enters (≥ 1)."""
        return z.sub_(shift).clamp_(min=-80.0).exp_()

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SegmentPlan,
                scale: float | None) -> torch.Tensor:
        h, hkv, d = q.shape[1], k.shape[1], q.shape[3]
        scale = d ** -0.5 if scale is None else scale
        qp = _pad(q, plan.queries)  # (S, H, L, D)
        segs, _, length, _ = qp.shape
        qg = qp.reshape(segs, hkv, (h // hkv) * length, d)
        kp, vp = _pad(k, plan.keys), _pad(v, plan.keys)  # (S, Hkv, Lk, D)
        z = _MathSegments._scores(qg, kp, _mask(plan), h // hkv, scale)
        peak = z.amax(-1, keepdim=True)  # finite: every query sees at least one key
        p = _MathSegments._probabilities(z, peak)
        total = p.sum(-1, keepdim=True)
        out = torch.matmul(p.div_(total).to(q.dtype), vp)  # (S, Hkv, g·L, D)
        y = _rows(out.view(segs, h, length, d), plan)
        ctx.save_for_backward(q, k, v, y, total.log_().add_(peak))  # lse
        ctx.plan, ctx.scale = plan, scale
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, y, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        h, hkv, d, n = q.shape[1], k.shape[1], q.shape[3], q.shape[2]
        segs, length = plan.queries.shape
        groups = h // hkv

        def grouped(t: torch.Tensor) -> torch.Tensor:  # (N, H, D) → (S, Hkv, g·L, D), zeros in padding
            full = t.new_zeros(segs, length, h, d)
            full[plan.rows, plan.cols] = t
            return full.transpose(1, 2).reshape(segs, hkv, groups * length, d)

        qg = _pad(q, plan.queries).reshape(segs, hkv, groups * length, d)
        kp, vp = _pad(k, plan.keys), _pad(v, plan.keys)
        go = grouped(gy.to(q.dtype))
        acc = lse.dtype
        rowdot = (go.to(acc) * grouped(y).to(acc)).sum(-1, keepdim=True)  # D (S, Hkv, g·L, 1)
        p = _MathSegments._probabilities(_MathSegments._scores(qg, kp, _mask(plan), groups, scale), lse)
        grad_v = torch.matmul(p.to(q.dtype).transpose(-1, -2), go)  # (S, Hkv, Lk, D)
        dz = torch.matmul(go, vp.transpose(-1, -2)).to(acc).sub_(rowdot).mul_(p).mul_(scale).to(q.dtype)
        del p
        grad_q = torch.matmul(dz, kp).view(segs, h, length, d)
        grad_k = torch.matmul(dz.transpose(-1, -2), qg)
        return (_unpad_grad(grad_q, plan.queries, n), _unpad_grad(grad_k, plan.keys, n),
                _unpad_grad(grad_v, plan.keys, n), None, None)


def _math_fits(plan: SegmentPlan, heads: int) -> bool:
    """Whether one layer's fp32 scores (S, H, L, Lk) for ``plan`` fit in ``MATH_BYTES``."""
    segs, length = plan.queries.shape
    return segs * heads * length * plan.keys.shape[1] * 4 <= MATH_BYTES


def _mask(plan: SegmentPlan) -> torch.Tensor:
    """(S, 1, L, Lk) fp32, 0 where a query sees a key and −∞ elsewhere: the plan's mask, or the
    causal one when the plan has none."""
    if plan.mask is not None:
        return _additive(plan.mask, torch.float32)
    length = plan.queries.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=plan.queries.device).tril()
    return _additive(causal[None, None], torch.float32)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                     scale: float | None = None, dropout_p: float = 0.0, prefix: int = 0,
                     window: int | None = None) -> torch.Tensor:
    """Causal attention within each segment of a packed row.

    q (1, H, N, D), k and v (1, Hkv, N, D) with H a multiple of Hkv (grouped-query attention);
    ``cu_seqlens`` (S+1,) cumulative segment lengths ending at N. Returns (1, N, H, D), the layout
    transformers' attention output has.

    ``prefix`` = P > 0 says the first segment, tokens [0, P), is a prefix shared by every other
    segment (see ``collate.collate_flat``): it attends causally to itself, and each later segment
    attends to all P prefix keys plus its own keys up to itself, exactly as if the prefix had been
    repeated in front of it. ``window`` = W (a sliding-window layer) hides keys W or more positions
    before their query, as transformers' sliding-window mask does.

    On CPU without dropout this runs one of two nodes that keep only q, k, v, the output and the
    log-sum-exp for backward (``CPU_ATTENTION``): ``_MathSegments`` for bf16 compute on short
    segments, ``_FlashSegments`` otherwise; elsewhere autograd differentiates SDPA on the gathered
    segments. All compute the same function.
    """
    plan = plan_segments(cu_seqlens, max_len, prefix, window)
    if CPU_ATTENTION != "sdpa" and q.device.type == "cpu" and dropout_p == 0:
        # the result in the dtype SDPA would give (under autocast its dtype; rotary leaves q, k in
        # fp32 beside a bf16 v)
        out = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
        if CPU_ATTENTION == "math" or (CPU_ATTENTION == "auto" and out.itemsize == 2 and _math_fits(plan, q.shape[1])):
            # bf16 products at the bf16 matmul rate (SmolLM2 segments, AVX512-BF16: 1.10× a bf16 step;
            # in fp32 it only ties with the flash kernel)
            return _MathSegments.apply(q.to(out), k.to(out), v.to(out), plan, scale)[None]
        # ATen's CPU flash backward runs bf16 inputs ~3× slower than fp32 ones: compute in fp32
        work = torch.promote_types(out, torch.float32)
        return _FlashSegments.apply(q.to(work), k.to(work), v.to(work), plan, scale).to(out)[None]
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    out = F.scaled_dot_product_attention(_pad(q, plan.queries), _pad(k, plan.keys), _pad(v, plan.keys),
                                         attn_mask=plan.mask, is_causal=plan.mask is None, scale=scale,
                                         dropout_p=dropout_p, **gqa)
    return _rows(out, plan)[None]


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               scale: float | None = None, prefix: int = 0, window: int | None = None) -> torch.Tensor:
    """Segment by segment with an explicit causal softmax (the shared prefix, if any, literally
    prepended to each segment's keys and values; with ``window``, only the last ``window`` keys up to
    each query): what ``varlen_attention`` must equal, (1, N, H, D)."""
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
        if window is not None:
            allowed &= ~torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n - window)
        outs.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vs)
    return torch.cat(outs, dim=2).transpose(1, 2)


def padded_plan(mask: torch.Tensor | None, rows: int, length: int) -> SegmentPlan | None:
    """The ``SegmentPlan`` of a padded (B, T) batch flattened row after row: every row a segment of
    T tokens, attending as transformers' boolean SDPA mask (B, 1, T, T) says (None: causal). None
    when the mask is not boolean or some query sees no key at all (left padding), where a softmax
    over nothing has no value and SDPA's own handling must run."""
    if mask is not None and (mask.dtype != torch.bool or mask.shape != (rows, 1, length, length)
                             or not bool(mask.any(-1).all())):
        return None
    device = mask.device if mask is not None else None
    positions = torch.arange(rows * length, device=device).view(rows, length)
    r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(length, device=device), indexing="ij")
    return SegmentPlan(positions, positions, mask, r.reshape(-1), c.reshape(-1))


def _interface_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature; returns (B, N, H, D) as its callers expect."""
    for name in UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise AttentionError(f"{type(module).__name__} passes {name}= to attention, which lorakit's "
                                 f"attention does not implement; set data.padding_free=false")
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and getattr(module, "is_causal", True) is False:
        raise AttentionError(f"{type(module).__name__} attends both ways; padding-free batches attend causally "
                             f"within each example: set data.padding_free=false")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if query.device.type == "cpu" and torch.is_autocast_enabled("cpu") and dropout == 0:
            # padded batches under CPU autocast: the rows as segments of the math node (bf16 products);
            # SDPA in fp32 where it does not apply (ATen's CPU flash backward is ~3× slower on bf16)
            dtype = torch.get_autocast_dtype("cpu")
            plan = padded_plan(attention_mask, query.shape[0], query.shape[2])
            b, h, t, d = query.shape
            if plan is not None and _math_fits(plan, h):
                flat = [x.to(dtype).transpose(0, 1).reshape(1, x.shape[1], b * t, d) for x in (query, key, value)]
                return _MathSegments.apply(*flat, plan, scaling).view(b, t, h, d), None
            with torch.autocast("cpu", enabled=False):
                out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                                      attention_mask, dropout=dropout, scaling=scaling, **kwargs)
            return out.to(dtype), weights
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = varlen_attention(query, key, value, cu, int(kwargs["max_length_q"]), scaling, dropout,
                           int(kwargs.get("shared_prefix") or 0), kwargs.get("sliding_window"))
    return out, None


def register() -> None:
    """Make ``"lorakit_varlen"`` a transformers attention implementation (idempotent)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(NAME, _interface_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def supports_padding_free(model: nn.Module) -> bool:
    """True for transformers models that route attention through the attention interface and use
    SDPA or eager attention (the two this module stands in for), with no attention feature beyond
    causal, sliding-window and shared-prefix masks (see ``padding_free_obstacle``)."""
    return padding_free_obstacle(model) is None


def padding_free_obstacle(model: nn.Module) -> str | None:
    """Why ``model`` cannot run padding-free batches, as a phrase for an error message, or None."""
    mixers = sequence_mixers(model)
    if mixers:
        return (f"mixes tokens outside attention ({mixers[0]}: convolution or state-space layers), so examples "
                f"sharing a row would see each other")
    config = getattr(model, "config", None)
    if config is None or not getattr(type(model), "_supports_attention_backend", False) \
            or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager", NAME):
        return "does not route attention through transformers' attention interface with sdpa/eager"
    if any(getattr(m, "is_causal", True) is False for m in model.modules()):
        return "has bidirectional attention (padding-free batches attend causally within each example)"
    for name in UNSUPPORTED_CONFIG:  # Gemma 2's soft-capped scores, Llama 4's chunked attention
        if config_value(config, name) is not None:
            return f"sets {name} (an attention feature padding-free batches do not implement)"
    if any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in model.modules()):  # gpt-oss
        return "has attention sinks (an attention feature padding-free batches do not implement)"
    if _PROBED not in model.__dict__:
        model.__dict__[_PROBED] = _segments_stay_apart(model)
    if not model.__dict__[_PROBED]:
        return ("lets one packed example change another's outputs, or ignores the shared prefix (its layers do "
                "not hand the segment bounds to attention, or mix tokens outside it)")
    return None


_PROBED = "_lorakit_padding_free_probe"


def _segments_stay_apart(model: nn.Module) -> bool:
    """Whether, in a padding-free row [prefix P | example A | example B] with P shared, example B's
    logits are untouched when A's tokens change (nothing carries A into B: every layer hands the
    segment bounds to attention and nothing else mixes tokens) and move when P's change (B does
    attend to the shared prefix). Both compare runs of one shape, whose per-token arithmetic is the
    same, so the test holds in any dtype. Three forwards of 12 tokens in eval mode (no dropout
    draws); a model the probe cannot run counts as no."""
    param = next(model.parameters(), None)
    if param is None:
        return False
    vocab = model.get_input_embeddings().weight.shape[0] if hasattr(model, "get_input_embeddings") else 2
    device = param.device
    ids = (torch.arange(3, 15, device=device) * 7 % max(vocab, 1))[None]  # P = 3, A = 4, B = 5 tokens
    other_a, other_p = ids.clone(), ids.clone()
    other_a[:, 3:7] = (other_a[:, 3:7] + 1) % max(vocab, 1)
    other_p[:, :3] = (other_p[:, :3] + 1) % max(vocab, 1)
    cu = torch.tensor([0, 3, 7, 12], dtype=torch.int32, device=device)
    flat = {"position_ids": torch.tensor([[0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 7]], device=device),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 5, "max_length_k": 5, "shared_prefix": 3}
    try:
        with evaluating(model), padding_free(model):
            b = [model(input_ids=x, **flat, use_cache=False).logits[0, 7:].double() for x in (ids, other_a, other_p)]
        scale = float(b[0].abs().max())
        return bool((b[1] - b[0]).abs().max() <= 1e-5 * scale < (b[2] - b[0]).abs().max())
    except Exception:  # a model the probe cannot run trains on padded batches, which is always right
        return False


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
