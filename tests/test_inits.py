"""PiSSA, OLoRA and orthogonal initialisations (lorakit.inits): PEFT's factors bit for bit, the
definitions in float64, the conversion to a plain LoRA on the original base, and the refusals."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from conftest import randomize_adapters, tiny_convnet, tiny_gpt2, tiny_llama
from lorakit import LoraConfig, get_lora_model, load_adapter, save_adapter
from lorakit.inject import delete_adapter
from lorakit.io import adapter_state_dict
from lorakit.layers import lora_layers

LLAMA = {"target_modules": ["q_proj", "v_proj", "down_proj"]}
GPT2 = {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def _ours_and_peft(builder, init, kwargs):
    base = builder()
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, **kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                                                        **kwargs))
    return base, ours, theirs


@pytest.mark.parametrize("builder,init,kwargs", [(tiny_llama, "pissa", LLAMA), (tiny_gpt2, "pissa", GPT2),
                                                 (tiny_llama, "olora", LLAMA)])
def test_factors_and_residual_base_equal_peft(builder, init, kwargs):
    """fp32 (PEFT refuses float64 here): the same A, B and residual base weights, bit for bit."""
    base, ours, theirs = _ours_and_peft(builder, init, kwargs)
    mine, _ = adapter_state_dict(ours)
    assert mine.keys() == peft.get_peft_model_state_dict(theirs).keys()
    for key, tensor in peft.get_peft_model_state_dict(theirs).items():
        assert torch.equal(mine[key].detach(), tensor), key
    peft_base = {k.replace(".base_layer", ""): v for k, v in theirs.base_model.model.state_dict().items()
                 if "lora_" not in k}
    moved = 0
    for key, tensor in _weights(ours).items():
        assert torch.equal(tensor, peft_base[key]), key
        moved += not torch.equal(tensor, base.state_dict()[key])
    assert moved == len(kwargs["target_modules"]) * 2  # every target of each of the two layers
    torch.testing.assert_close(_logits(ours), _logits(base), atol=1e-5, rtol=0)


def test_pissa_is_the_best_rank_r_part_in_float64():
    """s·B A = the top-r SVD part of W (‖W − s B A‖_F² = Σ_{i>r} σ_i²), W_res + s B A = W, and the
    model computes what the base did."""
    base = tiny_llama().double()
    model = get_lora_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", **LLAMA))
    for name, layer in lora_layers(model):
        w = base.get_submodule(name).weight.detach()
        delta = layer.delta_weight("default")
        sigma = torch.linalg.svdvals(w)
        torch.testing.assert_close((w - delta).norm() ** 2, (sigma[4:] ** 2).sum(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.weight + delta, w, rtol=0, atol=1e-14)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(a @ a.T, b.T @ b, rtol=1e-12, atol=1e-12)  # both √(S/s): balanced factors
    torch.testing.assert_close(_logits(model), _logits(base), rtol=0, atol=1e-12)


def test_pissa_niter_and_olora_keep_the_model_and_capture_the_principal_part():
    base = tiny_llama().double()
    for init in ("pissa_niter_4", "olora"):
        torch.manual_seed(0)
        model = get_lora_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, **LLAMA))
        torch.testing.assert_close(_logits(model), _logits(base), rtol=0, atol=1e-12)
        for name, layer in lora_layers(model):
            w = base.get_submodule(name).weight.detach()
            delta = layer.delta_weight("default")
            torch.testing.assert_close(layer.weight + delta, w, rtol=0, atol=1e-14)
            if init == "olora":  # B = Q_r has orthonormal columns, A = R_r is upper triangular
                b = layer.lora_B["default"].weight
                torch.testing.assert_close(b.T @ b, torch.eye(4, dtype=b.dtype), rtol=0, atol=1e-12)
                assert torch.equal(layer.lora_A["default"].weight.tril(-1), torch.zeros(4, w.shape[1]).double().tril(-1))
            else:  # a randomised SVD: 95-100% of the best rank-4 approximation's energy (98% here)
                best = (torch.linalg.svdvals(w)[:4] ** 2).sum()
                assert 0.95 * best <= delta.norm() ** 2 <= best * (1 + 1e-12)


def test_orthogonal_init_starts_at_zero_update_and_leaves_the_base():
    base = tiny_llama()
    torch.manual_seed(0)
    model = get_lora_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights="orthogonal", **LLAMA))
    assert _weights(model).keys() == {k for k in base.state_dict()}
    for k, v in _weights(model).items():
        assert torch.equal(v, base.state_dict()[k]), k
    for _, layer in lora_layers(model):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.abs().min() > 0 and b.abs().max() > 0.01  # both factors random, not zero
        assert (b @ a).abs().max() < 1e-7 * b.norm() * a.norm()
        assert torch.linalg.matrix_rank(a, rtol=1e-5) == torch.linalg.matrix_rank(b, rtol=1e-5) == 2  # r/2 each
    with pytest.raises(ValueError, match="'orthogonal' needs an even rank, got r=3"):
        get_lora_model(tiny_llama(), LoraConfig(r=3, init_lora_weights="orthogonal", **LLAMA))


@pytest.mark.parametrize("builder,kwargs", [(tiny_llama, LLAMA), (tiny_gpt2, GPT2)])
def test_converted_adapter_equals_peft_conversion_and_works_on_the_original_base(builder, kwargs, tmp_path):
    """After training (random factors stand in), ``save_adapter`` writes PEFT's
    ``path_initial_model_for_weight_conversion`` tensors exactly, and that rank-2r LoRA on the
    untouched base gives the trained model's outputs, in lorakit and in PEFT."""
    base, ours, theirs = _ours_and_peft(builder, "pissa", kwargs)
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial factors, marked plain
    theirs.save_pretrained(tmp_path / "peft" / "initial")
    randomize_adapters(ours, seed=4)
    params, _ = adapter_state_dict(ours)
    peft.set_peft_model_state_dict(theirs, {k: v.detach() for k, v in params.items()})
    theirs.save_pretrained(tmp_path / "peft" / "trained",
                           path_initial_model_for_weight_conversion=str(tmp_path / "peft" / "initial"))
    save_adapter(ours, tmp_path / "ours")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "peft" / "trained" / "adapter_model.safetensors")
    assert mine.keys() == reference.keys()
    for key in mine:
        assert torch.equal(mine[key], reference[key]), key
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)

    trained = _logits(ours)
    assert (trained - _logits(base)).abs().max() > 1e-2  # the adapter does something
    for loaded in (load_adapter(copy.deepcopy(base), tmp_path / "ours"),
                   peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()):
        torch.testing.assert_close(_logits(loaded), trained, atol=2e-5, rtol=0)


