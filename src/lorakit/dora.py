"""DoRA, weight-decomposed low-rank adaptation (Liu et al., 2024), as tensor maths.

A DoRA adapter on a linear layer with frozen weight W (out, in) trains the LoRA factors A (r, in)
and B (out, r) and a magnitude m (out,). The adapted weight keeps the direction of the LoRA-updated
weight and learns each output row's length:

    V = W + ΔW,   ΔW = s B A,   n = ‖V‖_row  (n[o] = sqrt(Σ_i V[o, i]²)),   W' = (m / n) ⊙ V

m starts at n (so W' = W for the usual B = 0 start). As in the paper (§4.3) and PEFT, n is a
constant in the backward pass: gradients reach m directly and A, B through the ΔW x term, and no
out × in tensor is kept for backward.

With g = m / n (out,), the layer's output for x (…, in) is

    y = g ⊙ (x Wᵀ + x ΔWᵀ) + b = (x Wᵀ + b) + [(g − 1) ⊙ x Wᵀ + g ⊙ x ΔWᵀ]

and the bracket, the adapter's term, reuses the base layer's output (less its bias): besides the
rank-r products it costs one pass over W for n. Under dropout the term is computed on dropout(x)
with its own x Wᵀ, PEFT's convention. Everything here works on rows, (out, in); a convolution's
kernel (out, in, k…) is the rows (out, in · k…), its output channels rescaled alike.
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

# Optimizer steps taken in this process, by any torch optimizer: a LoRA layer keeps n until W, A, B
# or s change, and fused optimizers (AdamW's ``fused=True``) update parameters without moving their
# version counters, so a step counts as a change of every adapter.
optimizer_steps = 0


def _count_step(*_: object) -> None:
    global optimizer_steps
    optimizer_steps += 1


register_optimizer_step_post_hook(_count_step)


def weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """n = ‖W + ΔW‖ over the input dimension: (out,) from W and ΔW (out, in), without gradient,
    in ΔW's dtype."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight.to(delta.dtype) + delta, dim=1)


def factored_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                  weight_sq: torch.Tensor) -> torch.Tensor:
    """n = ‖W + s B A‖_row (out,) without forming the (out, in) sum, no gradient:

        n² = ‖W‖²_row + 2s Σ_k B[:, k] (W Aᵀ)[:, k] + s² Σ_k (B (A Aᵀ))[:, k] B[:, k]

    one (out, in) × (in, r) product, which reads W once; ``weight_sq`` = ‖W‖²_row is W's alone
    (the caller keeps it while W is unchanged). W (out, in) in A's dtype; the result in that dtype."""
    with torch.no_grad():
        cross = (b * (weight @ a.T)).sum(1)  # ⟨W, B A⟩ per row
        low = (b * (b @ (a @ a.T))).sum(1)  # ‖B A‖² per row
        return (weight_sq + 2 * scale * cross + scale * scale * low).clamp_min_(0).sqrt_()


def term(base_out: torch.Tensor, lora_out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The adapter's addition to the base output: (g − 1) ⊙ x Wᵀ + g ⊙ s x Aᵀ Bᵀ.

    ``base_out`` is x Wᵀ without bias (…, out), ``lora_out`` is s x Aᵀ Bᵀ (…, out) and ``scale``
    is g = m / n (out,)."""
    return (scale - 1) * base_out + scale * lora_out


def merge(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
          norm: torch.Tensor) -> torch.Tensor:
    """W' = (m / n) ⊙ (W + ΔW) (out, in): ``weight`` may already hold other merged adapters;
    ``norm`` is n of the base weight without them, as the unmerged forward sees it."""
    return (magnitude / norm).unsqueeze(1) * (weight + delta)


def unmerge(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
            norm: torch.Tensor) -> torch.Tensor:
    """The inverse of ``merge``: W' / (m / n) − ΔW, with the n that merge used."""
    return weight / (magnitude / norm).unsqueeze(1) - delta
