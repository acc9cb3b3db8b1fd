"""Fused kernels against their plain-PyTorch references (values and gradients)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import lorakit.kernels.cast
import lorakit.layers
from conftest import randomize_adapters, tiny_gpt2, tiny_llama
from lorakit import LoraConfig, get_lora_model
from lorakit.kernels import cross_entropy, gemm
from lorakit.kernels import mlp as mlp_kernel
from lorakit.kernels.cast import cached_casts, cast_frozen
from lorakit.kernels.dora import dora_linear_reference, fused_dora_linear
from lorakit.kernels.lora import fused_lora_linear, lora_linear_reference
from lorakit.layers import lora_layers
from lorakit.loss import causal_lm_loss
from lorakit.mlp import fused_mlp


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("train_weight", [False, True])
def test_fused_lora_linear_matches_the_reference(bias, dropout, train_weight):
    g = torch.Generator().manual_seed(0)

    def t(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    x, w, a, b = t(3, 5, 7), t(6, 7, grad=train_weight), t(2, 7), t(6, 2)
    bb = t(6) if bias else None
    torch.manual_seed(1)
    y = fused_lora_linear(x, w, bb, a, b, 0.5, dropout)
    torch.manual_seed(1)  # the same dropout mask
    x_lora = torch.nn.functional.dropout(x, dropout, training=True) if dropout else x
    ref = lora_linear_reference(x, w, bb, a, b, 0.5, x_lora)
    inputs = [p for p in (x, w, bb, a, b) if p is not None and p.requires_grad]
    up = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got, want = torch.autograd.grad(y, inputs, up), torch.autograd.grad(ref, inputs, up)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=0)


@pytest.mark.parametrize("bias", [None, "frozen", "trained"])
def test_fused_dora_linear_matches_the_reference(bias):
    """Values and the gradients of x, A, B, the magnitude and a trained bias, float64; without
    gradients the same values and no graph."""
    g = torch.Generator().manual_seed(0)

    def t(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    x, w, a, b, m = t(3, 5, 7), t(6, 7, grad=False), t(2, 7), t(6, 2), t(6)
    bb = None if bias is None else t(6, grad=bias == "trained")
    norm = (w + 0.5 * b @ a).norm(dim=1).detach()
    y = fused_dora_linear(x, w, bb, a, b, 0.5, m, norm)
    ref = dora_linear_reference(x, w, bb, a, b, 0.5, m, norm)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    inputs = [p for p in (x, bb, a, b, m) if p is not None and p.requires_grad]
    up = torch.randn(y.shape, generator=g, dtype=torch.float64)
    for u, v in zip(torch.autograd.grad(y, inputs, up), torch.autograd.grad(ref, inputs, up), strict=True):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=0)
    with torch.no_grad():
        plain = fused_dora_linear(x, w, bb, a, b, 0.5, m, norm)
    assert plain.grad_fn is None and torch.equal(plain, y.detach())


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_lora_layers_take_the_fused_path_and_match_the_plain_one(build, monkeypatch):
    model = get_lora_model(build(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(model)
    model.train()
    ids = torch.randint(0, 128, (2, 9))
    calls = []
    monkeypatch.setattr(lorakit.layers, "fused_lora_linear",
                        lambda *a, **k: calls.append(1) or fused_lora_linear(*a, **k))

    def run(fused: bool):
        monkeypatch.setattr(lorakit.layers, "FUSED_LINEAR", fused)
        m = copy.deepcopy(model)
        torch.manual_seed(0)  # GPT-2's own dropout draws the same masks in both runs
        out = m(ids).logits
        out.pow(2).mean().backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        return out, grads

    plain, plain_grads = run(False)
    assert not calls
    fused, fused_grads = run(True)
    assert len(calls) == len(lora_layers(model))
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=0)
    assert fused_grads.keys() == plain_grads.keys()
    for n in plain_grads:
        torch.testing.assert_close(fused_grads[n], plain_grads[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("chunk_rows", [3, 64])
def test_linear_cross_entropy_matches_the_reference(bias, train_head, chunk_rows, monkeypatch):
    monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", chunk_rows * 4 * 50)  # 3 rows: several chunks, one short
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 8, generator=g, dtype=torch.float64, requires_grad=train_head)
    b = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=train_head) if bias else None
    y = torch.randint(0, 50, (10,), generator=g)
    got = cross_entropy.linear_cross_entropy(h, w, b, y)
    want = cross_entropy.linear_cross_entropy_reference(h, w, b, y)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    inputs = [t for t in (h, w, b) if t is not None and t.requires_grad]
    for u, v in zip(torch.autograd.grad(got * 0.37, inputs), torch.autograd.grad(want * 0.37, inputs)):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=0)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_head", [False, True])
def test_per_row_linear_cross_entropy_matches_the_reference(bias, train_head, monkeypatch):
    """``reduction="none"`` (DPO's per-token log-probabilities): each row's loss, and the gradients
    for per-row upstream weights (a frozen head: the fused kernel; a trained one: the plain way)."""
    monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", 3 * 4 * 50)  # several chunks, one short
    g = torch.Generator().manual_seed(2)
    h = torch.randn(10, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 8, generator=g, dtype=torch.float64, requires_grad=train_head)
    b = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=train_head) if bias else None
    y = torch.randint(0, 50, (10,), generator=g)
    upstream = torch.randn(10, generator=g, dtype=torch.float64)
    got = cross_entropy.linear_cross_entropy(h, w, b, y, reduction="none")
    want = cross_entropy.linear_cross_entropy_reference(h, w, b, y, reduction="none")
    assert got.shape == (10,) and (got.grad_fn is not None)
    assert ("_LinearCrossEntropy" in type(got.grad_fn).__name__) == (not train_head)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    inputs = [t for t in (h, w, b) if t is not None and t.requires_grad]
    for u, v in zip(torch.autograd.grad(got @ upstream, inputs), torch.autograd.grad(want @ upstream, inputs)):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'none'"):
        cross_entropy.linear_cross_entropy(h, w, b, y, reduction="mean")


def test_linear_cross_entropy_under_autocast_keeps_fp32_logits():
    """Under bf16 autocast with an fp32 head (a CPU model) the loss comes from fp32 logits, exact to
    fp32 rounding where bf16 logits are off by far more; ∂loss/∂h is G W in bf16, as autocast runs it."""
    g = torch.Generator().manual_seed(1)
    h64 = torch.randn(24, 32, generator=g, dtype=torch.float64) * 2
    w64 = torch.randn(300, 32, generator=g, dtype=torch.float64)
    y = (h64 @ w64.T).argmax(1)  # confident and right, as a trained model mostly is: the case that needs it
    want = cross_entropy.linear_cross_entropy_reference(h64.requires_grad_(), w64, None, y)
    (want_grad,) = torch.autograd.grad(want, h64)
    h = h64.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cross_entropy.linear_cross_entropy(h, w64.float(), None, y)
        bf16_logits = F.cross_entropy(h.detach() @ w64.float().T, y, reduction="sum")  # what autocast's head gives
    assert got.dtype == torch.float32 and bf16_logits.dtype == torch.float32
    loss, exact = float(got.detach()), float(want.detach())
    assert abs(loss - exact) <= 1e-5 * exact
    assert abs(float(bf16_logits) - exact) > 100 * abs(loss - exact)
    (grad,) = torch.autograd.grad(got, h)
    assert grad.dtype == torch.float32 and 1e-4 < _rel(grad, want_grad) < 2e-2  # bf16 product: rounded, not wrong


def test_linear_cross_entropy_without_grad_keeps_nothing():
    h, w = torch.randn(6, 4), torch.randn(20, 4)
    y = torch.randint(0, 20, (6,))
    with torch.no_grad():
        loss = cross_entropy.linear_cross_entropy(h, w, None, y)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, cross_entropy.linear_cross_entropy_reference(h, w, None, y))


def test_causal_lm_loss_fused_head_equals_the_models_own_loss(monkeypatch):
    """The split body + fused head/cross-entropy path against transformers' full forward with
    ``labels`` (mean loss) on a tiny model, values and LoRA gradients."""
    torch.manual_seed(0)
    model = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "labels": labels}
    loss_sum, n = causal_lm_loss(model, batch)
    (loss_sum / n).backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ref = model(input_ids=ids, labels=labels).loss
    ref.backward()
    torch.testing.assert_close(loss_sum / n, ref, atol=1e-6, rtol=1e-6)
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[k], p.grad, atol=1e-6, rtol=1e-5)


def _proj(g, out, inp, r, scale):
    def t(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    return t(out, inp, grad=False), t(r, inp), t(out, r), scale


@pytest.mark.parametrize("dora", ["none", "gate+down", "all"])
def test_lora_swiglu_matches_the_reference(dora):
    """Values and gradients (x, every A and B, and a DoRA projection's magnitude) against plain
    autograd ops, float64; DoRA projections carry (m, n)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    gate, up, down = _proj(g, 10, 6, 3, 0.5), _proj(g, 10, 6, 3, 2.0), _proj(g, 6, 10, 3, 0.25)
    dora_projections = {"none": (), "gate+down": ("gate", "down"), "all": ("gate", "up", "down")}[dora]

    def with_magnitude(name, p):
        if name not in dora_projections:
            return p
        m = (1 + 0.2 * torch.randn(p[0].shape[0], generator=g, dtype=torch.float64)).requires_grad_()
        n = (p[0] + p[3] * p[2] @ p[1]).detach().norm(dim=1)
        return (*p, m, n)

    gate, up, down = (with_magnitude(n, p) for n, p in (("gate", gate), ("up", up), ("down", down)))
    y = mlp_kernel.lora_swiglu(x, gate, up, down)
    ref = mlp_kernel.lora_swiglu_reference(x, gate, up, down)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    inputs = [x] + [t for p in (gate, up, down) for t in (*p[1:3], *p[4:5])]
    up_grad = torch.randn(y.shape, generator=g, dtype=torch.float64)
    for u, v in zip(torch.autograd.grad(y, inputs, up_grad), torch.autograd.grad(ref, inputs, up_grad)):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="frozen"):
        mlp_kernel.lora_swiglu(x, (gate[0].detach().requires_grad_(), *gate[1:]), up, down)


def _saved_bytes(fn):
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_mlp_equals_the_plain_model_and_keeps_less(dropout, monkeypatch):
    """Llama MLPs inside ``fused_mlp``: the same loss and LoRA gradients as the model's own forward,
    and 2·N·I fewer saved values per layer; with dropout the plain path runs (same result). (The
    last layer's MLP on supervised rows only is tested below; here every MLP sees every row.)"""
    import lorakit.loss

    monkeypatch.setattr(lorakit.loss, "mlp_rows", lambda *_: contextlib.nullcontext(False))
    model = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout))
    randomize_adapters(model)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "labels": ids}

    def run(fused):
        torch.manual_seed(7)  # the same dropout masks
        model.zero_grad()
        with fused_mlp(model) if fused else contextlib.nullcontext() as count:
            (loss, n), saved = _saved_bytes(lambda: causal_lm_loss(model, batch))
            (loss / n).backward()
        return count, float(loss.detach()), saved, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    _, plain_loss, plain_saved, plain_grads = run(False)
    count, fused_loss, fused_saved, fused_grads = run(True)
    assert count == model.config.num_hidden_layers
    assert fused_loss == pytest.approx(plain_loss, rel=1e-6)
    for k, v in plain_grads.items():
        torch.testing.assert_close(fused_grads[k], v, atol=1e-6, rtol=1e-5)
    n_tokens, inter = ids.numel(), model.config.intermediate_size
    expected_saving = 0 if dropout else 2 * n_tokens * inter * 4 * model.config.num_hidden_layers
    assert plain_saved - fused_saved == expected_saving
    mlp = model.model.layers[0].mlp
    assert "forward" not in mlp.__dict__ and "_lorakit_unfused" not in mlp.__dict__  # restored


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32])
def test_fused_paths_under_autocast_round_like_autocast(base_dtype, monkeypatch):
    """bf16 autocast (what the trainer runs on a GPU; here CPU autocast), a bf16 or fp32 base and
    fp32 adapters: the fused linear and MLP nodes run (one call per layer) and their loss and LoRA
    gradients are as close to the fp32 result as the unfused autocast ops are, and close to those."""
    model = get_lora_model(tiny_llama().to(base_dtype), LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model, std=0.2)
    model.train()
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    batch = {"input_ids": ids, "labels": labels}
    reference = copy.deepcopy(model).float()
    calls = {"linear": 0, "mlp": 0}
    real_linear, real_mlp = lorakit.layers.fused_lora_linear, lorakit.mlp.lora_swiglu
    monkeypatch.setattr(lorakit.layers, "fused_lora_linear",
                        lambda *a, **k: calls.__setitem__("linear", calls["linear"] + 1) or real_linear(*a, **k))
    monkeypatch.setattr(lorakit.mlp, "lora_swiglu",
                        lambda *a, **k: calls.__setitem__("mlp", calls["mlp"] + 1) or real_mlp(*a, **k))

    def run(m, fused: bool, autocast: bool):
        m.zero_grad()
        monkeypatch.setattr(lorakit.layers, "FUSED_LINEAR", fused)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
                fused_mlp(m) if fused else contextlib.nullcontext():
            loss, n = causal_lm_loss(m, batch)
        (loss / n).backward()
        return float(loss.detach()) / n, {k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad}

    exact_loss, exact = run(reference, False, False)  # fp32 throughout, no autocast
    plain_loss, plain = run(model, False, True)
    assert calls == {"linear": 0, "mlp": 0}
    fused_loss, fused = run(model, True, True)
    layers = model.config.num_hidden_layers
    assert calls == {"linear": 4 * layers, "mlp": layers}  # q, k, v, o per layer; gate/up/down in the MLP node
    assert abs(plain_loss - exact_loss) > 0  # autocast does round here, so the bounds below mean something
    assert abs(fused_loss - exact_loss) <= 2 * abs(plain_loss - exact_loss) + 1e-4 * abs(exact_loss)
    fused_err = {k: _rel(fused[k], exact[k]) for k in exact}
    plain_err = {k: _rel(plain[k], exact[k]) for k in exact}
    assert all(fused[k].dtype == torch.float32 for k in exact)
    # bf16 noise (a few % here; it varies with the seed, either way round) vs a wrong term (≫ 10%)
    assert max(fused_err.values()) < 0.15, max(fused_err.items(), key=lambda kv: kv[1])
    assert sum(fused_err.values()) <= 2.5 * sum(plain_err.values())


