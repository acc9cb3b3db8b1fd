"""QLoRA on a bitsandbytes NF4/FP4/int8 base (bitsandbytes 0.50 runs these on the CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from conftest import randomize_adapters, tiny_gpt2, tiny_llama
from lorakit.layers import lora_layers
from lorakit.quant import (
    QuantizationError,
    dequantized_weight,
    is_quantized,
    quantize_model,
    weight_memory_bytes,
)

pytest.importorskip("bitsandbytes")
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_nf4_round_trip_error_matches_the_qlora_scheme():
    import bitsandbytes.functional as F

    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    errors = {}
    for kind in ("nf4", "fp4"):
        q, state = F.quantize_4bit(w, quant_type=kind, blocksize=64)
        errors[kind] = float((F.dequantize_4bit(q, state) - w).norm() / w.norm())
    # NF4 puts its 16 levels at normal quantiles: ~9% relative RMS error on Gaussian weights with
    # blocks of 64 (measured 0.092), below FP4's (~0.10); 4 bits cannot do much better.
    assert 0.07 < errors["nf4"] < 0.10
    assert errors["nf4"] < errors["fp4"]


def test_quantized_smollm_weights_take_under_a_third_of_fp16():
    from lorakit.models import load_model

    model, _ = load_model("smollm2-135m-instruct")
    linear_params = sum(m.weight.numel() for n, m in model.named_modules()
                        if type(m) is nn.Linear and n != "lm_head")
    names = quantize_model(model, "nf4", double_quant=True)
    assert len(names) == 210 and "lm_head" not in names
    quantized_bytes = sum(weight_memory_bytes(model.get_submodule(n)) for n in names)
    assert quantized_bytes <= 0.3 * linear_params * 2  # fp16 = 2 bytes per weight
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_lora_on_quantized_base_trains_only_adapters(method):
    model = tiny_llama()
    quantize_model(model, method)
    assert all(is_quantized(model.model.layers[0].self_attn.get_submodule(p)) for p in ("q_proj", "o_proj"))
    assert type(model.lm_head) is nn.Linear
    base_out = logits(model)
    lorakit.get_lora_model(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    torch.testing.assert_close(logits(model), base_out, atol=0, rtol=0)  # B = 0: a no-op at init
    layer = lora_layers(model)[0][1]
    assert layer.lora_A["default"].weight.dtype == torch.float32
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert (logits(model) - base_out).abs().max() > 1e-3


def test_4bit_base_dequantized_onto_gemm_equals_float64_math(monkeypatch):
    """LoRA on an NF4 base in fp32: with oneDNN the faster GEMM, each layer runs as one fused node
    that dequantizes the base (``kernels.dequant``) and runs its products on ``gemm.mm`` (oneDNN
    inside ``onednn_scope()``); elsewhere as bitsandbytes' forward plus the LoRA term. Against the
    same model in float64 (the dequantized weights, the same adapters) the loss and every gradient
    (input, A, B) agree to fp32 rounding, closer than bitsandbytes' path does (measured 6e-6 vs
    7e-5 of the largest entry); the node keeps the packed 4-bit weight only, never a float copy."""
    from lorakit.kernels import gemm

    if gemm._linear_op() is None:
        pytest.skip("this torch build has no oneDNN linear")
    model = tiny_llama()
    ref = copy.deepcopy(model)
    quantize_model(model, "nf4")
    for m, r in zip(model.modules(), ref.modules(), strict=True):
        if is_quantized(m):
            r.weight.data = dequantized_weight(m).clone()
    cfg = lorakit.LoraConfig(r=4, target_modules="all-linear")
    lorakit.get_lora_model(model, cfg)
    randomize_adapters(model, std=0.3)
    lorakit.get_lora_model(ref, cfg)
    for (_, a), (_, b) in zip(lora_layers(model), lora_layers(ref), strict=True):
        for p, q in zip(a.adapter_parameters("default"), b.adapter_parameters("default"), strict=True):
            q.data = p.data.clone()
    ref.double()

    def run(m: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        m.train()
        m.zero_grad(set_to_none=True)
        x = m.get_input_embeddings()(IDS).detach().requires_grad_()
        loss = m(inputs_embeds=x, labels=IDS).loss
        loss.backward()
        return loss.detach().double(), [x.grad.double()] + [p.grad.double() for p in m.parameters() if p.requires_grad]

    want, want_grads = run(ref)
    monkeypatch.setattr(gemm, "CPU_GEMM", "onednn")
    out = model.model.layers[0].self_attn.q_proj(torch.randn(3, 5, 32).requires_grad_())
    node = out.grad_fn.next_functions[0][0]  # under the (…, out) view of its (N, out) result
    assert type(node).__name__ == "_FusedLoraLinearBackward"  # base and LoRA in one node
    saved = [t for t in node.saved_tensors if t is not None]
    assert sum(type(t).__name__ == "Params4bit" for t in saved) == 1
    assert not any(t.shape == (32, 32) and t.is_floating_point() for t in saved)  # no float copy of W
    with gemm.onednn_scope():
        got, grads = run(model)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert len(grads) == len(want_grads) == 1 + 2 * 7 * 2
    for u, v in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(u, v, atol=2e-5 * float(v.abs().max()), rtol=0)


def test_eval_mode_keeps_the_4bit_layout_on_avx512_bf16_cpus(monkeypatch):
    """bitsandbytes repacks 4-bit weights for its bf16 CPU kernel at the first eval-mode forward
    on CPUs with AVX512-BF16 (and fails on layers this small); lorakit keeps the layout training
    uses, so evaluation computes exactly as training does. The CPU check is faked so that this
    runs on any CPU."""
    import bitsandbytes as bnb

    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    model = tiny_llama()
    quantize_model(model, "nf4")
    lorakit.get_lora_model(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model, std=0.3)
    train_mode = logits(model.train())
    assert torch.equal(logits(model.eval()), train_mode)
    states = [p.quant_state for p in model.parameters() if type(p).__name__ == "Params4bit"]
    assert len(states) == 7 * len(model.model.layers)
    assert not any(getattr(s, "packing_format_for_cpu", False) for s in states)
    # a 4-bit layer quantized elsewhere (a transformers BitsAndBytesConfig model) gets the same
    layer = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4")
    assert layer.support_avx512bf16_for_cpu
    assert not lorakit.layers.lora_class_for(type(layer)).from_base(layer).support_avx512bf16_for_cpu


def test_adapter_from_quantized_base_loads_on_both_bases(tmp_path):
    base = tiny_llama()
    qmodel = copy.deepcopy(base)
    quantize_model(qmodel, "nf4")
    lorakit.get_lora_model(qmodel, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(qmodel, std=0.3)
    expected = logits(qmodel)
    lorakit.save_adapter(qmodel, tmp_path)
    again = copy.deepcopy(base)
    quantize_model(again, "nf4")
    torch.testing.assert_close(logits(lorakit.load_adapter(again, tmp_path)), expected, atol=1e-5, rtol=0)
    plain = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    # on the unquantized base the outputs differ only by the quantization error of the base
    assert (logits(plain) - expected).abs().max() < 0.5 * expected.abs().max()


def test_merge_goes_into_dequantized_weights_never_4bit():
    model = tiny_llama()
    quantize_model(model, "nf4")
    lorakit.get_lora_model(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model, std=0.3)
    q_proj = model.model.layers[0].self_attn.q_proj
    expected_weight = dequantized_weight(q_proj) + q_proj.delta_weight("default")
    unmerged = logits(model)
    with pytest.raises(ValueError, match="is quantized: merging into 4-bit"):
        lorakit.merge(model)
    plain = lorakit.merge_and_unload(model)
    assert not any(is_quantized(m) for m in plain.modules())
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(plain.model.layers[0].self_attn.q_proj.weight, expected_weight, atol=1e-6, rtol=0)
    # merged (fp32 dequantized) vs unmerged QLoRA forward: bounded by bitsandbytes' own
    # dequantize-and-matmul rounding (measured ~1e-6 here)
    assert (logits(plain) - unmerged).abs().max() < 1e-4


def test_quantization_errors_are_clear():
    with pytest.raises(QuantizationError, match="one of nf4, fp4, int8"):
        quantize_model(tiny_llama(), "nf3")
    with pytest.raises(QuantizationError, match="Conv1D, which bitsandbytes cannot quantize"):
        quantize_model(tiny_gpt2(), "nf4")
    model = lorakit.get_lora_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(QuantizationError, match="before adding LoRA"):
        quantize_model(model, "nf4")


def test_missing_bitsandbytes_names_the_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(QuantizationError, match="pip install bitsandbytes"):
        quantize_model(tiny_llama(), "nf4")
