"""Text generation: chat-template prompts, greedy or temperature / top-p sampling, stop strings,
and tokens streamed to a callback as they are produced."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.plain import inference_on_onednn


@dataclass
class SamplingOptions:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None


def chat_input_ids(tokenizer: Any, messages: list[dict[str, str]]) -> torch.Tensor:
    """Token ids (1, T) of ``messages`` rendered with the chat template, ready for the assistant's turn."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return out if torch.is_tensor(out) else out["input_ids"]


def prompt_ids(tokenizer: Any, prompt: str | list[dict[str, str]], *, chat: bool = True,
               system: str | None = None) -> torch.Tensor:
    """(1, T) ids for a text prompt (a user turn when ``chat`` and the tokenizer has a template) or
    for a list of chat messages."""
    if isinstance(prompt, list):
        return chat_input_ids(tokenizer, prompt)
    if chat and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return chat_input_ids(tokenizer, messages)
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


class _Streamer:
    """Receives new token ids from ``generate``; emits decoded text, holding back what could be the
    start of a stop string and cutting at the first stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], on_text: Callable[[str], None] | None) -> None:
        self.tokenizer, self.stop, self.on_text = tokenizer, list(stop), on_text
        self.ids: list[int] = []
        self.emitted = 0
        self.prompt_seen = False
        self.stopped = False  # a stop string has appeared in the text

    def text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stop if s and s in text]
        self.stopped = bool(cuts)
        return text[: min(cuts)] if cuts else text

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        text = self.text()
        hold = max((len(s) - 1 for s in self.stop), default=0)
        self._emit(text[: max(self.emitted, len(text) - hold)])

    def end(self) -> None:
        self._emit(self.text())

    def _emit(self, text: str) -> None:
        if len(text) > self.emitted and self.on_text is not None:
            self.on_text(text[self.emitted:])
        self.emitted = max(self.emitted, len(text))


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, input_ids: torch.Tensor, options: SamplingOptions | None = None,
             on_text: Callable[[str], None] | None = None) -> str:
    """Generate from ``input_ids`` (1, T) until EOS / end of turn, a stop string or the token limit;
    returns the text (cut before any stop string) and streams it to ``on_text``. The fp32 CPU
    products run on oneDNN where ``gemm.uses_onednn`` says so: the prompt's rows padded up to a
    ``gemm.row_bucket`` size, each decode step's one row as it is."""
    o = options or SamplingOptions()
    if o.seed is not None:
        torch.manual_seed(o.seed)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    streamer = _Streamer(tokenizer, o.stop, on_text)
    sampling = {"do_sample": True, "temperature": o.temperature, "top_p": o.top_p} if o.temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    extra = {"stop_strings": list(o.stop), "tokenizer": tokenizer} if o.stop else {}
    with inference_on_onednn(model):
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=o.max_new_tokens,
                       pad_token_id=tokenizer.pad_token_id, streamer=streamer, use_cache=True, **sampling, **extra)
    return streamer.text()


def generate_text(model: nn.Module, tokenizer: Any, prompt: str, *, max_new_tokens: int = 64, chat: bool = True,
                  system: str | None = None) -> str:
    """Greedy completion of ``prompt`` (as a user turn when ``chat``), stripped."""
    ids = prompt_ids(tokenizer, prompt, chat=chat, system=system)
    return generate(model, tokenizer, ids, SamplingOptions(max_new_tokens=max_new_tokens)).strip()
