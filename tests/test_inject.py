"""Target matching, trainability and errors of `get_lora_model` / adapter management."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import tiny_bert_classifier, tiny_gpt2, tiny_llama
from lorakit.inject import group_module_names, resolve_targets
from lorakit.layers import lora_layers


def test_target_that_matches_nothing_lists_existing_names():
    with pytest.raises(ValueError) as err:
        lorakit.get_lora_model(tiny_llama(), lorakit.LoraConfig(target_modules=["qproj"]))
    msg = str(err.value)
    assert "matched no module of LlamaForCausalLM" in msg
    assert "q_proj (Linear ×2)" in msg and "down_proj (Linear ×2)" in msg and "embed_tokens (Embedding)" in msg
    assert "\n" not in msg


def test_all_linear_skips_output_head_and_matches_peft():
    import peft

    for builder in (tiny_llama, tiny_gpt2):
        model = builder()
        ours = resolve_targets(model, lorakit.LoraConfig(target_modules="all-linear"))
        theirs = peft.get_peft_model(builder(), peft.LoraConfig(target_modules="all-linear"))
        assert set(ours) == set(theirs.peft_config["default"].target_modules)
        assert "lm_head" not in ours


def test_default_targets_by_model_type():
    assert resolve_targets(tiny_llama(), lorakit.LoraConfig()) == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"
    ]
    assert all(n.endswith("c_attn") for n in resolve_targets(tiny_gpt2(), lorakit.LoraConfig()))


def test_unsupported_module_type_is_named():
    with pytest.raises(ValueError, match="model.norm' is a LlamaRMSNorm; LoRA supports Linear"):
        lorakit.get_lora_model(tiny_llama(), lorakit.LoraConfig(target_modules=["norm"]))


def test_duplicate_adapter_name_is_refused():
    model = lorakit.get_lora_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="adapter 'default' already exists"):
        lorakit.add_adapter(model, lorakit.LoraConfig(target_modules=["q_proj"]))


def test_trainable_sets_by_bias_mode():
    model = lorakit.get_lora_model(tiny_bert_classifier(), lorakit.LoraConfig(
        target_modules=["query"], bias="lora_only", modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        *(f"bert.encoder.layer.{i}.attention.self.query.{x}" for i in range(2)
          for x in ("lora_A.default.weight", "lora_B.default.weight", "bias")),
        "classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias",
    }


def test_lora_init_is_a_no_op_then_trains():
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 7))
    expected = base(ids).logits.detach()
    model = lorakit.get_lora_model(base, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)
    gaussian = lorakit.add_adapter(model, lorakit.LoraConfig(r=4, init_lora_weights="gaussian",
                                                             target_modules=["q_proj"]), "g")
    assert len(gaussian) == 2
    layer = lora_layers(model)[0][1]
    assert layer.lora_B["g"].weight.abs().sum() == 0 and layer.lora_A["g"].weight.std() < 0.5


def test_group_module_names_collapses_blocks():
    groups = {(p, t): c for p, t, c in group_module_names(tiny_llama())}
    assert groups[("model.layers.*.self_attn.q_proj", "Linear")] == 2
    assert groups[("lm_head", "Linear")] == 1