def test_cast_frozen_makes_one_copy_while_the_weight_is_unchanged():
    """Inside ``cached_casts`` a frozen tensor's cast is made once and reused; an in-place change,
    a trainable tensor or a view is never served a stale or shared copy; outside, every call casts."""
    w = torch.randn(8, 4)
    assert cast_frozen(w, torch.bfloat16) is not cast_frozen(w, torch.bfloat16)  # no cache outside the block
    with cached_casts():
        first = cast_frozen(w, torch.bfloat16)
        assert torch.equal(first, w.bfloat16()) and cast_frozen(w, torch.bfloat16) is first
        assert cast_frozen(w, torch.float64) is not first and cast_frozen(w, torch.float32) is w  # per dtype; no-op
        w.add_(1.0)  # e.g. merging an adapter into the base: the version counter moves
        again = cast_frozen(w, torch.bfloat16)
        assert again is not first and torch.equal(again, w.bfloat16())
        trained = torch.randn(8, 4, requires_grad=True)
        assert cast_frozen(trained, torch.bfloat16) is not cast_frozen(trained, torch.bfloat16)
        assert cast_frozen(w.T, torch.bfloat16) is not cast_frozen(w.T, torch.bfloat16)
        with cached_casts():  # nested: the outer block's copies stay
            assert cast_frozen(w, torch.bfloat16) is again
    assert lorakit.kernels.cast._cache is None  # released on exit


