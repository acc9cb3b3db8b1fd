"""Tiny models built from configs in code (no downloads), shared by the tests."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    # Triton kernels run in Triton's interpreter on CPU tensors; it must be chosen before anything
    # imports triton (torch may, lazily), so here rather than in a fixture.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert_classifier(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=3, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).eval()


class TinyConvNet(nn.Module):
    """Conv2d → Conv1d-free image classifier with a Linear head (exercises conv LoRA)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.conv1d = nn.Conv1d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (B, 8, H/2, W/2)
        h = self.conv1d(h.flatten(2)).mean(-1)  # (B, 8)
        return self.head(h)


def tiny_convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


def randomize_adapters(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Give every LoRA parameter random values (so B is not zero and the adapter does something)."""
    from lorakit.layers import lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.adapter_names:
                for p in layer.adapter_parameters(name):
                    p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def clone():
    return copy.deepcopy


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's real tokenizer and chat template, saved as an HF directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorakit.models import ensure_converted

    tokenizer = AutoTokenizer.from_pretrained(ensure_converted("smollm2-135m-instruct"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, bos_token_id=1, pad_token_id=2)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def with_sections(base: dict, sections: dict) -> dict:
    """``base`` with each section dict updated from ``sections`` (other values replaced)."""
    cfg = copy.deepcopy(base)
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return cfg


def run_configs(tmp_path, model_dir, train_rows: list[dict], eval_rows: list[dict], **sections):
    """Write the rows to train.jsonl and eval.jsonl in ``tmp_path`` and return ``make(**changes)``: a run
    config dict on ``model_dir`` with those files and output in ``tmp_path / "out"``, the given
    ``sections``, updated by ``changes`` (``with_sections``)."""
    write_jsonl(tmp_path / "train.jsonl", train_rows)
    write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    files = {"model": {"name": str(model_dir)}, "output_dir": str(tmp_path / "out"),
             "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl")}}
    base = with_sections(files, sections)
    return lambda **changes: with_sections(base, changes)


def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def onednn_rows(monkeypatch):
    """The row count of every product that runs on oneDNN from here on (``kernels.gemm``), in order."""
    from lorakit.kernels import gemm

    real = gemm._linear_op()
    seen: list[int] = []

    class Counting:
        def __call__(self, a, *args):
            seen.append(a.shape[0])
            return real(a, *args)

        def binary(self, a, *args):
            seen.append(a.shape[0])
            return real.binary(a, *args)

    monkeypatch.setattr(gemm, "_linear_op", lambda: Counting())
    return seen


def submit_and_wait(engine, work: list[tuple[list[int], str | None, int]]) -> list[list[int]]:
    """Submit requests (prompt ids, adapter or None, max new tokens) to a started serving engine all
    at once, wait for every one, and return their generated tokens; an error event fails the test."""
    import threading

    from lorakit.engine import Request, SamplingOptions

    done = threading.Semaphore(0)
    errors: list[str] = []

    def emit(event: tuple) -> None:
        if event[0] == "error":
            errors.append(event[1])
        if event[0] in ("done", "error"):
            done.release()

    requests = [Request(ids, adapter, SamplingOptions(max_new_tokens=n), emit) for ids, adapter, n in work]
    for r in requests:
        engine.submit(r)
    for _ in requests:
        assert done.acquire(timeout=60)
    assert not errors, errors[0]
    return [r.generated for r in requests]


class NumberTokenizer:
    """What the serving engine needs of a tokenizer, for greedy runs of random models: no EOS (every
    request runs to its length), ids decoded as numbers."""

    eos_token_id, pad_token_id = None, 0

    def decode(self, ids: list[int], **_: object) -> str:
        return " ".join(map(str, ids))


def serve_greedy(base, pool, work: list[tuple[list[int], str | None]], new_tokens: int = 8,
                 max_batch: int = 4) -> list[list[int]]:
    """Run ``work`` (prompt ids, adapter or None) through a serving engine on ``base`` with ``pool``,
    all submitted at once (with max_batch < len(work) some wait, then join the running batch), and
    return each request's greedy tokens."""
    from lorakit.engine import Engine

    engine = Engine(base, NumberTokenizer(), pool, max_batch=max_batch).start()
    engine.eos = set()
    try:
        return submit_and_wait(engine, [(ids, adapter, new_tokens) for ids, adapter in work])
    finally:
        engine.stop()
