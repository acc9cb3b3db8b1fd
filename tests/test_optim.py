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