def test_cached_casts_change_no_number_of_a_bf16_autocast_step():
    """Two LoRA steps under CPU bf16 autocast with the fused nodes, an fp32 base: with the frozen
    weights' casts cached, the losses and every LoRA gradient are bit-identical to casting them
    at every matmul, also after an optimizer step and after the base changes in place."""
    model = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model, std=0.2)
    model.train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    batch = {"input_ids": ids, "labels": ids.masked_fill(torch.arange(16) < 5, -100)}
    twin = copy.deepcopy(model)

    def steps(m, cached: bool) -> list[tuple[float, dict[str, torch.Tensor]]]:
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        out = []
        with fused_mlp(m), cached_casts() if cached else contextlib.nullcontext():
            for i in range(3):
                if i == 2:  # the base weight changes under the cache (version counter)
                    with torch.no_grad():
                        m.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss, n = causal_lm_loss(m, batch)
                (loss / n).backward()
                out.append((float(loss.detach()), {k: p.grad.clone() for k, p in m.named_parameters()
                                                    if p.requires_grad}))
                if cached:  # every frozen projection weight (7 a layer) and the head were served from the cache
                    assert len(lorakit.kernels.cast._cache) >= 7 * m.config.num_hidden_layers
                opt.step()
                opt.zero_grad()
        return out

    for (loss_a, grads_a), (loss_b, grads_b) in zip(steps(model, True), steps(twin, False), strict=True):
        assert loss_a == loss_b
        assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_b)


