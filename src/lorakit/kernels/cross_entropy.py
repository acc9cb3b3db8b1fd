"""The output head and the cross-entropy in one pass, a chunk of rows at a time.

For hidden states h (N, H), head weight W (V, H), optional bias b (V,) and targets y (N,):

    z = h Wᵀ + b  (N, V)        loss = Σᵢ (logsumexp(zᵢ) − zᵢ,yᵢ)
    ∂loss/∂z = softmax(z) − onehot(y) = G      ∂loss/∂h = G W     ∂loss/∂W = Gᵀ h     ∂loss/∂b = Σᵢ Gᵢ

The plain way keeps z, its log-softmax and then the gradient of each, three (N, V) tensors at
once, which for a 49k or 128k vocabulary outweigh the rest of a LoRA step's activations. Here the
gradients are formed in the forward pass, chunk by chunk, while the chunk's logits are at hand:
one (V, c) buffer is live at a time, turned in place into Gᵀ, and only ∂loss/∂h (N, H) (plus
∂loss/∂W when the head trains) is kept for backward, which just scales it by the incoming
gradient. The FLOPs are those of the plain way (one matmul forward, one or two backward).

Logits are computed transposed, Wᵀ-major as (V, c) = W hᵀ: on CPU BLAS that orientation of the
skinny product runs faster, and the softmax then reduces over dim 0. The chunk's buffer is turned
into exp(z − max) in place, and from it into the softmax, so the exponentials are taken once and
no second (V, c) tensor is made (``torch.logsumexp`` would make one and exponentiate it again).

Precision: under autocast the logits are still formed from the hidden state and the head in the
head's own dtype. Only the gradient product G W runs in autocast's dtype. On a CPU, where the
model is fp32 under bf16 autocast, this costs 7.7% of a bf16 step. It bought a lower demo eval loss
at four of five seeds: a mean of 0.0403 against 0.0430 with bf16 logits, and 0.0411 in all-fp32
training at the three seeds run. Single-seed differences are noisy: they spread from -0.0065 to
+0.0010. On a GPU the model is bf16 already, and nothing changes there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lorakit.kernels.cast import cast_frozen

CHUNK_BYTES = 64 * 2**20  # fp32 logits per chunk: 341 rows of a 49,152-token vocabulary
VOCAB_BLOCK = 4096  # rows of the head per matmul when forming a chunk's logits


def _chunk_rows(vocab: int, rows: int) -> int:
    return max(1, min(rows, CHUNK_BYTES // (4 * vocab)))


def _logits_t(w: torch.Tensor, h: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """W hᵀ (V, c) in ``acc``. Where no cast is needed, VOCAB_BLOCK rows of W at a time, so that
    each block's output is still in cache as BLAS writes it (49,152 × 189 fp32 on a 2-core AVX-512
    CPU: 55 ms instead of 70 alone, 1.004× a whole fp32 step; under bf16 it does not pay)."""
    if w.dtype != acc:
        return (w @ h.T).to(acc)
    out = torch.empty(w.shape[0], h.shape[0], dtype=acc, device=h.device)
    for start in range(0, w.shape[0], VOCAB_BLOCK):
        torch.mm(w[start:start + VOCAB_BLOCK], h.T, out=out[start:start + VOCAB_BLOCK])
    return out


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h Wᵀ + b`` against ``targets``; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grads = need_h or need_w or need_b
        # the logits in the head's own dtype, also under autocast (see "Precision" above); the gradient
        # product G W in autocast's dtype, as autocast would run it
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else weight.dtype
        acc = torch.promote_types(weight.dtype, torch.float32)  # softmax and sums: fp32, or fp64 for fp64 inputs
        h = hidden.to(weight.dtype)
        w_grad = cast_frozen(weight, dtype) if need_h else None  # a frozen head's copy: once a run (cached_casts)
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if need_b else None
        step = _chunk_rows(vocab, n)
        for start in range(0, n, step):
            hc, yc = h[start:start + step], targets[start:start + step]
            cols = torch.arange(hc.shape[0], device=hidden.device)
            zt = _logits_t(weight, hc, acc)  # (V, c)
            if bias is not None:
                zt += bias.to(acc)[:, None]
            target = zt[yc, cols]  # (c,), read before zt is overwritten
            peak = zt.amax(dim=0)  # (c,)
            total = zt.sub_(peak).exp_().sum(dim=0)  # Σ exp(z − max), exponentials kept in zt
            loss += (total.log() + peak - target).sum()  # logsumexp − z_y
            if not grads:
                continue
            gt = zt.div_(total)  # softmax, transposed
            gt[yc, cols] -= 1.0  # Gᵀ (V, c)
            if need_h:
                grad_h[start:start + step] = (gt.T.to(dtype) @ w_grad).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(gt, hc.to(acc))
            if need_b:
                grad_b += gt.sum(1)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad
        return (grad_h * scale.to(grad_h.dtype) if grad_h is not None else None,
                (grad_w * scale.to(grad_w.dtype)).to(w_dtype) if grad_w is not None else None,
                (grad_b * scale.to(grad_b.dtype)).to(b_dtype) if grad_b is not None else None,
                None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, targets, reduction="sum")`` (softmax in fp32 or wider)
    without keeping any (N, V) tensor: hidden (N, H), weight (V, H), bias (V,) or None, targets (N,)
    token ids (no ignore index: pass only the supervised rows)."""
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                   targets: torch.Tensor) -> torch.Tensor:
    """The plain way, what ``linear_cross_entropy`` must equal."""
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")
