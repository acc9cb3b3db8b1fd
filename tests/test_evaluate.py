"""Evaluation: the loss over padding-free rows equals the loss over right-padded batches."""

from __future__ import annotations

import pytest

from conftest import randomize_adapters, write_jsonl
from lorakit import LoraConfig, get_lora_model
from lorakit.collate import shared_prefix
from lorakit.data import DataOptions, load_examples
from lorakit.evaluate import eval_loss
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
