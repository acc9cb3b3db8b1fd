"""NEFTune: uniform noise on the input embeddings while training (Jain et al., 2023, "NEFTune: Noisy
Embeddings Improve Instruction Finetuning"; TRL's and axolotl's ``neftune_noise_alpha``).

For a token of an example of L tokens, in a model of hidden width d, the embedding e (d,) becomes

    e + α / √(L·d) · u,        u ~ U(−1, 1)^d, drawn afresh at every training forward

so the noise's norm is about α/√(3L) whatever d. L is the example's own length in every batch layout
(padded rows, packed rows, padding-free batches: ``example_lengths`` from ``lorakit.collate``), so the
noise does not depend on which examples share a batch; transformers' hook takes a padded row's
length instead. Padding and filler tokens (L = 0) get none; a shared prefix stored once (see
``collate.collate_flat``) gets one draw at the scale of its examples' mean length. Evaluation and
generation (``module.training`` false) see the embeddings unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class NoisyEmbeddings:
    """The forward hook on a model's input embedding; ``lengths`` (B, T), the current batch's
    ``example_lengths``, is set by the trainer before each forward."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.lengths: torch.Tensor | None = None

    def scale(self, width: int) -> torch.Tensor:
        """α/√(L·d) per token (B, T), 0 where L = 0."""
        lengths = self.lengths.to(torch.float32)  # type: ignore[union-attr]
        return torch.where(lengths > 0, self.alpha / (lengths.clamp(min=1) * width).sqrt(), 0.0)

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training or self.lengths is None:
            return None
        if self.lengths.shape != output.shape[:-1]:
            raise ValueError(f"NEFTune: the batch's example_lengths {tuple(self.lengths.shape)} do not match the "
                             f"embeddings {tuple(output.shape[:-1])}")
        scale = self.scale(output.shape[-1]).to(device=output.device, dtype=output.dtype)
        noise = torch.rand(output.shape, device=output.device, dtype=output.dtype) * 2 - 1
        return output + noise * scale[..., None]


@contextlib.contextmanager
def noisy_embeddings(model: nn.Module, alpha: float) -> Iterator[NoisyEmbeddings | None]:
    """Add NEFTune's noise to ``model``'s input embeddings inside the block (None for α = 0)."""
    if alpha <= 0:
        yield None
        return
    hook = NoisyEmbeddings(alpha)
    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield hook
    finally:
        handle.remove()
