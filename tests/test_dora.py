"""DoRA (``use_dora``): the layer against float64 maths and PEFT, training, files both ways,
merging, QLoRA and mixed-adapter batches."""

from __future__ import annotations

import contextlib
import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

import lorakit
import lorakit.layers
from conftest import tiny_bert_classifier, tiny_gpt2, tiny_llama
from lorakit import LoraConfig, get_lora_model
from lorakit.batch import adapter_batch
from lorakit.inject import add_adapter, count_parameters, set_adapter
from lorakit.io import adapter_state_dict, load_adapter, save_adapter
from lorakit.layers import LoraLinear, lora_layers
from lorakit.merge import merge, merge_and_unload, unmerge
from lorakit.mlp import fused_mlp

TOKENS = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(7))
MODELS = {"llama": (tiny_llama, dict(target_modules="all-linear")),
          "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True))}


def _dora(model, name="default", seed=1, **kwargs):
    """Add DoRA adapter ``name`` and make it the active one: random A, B and magnitudes 0.8-1.2× the
    rows' norms (so every part acts)."""
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, **kwargs)
    add_adapter(model, config, name)
    set_adapter(model, name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if layer.is_dora(name):
                for p in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
                m = layer.lora_magnitude_vector[name]
                m.mul_(0.8 + 0.4 * torch.rand(m.shape, generator=g, dtype=m.dtype))
    return model


def _adapted_weight(layer, name):
    """W' = m ⊙ (W + s B A) / ‖W + s B A‖ per output row (a kernel: per output channel), float64, in
    the layer's storage layout, from the definition."""
    w = layer.weight.double()
    w = w.T if isinstance(layer, Conv1D) else w
    a, b = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
    v = w + layer.scaling[name] * (b.flatten(1) @ a.flatten(1)).view_as(w)
    norm = v.flatten(1).norm(dim=1).view(-1, *(1,) * (v.dim() - 1))
    adapted = layer.lora_magnitude_vector[name].double().reshape(norm.shape) * v / norm
    return adapted.T if isinstance(layer, Conv1D) else adapted


def _plain_forward(layer, x, weight):
    if isinstance(layer, torch.nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding)
    return F.linear(x, weight.T if isinstance(layer, Conv1D) else weight, layer.bias)


LAYERS = {"linear": (lambda: torch.nn.Linear(12, 10), (3, 5, 12)),
          "conv1d": (lambda: Conv1D(10, 12), (3, 5, 12)),
          "conv2d": (lambda: torch.nn.Conv2d(3, 6, 3, padding=1), (2, 3, 7, 7))}


@pytest.mark.parametrize("kind", LAYERS)
def test_layer_equals_the_definition(kind):
    torch.manual_seed(0)
    base, shape = LAYERS[kind][0]().double(), LAYERS[kind][1]
    model = _dora(torch.nn.Sequential(copy.deepcopy(base)), target_modules=["0"], fan_in_fan_out=kind == "conv1d")
    layer = model[0]
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _plain_forward(layer, x, _adapted_weight(layer, "default")),
                               rtol=1e-12, atol=1e-12)
    # the magnitude starts at the adapted rows' norms: a fresh adapter (B = 0) leaves the layer as it was
    fresh = get_lora_model(torch.nn.Sequential(copy.deepcopy(base)), LoraConfig(r=4, target_modules=["0"], use_dora=True))
    torch.testing.assert_close(fresh(x), base(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_dropout_is_applied_to_the_adapters_input_only(kind):
    """Under dropout d(x): y = x Wᵀ + b + (g − 1) ⊙ d(x) Wᵀ + g ⊙ s d(x) Aᵀ Bᵀ (PEFT's convention);
    for a convolution the same with W and B A as kernels."""
    torch.manual_seed(0)
    base, shape = LAYERS[kind][0]().double(), LAYERS[kind][1]
    layer = _dora(torch.nn.Sequential(base), target_modules=["0"], lora_dropout=0.3).train()[0]
    x = torch.randn(*shape, dtype=torch.float64)
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    dx = F.dropout(x, 0.3, training=True)
    w = layer.weight.detach()
    delta = (layer.lora_B["default"].weight.flatten(1) @ layer.lora_A["default"].weight.flatten(1)).view_as(w) * 2.0
    g = layer.lora_magnitude_vector["default"].reshape(-1) / (w + delta).flatten(1).norm(dim=1)
    g = g.view(1, -1, 1, 1) if kind == "conv2d" else g
    product = (lambda t, k: F.conv2d(t, k, None, 1, 1)) if kind == "conv2d" else F.linear  # without bias
    expected = _plain_forward(layer, x, w) + (g - 1) * product(dx, w) + g * product(dx, delta)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def _peft_pair(model_name):
    builder, kwargs = MODELS[model_name]
    base = builder().double()
    ours = _dora(copy.deepcopy(base), **kwargs)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, **kwargs))
    params, _ = adapter_state_dict(ours)
    result = peft.set_peft_model_state_dict(theirs, {k: v.detach() for k, v in params.items()})
    assert not result.unexpected_keys
    return base, ours, theirs