def test_conversion_in_float64_with_rslora_patterns_dora_and_untouched_kinds(tmp_path):
    """rsLoRA with rank and alpha patterns, DoRA magnitudes, and an embedding (default init, zero
    padded): the converted adapter on the original base is the trained model to 1e-12."""
    base = tiny_llama().double()
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", use_rslora=True, use_dora=True,
                        target_modules=["q_proj", "v_proj", "o_proj"], rank_pattern={"o_proj": 2},
                        alpha_pattern={"v_proj": 3.0})
    model = get_lora_model(copy.deepcopy(base), config)
    for name, layer in lora_layers(model):  # DoRA's m starts at the original rows' norms
        torch.testing.assert_close(layer.magnitude("default"), base.get_submodule(name).weight.norm(dim=1))
    randomize_adapters(model, seed=2, std=0.05)
    save_adapter(model, tmp_path / "plain")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "plain")
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-12)
    saved = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {"o_proj": 4} and saved["alpha_pattern"] == {"v_proj": 3.0 * 2 ** 0.5}

    emb = get_lora_model(copy.deepcopy(base), LoraConfig(r=4, init_lora_weights="pissa",
                                                         target_modules=["embed_tokens", "q_proj"]))
    embedding = emb.model.embed_tokens
    assert not embedding.lora_embedding_A["default"].any()  # PEFT's default init for embeddings
    randomize_adapters(emb, seed=3, std=0.05)
    save_adapter(emb, tmp_path / "emb")
    torch.testing.assert_close(_logits(load_adapter(copy.deepcopy(base), tmp_path / "emb")), _logits(emb),
                               rtol=0, atol=1e-12)


def test_raw_save_reloads_by_decomposing_the_given_base_as_peft_does(tmp_path):
    """``convert=False`` keeps init_lora_weights='pissa': loading it onto the original base runs
    the decomposition again (PEFT's behaviour), so lorakit and PEFT both recover the trained model."""
    base = tiny_llama()
    model = get_lora_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", **LLAMA))
    randomize_adapters(model, seed=5)
    save_adapter(model, tmp_path / "raw", convert=False)
    assert json.loads((tmp_path / "raw" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    for loaded in (load_adapter(copy.deepcopy(base), tmp_path / "raw"),
                   peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "raw").eval()):
        torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-5, rtol=0)
    again = load_adapter(copy.deepcopy(base), tmp_path / "raw")
    save_adapter(again, tmp_path / "converted")  # a raw file converts once loaded
    torch.testing.assert_close(_logits(load_adapter(copy.deepcopy(base), tmp_path / "converted")), _logits(model),
                               atol=1e-5, rtol=0)


