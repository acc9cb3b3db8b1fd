"""Plain linear layers on ``gemm.linear`` while training (``lorakit.plain``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from conftest import randomize_adapters, tiny_llama
from lorakit.kernels import gemm
from lorakit.plain import plain_linears


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("backend", ["blas", pytest.param("onednn", marks=pytest.mark.skipif(
    gemm._linear_op() is None, reason="this torch build has no oneDNN linear"))])
def test_plain_linears_switch_the_plain_layers_and_change_no_result(backend, method, monkeypatch):
    """LoRA on q_proj and v_proj: the other projections and the head are frozen nn.Linear layers;
    full fine-tuning: every projection and the head are trainable ones. Where oneDNN applies they
    are switched (none on the BLAS); the loss and every gradient (the adapters', or every weight's)
    stay those of the unswitched model to fp32 rounding; on exit every layer has its own forward again."""
    monkeypatch.setattr(gemm, "CPU_GEMM", backend)
    model = tiny_llama()
    if method == "lora":
        lorakit.get_lora_model(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        randomize_adapters(model, std=0.3)
        plain = [m for m in model.modules() if type(m) is nn.Linear and not m.weight.requires_grad]  # not lora_A/B
        assert len(plain) == 2 * 5 + 1  # k, o, gate, up, down per layer, and the head
    else:
        model.requires_grad_(True)
        plain = [m for m in model.modules() if type(m) is nn.Linear]
        assert len(plain) == 2 * 7 + 1
    model.train()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    want, want_grads = run()
    with plain_linears(model) as n, gemm.onednn_scope():
        assert n == (len(plain) if backend == "onednn" else 0)
        got, grads = run()
        assert all("forward" in m.__dict__ for m in plain) is (backend == "onednn")
    assert not any("forward" in m.__dict__ for m in plain)  # restored
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(grads) == len(want_grads) == (2 * 2 * 2 if method == "lora" else len(list(model.parameters())))
    for u, v in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(u, v, atol=1e-5 * float(v.abs().max()), rtol=1e-4)