@pytest.mark.parametrize("model_name", MODELS)
def test_outputs_and_gradients_equal_peft(model_name):
    _, ours, theirs = _peft_pair(model_name)
    ours.eval(), theirs.eval()  # (GPT-2's own dropout off; gradients flow all the same)
    loss_ours, loss_theirs = ours(TOKENS, labels=TOKENS).loss, theirs(TOKENS, labels=TOKENS).loss
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-12, atol=0)
    loss_ours.backward(), loss_theirs.backward()
    mine = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    peft_grads = {k.removeprefix("base_model.model.").replace("lora_magnitude_vector.default.weight",
                                                              "lora_magnitude_vector.default"): p.grad
                  for k, p in theirs.named_parameters() if p.requires_grad}
    assert mine.keys() == peft_grads.keys() and any("magnitude" in k for k in mine)
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()
    for key, grad in mine.items():
        torch.testing.assert_close(grad, peft_grads[key], rtol=1e-10, atol=1e-12, msg=key)


def test_files_load_both_ways_with_peft(tmp_path):
    base, ours, theirs = _peft_pair("llama")
    with torch.no_grad():
        expected = ours(TOKENS).logits
    save_adapter(ours, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS).logits, expected, rtol=1e-12, atol=1e-12)
    theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    set_adapter(back, "default")
    assert all(layer.is_dora("default") for _, layer in lora_layers(back))
    with torch.no_grad():
        torch.testing.assert_close(back(TOKENS).logits, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model_name", MODELS)
def test_merge_unmerge_and_export_keep_the_outputs(model_name):
    _, ours, theirs = _peft_pair(model_name)
    _dora(ours, "second", seed=2, **MODELS[model_name][1])
    add_adapter(ours, LoraConfig(r=2, target_modules=MODELS[model_name][1]["target_modules"], init_lora_weights=False,
                                 fan_in_fan_out=model_name == "gpt2"), "plain")
    weights = {k: v.clone() for k, v in ours.state_dict().items() if "lora" not in k}
    with torch.no_grad():
        for names in (["default"], ["plain", "default"], ["default", "second"]):
            set_adapter(ours, names)
            expected = ours(TOKENS).logits
            merge(ours, names, safe_merge=True)
            assert all(layer.merged_adapters == names for _, layer in lora_layers(ours))
            torch.testing.assert_close(ours(TOKENS).logits, expected, rtol=1e-10, atol=1e-10)
            unmerge(ours)
            for k, v in ours.state_dict().items():
                if "lora" not in k:
                    torch.testing.assert_close(v, weights[k], rtol=0, atol=1e-12, msg=k)
        set_adapter(ours, "default")
        expected = ours(TOKENS).logits
        merged = merge_and_unload(ours)
        assert not any(isinstance(m, lorakit.layers.LoraLayer) for m in merged.modules())
        torch.testing.assert_close(merged(TOKENS).logits, expected, rtol=1e-10, atol=1e-10)
        peft_merged = theirs.merge_and_unload()
        for k, v in merged.state_dict().items():
            torch.testing.assert_close(v, peft_merged.state_dict()[k], rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("model_name", MODELS)
def test_the_fused_dora_node_trains_like_the_plain_composition(model_name, monkeypatch):
    """Inside the trainer's fast paths every DoRA layer runs in a fused node (Llama's MLP projections
    in the fused SwiGLU node, the others in the DoRA-linear node): loss and gradients equal the plain
    composition's, float64."""
    from lorakit.train import fast_paths

    builder, kwargs = MODELS[model_name]
    model = _dora(builder().double(), **kwargs).train()
    for module in model.modules():  # GPT-2's own dropout off, training mode kept
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    import lorakit.mlp

    calls = {"linear": 0, "mlp": 0}
    real, real_mlp = lorakit.layers.fused_dora_linear, lorakit.mlp.lora_swiglu

    def count(kind, fn):
        return lambda *a: calls.__setitem__(kind, calls[kind] + 1) or fn(*a)

    monkeypatch.setattr(lorakit.layers, "fused_dora_linear", count("linear", real))
    monkeypatch.setattr(lorakit.mlp, "lora_swiglu", count("mlp", real_mlp))
    results = []
    for fused in (False, True):
        monkeypatch.setattr(lorakit.layers, "FUSED_LINEAR", fused)
        with fast_paths(model, padding_free=False, bf16=False, device=torch.device("cpu")):
            loss = model(TOKENS, labels=TOKENS).loss
            loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
        model.zero_grad(set_to_none=True)
    layers = model.config.num_hidden_layers if model_name == "llama" else 0  # GPT-2's MLP is not gated
    assert calls == {"linear": len(lora_layers(model)) - 3 * layers, "mlp": layers}
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-13, atol=0)
    for key, grad in results[1][1].items():
        torch.testing.assert_close(grad, results[0][1][key], rtol=1e-10, atol=1e-13, msg=key)


def test_dora_under_bf16_autocast_is_as_close_to_fp32_as_plain_autocast(monkeypatch):
    """What a GPU run does (bf16 autocast, fp32 adapters and magnitudes; here CPU autocast): the
    fused DoRA nodes' (linear and SwiGLU) gradients are about as close to the fp32 result as the unfused composition's
    under autocast. bf16 noise moves single gradients by up to ~15% on this tiny model, either path
    ahead by seed (fused / plain summed error 0.9-1.6× over six seeds), so four seeds are pooled; a
    wrong term is off by ≫ 100%."""

    def rel(u, v):
        return float((u - v).norm() / v.norm().clamp_min(1e-12))

    fused_err, plain_err = [], []
    for seed in range(4):
        model = _dora(tiny_llama(), target_modules="all-linear", seed=seed).train()
        tokens = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(seed + 7))

        def run(fused: bool, autocast: bool, model=model, tokens=tokens):
            monkeypatch.setattr(lorakit.layers, "FUSED_LINEAR", fused)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
                    fused_mlp(model) if fused else contextlib.nullcontext():
                model(tokens, labels=tokens).loss.backward()
            grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
            model.zero_grad(set_to_none=True)
            return grads

        exact, plain, fused = run(False, False), run(False, True), run(True, True)
        assert all(g.dtype == torch.float32 for g in fused.values())
        fused_err += [rel(fused[k], exact[k]) for k in exact]
        plain_err += [rel(plain[k], exact[k]) for k in exact]
    assert sum(plain_err) > 0 and max(fused_err) < 0.25
    assert sum(fused_err) <= 2 * sum(plain_err)


