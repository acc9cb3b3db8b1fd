"""Causal-LM loss computed only where it counts.

``labels`` (B, T) hold -100 except on trained tokens. Position t predicts token t+1, so the targets
are ``labels[:, 1:]``. Instead of materialising the (B, T, V) logits, the transformer body runs once,
its hidden states are gathered at the N supervised positions (N ≪ B·T for answer-only training),
and only those pass through the output head: (N, H) → (N, V). With a plain linear head, the head
and the cross-entropy run fused (``kernels.cross_entropy``), so no (N, V) tensor is kept at all.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data import IGNORE
from lorakit.kernels.cross_entropy import linear_cross_entropy
from lorakit.mlp import mlp_rows

# what a batch may hand the model: padded batches carry a mask, padding-free ones segment bounds
_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                 "max_length_k", "shared_prefix")


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(body returning hidden states, output head) for a standard causal LM, or None when the model
    post-processes its logits (soft-capping, scaling) and must run whole."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    if head is None or body is None or body is model:
        return None
    return body, head


def causal_lm_loss(model: nn.Module, batch: dict[str, Any], whole: bool = False) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over supervised positions, number of those positions).

    ``whole`` calls the model's own forward (as DDP / FSDP wrappers need) and asks it for logits at
    the supervised columns only (``logits_to_keep``), instead of running body and head separately.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]
    mask = targets != IGNORE  # (B, T-1)
    n = int(mask.sum())
    inputs = {k: batch[k] for k in _MODEL_INPUTS if k in batch}
    parts = None if whole else split_head(model)
    if whole:
        cols = mask.any(0).nonzero().squeeze(1)  # (K,) positions whose next token trains in some row
        logits = model(**inputs, use_cache=False, logits_to_keep=cols).logits  # (B, K, V)
        targets, mask = targets[:, cols], mask[:, cols]
        logits = logits[mask]
    elif parts is None:
        logits = model(**inputs, use_cache=False).logits[:, :-1][mask]  # (N, V)
    else:
        body, head = parts
        with mlp_rows(model, mask):  # the last MLP only where the loss reads (exact)
            hidden = body(**inputs, use_cache=False).last_hidden_state[:, :-1]  # (B, T-1, H)
        if type(head) is nn.Linear:
            return linear_cross_entropy(hidden[mask], head.weight, head.bias, targets[mask]), n
        logits = head(hidden[mask])  # (N, V)
    return F.cross_entropy(logits.float(), targets[mask], reduction="sum"), n