@pytest.mark.parametrize("train_weight", [False, True])
def test_rms_norm_matches_float64_math(train_weight):
    """The fused RMSNorm on fp32 inputs: values and gradients equal the float64 formula
    w · x / sqrt(mean(x²) + ε) to fp32 rounding, and the forward equals Llama's module bit for bit."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lorakit.kernels.norm import rms_norm

    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(4, 6, 48, generator=g)).requires_grad_()
    module = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(1 + 0.3 * torch.randn(48, generator=g))
    module.weight.requires_grad_(train_weight)
    y = rms_norm(x, module.weight, 1e-5)
    assert torch.equal(y, module(x))
    x64, w64 = x.detach().double().requires_grad_(), module.weight.detach().double().requires_grad_(train_weight)
    ref = w64 * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(y.double(), ref, atol=2e-6, rtol=1e-6)
    up = torch.randn(y.shape, generator=g)
    inputs, inputs64 = [x, module.weight][: 1 + train_weight], [x64, w64][: 1 + train_weight]
    for got, want in zip(torch.autograd.grad(y, inputs, up), torch.autograd.grad(ref, inputs64, up.double())):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_rms_norm_in_bf16_equals_autograd_and_keeps_half():
    """On bf16 inputs the fused node gives the plain module's output and gradients exactly (same
    ops, same roundings) and keeps the bf16 input instead of autograd's fp32 copy and the normalised
    value (a trained weight here)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lorakit.kernels.norm import rms_norm

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, 64, generator=g).bfloat16().requires_grad_()
    module = LlamaRMSNorm(64).bfloat16()
    with torch.no_grad():
        module.weight.copy_(1 + 0.3 * torch.randn(64, generator=g))
    up = torch.randn(2, 10, 64, generator=g).bfloat16()
    plain, plain_saved = _saved_bytes(lambda: module(x))
    fused, fused_saved = _saved_bytes(lambda: rms_norm(x, module.weight, module.variance_epsilon))
    assert torch.equal(fused, plain)
    for got, want in zip(torch.autograd.grad(fused, (x, module.weight), up),
                         torch.autograd.grad(plain, (x, module.weight), up)):
        assert torch.equal(got, want)
    n = x.numel()
    weight, rows = 64 * 2, 20 * 4  # the bf16 weight and the fp32 (…, 1) factor, kept by both
    assert plain_saved == 4 * n + 2 * n + weight + rows  # the fp32 copy of x; n for the weight's gradient
    assert fused_saved == 2 * n + weight + rows  # x itself