def test_mixed_batch_rows_get_their_own_adapter():
    """A batch whose rows use a DoRA adapter, a LoRA adapter and none: each row's logits are those
    of the model with that adapter alone."""
    model = _dora(tiny_llama().double(), "d", target_modules="all-linear")
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), "l")
    ids = ["d", "l", None, "d"]
    tokens = torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), adapter_batch(model, ids):
        mixed = model(tokens).logits
    for row, name in enumerate(ids):
        with torch.no_grad():
            if name is None:
                with lorakit.disable_adapter(model):
                    alone = model(tokens[row:row + 1]).logits
            else:
                set_adapter(model, name)
                alone = model(tokens[row:row + 1]).logits
        torch.testing.assert_close(mixed[row:row + 1], alone, rtol=1e-10, atol=1e-10)


def test_qlora_dora_merges_into_the_dequantized_weights():
    pytest.importorskip("bitsandbytes")
    from lorakit.quant import dequantized_weight, quantize_model

    model = tiny_llama()
    quantize_model(model, "nf4")
    _dora(model, target_modules=["q_proj", "down_proj"])
    layers = dict(lora_layers(model))
    x = torch.randn(2, 5, 32)
    layer = layers["model.layers.0.self_attn.q_proj"]
    dense = dequantized_weight(layer)
    # the magnitude started at the dequantized rows' norms (A and B were random then, so reset them here)
    w = layer.lora_A["default"].weight
    v = dense + layer.scaling["default"] * layer.lora_B["default"].weight @ w
    with torch.no_grad():
        expected = F.linear(x, layer.lora_magnitude_vector["default"][:, None] * v / v.norm(dim=1, keepdim=True))
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
        before = model(TOKENS).logits
        merged = merge_and_unload(model)
        torch.testing.assert_close(merged(TOKENS).logits, before, rtol=1e-4, atol=1e-4)
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_what_dora_does_not_cover_is_refused_clearly():
    with pytest.raises(ValueError, match="'model.embed_tokens' is a Embedding.*linear layers and convolutions only"):
        get_lora_model(tiny_llama(), LoraConfig(target_modules=["embed_tokens", "q_proj"], use_dora=True))
    model = tiny_llama()
    get_lora_model(model, LoraConfig(target_modules=["q_proj"], use_dora=True))
    assert all(isinstance(m, LoraLinear) and not m.is_dora("x") for _, m in lora_layers(model))
    add_adapter(model, LoraConfig(target_modules=["q_proj"]), "b")
    with pytest.raises(ValueError, match="'default' is a DoRA adapter"):
        lorakit.combine_adapters(model, {"default": 1.0, "b": 1.0})
    from lorakit.router import RouterError, add_router

    with pytest.raises(RouterError, match="'default' is a DoRA adapter"):
        add_router(model, ["default", "b"])
    with pytest.raises(ValueError, match="'bert.embeddings.word_embeddings' is a Embedding"):
        get_lora_model(tiny_bert_classifier(), LoraConfig(target_modules=["word_embeddings"], use_dora=True))


