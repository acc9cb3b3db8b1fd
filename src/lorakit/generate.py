"""Text generation with chat templates: the helpers the CLI's demo, eval and chat build on."""

from __future__ import annotations

import torch
from torch import nn


def chat_input_ids(tokenizer, messages: list[dict[str, str]]) -> torch.Tensor:
    """Token ids (1, T) of ``messages`` rendered with the tokenizer's chat template, ready for the
    assistant's turn."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return out if torch.is_tensor(out) else out["input_ids"]


@torch.no_grad()
def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    chat: bool = True,
    system: str | None = None,
) -> str:
    """Greedy completion of ``prompt`` (as a user turn when ``chat``), decoded without special tokens."""
    if chat and tokenizer.chat_template:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = chat_input_ids(tokenizer, messages)
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    device = next(model.parameters()).device
    ids = ids.to(device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