def test_deleting_the_adapter_gives_the_base_back():
    base = tiny_llama().double()
    model = get_lora_model(copy.deepcopy(base), LoraConfig(r=4, init_lora_weights="olora", **LLAMA))
    randomize_adapters(model)
    delete_adapter(model, "default")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, base.state_dict()[k], rtol=0, atol=1e-14, msg=k)


def test_refusals_name_the_problem(tmp_path):
    model = get_lora_model(tiny_llama(), LoraConfig(r=4, **LLAMA))
    from lorakit.inject import add_adapter

    with pytest.raises(ValueError, match=r"module 'model.layers.0.self_attn.q_proj' already carries adapter\(s\) "
                                         r"\['default'\], and pissa rewrites the base weight"):
        add_adapter(model, LoraConfig(r=4, init_lora_weights="pissa", **LLAMA), "second")
    assert "second" not in model.model.layers[0].self_attn.q_proj.r  # nothing was wrapped
    pissa = get_lora_model(tiny_llama(), LoraConfig(r=4, init_lora_weights="pissa", **LLAMA))
    with pytest.raises(ValueError, match=r"adapter 'second': module '.*' carries adapter 'default', whose "
                                         r"PiSSA/OLoRA initialisation rewrote the base weight"):
        add_adapter(pissa, LoraConfig(r=4, **LLAMA), "second")
    with pytest.raises(ValueError, match=r"needs r ≤ min\(out, in\) = 32, got r=40"):
        get_lora_model(tiny_llama(), LoraConfig(r=40, init_lora_weights="pissa", **LLAMA))
    with pytest.raises(ValueError, match="init_lora_weights must be True, False, 'gaussian', 'pissa'"):
        LoraConfig(init_lora_weights="corda")
    with pytest.raises(ValueError, match="'eva' needs activations from data"):
        get_lora_model(tiny_llama(), LoraConfig(r=4, init_lora_weights="eva", **LLAMA))

    tied = tiny_llama()
    tied.lm_head.weight = tied.model.embed_tokens.weight  # tied input and output embeddings
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa': module 'lm_head' shares its weight with "
                                         r"'model.embed_tokens' \(tied weights\)"):
        get_lora_model(tied, LoraConfig(r=4, init_lora_weights="pissa", target_modules=["lm_head"]))
    get_lora_model(tied, LoraConfig(r=4, target_modules=["lm_head"]))  # the default init leaves W alone

    from lorakit.quant import quantize_model

    quantized = tiny_llama()
    quantize_model(quantized, "nf4")
    with pytest.raises(ValueError, match="has a quantized base weight; PiSSA/OLoRA decompose a float one"):
        get_lora_model(quantized, LoraConfig(r=4, init_lora_weights="olora", **LLAMA))


def test_eva_adapters_load_as_saved(tmp_path):
    """PEFT's EVA initialises from data; its saved adapters are plain factors and load unchanged."""
    base = tiny_llama()
    model = get_lora_model(copy.deepcopy(base), LoraConfig(r=4, **LLAMA))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "eva")
    path = tmp_path / "eva" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": "eva"}))
    torch.testing.assert_close(_logits(load_adapter(copy.deepcopy(base), tmp_path / "eva")), _logits(model),
                               rtol=0, atol=0)


def test_serving_pool_refuses_an_unconverted_adapter(tmp_path):
    from lorakit.pool import AdapterPool, AdapterPoolError

    model = get_lora_model(tiny_llama(), LoraConfig(r=4, init_lora_weights="pissa", **LLAMA))
    save_adapter(model, tmp_path / "raw", convert=False)
    save_adapter(model, tmp_path / "converted")
    pool = AdapterPool(tiny_llama())
    pool.register("ok", tmp_path / "converted")
    with pytest.raises(AdapterPoolError, match="init_lora_weights='pissa' and not converted.*save_adapter"):
        pool.register("raw", tmp_path / "raw")


def test_convolutions_take_the_default_init():
    model = get_lora_model(tiny_convnet(), LoraConfig(r=2, init_lora_weights="pissa",
                                                      target_modules=["conv1", "head"]))
    assert not model.conv1.lora_B["default"].weight.any() and model.head.lora_B["default"].weight.any()
