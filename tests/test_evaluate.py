"""Evaluation: the loss over padding-free rows equals the loss over right-padded batches."""

from __future__ import annotations

import pytest
import torch

from conftest import randomize_adapters, write_jsonl
from lorakit import LoraConfig, get_lora_model
from lorakit.collate import shared_prefix
from lorakit.data import DataOptions, load_examples
from lorakit.evaluate import eval_loss, generate_answers
from lorakit.kernels import gemm
from lorakit.models import load_model
from test_train import rows


@pytest.mark.parametrize("multiple", [1, 32])
def test_flat_eval_loss_equals_padded(tiny_model_dir, tmp_path, multiple):
    model, tok = load_model(str(tiny_model_dir))
    get_lora_model(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model)
    chats = [r for r in rows(14, seed=3) if "messages" in r]  # share the system turn: a shared prefix
    examples = load_examples(write_jsonl(tmp_path / "e.jsonl", chats + rows(5, seed=4)), tok, DataOptions())
    assert shared_prefix(examples[:4]) > 0
    before = model.config._attn_implementation
    padded = eval_loss(model, examples, tok.pad_token_id, batch_size=4, flat=False)
    flat = eval_loss(model, examples, tok.pad_token_id, batch_size=4, flat=True, multiple=multiple)
    assert flat["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-6)
    assert padded["eval_loss"] > 1.0  # random adapters on a random model: far from a trivial loss
    assert model.config._attn_implementation == before  # padding-free attention only inside the call
    assert eval_loss(model, examples, tok.pad_token_id, batch_size=4) == flat  # the default where supported


@pytest.mark.skipif(gemm._linear_op() is None, reason="this torch build has no oneDNN linear")
def test_greedy_answers_on_onednn_equal_the_blas_ones(tiny_model_dir, monkeypatch, onednn_rows):
    """generate_answers runs its fp32 products on oneDNN, rows padded to ``gemm.row_bucket`` sizes:
    the same greedy logits, so the same answers as with oneDNN off; oneDNN ran the prompts and the
    decode steps (rows = the batch's), only ever on bucket sizes, and the model's layers are
    restored afterwards."""
    model, tok = load_model(str(tiny_model_dir))
    get_lora_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # the rest: frozen nn.Linear
    randomize_adapters(model)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Say {w} twice."}], tokenize=False,
                                       add_generation_prompt=True) for w in ("yes", "no", "blue", "seven", "ok")]
    rows_seen = onednn_rows
    monkeypatch.setattr(gemm, "CPU_GEMM", "blas")
    blas = generate_answers(model, tok, prompts, max_new_tokens=12, batch_size=2)
    assert rows_seen == []
    monkeypatch.setattr(gemm, "CPU_GEMM", "onednn")
    fast = generate_answers(model, tok, prompts, max_new_tokens=12, batch_size=2)
    assert fast == blas and len(set(blas)) > 1
    assert 2 in rows_seen and max(rows_seen) > 8  # decode steps (2 rows) and prompts (2 × their length)
    assert all(gemm.row_bucket(n) == n for n in rows_seen)
    assert all(type(m).forward is m.forward.__func__ for m in model.modules() if type(m) is torch.nn.Linear)
