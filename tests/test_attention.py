"""Padding-free attention: per-segment attention of a flattened batch equals padded batches."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import lorakit.attention
from conftest import randomize_adapters, tiny_gpt2
from lorakit import LoraConfig, get_lora_model
from lorakit.attention import (
    padded_plan,
    padding_free,
    supports_padding_free,
    varlen_attention,
    varlen_attention_reference,
)
from lorakit.collate import collate, collate_flat, shared_prefix
from lorakit.data import IGNORE, DataOptions, Example, tokenize_row
from lorakit.loss import causal_lm_loss
from lorakit.models import load_model
from test_data import CHAT, R


@pytest.mark.parametrize("kernel", ["flash", "math", "sdpa"])
@pytest.mark.parametrize(("prefix", "window"), [(0, None), (4, None), (0, 3), (4, 3), (4, 6), (4, 13)])
def test_varlen_attention_matches_the_per_segment_reference(prefix, window, kernel, monkeypatch):
    """Causal per segment, the shared prefix seen by every segment, and a sliding window (3: within
    a segment; 6: reaching into the prefix from a segment's first tokens only; 13: wider than
    any distance, no mask built)."""
    monkeypatch.setattr(lorakit.attention, "CPU_ATTENTION", kernel)
    g = torch.Generator().manual_seed(0)
    lengths = [prefix, 5, 1, 9, 3] if prefix else [5, 1, 9, 3]
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    n = sum(lengths)
    q = torch.randn(1, 6, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64, requires_grad=True)  # grouped-query: 3 per kv
    v = torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    out = varlen_attention(q, k, v, cu, 9, scale=0.3, prefix=prefix, window=window)
    ref = varlen_attention_reference(q, k, v, cu, scale=0.3, prefix=prefix, window=window)
    if window is not None and window < 9:  # the window changes the function: the test can tell
        assert not torch.allclose(ref, varlen_attention_reference(q, k, v, cu, scale=0.3, prefix=prefix))
    assert (lorakit.attention.plan_segments(cu, 9, prefix, window).mask is None) == (window in (None, 13) and not prefix)
    assert out.shape == (1, n, 6, 8) and out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kernel", ["flash", "math"])
def test_varlen_attention_under_cpu_autocast_returns_bf16_as_sdpa_would(kernel, monkeypatch):
    """Under CPU bf16 autocast, rotary leaves q and k in fp32 beside a bf16 v; the result is bf16.
    "flash" computes in fp32 from the inputs as given (ATen's CPU flash backward is ~3× slower on
    bf16 inputs): the output is the float64 reference rounded once and the gradients are fp32-
    accurate. "math" (what "auto" picks here) rounds q and k to bf16, as SDPA under autocast
    would, and keeps the softmax in fp32: it equals the reference on the rounded inputs to bf16
    precision, and its gradients are within bf16 rounding of the exact ones."""
    monkeypatch.setattr(lorakit.attention, "CPU_ATTENTION", kernel)
    g = torch.Generator().manual_seed(0)
    lengths, prefix = [4, 5, 1, 9, 3], 4
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    n = sum(lengths)
    q = torch.randn(1, 6, n, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 2, n, 8, generator=g, requires_grad=True)
    v = torch.randn(1, 2, n, 8, generator=g).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = varlen_attention(q, k, v, cu, 9, scale=0.3, prefix=prefix)
    rounded = (lambda t: t.bfloat16()) if kernel == "math" else (lambda t: t)
    q64, k64, v64 = (rounded(t.detach()).double().requires_grad_() for t in (q, k, v))
    ref = varlen_attention_reference(q64, k64, v64, cu, scale=0.3, prefix=prefix)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=1e-6 if kernel == "flash" else 1e-2, rtol=2**-8)
    up = torch.randn(out.shape, generator=g).bfloat16()  # a bf16 output's gradient is bf16
    out.backward(up)
    ref.backward(up.double())
    assert (q.grad.dtype, k.grad.dtype, v.grad.dtype) == (torch.float32, torch.float32, torch.bfloat16)
    tol = {"atol": 1e-5, "rtol": 1e-5} if kernel == "flash" else {"atol": 3e-2, "rtol": 2e-2}
    torch.testing.assert_close(q.grad.double(), q64.grad, **tol)
    torch.testing.assert_close(k.grad.double(), k64.grad, **tol)
    torch.testing.assert_close(v.grad.double(), v64.grad, atol=0 if kernel == "flash" else 3e-2, rtol=2**-8)


def test_padded_rows_as_segments_equal_sdpa_with_the_same_mask():
    """A right-padded batch with transformers' boolean SDPA mask (causal and key padding), run by
    the math node as one segment per row (``padded_plan``): output and q/k/v gradients equal
    SDPA's on the (B, H, T, D) tensors in fp64. Left padding (a query that sees no key) and
    additive masks get no plan, and SDPA runs as before."""
    g = torch.Generator().manual_seed(0)
    b, h, hkv, t, d = 3, 6, 2, 7, 8
    lengths = torch.tensor([7, 4, 5])
    keep = torch.arange(t)[None, :] < lengths[:, None]  # (B, T) right padding
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]  # (B, 1, T, T)
    q = torch.randn(b, h, t, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64, requires_grad=True)
    plan = padded_plan(mask, b, t)
    flat = [x.transpose(0, 1).reshape(1, x.shape[1], b * t, d) for x in (q, k, v)]
    out = lorakit.attention._MathSegments.apply(*flat, plan, 0.3).view(b, t, h, d)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3,
                                                           enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    up = torch.randn(out.shape, generator=g, dtype=torch.float64) * keep[:, :, None, None]  # loss on real rows
    for a, c in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up)):
        torch.testing.assert_close(a, c, atol=1e-12, rtol=0)
    causal = padded_plan(None, b, t)  # no mask given: causal
    out_causal = lorakit.attention._MathSegments.apply(*flat, causal, 0.3).view(b, t, h, d)
    ref_causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out_causal, ref_causal.transpose(1, 2), atol=1e-12, rtol=0)
    left = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & keep.flip(1)[:, None, None, :]
    assert padded_plan(left, b, t) is None and padded_plan(mask.double(), b, t) is None


@pytest.mark.parametrize("kernel", ["flash", "math"])
def test_cpu_segment_nodes_keep_only_unpadded_qkv_the_output_and_the_log_sum_exp(kernel, monkeypatch):
    monkeypatch.setattr(lorakit.attention, "CPU_ATTENTION", kernel)
    g = torch.Generator().manual_seed(0)
    lengths, prefix, h, hkv, d = [4, 5, 1, 9, 3], 4, 6, 2, 8
    cu = torch.tensor([0, *lengths]).cumsum(0)
    n = sum(lengths)
    q, k, v = (torch.randn(1, heads, n, d, generator=g, requires_grad=True) for heads in (h, hkv, hkv))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = varlen_attention(q, k, v, cu, 9, prefix=prefix)
    segments, slots = len(lengths), 9
    assert sorted(t.numel() for t in saved) == sorted([h * n * d, hkv * n * d, hkv * n * d, n * h * d,
                                                       segments * h * slots])
    assert any(t.data_ptr() == out.data_ptr() for t in saved)  # the output itself, not a padded copy


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, n = causal_lm_loss(model, batch)
    (loss / n).backward()
    return float(loss.detach()) / n, _lora_grads(model)


def _check_flat_equals_padded(model, examples, pad_id, prefix=0):
    assert supports_padding_free(model)
    padded_loss, padded_grads = _loss_and_grads(model, collate([[e] for e in examples], pad_id))
    fillers, trimmed = [], []
    for share, multiple, trim in itertools.product((False, True), (1, 16), (False, True)):  # 16: with a filler
        batch = collate_flat([[e] for e in examples], share_prefix=share, multiple=multiple, pad_id=pad_id, trim=trim)
        assert batch.get("shared_prefix", 0) == (prefix if share else 0)
        real = sum(len(e.input_ids) for e in examples) - (len(examples) - 1) * (prefix if share else 0)
        n = batch["input_ids"].shape[1]
        if not trim:
            assert n == -(-real // multiple) * multiple
            assert (batch["input_ids"][0, real:] == pad_id).all()
            fillers.append(n - real)
        else:  # each example but (without a filler) the last one token shorter
            cu = batch["cu_seq_lens_q"].tolist()
            own = [b - a for a, b in itertools.pairwise(cu)][1 if share and prefix else 0:][:len(examples)]
            full = [len(e.input_ids) - (prefix if share else 0) for e in examples]
            assert all(o in (f, f - 1) for o, f in zip(own, full, strict=True)) and n % multiple == 0
            trimmed.append(sum(full) - sum(own))
        with padding_free(model):
            flat_loss, flat_grads = _loss_and_grads(model, batch)
        assert abs(flat_loss - padded_loss) <= 1e-5
        for name, grad in padded_grads.items():
            torch.testing.assert_close(flat_grads[name], grad, atol=1e-5, rtol=0, msg=name)
    assert any(fillers)  # the rounding did add a filler segment somewhere
    assert min(trimmed) >= len(examples) - 1  # every example followed by a segment lost its last token


def test_padding_free_llama_loss_and_gradients_equal_padded_batches(tiny_model_dir, tokenizer):
    model, _ = load_model(str(tiny_model_dir))
    get_lora_model(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model)
    model.train()
    rows = [CHAT, {"prompt": "Name a colour.", "completion": "Blue."}, {"text": "plain text row"},
            {"instruction": "Add", "input": "2 and 3", "output": "5"}, {"prompt": "x " * 20, "completion": "y"}]
    examples = [tokenize_row(R(r, f"r:{i}"), tokenizer, DataOptions()) for i, r in enumerate(rows)]
    _check_flat_equals_padded(model, examples, tokenizer.pad_token_id)  # no common prefix: "text" rows
    # chat rows with one system prompt share "<|im_start|>system\n...<|im_end|>\n<|im_start|>user\n"
    chats = [{"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": q},
                           {"role": "assistant", "content": a}]}
             for q, a in [("2+2?", "4"), ("Capital of France?", "Paris"), ("Colour of the sky?", "Blue, mostly.")]]
    examples = [tokenize_row(R(r, f"c:{i}"), tokenizer, DataOptions()) for i, r in enumerate(chats)]
    prefix = shared_prefix(examples)
    common = tokenizer.apply_chat_template([{"role": "system", "content": "Answer briefly."}], tokenize=False)
    assert prefix == len(tokenizer(common + "<|im_start|>user\n", add_special_tokens=False).input_ids)
    _check_flat_equals_padded(model, examples, tokenizer.pad_token_id, prefix)


def test_padding_free_gpt2_loss_and_gradients_equal_padded_batches():
    model = get_lora_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_proj"]))
    randomize_adapters(model)
    model.train()
    model.config.attn_pdrop = model.config.resid_pdrop = model.config.embd_pdrop = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    g = torch.Generator().manual_seed(0)
    examples = []
    head = [5, 6, 7]  # a shared prompt start: 3 tokens, then each example's own tokens
    for n in (7, 5, 12):
        ids = head + torch.randint(1, 128, (n,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE] * (3 + n // 2) + ids[3 + n // 2:], "x"))
    _check_flat_equals_padded(model, examples, 0, prefix=3)


def test_padded_batches_inside_the_context_run_as_before(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    ids = torch.randint(0, 1000, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        with padding_free(copy.deepcopy(model)) as m:
            inside = m(ids, attention_mask=mask).logits
    torch.testing.assert_close(inside, before, atol=1e-6, rtol=0)
    assert model.config._attn_implementation == "sdpa"