def test_fused_norms_switch_llama_norms_only_and_change_nothing_but_memory(monkeypatch):
    """``fused_norms`` on a LoRA Llama in bf16 autocast: every Llama RMSNorm (2 per layer + the
    final one) switches, a Gemma-style norm does not, the loss and LoRA gradients are unchanged,
    and each switched norm on the training path keeps 2 bytes less per element of its input. On an
    fp32 model (nothing to save) the modules' own forwards run."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    import lorakit.norm
    from lorakit.norm import fused_norms, is_llama_rms_norm

    calls = []
    real = lorakit.norm.rms_norm
    monkeypatch.setattr(lorakit.norm, "rms_norm", lambda *a: calls.append(a[0].dtype) or real(*a))

    assert not is_llama_rms_norm(GemmaRMSNorm(8))
    model = get_lora_model(tiny_llama().bfloat16(), LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "labels": labels}

    def run(fused):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16), fused_norms(model) if fused else contextlib.nullcontext() \
                as count:
            (loss, n), saved = _saved_bytes(lambda: causal_lm_loss(model, batch))
        (loss / n).backward()
        return count, float(loss.detach()), saved, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    _, plain_loss, plain_saved, plain_grads = run(False)
    count, fused_loss, fused_saved, fused_grads = run(True)
    layers = model.config.num_hidden_layers
    assert count == 2 * layers + 1
    assert fused_loss == plain_loss
    for k, v in plain_grads.items():
        assert torch.equal(fused_grads[k], v), k
    # all norms but the first keep something (its input, the embeddings' output, needs no gradient)
    kept = 2 * layers + 1 - 1
    assert plain_saved - fused_saved == kept * ids.numel() * model.config.hidden_size * (4 - 2)
    assert calls == [torch.bfloat16] * (2 * layers + 1)
    norm = model.model.norm
    assert "forward" not in norm.__dict__ and not any("_lorakit" in k for k in norm.__dict__)
    calls.clear()
    model.float()
    with fused_norms(model) as count:
        model(input_ids=ids)
    assert count == 2 * layers + 1 and calls == []


@pytest.mark.parametrize("dtype,programs", [(torch.float32, 1), (torch.float32, 100), (torch.bfloat16, 4)])
def test_triton_segmented_lora_matches_the_reference(dtype, programs):
    """The Triton mixed-adapter kernel (interpreted on the CPU): rows of uneven groups, a rank-5
    adapter zero-padded to 8, rows without an adapter left untouched, T = 6 tokens a row (a group of
    18 tokens spans two row blocks), a layer of two column blocks, taken by one program per token
    block (1 program wanted) or one per column block (100 wanted); ``y`` updated in place."""
    pytest.importorskip("triton")
    from lorakit.kernels.lora import gathered_lora_reference
    from lorakit.kernels.triton_lora import segmented_lora_add_, segments

    g = torch.Generator().manual_seed(0)
    slots, rank, k_in, n_out, tokens = [2, 0, 1, 2, 3, 2, 0], 8, 40, 70, 6
    a = torch.randn(4, rank, k_in, generator=g)
    b = torch.randn(4, n_out, rank, generator=g)
    a[0], b[0] = 0, 0
    a[2, 5:], b[2, :, 5:] = 0, 0
    x = torch.randn(len(slots), tokens, k_in, generator=g).to(dtype)
    y = torch.randn(len(slots), tokens, n_out, generator=g).to(dtype)
    want = y.double() + gathered_lora_reference(x.double(), a.double(), b.double(), torch.tensor(slots))
    rows, start, length, slot, longest = segments(slots, x.device)
    assert rows.tolist() == [2, 0, 3, 5, 4] and length.tolist() == [1, 3, 1] and longest == 3
    out = y.clone()
    assert segmented_lora_add_(out, x, a, b, rows, start, length, slot, longest, programs) is out
    bare = [i for i, s in enumerate(slots) if s == 0]
    assert torch.equal(out[bare], y[bare])
    tol = 1e-5 if dtype == torch.float32 else 2**-8  # fp32 sums, rounded once into y's dtype
    torch.testing.assert_close(out.double(), want, atol=tol * want.abs().max().item(), rtol=tol)


_COMPILE_FOR_H100 = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lorakit.kernels.triton_lora import _kernel

kernel = _kernel()
x_dtype, w_dtype = sys.argv[1:3]
pointers = {"x": x_dtype, "a": w_dtype, "b": w_dtype, "y": x_dtype, "rows": "i32", "seg_start": "i32",
            "seg_len": "i32", "seg_slot": "i32"}
blocks = {"BM": 16, "BN": 64, "BK": 64, "BR": 16}
signature = {n: f"*{pointers[n]}" if n in pointers else "constexpr" if n in blocks else "i32" for n in kernel.arg_names}
compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=blocks), target=GPUTarget("cuda", 90, 32))
print(len(compiled.asm["cubin"]), ".target sm_90" in compiled.asm["ptx"])
"""


