"""Causal-LM loss computed only where it counts.

``labels`` (B, T) hold -100 except on trained tokens. Position t predicts token t+1, so the targets
are ``labels[:, 1:]``. Instead of materialising the (B, T, V) logits, the transformer body runs once,
its hidden states are gathered at the N supervised positions (N ≪ B·T for answer-only training),
and only those pass through the output head: (N, H) → (N, V). With a plain linear head, the head
and the cross-entropy run fused (``kernels.cross_entropy``), so no (N, V) tensor is kept at all.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data import IGNORE
from lorakit.kernels.cross_entropy import linear_cross_entropy
from lorakit.mlp import mlp_rows
from lorakit.models import config_value, evaluating

# what a batch may hand the model: padded batches carry a mask, padding-free ones segment bounds
_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                 "max_length_k", "shared_prefix")


# config fields by which a transformers causal LM rescales or caps its logits after the head
# (Gemma 2/3, Cohere, Granite): such a model runs whole, as its forward computes them
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")
_SPLIT = "_lorakit_head_split"


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(body returning hidden states, output head) for a standard causal LM, or None when the model
    must run whole: its config says it post-processes its logits, or (for any other model, checked
    once and remembered) body-then-head does not give the logits its own forward gives on a short
    probe input."""
    if _SPLIT not in model.__dict__:
        model.__dict__[_SPLIT] = _find_split(model)
    return model.__dict__[_SPLIT]


def _find_split(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    cfg = getattr(model, "config", None)
    if cfg is None or any(config_value(cfg, name) for name in LOGIT_POSTPROCESSING):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    if head is None or body is None or body is model:
        return None
    return (body, head) if _same_logits(model, body, head) else None


def _same_logits(model: nn.Module, body: nn.Module, head: nn.Module) -> bool:
    """Whether head(body(x)) equals model(x).logits on 8 tokens (in eval mode: no dropout draws, so
    the random stream is untouched). Exact in practice (the same operations); the tolerance only
    allows for another kernel order on another device."""
    param = next(model.parameters(), None)
    if param is None:
        return False
    ids = torch.arange(8, device=param.device)[None] % max(1, head.weight.shape[0])
    try:
        with evaluating(model):
            own = model(input_ids=ids, use_cache=False).logits.float()
            split = head(body(input_ids=ids, use_cache=False).last_hidden_state).float()
        return own.shape == split.shape and torch.allclose(own, split, rtol=1e-3, atol=1e-3 * float(own.abs().max()))
    except Exception:  # a model the probe cannot run is run whole, which is always right
        return False


def _keeps_logits(model: nn.Module) -> bool:
    """Whether ``model``'s forward (or, under a DDP / FSDP wrapper, the wrapped one's) takes
    ``logits_to_keep``."""
    inner = getattr(model, "module", model)
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def causal_lm_loss(model: nn.Module, batch: dict[str, Any], whole: bool = False) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over supervised positions, number of those positions).

    ``whole`` calls the model's own forward (as DDP / FSDP wrappers need) instead of running body and
    head separately, as a model that post-processes its logits always does (``split_head``); its
    forward is asked for logits at the supervised columns only (``logits_to_keep``) where it takes
    that argument, as transformers' causal LMs do.
    """
    loss, mask = _supervised_cross_entropy(model, batch, whole, "sum")
    return loss, int(mask.sum())


def sequence_logprobs(model: nn.Module, batch: dict[str, Any], n_examples: int, whole: bool = False) -> torch.Tensor:
    """(E,) each example's summed log-probability of its supervised tokens, log π(y | x) = Σₜ log p(yₜ | x, y<ₜ),
    with gradients: what DPO compares between policy and reference. ``batch`` holds one example per
    row (``collate`` of single-example rows) or is padding-free (``collate_flat``); ``n_examples`` = E.
    Computed as the negated per-token cross-entropies, summed per example (``example_index``), by the
    same paths and kernels as ``causal_lm_loss``."""
    losses, mask = _supervised_cross_entropy(model, batch, whole, "none")  # (N,)
    owner = example_index(batch, mask)
    total = torch.zeros(n_examples, dtype=losses.dtype, device=losses.device)
    return -total.index_add(0, owner, losses)


def example_index(batch: dict[str, Any], mask: torch.Tensor) -> torch.Tensor:
    """(N,) the example each supervised position of ``mask`` (B, T-1) belongs to, in ``mask``'s
    row-major order: its row in a padded batch of single-example rows; in a padding-free batch the
    segment that holds the *predicting* token (``collate_flat`` may move a trimmed example's last
    label into the next segment's first slot; the token predicting it is still the example's own),
    less the shared prefix's segment."""
    where = mask.nonzero()  # (N, 2)
    if "cu_seq_lens_q" not in batch:
        return where[:, 0]
    bounds = batch["cu_seq_lens_q"].to(where.device, torch.long)[1:]
    segment = torch.searchsorted(bounds, where[:, 1], right=True)
    return segment - (1 if batch.get("shared_prefix") else 0)


def _supervised_cross_entropy(model: nn.Module, batch: dict[str, Any], whole: bool,
                              reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropies at the supervised positions (summed, or (N,) in ``mask``'s row-major order)
    and that mask (B, T-1); see ``causal_lm_loss`` for the paths."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    mask = targets != IGNORE  # (B, T-1)
    inputs = {k: batch[k] for k in _MODEL_INPUTS if k in batch}
    parts = None if whole else split_head(model)
    if parts is None and _keeps_logits(model):
        cols = mask.any(0).nonzero().squeeze(1)  # (K,) positions whose next token trains in some row
        logits = model(**inputs, use_cache=False, logits_to_keep=cols).logits  # (B, K, V)
        logits = logits[mask[:, cols]]  # (N, V): the same row-major order, as cols ascend
    elif parts is None:
        logits = model(**inputs, use_cache=False).logits[:, :-1][mask]  # (N, V)
    else:
        body, head = parts
        with mlp_rows(model, mask):  # the last MLP only where the loss reads (exact)
            hidden = body(**inputs, use_cache=False).last_hidden_state[:, :-1]  # (B, T-1, H)
        if type(head) is nn.Linear:
            return linear_cross_entropy(hidden[mask], head.weight, head.bias, targets[mask], reduction), mask
        logits = head(hidden[mask])  # (N, V)
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(wide, targets[mask], reduction=reduction), mask
