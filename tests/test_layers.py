"""Same weights → same outputs as PEFT, for each layer kind and architecture."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit
from conftest import randomize_adapters, tiny_bert_classifier, tiny_convnet, tiny_gpt2, tiny_llama
from lorakit.io import adapter_state_dict
from lorakit.layers import LoraConv1D, LoraEmbedding, LoraLinear

TOKENS = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(7))
IMAGES = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))

CASES = {
    "llama-qv": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-linear-rslora": (tiny_llama, dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True)),
    "llama-bias-all": (tiny_llama, dict(r=4, target_modules=["q_proj", "down_proj"], bias="all")),
    "llama-rank-pattern": (tiny_llama, dict(r=4, lora_alpha=8, target_modules="all-linear",
                                            rank_pattern={r"layers\.1\.mlp\.up_proj": 2, "o_proj": 6},
                                            alpha_pattern={"v_proj": 3})),
    "llama-embedding": (tiny_llama, dict(r=4, target_modules=["embed_tokens", "q_proj"])),
    "llama-regex-layers": (tiny_llama, dict(r=4, target_modules=r".*\.(q|k)_proj", exclude_modules=["model.layers.0.self_attn.k_proj"])),
    "llama-layers-to-transform": (tiny_llama, dict(r=4, target_modules=["v_proj"], layers_to_transform=[1])),
    "gpt2-conv1d": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "wte"], fan_in_fan_out=True)),
    "gpt2-all-linear": (tiny_gpt2, dict(r=4, target_modules="all-linear", fan_in_fan_out=True)),
    "bert-seq-cls": (tiny_bert_classifier, dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                                                task_type="SEQ_CLS")),
    "bert-bias-lora-only": (tiny_bert_classifier, dict(r=4, target_modules=["query", "value", "dense"], bias="lora_only")),
    "convnet": (tiny_convnet, dict(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "conv1d", "head"])),
}


def run(model, name):
    with torch.no_grad():
        out = model(IMAGES) if name == "convnet" else model(TOKENS)
    return out if torch.is_tensor(out) else out.logits


def build_pair(case: str):
    builder, kwargs = CASES[case]
    base = builder()
    ours = lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(init_lora_weights=False, **kwargs))
    randomize_adapters(ours, std=0.3)
    with torch.no_grad():  # make the modules_to_save copies differ from the original
        for _, saved in lorakit.saved.saved_modules(ours):
            for p in saved.modules_to_save["default"].parameters():
                p.add_(0.05)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    params, _ = adapter_state_dict(ours)
    result = peft.set_peft_model_state_dict(theirs, {k: v.detach() for k, v in params.items()})
    assert not [k for k in result.unexpected_keys if "lora" in k]
    return base, ours, theirs.eval()


@pytest.mark.parametrize("case", CASES)
def test_same_weights_same_outputs_as_peft(case):
    base, ours, theirs = build_pair(case)
    y_ours, y_peft, y_base = run(ours, case), run(theirs, case), run(base, case)
    assert (y_ours - y_base).abs().max() > 1e-3, "adapter must change the output"
    torch.testing.assert_close(y_ours, y_peft, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_parameter_counts_equal_peft(case):
    _, ours, theirs = build_pair(case)
    assert lorakit.count_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_print_trainable_parameters_matches_peft(capsys):
    _, ours, theirs = build_pair("bert-seq-cls")
    lorakit.print_trainable_parameters(ours)
    mine = capsys.readouterr().out
    theirs.print_trainable_parameters()
    assert mine == capsys.readouterr().out
    assert mine.startswith("trainable params: ")


def test_base_parameters_keep_their_names():
    base = tiny_gpt2()
    names = set(dict(base.named_parameters()))
    model = lorakit.get_lora_model(base, lorakit.LoraConfig(target_modules=["c_attn", "wte"]))
    after = set(dict(model.named_parameters()))
    assert names <= after
    assert {n for n in after - names if ".lora_" not in n} == set()
    attn = model.transformer.h[0].attn.c_attn
    assert isinstance(attn, LoraConv1D) and isinstance(model.transformer.wte, LoraEmbedding)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoraLinear) if hasattr(model, "model") else True


def test_dropout_applies_only_in_training():
    model = lorakit.get_lora_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5,
                                                                    init_lora_weights=False))
    model.eval()
    a, b = run(model, "llama"), run(model, "llama")
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    model.train()
    torch.manual_seed(0)
    c = model(TOKENS).logits.detach()
    assert (c - a).abs().max() > 1e-4


def test_inference_on_a_bf16_base_rounds_once():
    """fp32 adapters on a bf16 base, gradients off: base output + LoRA term is summed in fp32 and
    rounded to bf16 once (as PEFT sums), so it equals the float64 sum rounded to bf16 on all but
    fp32-noise ties; rounding the term to bf16 first would miss about a third of the elements."""
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.q_proj = torch.nn.Linear(256, 256).bfloat16()
    lorakit.get_lora_model(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]))
    layer = model.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)
    x = torch.randn(64, 256).bfloat16()
    with torch.no_grad():
        got = layer(x)
        base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    want = (base.double() + (x.double() @ a.T @ b.T) * 2.0).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert (got != want).float().mean() < 1e-3
    trained = layer(x)  # with gradients on: a new tensor, the term rounded first (autograd-safe)
    assert trained.requires_grad and (trained.detach() != want).float().mean() > 0.1


def test_embedding_adapters_take_a_float64_bases_dtype():
    """Embedding adapters are bare parameters: they are replaced by moved copies (``Parameter.to``
    returns a new tensor), so on a float64 base they are float64 like Linear adapters."""
    model = lorakit.get_lora_model(tiny_llama().double(), lorakit.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    layer = model.model.embed_tokens
    assert isinstance(layer, LoraEmbedding)
    assert layer.lora_embedding_A["default"].dtype == layer.lora_embedding_B["default"].dtype == torch.float64
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float64
