"""The learned router: gates weigh frozen adapters per token; trained with method: router; saved and loaded."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from conftest import randomize_adapters, write_jsonl
from lorakit import LoraConfig, add_adapter, combine_adapters, save_adapter, set_adapter
from lorakit.layers import lora_layers
from lorakit.models import load_model
from lorakit.router import RouterError, add_router, load_router, remove_router, save_router
from lorakit.train import train
from lorakit.train_config import ConfigError, build_config
from test_train import rows


@pytest.fixture
def two(tiny_model_dir, tmp_path):
    base, _ = load_model(str(tiny_model_dir))
    for i, targets in enumerate([["q_proj", "v_proj"], ["v_proj", "down_proj"]]):
        m = copy.deepcopy(base)
        add_adapter(m, LoraConfig(r=4, lora_alpha=8, target_modules=targets), "x")
        randomize_adapters(m, seed=i + 1, std=0.3)
        save_adapter(m, tmp_path / f"ad{i}", adapter_name="x")
    model = copy.deepcopy(base)
    from lorakit import load_adapter

    load_adapter(model, tmp_path / "ad0", adapter_name="a", activate=False)
    load_adapter(model, tmp_path / "ad1", adapter_name="b", activate=False)
    return base, model, tmp_path


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_untrained_router_averages_and_a_saturated_gate_picks_one_adapter(two):
    _, model, _ = two
    ids = torch.randint(0, 1000, (2, 9))
    mean = copy.deepcopy(model)
    combine_adapters(mean, {"a": 0.5, "b": 0.5}, method="cat", new_name="mean")
    set_adapter(mean, "mean")
    only_b = copy.deepcopy(model)
    set_adapter(only_b, "b")
    gated = add_router(model, ["a", "b"])
    assert gated and all(p.requires_grad == ("lora_router" in n) for n, p in model.named_parameters())
    torch.testing.assert_close(logits(model, ids), logits(mean, ids), atol=1e-5, rtol=0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if "lora_router" in layer._modules:
                layer.lora_router.bias.copy_(torch.tensor([-60.0, 60.0]))  # softmax = (0, 1)
    torch.testing.assert_close(logits(model, ids), logits(only_b, ids), atol=1e-5, rtol=0)
    remove_router(model)  # back to plain adapters: the active one alone decides again
    assert not any("lora_router" in n for n, _ in model.named_modules())
    set_adapter(model, "a")
    only_a = copy.deepcopy(only_b)
    set_adapter(only_a, "a")
    torch.testing.assert_close(logits(model, ids), logits(only_a, ids), atol=0, rtol=0)


def test_router_trains_saves_and_loads(two, tiny_model_dir):
    base, _, tmp = two
    write_jsonl(tmp / "mix.jsonl", rows(16))
    cfg = {"model": {"name": str(tiny_model_dir)}, "method": "router",
           "router": {"adapters": {"a": str(tmp / "ad0"), "b": str(tmp / "ad1")}},
           "data": {"train": str(tmp / "mix.jsonl"), "max_seq_len": 96},
           "train": {"epochs": 2, "batch_size": 4, "lr": 5e-2}, "output_dir": str(tmp / "router"), "seed": 1}
    result = train(cfg, progress=False)
    assert result.trainable_params == sum(2 * (m.in_features + 1) for _, m in _gated(base, tmp))
    losses = [r["loss"] for r in map(yaml.safe_load, (tmp / "router" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses[-1] < losses[0]
    assert {"router_config.json", "router.safetensors"} <= {p.name for p in (tmp / "router").iterdir()}
    # loading the router (which loads its adapters) reproduces the trained model's outputs
    fresh = copy.deepcopy(base)
    assert load_router(fresh, tmp / "router") == ["a", "b"]
    trained = copy.deepcopy(base)
    load_router(trained, tmp / "router")
    ids = torch.randint(0, 1000, (1, 7))
    torch.testing.assert_close(logits(fresh, ids), logits(trained, ids), atol=0, rtol=0)
    gates = [layer.lora_router.weight for _, layer in lora_layers(fresh) if "lora_router" in layer._modules]
    assert any(g.abs().sum() > 0 for g in gates)  # the gates moved away from their zero start
    save_router(fresh, tmp / "again", {"a": str(tmp / "ad0"), "b": str(tmp / "ad1")})
    again = copy.deepcopy(base)
    load_router(again, tmp / "again")
    torch.testing.assert_close(logits(again, ids), logits(fresh, ids), atol=0, rtol=0)


def _gated(base, tmp):
    m = copy.deepcopy(base)
    from lorakit import load_adapter

    load_adapter(m, tmp / "ad0", adapter_name="a", activate=False)
    load_adapter(m, tmp / "ad1", adapter_name="b", activate=False)
    return [(n, layer) for n, layer in lora_layers(m)]


def test_router_errors_are_clear(two, tiny_model_dir):
    _, model, tmp = two
    with pytest.raises(RouterError, match="at least two adapters"):
        add_router(model, ["a"])
    with pytest.raises(RouterError, match="not a router directory"):
        load_router(model, tmp)
    with pytest.raises(ConfigError, match="router.adapters"):
        build_config({"method": "router", "data": {"train": "x.jsonl"}})
