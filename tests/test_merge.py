"""merge ≈ unmerged forward; unmerge restores the base; merge_and_unload gives a plain model back."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from conftest import randomize_adapters, tiny_bert_classifier, tiny_convnet, tiny_gpt2, tiny_llama
from lorakit.layers import LoraLayer, lora_layers
from lorakit.saved import ModulesToSave

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
IMAGES = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))

MODELS = {
    "llama": (tiny_llama, dict(target_modules="all-linear")),
    "llama-embedding": (tiny_llama, dict(target_modules=["embed_tokens", "q_proj", "down_proj"])),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc", "c_proj"])),
    "bert": (tiny_bert_classifier, dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    "convnet": (tiny_convnet, dict(target_modules=["conv1", "conv2", "conv1d", "head"])),
}


def forward(model, kind):
    with torch.no_grad():
        out = model(IMAGES) if kind == "convnet" else model(TOKENS)
    return out if torch.is_tensor(out) else out.logits


def adapted(kind, **extra):
    builder, kwargs = MODELS[kind]
    base = builder()
    model = lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(r=4, lora_alpha=8, **kwargs, **extra))
    randomize_adapters(model, std=0.3)
    return base, model


@pytest.mark.parametrize("kind", MODELS)
def test_merge_unmerge_disable(kind):
    base, model = adapted(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = forward(model, kind)
    with lorakit.disable_adapter(model):
        torch.testing.assert_close(forward(model, kind), forward(base, kind), atol=0, rtol=0)
    lorakit.merge(model)
    torch.testing.assert_close(forward(model, kind), unmerged, atol=1e-5, rtol=0)
    lorakit.unmerge(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(forward(model, kind), unmerged, atol=1e-5, rtol=0)


def test_disable_while_merged_gives_base_and_remerges():
    base, model = adapted("llama")
    lorakit.merge(model)
    merged = forward(model, "llama")
    with lorakit.disable_adapter(model):
        torch.testing.assert_close(forward(model, "llama"), forward(base, "llama"), atol=1e-5, rtol=0)
    torch.testing.assert_close(forward(model, "llama"), merged, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", MODELS)
def test_merge_and_unload_returns_original_types(kind):
    base, model = adapted(kind)
    expected = forward(model, kind)
    plain = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in plain.modules())
    assert [type(m) for m in plain.modules()] == [type(m) for m in base.modules()]
    assert list(dict(plain.named_parameters())) == list(dict(base.named_parameters()))
    torch.testing.assert_close(forward(plain, kind), expected, atol=1e-5, rtol=0)


def test_merged_llama_saves_and_loads_in_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    _, model = adapted("llama")
    expected = forward(model, "llama")
    lorakit.merge_and_unload(model).save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(forward(reloaded, "llama"), expected, atol=1e-5, rtol=0)


def test_safe_merge_refuses_nan_and_leaves_weights():
    _, model = adapted("llama")
    layer = lora_layers(model)[3][1]
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=lora_layers(model)[3][0].replace(".", r"\.") + ".*NaN/Inf"):
        lorakit.merge_and_unload(model, safe_merge=True)
    assert torch.equal(layer.weight, before) and not layer.merged_adapters


def test_two_adapters_add_up_and_merge_both():
    base = tiny_llama()
    model = lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["v_proj", "up_proj"]), "b")
    randomize_adapters(model, std=0.3)
    y0 = forward(base, "llama")
    lorakit.set_adapter(model, "default")
    ya = forward(model, "llama")
    lorakit.set_adapter(model, "b")
    yb = forward(model, "llama")
    lorakit.set_adapter(model, ["default", "b"])
    both = forward(model, "llama")
    # each adapter alone changes the output; together the model sees both deltas in every layer
    assert (ya - y0).abs().max() > 1e-3 and (yb - y0).abs().max() > 1e-3
    lorakit.merge(model)
    torch.testing.assert_close(forward(model, "llama"), both, atol=1e-5, rtol=0)
    lorakit.unmerge(model)
    # with both active, each layer's weight-equivalent is W + ΔW_a + ΔW_b
    for _, layer in lora_layers(model):
        w = layer.weight + sum(layer.delta_weight(n) for n in layer.active_adapters)
        x = torch.randn(5, layer.in_features)
        torch.testing.assert_close(layer(x), x @ w.T, atol=1e-5, rtol=0)


def test_optimizer_step_changes_only_lora_parameters():
    model = lorakit.get_lora_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules="all-linear"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    out = model(TOKENS, labels=TOKENS)
    out.loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
            assert p.grad is None
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)


def test_delete_adapter_restores_plain_layers():
    base = tiny_llama()
    model = lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "k_proj"]), "b")
    lorakit.delete_adapter(model, "b")
    assert all(type(m.self_attn.k_proj) is nn.Linear for m in model.model.layers)
    assert lorakit.active_adapters(model) == ["default"]
    with pytest.raises(ValueError, match="no adapter named 'b'"):
        lorakit.set_adapter(model, "b")


def test_merging_a_tied_embedding_is_refused():
    model = lorakit.get_lora_model(tiny_gpt2(), lorakit.LoraConfig(r=4, target_modules=["wte", "c_attn"]))
    randomize_adapters(model)
    with pytest.raises(ValueError, match="transformer.wte shares its weight with lm_head"):
        lorakit.merge(model)
    assert all(not layer.merged_adapters for _, layer in lora_layers(model))