@pytest.mark.parametrize("x_dtype,w_dtype", [("bf16", "fp32"), ("fp16", "fp16")])
def test_triton_segmented_lora_compiles_for_an_h100(x_dtype, w_dtype):
    """The interpreter accepts code a GPU compile refuses (tile shapes, dot operand types), so the
    kernel is also compiled, without a GPU, through Triton's whole pipeline to an sm_90 cubin (in a
    process without TRITON_INTERPRET, which changes what ``triton.language`` does)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100, x_dtype, w_dtype], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    size, sm90 = done.stdout.split()[-2:]
    assert int(size) > 1000 and sm90 == "True"


def test_fused_lora_linear_without_gradients_runs_the_same_ops():
    """With gradients off the fused linear skips its autograd node: bitwise the same output."""
    g = torch.Generator().manual_seed(2)
    x, w, bias, a, b = (torch.randn(*s, generator=g) for s in ((3, 5, 16), (12, 16), (12,), (4, 16), (12, 4)))
    a.requires_grad_()
    with_node = fused_lora_linear(x, w, bias, a, b, 0.7)
    with torch.no_grad():
        without = fused_lora_linear(x, w, bias, a, b, 0.7)
    assert with_node.grad_fn is not None and without.grad_fn is None
    assert torch.equal(with_node.detach(), without)


@pytest.mark.parametrize("flat", [False, True])
def test_last_mlp_runs_only_at_supervised_rows_with_the_same_loss_and_gradients(flat, monkeypatch):
    """``causal_lm_loss`` inside ``fused_mlp``: the last decoder layer's MLP runs on the supervised
    positions only (the rows the head reads), and the loss and every LoRA gradient equal those of
    the full computation in float64, for padded and padding-free batches."""
    import lorakit.loss
    import lorakit.mlp
    from lorakit.attention import padding_free
    from lorakit.collate import collate, collate_flat
    from lorakit.data import IGNORE, Example

    model = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear")).double()
    randomize_adapters(model)
    model.train()
    g = torch.Generator().manual_seed(5)
    examples = []
    for n, answer in ((9, 3), (14, 6), (6, 1)):  # a common 4-token start: a shared prefix when flat
        ids = [5, 6, 7, 8, *torch.randint(3, 128, (n,), generator=g).tolist()]
        examples.append(Example(ids, [IGNORE] * (4 + n - answer) + ids[4 + n - answer:], "x"))
    batch = collate_flat([[e] for e in examples]) if flat else collate([[e] for e in examples], 0)
    assert batch.get("shared_prefix", 0) == (4 if flat else 0)
    assert lorakit.loss.split_head(model) is not None  # its one-time probe (8 tokens) before counting rows
    rows: list[int] = []
    swiglu = lorakit.mlp.lora_swiglu
    monkeypatch.setattr(lorakit.mlp, "lora_swiglu", lambda x, *p: rows.append(x.reshape(-1, x.shape[-1]).shape[0])
                        or swiglu(x, *p))

    def run(only_rows: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not only_rows:
            monkeypatch.setattr(lorakit.loss, "mlp_rows", lambda *_: contextlib.nullcontext(False))
        model.zero_grad(set_to_none=True)
        with fused_mlp(model), padding_free(model) if flat else contextlib.nullcontext():
            loss, _ = causal_lm_loss(model, batch)
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    loss, grads = run(True)
    tokens = batch["input_ids"].numel()
    supervised = sum(e.n_supervised for e in examples)
    assert rows == [tokens] * (model.config.num_hidden_layers - 1) + [supervised]  # the last layer: 10 rows
    full_loss, full_grads = run(False)
    assert rows[-1] == tokens
    torch.testing.assert_close(loss, full_loss, atol=1e-12, rtol=0)
    for k, v in full_grads.items():
        torch.testing.assert_close(grads[k], v, atol=1e-12, rtol=0, msg=k)
    # a body that sees another token count than the labels (a model adding tokens of its own) runs whole
    rows.clear()
    longer = torch.zeros(batch["input_ids"].shape[0], batch["input_ids"].shape[1], dtype=torch.bool)  # one more column
    with fused_mlp(model), lorakit.mlp.mlp_rows(model, longer) as applies:
        assert applies
        with padding_free(model) if flat else contextlib.nullcontext(), torch.no_grad():
            model.model(**{k: v for k, v in batch.items() if k != "labels"})
    assert rows[-1] == tokens


GEMMS = ["blas", pytest.param("onednn", marks=pytest.mark.skipif(
    gemm._linear_op() is None, reason="this torch build has no oneDNN linear"))]


@pytest.mark.parametrize("backend", GEMMS)
def test_gemm_mm_equals_float64_math_for_any_strides(backend, monkeypatch):
    """``gemm.mm`` gives a @ b (+ add) to fp32 rounding on either CPU library, for row- and
    column-major operands; oneDNN runs only inside ``onednn_scope()``, on bounded shapes, and never
    where a gradient must flow through the product."""
    monkeypatch.setattr(gemm, "CPU_GEMM", backend)
    g = torch.Generator().manual_seed(0)
    a, b, add = torch.randn(37, 53, generator=g), torch.randn(53, 29, generator=g), torch.randn(37, 29, generator=g)
    want = a.double() @ b.double()
    assert not gemm.onednn_applies(a, b)  # outside the scope: always the BLAS
    with gemm.onednn_scope():
        for left in (a, a.T.contiguous().T):
            for right in (b, b.T.contiguous().T):
                assert gemm.onednn_applies(left, right) is (backend == "onednn")
                torch.testing.assert_close(gemm.mm(left, right).double(), want, atol=2e-5, rtol=1e-5)
                torch.testing.assert_close(gemm.mm(left, right, add).double(), want + add.double(), atol=2e-5, rtol=1e-5)
        tracked = a.clone().requires_grad_()
        assert not gemm.onednn_applies(tracked, b) and not gemm.onednn_applies(a.double(), b.double())
        gemm.mm(tracked, b).sum().backward()
        torch.testing.assert_close(tracked.grad, b.sum(1).expand(37, 53))
        # token counts are bounded: rows or a summed side over 64 must be a multiple of 16
        tall, wide = torch.randn(100, 53, generator=g), torch.randn(37, 100, generator=g)
        assert not gemm.onednn_applies(tall, b) and not gemm.onednn_applies(wide, torch.randn(100, 29, generator=g))
        assert gemm.onednn_applies(tall[:96], b) is (backend == "onednn")
        torch.testing.assert_close(gemm.mm(tall, b).double(), tall.double() @ b.double(), atol=2e-5, rtol=1e-5)
    assert not gemm.onednn_applies(a, b)


def test_row_bucket_sizes_are_few_and_waste_at_most_an_eighth():
    """Bucket sizes: ≥ n, a fixed point for themselves, 1/2/4/8, then fewer than 8 rows of padding
    up to 64 rows and at most 1/8 above, 8 sizes per doubling: 99 cover every row count up to 2^17."""
    sizes = [gemm.row_bucket(n) for n in range(1, 2**17 + 1)]
    assert sizes[:9] == [1, 2, 4, 4, 8, 8, 8, 8, 16]
    assert all(size >= n and gemm.row_bucket(size) == size for n, size in enumerate(sizes, 1))
    assert all(size - n < 8 if n <= 64 else size <= n * 9 / 8 for n, size in enumerate(sizes, 1) if n > 8)
    assert sizes == sorted(sizes) and len(set(sizes)) == 99


@pytest.mark.parametrize("backend", GEMMS)
def test_gemm_mm_with_bucketed_rows_pads_and_drops_the_padding(backend, monkeypatch, onednn_rows):
    """Inside ``onednn_scope(bucket_rows=True)`` products of any row count run on oneDNN on
    ``row_bucket(rows)`` rows (zero rows appended, their results dropped): the same values as the
    unpadded product, ``add`` included; with a gradient to track, the BLAS as ever."""
    monkeypatch.setattr(gemm, "CPU_GEMM", backend)
    g = torch.Generator().manual_seed(2)
    b = torch.randn(48, 40, generator=g)
    with gemm.onednn_scope(bucket_rows=True):
        for rows in (1, 3, 9, 100, 777):
            a, add = torch.randn(rows, 48, generator=g), torch.randn(rows, 40, generator=g)
            assert gemm.onednn_applies(a, b) is (backend == "onednn")
            out, out_add = gemm.mm(a, b), gemm.mm(a, b, add)
            assert out.shape == out_add.shape == (rows, 40)
            torch.testing.assert_close(out.double(), a.double() @ b.double(), atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(out_add.double(), a.double() @ b.double() + add.double(), atol=2e-5, rtol=1e-5)
        assert not gemm.onednn_applies(a.requires_grad_(), b)
    assert onednn_rows == ([1, 1, 4, 4, 16, 16, 104, 104, 832, 832] if backend == "onednn" else [])


def test_cpu_flags_reads_vendor_and_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\n")
    assert gemm.cpu_flags(str(info)) == ("AuthenticAMD", {"fpu", "avx2", "avx512f"})
    assert gemm.cpu_flags(str(tmp_path / "missing")) == ("", set())


@pytest.mark.parametrize("backend", GEMMS)
def test_fused_nodes_in_fp32_equal_float64_math_on_either_gemm(backend, monkeypatch):
    """The fused LoRA linear, LoRA SwiGLU and head + cross-entropy nodes in fp32, their products on
    oneDNN or on torch's BLAS: values and gradients equal the float64 references to fp32 rounding."""
    monkeypatch.setattr(gemm, "CPU_GEMM", backend)
    monkeypatch.setattr(gemm, "_scopes", [False])  # as inside onednn_scope()
    monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", 5 * 4 * 300)  # 5 rows a chunk: three chunks
    g = torch.Generator().manual_seed(3)

    def check(fn, ref, tensors):
        ours = [t.float().detach().requires_grad_(t.requires_grad) for t in tensors]
        exact = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
        y, want = fn(*ours), ref(*exact)
        close(y, want)
        up = torch.randn(y.shape, generator=g, dtype=torch.float64)
        got = torch.autograd.grad(y, [t for t in ours if t.requires_grad], up.float())
        for u, v in zip(got, torch.autograd.grad(want, [t for t in exact if t.requires_grad], up)):
            close(u, v)

    def close(got, want):  # fp32 rounding relative to the tensor's scale
        torch.testing.assert_close(got.double(), want, atol=1e-5 * float(want.detach().abs().max()), rtol=1e-5)

    def t(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    x, w, bias, a, b = t(4, 9, 48), t(40, 48, grad=False), t(40, grad=False), t(8, 48), t(40, 8)
    check(lambda *p: fused_lora_linear(*p, 0.5), lambda *p: lora_linear_reference(*p, 0.5), (x, w, bias, a, b))
    norm = (w + 0.5 * b @ a).norm(dim=1).detach()
    check(lambda *p: fused_dora_linear(*p[:5], 0.5, p[5], norm.float()),
          lambda *p: dora_linear_reference(*p[:5], 0.5, p[5], norm), (x, w, bias, a, b, 1 + t(40) / 10))
    gate, up, down = _proj(g, 64, 48, 8, 0.5), _proj(g, 64, 48, 8, 2.0), _proj(g, 48, 64, 8, 0.25)
    flat = [x, *gate[:3], *up[:3], *down[:3]]
    scales = (gate[3], up[3], down[3])

    def swiglu(fn):
        return lambda x, *p: fn(x, *[(*p[i:i + 3], s) for i, s in zip((0, 3, 6), scales)])

    check(swiglu(mlp_kernel.lora_swiglu), swiglu(mlp_kernel.lora_swiglu_reference), flat)
    targets = torch.randint(0, 300, (13,), generator=g)
    check(lambda h, w: cross_entropy.linear_cross_entropy(h, w, None, targets),
          lambda h, w: cross_entropy.linear_cross_entropy_reference(h, w, None, targets), (t(13, 48), t(300, 48, grad=False)))
    # chunks of 100 rows → 96 (a multiple of 16 for oneDNN), the last one of 74 rows padded to 80
    monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", 100 * 4 * 300)
    assert gemm.row_multiple(torch.zeros(170, 48), torch.zeros(48, 300)) == (16 if backend == "onednn" else 1)
    targets = torch.randint(0, 300, (170,), generator=g)
    check(lambda h, w: cross_entropy.linear_cross_entropy(h, w, None, targets),
          lambda h, w: cross_entropy.linear_cross_entropy_reference(h, w, None, targets), (t(170, 48), t(300, 48, grad=False)))


@pytest.mark.parametrize("backend", GEMMS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("trainable", [False, True])
def test_linear_equals_f_linear_with_its_gradients(backend, bias, trainable, monkeypatch):
    """``gemm.linear`` gives F.linear's output and the gradients of x and, where they train, of W
    and b, against float64 (fp32, either library); a frozen W keeps no input for backward."""
    monkeypatch.setattr(gemm, "CPU_GEMM", backend)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 40, 48, generator=g, requires_grad=True)
    w = torch.randn(96, 48, generator=g).requires_grad_(trainable)
    b = torch.randn(96, generator=g).requires_grad_(trainable) if bias else None
    up = torch.randn(2, 40, 96, generator=g)
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    with gemm.onednn_scope():
        y = gemm.linear(x, w, b)
        node = y.grad_fn.next_functions[0][0]  # under the (…, out) view of its (N, out) result
        assert (node.saved_tensors[0] is None) is not trainable  # x kept only to form W's gradient
        got = torch.autograd.grad(y, inputs, up)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_(trainable)
    bd = b.detach().double().requires_grad_(trainable) if bias else None
    ref = F.linear(xd, wd, bd)
    want = torch.autograd.grad(ref, [t for t in (xd, wd, bd) if t is not None and t.requires_grad], up.double())
    torch.testing.assert_close(y.double(), ref.detach(), atol=1e-4, rtol=1e-5)
    for u, v in zip(got, want, strict=True):
        assert u.dtype == torch.float32
        torch.testing.assert_close(u.double(), v, atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        assert gemm.linear(x, w, b).grad_fn is None


@pytest.mark.parametrize("node", ["lora_linear", "dora_linear", "lora_swiglu", "linear"])
def test_fused_nodes_outputs_can_be_modified_in_place(node):
    """Some models modify a layer's output in place (Llama 4's MoE adds into its shared expert's
    output): each node returns a tensor of its own, reshaped outside it, so that works, and the
    gradients are those of the modified output (here y · 3: three times the plain ones). (The
    attention nodes keep their output for backward, as SDPA's own autograd does, so there an
    in-place change is autograd's usual error.)"""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w, w2 = (torch.randn(8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    a = torch.randn(2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, 2, generator=g, dtype=torch.float64, requires_grad=True)
    run = {
        "lora_linear": lambda: fused_lora_linear(x, w, None, a, b, 2.0),
        "dora_linear": lambda: fused_dora_linear(x, w, None, a, b, 2.0, torch.ones(8, dtype=torch.float64), 2 + w[0]),
        "lora_swiglu": lambda: mlp_kernel.lora_swiglu(x, (w, a, b, 2.0), (w2, a, b, 0.5), (w, a, b, 1.0)),
        "linear": lambda: gemm.linear(x, w.requires_grad_()),
    }[node]
    plain = torch.autograd.grad(run().sum(), x)[0]
    y = run()
    y.mul_(3)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], 3 * plain, rtol=1e-12, atol=0)
