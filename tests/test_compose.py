"""combine_adapters: cat is the exact weighted sum, svd the best rank-k approximation, linear needs equal ranks."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import randomize_adapters, tiny_gpt2, tiny_llama
from lorakit import LoraConfig, add_adapter, combine_adapters, load_adapter, save_adapter, set_adapter
from lorakit.layers import lora_layers

WEIGHTS = {"a": 0.7, "b": -0.3}


def two_adapters(build=tiny_llama, rank_b=4):
    model = build()
    targets_a = ["q_proj", "v_proj", "down_proj"] if build is tiny_llama else ["c_attn", "c_proj"]
    targets_b = ["v_proj", "o_proj", "down_proj"] if build is tiny_llama else ["c_attn", "c_fc"]
    add_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets_a), "a")
    add_adapter(model, LoraConfig(r=rank_b, lora_alpha=2, use_rslora=True, target_modules=targets_b), "b")
    randomize_adapters(model, std=0.3)
    return model


def expected_delta(layer, weights):
    return sum(w * layer.delta_weight(n).double() for n, w in weights.items() if n in layer.r)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_cat_reproduces_the_weighted_sum_of_deltas_exactly(build):
    model = two_adapters(build)
    config = combine_adapters(model, WEIGHTS, method="cat", new_name="ab")
    assert config.r == 2 + 4
    layers = [(n, layer) for n, layer in lora_layers(model) if "ab" in layer.r]
    assert sorted(n for n, _ in layers) == config.target_modules
    for name, layer in layers:
        torch.testing.assert_close(layer.delta_weight("ab").double(), expected_delta(layer, WEIGHTS), atol=1e-6,
                                   rtol=0, msg=name)
    # the forward with the combined adapter equals the base plus the weighted deltas
    ids = torch.randint(0, 128, (2, 7))
    set_adapter(model, "ab")
    with torch.no_grad():
        got = model(ids).logits
        for _, layer in layers:
            layer.base_weight.add_(expected_delta(layer, WEIGHTS).to(layer.base_weight.dtype).reshape(
                layer.base_weight.shape))
            layer.adapters_disabled = True
        want = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_svd_truncation_error_matches_the_discarded_singular_values():
    model = two_adapters()
    combine_adapters(model, WEIGHTS, method="svd", new_name="k2", rank=2)
    combine_adapters(model, WEIGHTS, method="svd", new_name="full", rank=6)
    for name, layer in lora_layers(model):
        if "k2" not in layer.r:
            continue
        delta = expected_delta(layer, WEIGHTS)
        sigma = torch.linalg.svdvals(delta)
        err = torch.linalg.norm(delta - layer.delta_weight("k2").double())
        assert err.item() == pytest.approx(sigma[2:].pow(2).sum().sqrt().item(), rel=1e-4, abs=1e-6), name
        # rank ≥ rank(ΔW) (at most 2 + 4): exact
        torch.testing.assert_close(layer.delta_weight("full").double(), delta, atol=1e-6, rtol=0)


def test_linear_needs_equal_ranks_and_follows_its_formula():
    with pytest.raises(ValueError, match="equal rank"):
        combine_adapters(two_adapters(rank_b=4), WEIGHTS, method="linear")
    model = two_adapters(rank_b=2)
    combine_adapters(model, WEIGHTS, method="linear", new_name="lin")
    for _, layer in lora_layers(model):
        if "lin" not in layer.r:
            continue
        want_a = sum(abs(w * layer.scaling[n]) ** 0.5 * layer.lora_A[n].weight for n, w in WEIGHTS.items()
                     if n in layer.r)
        torch.testing.assert_close(layer.lora_A["lin"].weight, want_a, atol=1e-6, rtol=0)


def test_combined_adapter_saves_and_loads_like_any_other(tmp_path):
    model = two_adapters()
    base = copy.deepcopy(model)
    combine_adapters(model, WEIGHTS, method="cat", new_name="ab")
    set_adapter(model, "ab")
    save_adapter(model, tmp_path / "ab", adapter_name="ab")
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "ab")
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no adapter named 'zzz'"):
        combine_adapters(base, {"zzz": 1.0})
    with pytest.raises(ValueError, match="method must be one of"):
        combine_adapters(base, WEIGHTS, method="ties")


def test_cli_combine_writes_an_adapter_equal_to_the_weighted_sum(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    from lorakit.models import load_model

    base, _ = load_model(str(tiny_model_dir))
    for i, targets in enumerate([["q_proj"], ["q_proj", "up_proj"]]):
        m = copy.deepcopy(base)
        add_adapter(m, LoraConfig(r=2 + i, target_modules=targets), "x")
        randomize_adapters(m, seed=i)
        save_adapter(m, tmp_path / f"a{i}", adapter_name="x")
    out = subprocess.run([sys.executable, "-m", "lorakit", "combine", "--model", str(tiny_model_dir), "--adapter",
                          f"{tmp_path / 'a0'}:0.5", "--adapter", f"{tmp_path / 'a1'}:2", "--method", "svd",
                          "--rank", "5", "--out", str(tmp_path / "c")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "rank 5" in out.stdout
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path / "a0", adapter_name="a0", activate=False)
    load_adapter(model, tmp_path / "a1", adapter_name="a1", activate=False)
    load_adapter(model, tmp_path / "c", adapter_name="c", activate=False)
    for _, layer in lora_layers(model):
        torch.testing.assert_close(layer.delta_weight("c").double(), expected_delta(layer, {"a0": 0.5, "a1": 2.0}),
                                   atol=1e-6, rtol=0)
