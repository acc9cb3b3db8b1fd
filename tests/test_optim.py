"""The optimizer and lr schedule, against their closed forms."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lorakit.optim import build_optimizer, lr_lambda


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_multiplier_warms_up_linearly_then_follows_its_schedule(schedule):
    warmup, total = 3, 13
    f = lr_lambda(schedule, warmup, total)
    assert [f(s) for s in range(warmup)] == pytest.approx([1 / 4, 2 / 4, 3 / 4])
    for step in range(warmup, total + 2):
        progress = min((step - warmup) / (total - warmup), 1.0)
        expected = {"cosine": (1 + math.cos(math.pi * progress)) / 2, "linear": 1 - progress, "constant": 1.0}[schedule]
        assert f(step) == pytest.approx(expected, abs=1e-12)
    assert f(total) == pytest.approx(0.0 if schedule != "constant" else 1.0, abs=1e-12)


def test_weight_decay_applies_to_matrices_only():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    params = list(model.named_parameters())
    cfg = SimpleNamespace(weight_decay=0.1, lr=1e-3, betas=[0.9, 0.99], eps=1e-8)
    opt = build_optimizer(params, cfg)
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 4])] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["fused"] is True
    only_matrices = build_optimizer([params[0]], cfg)
    assert len(only_matrices.param_groups) == 1  # no empty group


def _lr_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    names = {n: n.removeprefix("base_model.model.").replace("base_layer.", "").replace(
        "lora_magnitude_vector.default.weight", "lora_magnitude_vector.default") for n, _ in model.named_parameters()}
    return {names[n]: lr[id(p)] for n, p in model.named_parameters() if p.requires_grad}


def test_loraplus_groups_parameters_as_peft_does():
    """Every trainable parameter gets the lr PEFT's ``create_loraplus_optimizer`` gives it: B
    matrices and 1-D parameters (biases, DoRA magnitudes) λ·lr, an embedding adapter's factors
    ``loraplus_lr_embedding``, the rest lr; and the first group is lr's (the lr a run logs)."""
    import copy

    import peft
    from peft.optimizers import create_loraplus_optimizer

    from conftest import tiny_llama
    from lorakit import LoraConfig, get_lora_model
    from lorakit.optim import loraplus_scales

    cfg = SimpleNamespace(weight_decay=0.0, lr=1e-3, betas=[0.9, 0.999], eps=1e-8)
    base = tiny_llama()
    got = {}
    for kwargs in (dict(r=4, target_modules=["embed_tokens", "q_proj", "v_proj", "down_proj"], bias="lora_only"),
                   dict(r=4, target_modules=["q_proj", "up_proj"], use_dora=True)):
        ours = get_lora_model(copy.deepcopy(base), LoraConfig(**kwargs))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
        mine = build_optimizer(list(ours.named_parameters()), cfg, loraplus_scales(ours, 16.0, 1e-3, 1e-6))
        assert mine.param_groups[0]["lr"] == 1e-3 and mine.param_groups[0]["params"][0].ndim == 2
        reference = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
        got = _lr_by_name(ours, mine)
        assert got == pytest.approx(_lr_by_name(theirs, reference), rel=1e-12)
        assert {got[n] for n in got if "lora_B" in n} == {16e-3} and {got[n] for n in got if "lora_A" in n} == {1e-3}
        assert {got[n] for n in got if "magnitude" in n or n.endswith("bias")} <= {16e-3}
    assert any("magnitude" in n for n in got)


def test_loraplus_first_step_moves_b_by_the_ratio():
    """Adam's first step moves each parameter by lr · g / (|g| + ε): with LoRA+ B moves λ times as
    far as without, A exactly as far."""
    from conftest import tiny_llama
    from lorakit import LoraConfig, get_lora_model
    from lorakit.optim import loraplus_scales

    cfg = SimpleNamespace(weight_decay=0.0, lr=1e-3, betas=[0.9, 0.999], eps=1e-8)
    moves = []
    for ratio in (None, 4.0):
        model = get_lora_model(tiny_llama().double(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        before = {n: p.detach().clone() for n, p in params}
        opt = build_optimizer(params, cfg, loraplus_scales(model, ratio, cfg.lr, 1e-6) if ratio else None)
        ids = torch.arange(12).view(2, 6)
        model(ids, labels=ids).loss.backward()
        opt.step()
        moves.append({n: p.detach() - before[n] for n, p in params})
    for name, move in moves[1].items():
        expected = moves[0][name] * (4.0 if "lora_B" in name else 1.0)
        torch.testing.assert_close(move, expected, rtol=1e-9, atol=1e-15)
