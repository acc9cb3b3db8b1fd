"""Hot load / unload / replace with an LRU cap, touching nothing but the adapter itself."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from conftest import randomize_adapters, tiny_gpt2, tiny_llama
from lorakit.pool import AdapterPool, AdapterPoolError

IDS = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def saved(tmp_path):
    base = tiny_llama()
    paths = {}
    for i, (name, r) in enumerate((("a", 2), ("b", 4), ("c", 8))):
        model = lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(r=r, target_modules="all-linear"))
        randomize_adapters(model, seed=i, std=0.3)
        lorakit.save_adapter(model, tmp_path / name)
        paths[name] = (tmp_path / name, model)
    return base, paths


def run(model, name):
    with torch.no_grad(), lorakit.adapter_batch(model, [name]):
        return model(IDS).logits


def test_lru_eviction_and_reload_give_the_same_outputs(saved):
    base, paths = saved
    model = copy.deepcopy(base)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    pool = AdapterPool(model, max_loaded=2)
    for name, (path, _) in paths.items():
        pool.register(name, path)
    assert pool.model_adapters == []  # registration checks but does not keep anything loaded
    for name in ("a", "b", "c"):
        with pool.use([name]):
            torch.testing.assert_close(run(model, name), paths[name][1](IDS).logits.detach(), atol=1e-5, rtol=0)
    assert list(pool.loaded) == ["b", "c"]  # a was least recently used
    with pool.use(["a", "c"]):
        pass
    assert list(pool.loaded) == ["a", "c"] and pool.loads == 4  # b evicted; c touched last
    with pool.use(["a"]):
        torch.testing.assert_close(run(model, "a"), paths["a"][1](IDS).logits.detach(), atol=1e-5, rtol=0)
    for key, value in model.state_dict().items():
        if key in base_state:
            assert torch.equal(value, base_state[key]), key


def test_replace_swaps_the_weights_and_leaves_others(saved):
    base, paths = saved
    model = copy.deepcopy(base)
    pool = AdapterPool(model, max_loaded=3)
    pool.register("x", paths["a"][0])
    pool.register("y", paths["b"][0])
    with pool.use(["x", "y"]):
        y_before = run(model, "y")
    pool.replace("x", paths["c"][0])
    with pool.use(["x", "y"]):
        torch.testing.assert_close(run(model, "x"), paths["c"][1](IDS).logits.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(run(model, "y"), y_before, atol=0, rtol=0)
        with pytest.raises(AdapterPoolError, match="in use"):
            pool.replace("x", paths["a"][0])


def test_bad_adapters_fail_at_registration(saved, tmp_path):
    base, paths = saved
    pool = AdapterPool(copy.deepcopy(base), max_loaded=1)
    gpt2 = lorakit.get_lora_model(tiny_gpt2(), lorakit.LoraConfig(target_modules=["c_attn"]))
    lorakit.save_adapter(gpt2, tmp_path / "gpt2")
    with pytest.raises(ValueError, match="does not fit this model"):
        pool.register("g", tmp_path / "gpt2")
    with pytest.raises(ValueError, match="does not exist"):
        pool.register("h", tmp_path / "missing")
    pool.register("a", paths["a"][0])
    pool.register("b", paths["b"][0])
    with pytest.raises(AdapterPoolError, match="unknown adapter 'zz'"):
        pool.ensure(["zz"])
    with pytest.raises(AdapterPoolError, match="needs 2 adapters but at most 1"):
        pool.ensure(["a", "b"])
