"""The output head and the cross-entropy in one pass, a chunk of rows at a time.

For hidden states h (N, H), head weight W (V, H), optional bias b (V,) and targets y (N,):

    z = h Wᵀ + b  (N, V)        loss = Σᵢ (logsumexp(zᵢ) − zᵢ,yᵢ)
    ∂loss/∂z = softmax(z) − onehot(y) = G      ∂loss/∂h = G W     ∂loss/∂W = Gᵀ h     ∂loss/∂b = Σᵢ Gᵢ

The plain way keeps z, its log-softmax and then the gradient of each, three (N, V) tensors at
once, which for a 49k or 128k vocabulary outweigh the rest of a LoRA step's activations. Here the
gradients are formed in the forward pass, chunk by chunk, while the chunk's logits are at hand:
one (c, V) buffer is live at a time, turned in place into G, and only ∂loss/∂h (N, H) (plus
∂loss/∂W when the head trains) is kept for backward, which just scales it by the incoming
gradient. The FLOPs are those of the plain way (one matmul forward, one or two backward).

Logits are computed row-major, (c, V) = h Wᵀ, through ``gemm.mm`` (oneDNN on CPUs where it beats
the BLAS: 320-400 GFLOP/s for this product and the gradient's G W on the 2-core AMD EPYC, against
160-210 for oneMKL). The softmax then reduces along each contiguous row, and the chunk's buffer is
turned into exp(z − max) in place, and from it into the softmax, so the exponentials are taken
once and no second (c, V) tensor is made (``torch.logsumexp`` would make one and exponentiate it
again).

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
from lorakit.kernels.gemm import mm, row_multiple

CHUNK_BYTES = 64 * 2**20  # fp32 logits per chunk: 341 rows of a 49,152-token vocabulary


def _chunk_rows(vocab: int, rows: int) -> int:
    return max(1, min(rows, CHUNK_BYTES // (4 * vocab)))


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h Wᵀ + b`` against ``targets``; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, per_row: bool = False) -> torch.Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and not per_row
        need_b = bias is not None and ctx.needs_input_grad[2] and not per_row
        grads = need_h or need_w or need_b
        # the logits in the head's own dtype, also under autocast (see "Precision" above); the gradient
        # product G W in autocast's dtype, as autocast would run it
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else weight.dtype
        acc = torch.promote_types(weight.dtype, torch.float32)  # softmax and sums: fp32, or fp64 for fp64 inputs
        h = hidden.to(weight.dtype)
        w_grad = cast_frozen(weight, dtype) if need_h else None  # a frozen head's copy: once a run (cached_casts)
        loss = torch.zeros(n if per_row else (), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if need_b else None
        # rows padded to a multiple of 16 where oneDNN then takes the products (kernels.gemm); the
        # padding rows' logits are computed and never read, and their G rows are zeroed
        multiple = row_multiple(h, weight.T)
        step = _chunk_rows(vocab, n)
        step = step - step % multiple if step > multiple else step
        for start in range(0, n, step):
            hc, yc = h[start:start + step], targets[start:start + step]
            c = hc.shape[0]
            rows = torch.arange(c, device=hidden.device)
            pad = -c % multiple if c > 64 else 0
            full = mm(F.pad(hc, (0, 0, 0, pad)) if pad else hc, weight.T)  # (c + pad, V)
            full = full if full.dtype == acc else full.to(acc)
            z = full[:c]  # (c, V), a view
            if bias is not None:
                z += bias.to(acc)
            target = z[rows, yc]  # (c,), read before z is overwritten
            peak = z.amax(dim=1, keepdim=True)  # (c, 1)
            total = z.sub_(peak).exp_().sum(dim=1, keepdim=True)  # Σ exp(z − max), exponentials kept in z
            row_loss = (total.log() + peak).squeeze(1) - target  # logsumexp − z_y, (c,)
            if per_row:
                loss[start:start + c] = row_loss
            else:
                loss += row_loss.sum()
            if not grads:
                continue
            gz = z.div_(total)  # softmax
            gz[rows, yc] -= 1.0  # G (c, V)
            if need_h:
                full[c:] = 0  # the padding rows' G
                gfull = full if full.dtype == dtype else full.to(dtype)
                grad_h[start:start + step] = mm(gfull, w_grad)[:c].to(hidden.dtype)
            if need_w:
                grad_w.addmm_(gz.T, hc.to(acc))
            if need_b:
                grad_b += gz.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.scaled, ctx.per_row = False, per_row
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The gradients formed in forward, scaled by the loss's upstream gradient in place (a new
        (V, H) tensor for the head's would page-fault 113 MB in for SmolLM2 every step)."""
        if ctx.scaled:
            raise RuntimeError("linear_cross_entropy: its gradients were already handed out once; a second "
                               "backward through the same loss is not supported")
        ctx.scaled = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        if ctx.per_row:  # row i of ∂/∂h depends on row i's loss only (the head's gradients are refused above)
            return grad_h.mul_(grad.to(grad_h.dtype)[:, None]) if grad_h is not None else None, None, None, None, None
        return (grad_h.mul_(grad.to(grad_h.dtype)) if grad_h is not None else None,
                grad_w.mul_(grad.to(grad_w.dtype)).to(w_dtype) if grad_w is not None else None,
                grad_b.mul_(grad.to(grad_b.dtype)).to(b_dtype) if grad_b is not None else None,
                None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, targets, reduction=reduction)`` (softmax in fp32 or
    wider) without keeping any (N, V) tensor: hidden (N, H), weight (V, H), bias (V,) or None, targets
    (N,) token ids (no ignore index: pass only the supervised rows). ``reduction``: ``"sum"`` (a
    scalar) or ``"none"`` (N,), the per-token losses a sequence's log-probability sums (DPO); as
    ∂loss/∂W = Σᵢ gᵢ Gᵢᵀ hᵢ cannot be formed before the rows' upstream gradients gᵢ are known,
    ``"none"`` with a head that trains takes the plain way."""
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    per_row = reduction == "none"
    if per_row and torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return linear_cross_entropy_reference(hidden, weight, bias, targets, reduction)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, per_row)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                   targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """The plain way, what ``linear_cross_entropy`` must equal."""
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction=reduction)
