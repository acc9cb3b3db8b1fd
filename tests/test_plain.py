"""Plain linear layers on ``gemm.linear`` while training (``lorakit.plain``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from conftest import randomize_adapters, tiny_llama
from lorakit.kernels import gemm
from lorakit.layers import LoraLayer
from lorakit.plain import plain_linears


@pytest.mark.parametrize("method", ["lora", "full", "qlora"])
@pytest.mark.parametrize("backend", ["blas", pytest.param("onednn", marks=pytest.mark.skipif(
    gemm._linear_op() is None, reason="this torch build has no oneDNN linear"))])
def test_plain_linears_switch_the_plain_layers_and_change_no_result(backend, method, monkeypatch):
    """LoRA on q_proj and v_proj: the other projections and the head are frozen nn.Linear layers
    (under QLoRA the projections bitsandbytes 4-bit ones, run dequantized); full fine-tuning: every
    projection and the head are trainable ones. Where oneDNN applies they are switched (none on the BLAS); the loss and every gradient (the adapters', or every weight's)
    stay those of the unswitched model to fp32 rounding; on exit every layer has its own forward again."""
    monkeypatch.setattr(gemm, "CPU_GEMM", backend)
    model = tiny_llama()
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
        from lorakit.quant import quantize_model

        quantize_model(model, "nf4")
    if method in ("lora", "qlora"):
        lorakit.get_lora_model(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        randomize_adapters(model, std=0.3)
        plain = [m for m in model.modules() if isinstance(m, nn.Linear) and not isinstance(m, LoraLayer)
                 and not m.weight.requires_grad]  # not lora_A/B
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
    assert len(grads) == len(want_grads) == (len(list(model.parameters())) if method == "full" else 2 * 2 * 2)
    for u, v in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(u, v, atol=1e-5 * float(v.abs().max()), rtol=1e-4)
