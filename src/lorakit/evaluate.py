"""Evaluation: token-level loss and perplexity, and generation-based exact match.

Exact match greedily generates each example's answer from its prompt and compares it, stripped of
surrounding whitespace, with the reference (the completion, the last assistant turn, or the row's
``answer`` field).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lorakit.attention import padding_free, supports_padding_free
from lorakit.collate import collate, collate_flat
from lorakit.data import Example
from lorakit.kernels.gemm import TOKEN_MULTIPLE, onednn_scope, uses_onednn
from lorakit.loss import causal_lm_loss
from lorakit.models import evaluating
from lorakit.plain import inference_on_onednn


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def eval_loss(model: nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 16,
              autocast: Any = None, *, flat: bool | None = None, multiple: int = 1) -> dict[str, float]:
    """Mean cross-entropy over all supervised tokens of ``examples``, and its perplexity.

    ``flat`` (default: where the model supports it) runs each batch as training does, as one
    padding-free row with the shared prefix stored once (``collate.collate_flat``, its length rounded
    up to a multiple of ``multiple``): the same loss as right-padded batches, in fewer FLOPs."""
    device = device_of(model)
    flat = supports_padding_free(model) if flat is None else flat
    total, count = 0.0, 0
    with evaluating(model), padding_free(model) if flat else contextlib.nullcontext():  # no autograd graph
        for k in range(0, len(examples), batch_size):
            rows = [[e] for e in examples[k:k + batch_size]]
            raw = collate_flat(rows, multiple=multiple, pad_id=pad_id) if flat else collate(rows, pad_id, multiple=multiple)
            batch = {key: v.to(device) if torch.is_tensor(v) else v for key, v in raw.items()}
            with autocast() if autocast else contextlib.nullcontext():
                loss_sum, n = causal_lm_loss(model, batch)
            total, count = total + float(loss_sum), count + n
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def normalise(text: str) -> str:
    return " ".join(text.strip().split())


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 64,
                     batch_size: int = 16, chat: bool = True) -> list[str]:
    """Greedy answers for rendered ``prompts`` (left-padded batches, stopping at EOS/end of turn).
    The fp32 CPU products run on oneDNN where ``gemm.uses_onednn`` says so, their rows padded up
    to ``gemm.row_bucket`` sizes (``plain.inference_on_onednn``)."""
    device = device_of(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers = []
    try:
        with evaluating(model), inference_on_onednn(model):
            for k in range(0, len(prompts), batch_size):
                enc = tokenizer(list(prompts[k:k + batch_size]), return_tensors="pt", padding=True,
                                add_special_tokens=not chat).to(device)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id)
                answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def exact_match(model: nn.Module, tokenizer: Any, examples: Sequence[Example], *, max_new_tokens: int = 64,
                batch_size: int = 16) -> tuple[float, list[tuple[Example, str]]]:
    """Fraction of examples whose greedy answer equals the reference, and (example, answer) pairs."""
    chat = bool(examples) and examples[0].prompt_is_chat
    answers = generate_answers(model, tokenizer, [e.prompt for e in examples], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, chat=chat)
    hits = sum(normalise(a) == normalise(e.reference) for e, a in zip(examples, answers))
    return hits / max(len(examples), 1), list(zip(examples, answers))


def evaluate_file(model_name: str, data: str, *, adapters: Sequence[str] = (), generate: bool = True,
                  max_new_tokens: int = 64, batch_size: int = 16, max_examples: int = 0,
                  system_prompt: str | None = None, max_seq_len: int = 1024, beta: float = 0.1) -> dict[str, float]:
    """Evaluate a base model (plus adapters) on a data file: the standalone form of training's eval.
    Preference rows (prompt/chosen/rejected) are scored as pairs (``preference.evaluate_pairs``, DPO's
    rewards at ``beta`` against the base), judged answers (prompt/completion/label) by KTO's; not by
    loss and generation."""
    from lorakit.collate import collate
    from lorakit.data import DataOptions, Row, build_examples, load_examples
    from lorakit.io import load_adapters
    from lorakit.models import load_model
    from lorakit.preference import (
        PreferencePair,
        build_kto_items,
        build_pairs,
        evaluate_pairs,
        is_preference_row,
        is_unpaired_row,
    )

    model, tokenizer = load_model(model_name)
    load_adapters(model, adapters)
    model.requires_grad_(False)  # inference only: every weight frozen, so frozen layers' fast paths apply

    def build(rows: Sequence[Row], tokenizer: Any, opts: DataOptions) -> list[Any]:  # preference rows: pairs
        first = rows[0].data
        kind = build_pairs if is_preference_row(first) else build_kto_items if is_unpaired_row(first) else build_examples
        return kind(rows, tokenizer, opts)

    opts = DataOptions(max_seq_len=max_seq_len, system_prompt=system_prompt)
    examples = load_examples(data, tokenizer, opts, build=build)[:max_examples or None]
    if isinstance(examples[0], PreferencePair):
        return evaluate_pairs(model, examples, lambda ex: collate([[e] for e in ex], tokenizer.pad_token_id),
                              batch_size, beta)
    # as the trainer's eval loss: fp32 CPU products on oneDNN where it applies, token counts rounded
    # up so that their shapes come from a bounded set
    weight = next(model.parameters())
    multiple = TOKEN_MULTIPLE if uses_onednn(weight.device, weight.dtype) else 1
    with onednn_scope():
        metrics = eval_loss(model, examples, tokenizer.pad_token_id, batch_size, multiple=multiple)
    if generate:
        metrics["exact_match"], _ = exact_match(model, tokenizer, examples, max_new_tokens=max_new_tokens,
                                                batch_size=batch_size)
    metrics["examples"] = len(examples)
    return metrics