def test_serving_engine_serves_dora_and_lora_adapters_in_one_batch(tmp_path):
    """The engine's mixed batches (a DoRA adapter, a LoRA adapter and the base in one running batch)
    give each request the greedy tokens ``generate`` gives it alone with its adapter."""
    from conftest import serve_greedy
    from lorakit.pool import AdapterPool

    base = tiny_llama().requires_grad_(False)
    pool = AdapterPool(base, max_loaded=2)
    for seed, (adapter, use_dora) in enumerate([("d", True), ("l", False)], 1):
        model = get_lora_model(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora))
        _dora(model, "tmp", seed=seed, target_modules="all-linear")  # random values to copy from
        with torch.no_grad():
            for _, layer in lora_layers(model):
                for mine, other in zip(layer.adapter_parameters("default"), layer.adapter_parameters("tmp")):
                    mine.copy_(other * (3 if mine.ndim == 2 else 1))
        lorakit.delete_adapter(model, "tmp")
        save_adapter(model, tmp_path / adapter)
        pool.register(adapter, tmp_path / adapter)
    g = torch.Generator().manual_seed(0)
    work = [(torch.randint(3, 128, (n,), generator=g).tolist(), [None, "d", "l"][k % 3])
            for k, n in enumerate((3, 17, 9, 25, 11, 4))]
    expected = []
    for ids, adapter in work:
        model = base if adapter is None else load_adapter(copy.deepcopy(base), tmp_path / adapter)
        if adapter is not None:
            set_adapter(model, "default")
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
        expected.append(out[0, len(ids):].tolist())

    assert serve_greedy(base, pool, work) == expected
    ids = work[1][0]  # an "d" request: the DoRA adapter changes its tokens
    plain = base.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert plain[0, len(ids):].tolist() != expected[1]


