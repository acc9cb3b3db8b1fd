"""Adapters round-trip with PEFT's on-disk format, both ways; bad files give clear errors."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from conftest import randomize_adapters, tiny_bert_classifier, tiny_convnet, tiny_gpt2, tiny_llama
from lorakit.io import AdapterLoadError
from lorakit.layers import lora_layers

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
IMAGES = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))

CASES = {
    "llama": (tiny_llama, dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"o_proj": 2})),
    "llama-embedding-bias": (tiny_llama, dict(r=4, target_modules=["embed_tokens", "q_proj"], use_rslora=True)),
    "gpt2": (tiny_gpt2, dict(r=4, target_modules=["c_attn", "c_proj"], bias="all", fan_in_fan_out=True)),
    "bert": (tiny_bert_classifier, dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                                        task_type="SEQ_CLS")),
    "convnet": (tiny_convnet, dict(r=2, target_modules=["conv1", "conv2", "head"])),
}


def forward(model, kind):
    with torch.no_grad():
        out = model(IMAGES) if kind == "convnet" else model(TOKENS)
    return out if torch.is_tensor(out) else out.logits


def trained(kind):
    builder, kwargs = CASES[kind]
    base = builder()
    model = lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(**kwargs))
    randomize_adapters(model, std=0.3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ".lora_" not in n:  # biases and modules_to_save copies train too
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return base, model


@pytest.mark.parametrize("kind", CASES)
def test_lorakit_adapter_loads_in_peft(kind, tmp_path):
    base, model = trained(kind)
    expected = forward(model, kind)
    lorakit.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(forward(theirs, kind), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", CASES)
def test_peft_adapter_loads_in_lorakit(kind, tmp_path):
    builder, kwargs = CASES[kind]
    base = builder()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad and "lora_" not in n:
                p.add_(0.1)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(forward(ours, kind), forward(theirs, kind), atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in ours.parameters())


def test_keys_are_peft_keys(tmp_path):
    _, model = trained("llama-embedding-bias")
    lorakit.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_B" in keys
    assert not any("default" in k for k in keys)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["use_rslora"] is True


@pytest.mark.parametrize(("targets", "extra", "saved"), [
    ("all-linear", {}, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    (["q_proj", "v_proj"], {"layers_to_transform": [1]}, ["q_proj", "v_proj"]),
    (["model.layers.1.self_attn.q_proj", "mlp.up_proj"], {}, None),  # leaf names would take layer 0's q_proj too
])
def test_saved_target_modules_name_the_wrapped_modules(targets, extra, saved, tmp_path):
    """adapter_config.json lists the modules the adapter wraps (PEFT's own habit after expanding
    all-linear), or a regex of their full names where leaf names would pick more; PEFT wraps
    exactly those again."""
    base = tiny_llama()
    model = lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(r=2, target_modules=targets, **extra))
    lorakit.save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    wrapped = sorted(n for n, _ in lora_layers(model))
    if saved is not None:
        assert written == saved
    else:
        assert isinstance(written, str)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                  if hasattr(m, "lora_A") and not n.endswith(("lora_A", "lora_B"))) == wrapped


def test_trainable_load_and_resave_round_trip(tmp_path):
    base, model = trained("gpt2")
    lorakit.save_adapter(model, tmp_path / "a")
    again = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "a", is_trainable=True)
    assert any(p.requires_grad for p in again.parameters())
    lorakit.save_adapter(again, tmp_path / "b")
    a, b = load_file(tmp_path / "a/adapter_model.safetensors"), load_file(tmp_path / "b/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_several_adapters_save_separately(tmp_path):
    base = tiny_llama()
    model = lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["v_proj"]), "other")
    randomize_adapters(model)
    lorakit.set_adapter(model, "other")
    expected = forward(model, "llama")
    lorakit.save_adapter(model, tmp_path, adapter_name="other")
    fresh = lorakit.load_adapter(copy.deepcopy(base), tmp_path, adapter_name="x")
    torch.testing.assert_close(forward(fresh, "llama"), expected, atol=1e-6, rtol=0)
    assert [n for n, _ in lora_layers(fresh)] == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]


def _saved(tmp_path):
    _, model = trained("llama")
    lorakit.save_adapter(model, tmp_path)
    return tmp_path


def test_missing_and_unexpected_keys_are_named(tmp_path):
    d = _saved(tmp_path)
    tensors = load_file(d / "adapter_model.safetensors")
    tensors.pop("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight")
    tensors["base_model.model.model.layers.9.mlp.up_proj.lora_B.weight"] = torch.zeros(1)
    save_file(tensors, d / "adapter_model.safetensors")
    base = tiny_llama()
    before = {n: p.clone() for n, p in base.named_parameters()}
    with pytest.raises(AdapterLoadError, match=r"missing keys model\.layers\.1\.mlp\.up_proj\.lora_B\.weight.*"
                                               r"unexpected keys model\.layers\.9\.mlp\.up_proj"):
        lorakit.load_adapter(base, d)
    assert not lora_layers(base) and all(torch.equal(p, before[n]) for n, p in base.named_parameters())


def test_shape_mismatch_names_module_and_shapes(tmp_path):
    d = _saved(tmp_path)
    tensors = load_file(d / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 31)
    save_file(tensors, d / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A has shape \(4, 31\) "
                                               r"in the file but \(4, 32\) in the model"):
        lorakit.load_adapter(tiny_llama(), d)


def test_pickle_is_refused(tmp_path):
    d = _saved(tmp_path)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="pickle.*safetensors"):
        lorakit.load_adapter(tiny_llama(), d)


def test_missing_dir_config_and_corrupt_file(tmp_path):
    with pytest.raises(AdapterLoadError, match="does not exist"):
        lorakit.load_adapter(tiny_llama(), tmp_path / "nope")
    d = _saved(tmp_path)
    (d / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterLoadError, match="not a readable safetensors file"):
        lorakit.load_adapter(tiny_llama(), d)
    (d / "adapter_config.json").unlink()
    with pytest.raises(AdapterLoadError, match="no adapter_config.json"):
        lorakit.load_adapter(tiny_llama(), d)


def test_adapter_for_another_model_is_refused(tmp_path):
    _, model = trained("gpt2")
    lorakit.save_adapter(model, tmp_path)
    with pytest.raises(AdapterLoadError, match="does not fit this model: target_modules"):
        lorakit.load_adapter(tiny_llama(), tmp_path)