def test_the_row_norms_are_kept_until_a_weight_changes(monkeypatch):
    """n = ‖W + s B A‖ is computed once per change of W, A, B (an optimizer step, also a fused one,
    a merge, a dtype move), not at every forward (decode steps, micro-batches); after a change it is
    fresh."""
    import lorakit.dora

    model = _dora(tiny_llama(), target_modules=["q_proj", "v_proj"]).train()
    conv = _dora(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), target_modules=["0"])
    calls = []
    real = lorakit.dora.factored_norm
    monkeypatch.setattr(lorakit.dora, "factored_norm", lambda *a: calls.append(1) or real(*a))
    layers = len(lora_layers(model))
    images = torch.randn(1, 3, 6, 6)
    conv(images), conv(images)  # a kernel's rows are views made per call: the key holds the parameters
    assert len(calls) == 1
    calls.clear()
    model(TOKENS, labels=TOKENS).loss.backward()
    model(TOKENS, labels=TOKENS).loss.backward()
    assert len(calls) == layers
    # fused AdamW updates A, B and m without bumping their version counters
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
    optimizer.step()
    with torch.no_grad():
        after_step = model(TOKENS).logits
    assert len(calls) == 2 * layers
    fresh = copy.deepcopy(model)
    for _, layer in lora_layers(fresh):
        layer.__dict__.pop("dora_norm_cache")
    with torch.no_grad():
        torch.testing.assert_close(after_step, fresh(TOKENS).logits, rtol=0, atol=0)
        assert len(calls) == 3 * layers  # the copy's own
        merge(model)  # (the merge computes its n directly); the merged forward needs none
        model(TOKENS)
        assert len(calls) == 3 * layers
        unmerge(model)  # W is back, but written: n again at the next forward
        model(TOKENS)
        model(TOKENS)
        assert len(calls) == 4 * layers
        model.double()
        model(TOKENS)
    assert len(calls) == 5 * layers


def test_dora_on_meta_weights_is_refused_with_the_fix():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="meta device; load the weights before adding the adapter"):
        get_lora_model(model, LoraConfig(target_modules=["q_proj"], use_dora=True))


def test_factored_norm_equals_the_norm_of_the_sum():
    """n² = ‖W‖² + 2s⟨W, BA⟩ + s²‖BA‖² per row, without forming W + sBA: equal to the direct norm
    (float64 to 1e-13; fp32 to its rounding)."""
    from lorakit import dora

    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 2e-6)):
        w = torch.randn(40, 24, generator=g, dtype=dtype) * 0.05
        a, b = torch.randn(4, 24, generator=g, dtype=dtype), torch.randn(40, 4, generator=g, dtype=dtype) * 0.01
        direct = dora.weight_norm(w, 2.0 * b @ a)
        factored = dora.factored_norm(w, a, b, 2.0, w.square().sum(1))
        torch.testing.assert_close(factored, direct, rtol=tol, atol=0)


def test_convolutions_equal_peft_outputs_gradients_files_and_merge(tmp_path):
    """DoRA on Conv2d and Conv1d (rows: output channels over in · kernel; PEFT stores m as
    (1, out, 1…)) and on the Linear head of a small conv net: float64 outputs and every gradient
    equal PEFT's, the file loads in PEFT, and merging gives PEFT's merged kernels."""
    from conftest import tiny_convnet

    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    kwargs = dict(target_modules=["conv1", "conv2", "conv1d", "head"])
    base = tiny_convnet().double()
    ours = _dora(copy.deepcopy(base), **kwargs)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, **kwargs))
    params, _ = adapter_state_dict(ours)
    assert params["base_model.model.conv2.lora_magnitude_vector"].shape == (1, 8, 1, 1)
    assert not peft.set_peft_model_state_dict(theirs, {k: v.detach() for k, v in params.items()}).unexpected_keys
    y_ours, y_theirs = ours(images), theirs(images)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-12, atol=1e-12)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    peft_grads = {k.removeprefix("base_model.model.").replace("lora_magnitude_vector.default.weight",
                                                              "lora_magnitude_vector.default"): p.grad
                  for k, p in theirs.named_parameters() if p.requires_grad}
    for key, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, peft_grads[key], rtol=1e-10, atol=1e-12, msg=key)
    save_adapter(ours, tmp_path / "conv")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "conv")
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), y_ours.detach(), rtol=1e-12, atol=1e-12)
        merged, peft_merged = merge_and_unload(ours), theirs.merge_and_unload()
        torch.testing.assert_close(merged(images), y_ours.detach(), rtol=1e-10, atol=1e-12)
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, peft_merged.state_dict()[k], rtol=1e-12, atol=1e-12, msg=k)


def test_dora_on_an_8bit_base_is_refused_with_the_fix():
    pytest.importorskip("bitsandbytes")
    from lorakit.quant import quantize_model

    model = tiny_llama()
    quantize_model(model, "int8")
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' is 8-bit quantized.*quantize to 4-bit"):
        get_lora_model(model, LoraConfig(target_modules=["q_proj"], use_dora=True))
    assert not lora_layers(model)  # refused before anything was wrapped
