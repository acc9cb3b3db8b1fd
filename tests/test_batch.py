"""Mixed-adapter batches: every row equals running its adapter alone (prefill and KV-cache decode)."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
import lorakit.layers
import lorakit.rows
from conftest import randomize_adapters, tiny_bert_classifier, tiny_llama
from lorakit.kernels.lora import gathered_lora, gathered_lora_reference, grouped_lora
from lorakit.rows import RowPlan

ADAPTERS = {  # mixed ranks and target sets
    "a": lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "b": lorakit.LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"),
    "c": lorakit.LoraConfig(r=8, lora_alpha=32, target_modules=["down_proj", "o_proj"], use_rslora=True),
    "d": lorakit.LoraConfig(r=16, lora_alpha=8, target_modules=["up_proj", "embed_tokens"]),
}
ROWS = ["a", "b", None, "c", "d", "base", "b", "a"]


@pytest.fixture(scope="module")
def models():
    base = tiny_llama()
    model = copy.deepcopy(base)
    for name, cfg in ADAPTERS.items():
        lorakit.add_adapter(model, cfg, name)
    randomize_adapters(model, std=0.3)
    return base, model


def alone(model, base, name, fn):
    if name in (None, "base"):
        return fn(base)
    lorakit.set_adapter(model, name)
    return fn(model)


def test_gathered_kernel_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 12, generator=g)
    a, b = torch.randn(4, 6, 12, generator=g), torch.randn(4, 7, 6, generator=g)
    a[0], b[0] = 0, 0
    index = torch.tensor([2, 0, 3, 3, 1])
    torch.testing.assert_close(gathered_lora(x, a, b, index), gathered_lora_reference(x, a, b, index),
                               atol=1e-5, rtol=0)


def test_grouped_kernel_matches_the_reference():
    """Rows grouped by adapter (uneven groups, padding, rows with no adapter, an absent slot inside
    the range; one adapter present) give each row's own product, as the row-by-row reference does."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 12, generator=g)
    a, b = torch.randn(5, 6, 12, generator=g), torch.randn(5, 7, 6, generator=g)
    a[0], b[0] = 0, 0
    slots = [2, 0, 4, 4, 2, 4, 0]
    plan = RowPlan.build(("p", "q", "r", "s"), slots, torch.device("cpu"))
    # slot 3 is absent, but running 3 groups of 3 over slots 2..4 is 9 <= 2 x 5 rows: a slice, no copy
    assert plan.present == (2, 4) and plan.slots == (2, 3, 4) and plan.span and plan.grouped
    assert tuple(plan.groups.shape) == (3, 3)
    assert plan.bare is not None and plan.bare.tolist() == [1, 6]
    got = grouped_lora(x, a[2:5], b[2:5], plan.groups, plan.inverse, plan.bare)
    torch.testing.assert_close(got, gathered_lora_reference(x, a, b, torch.tensor(slots)), atol=1e-5, rtol=0)
    slots = [1, 4, 4, 0, 4, 0, 0]  # slots 1..4 in groups of 3 would be 12 > 2 x 4 rows: slots 1 and 4 only
    plan = RowPlan.build(("p", "q", "r", "s"), slots, torch.device("cpu"))
    assert plan.slots == (1, 4) and not plan.span and plan.grouped and tuple(plan.groups.shape) == (2, 3)
    got = grouped_lora(x, a[[1, 4]], b[[1, 4]], plan.groups, plan.inverse, plan.bare)
    torch.testing.assert_close(got, gathered_lora_reference(x, a, b, torch.tensor(slots)), atol=1e-5, rtol=0)
    for slots in ([3, 0, 3, 3, 0, 3, 3], [3] * 7):  # one adapter present, with and without bare rows
        plan = RowPlan.build(("p", "q", "r", "s"), slots, torch.device("cpu"))
        assert plan.slots == (3,) and plan.span
        got = grouped_lora(x, a[3:4], b[3:4], plan.groups, plan.inverse, plan.bare)
        torch.testing.assert_close(got, gathered_lora_reference(x, a, b, torch.tensor(slots)), atol=1e-5, rtol=0)


def test_group_stacks_slice_a_range_and_copy_scattered_slots(models):
    """A contiguous range of slots is read from the layer's stacks in place (same storage); scattered
    slots are copied once and the copy reused while the slots stay the same."""
    _, model = models
    layer = model.model.layers[0].mlp.down_proj
    order = tuple(ADAPTERS)
    a, b = layer.stacked(order)
    span = RowPlan.build(order, [1, 3, 3, 0, 1], torch.device("cpu"))
    a_s, b_s = layer.group_stacks(span, a, b)
    assert span.span and a_s.data_ptr() == a[1].data_ptr() and b_s.data_ptr() == b[1].data_ptr()
    assert torch.equal(a_s, a[1:4]) and torch.equal(b_s, b[1:4])
    apart = RowPlan.build(order, [1, 4, 4, 4], torch.device("cpu"))
    a_p, b_p = layer.group_stacks(apart, a, b)
    assert not apart.span and torch.equal(a_p, a[[1, 4]]) and torch.equal(b_p, b[[1, 4]])
    assert layer.group_stacks(apart, a, b)[0] is a_p


def test_row_plan_falls_back_to_gathering_for_uneven_groups():
    """Padding 1 + 1 + 6 rows to groups of 6 would triple the rank-r work: gather per row instead."""
    assert not RowPlan.build(("p", "q", "r"), [1, 2, 3, 3, 3, 3, 3, 3], torch.device("cpu")).grouped
    assert RowPlan.build(("p", "q", "r"), [1, 2, 2, 3, 3, 3, 0, 0], torch.device("cpu")).grouped
    assert not RowPlan.build(("p",), [0, 0], torch.device("cpu")).grouped  # no adapter at all


@pytest.fixture(params=["grouped", "gathered", "triton"])
def kernel(request, monkeypatch):
    """Run a test with rows grouped by adapter (the default here), with per-row gathering, and with
    the Triton kernel (in Triton's interpreter on the CPU; skipped where triton is not installed)."""
    target = lorakit.rows
    if request.param == "gathered":
        monkeypatch.setattr(lorakit.rows, "GROUPED_MAX_PADDING", 0.0)
    if request.param == "triton":
        pytest.importorskip("triton")  # on the CPU: in the interpreter (conftest sets TRITON_INTERPRET=1)
        monkeypatch.setattr(lorakit.rows, "MIXED_KERNEL", "triton")
        target = lorakit.rows.triton_lora
    name = "segmented_lora_add_" if request.param == "triton" else f"{request.param}_lora"
    calls = []
    real = getattr(target, name)
    monkeypatch.setattr(target, name, lambda *a: calls.append(1) or real(*a))
    yield calls
    assert calls  # the kernel under test did run


def test_prefill_rows_equal_each_adapter_alone(models, kernel):
    base, model = models
    ids = torch.randint(0, 128, (len(ROWS), 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), lorakit.adapter_batch(model, ROWS):
        mixed = model(ids).logits
    for i, name in enumerate(ROWS):
        with torch.no_grad():
            expected = alone(model, base, name, lambda m, i=i: m(ids[i:i + 1]).logits[0])
        torch.testing.assert_close(mixed[i], expected, atol=1e-5, rtol=0)
        if name not in (None, "base"):
            assert (mixed[i] - base(ids[i:i + 1]).logits[0]).abs().max() > 1e-3


def test_scattered_adapters_rows_equal_each_adapter_alone(models, kernel):
    """Adapters "a" (slot 1) and "d" (slot 4) only, unevenly: the groups run over those two slots'
    copied weights rather than over slots 1..4."""
    base, model = models
    rows = ["d", "a", "d", "d"]
    ids = torch.randint(0, 128, (len(rows), 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), lorakit.adapter_batch(model, rows):
        plan = model.model.layers[0].mlp.up_proj.row_index
        mixed = model(ids).logits
    assert plan.slots == (1, 4) and not plan.span
    for i, name in enumerate(rows):
        with torch.no_grad():
            expected = alone(model, base, name, lambda m, i=i: m(ids[i:i + 1]).logits[0])
        torch.testing.assert_close(mixed[i], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows", [["b", "b", "b"], ["a", "a", "a"], ["b", None, "b"]])
def test_one_adapter_batch_runs_the_single_adapter_node(models, monkeypatch, rows):
    """Every row on one adapter: the layers that have it run the fused single-adapter node (the
    same ops as that adapter set active), the others the base alone; with a bare row the grouped
    path runs. Each row equals its adapter alone."""
    base, model = models
    calls = []
    real = lorakit.layers.fused_lora_linear
    monkeypatch.setattr(lorakit.layers, "fused_lora_linear", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, 128, (len(rows), 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), lorakit.adapter_batch(model, rows):
        mixed = model(ids).logits
    n_layers = sum(1 for _, layer in lorakit.layers.lora_layers(model)
                   if rows[0] in layer.r and isinstance(layer, torch.nn.Linear))
    assert len(calls) == (n_layers if None not in rows else 0) and n_layers > 0
    for i, name in enumerate(rows):
        with torch.no_grad():
            expected = alone(model, base, name, lambda m, i=i: m(ids[i:i + 1]).logits[0])
        torch.testing.assert_close(mixed[i], expected, atol=1e-5, rtol=0)


def test_kv_cache_decode_rows_equal_each_adapter_alone(models, kernel):
    base, model = models
    ids = torch.randint(0, 128, (len(ROWS), 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), lorakit.adapter_batch(model, ROWS):
        out = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    for i, name in enumerate(ROWS):
        with torch.no_grad():
            ref = alone(model, base, name, lambda m, i=i: m.generate(
                ids[i:i + 1], max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True,
                pad_token_id=0))
        n = ref.sequences.shape[1]  # a row alone stops at its EOS; in the batch it is padded after it
        assert torch.equal(out.sequences[i, :n], ref.sequences[0])
        assert len(ref.logits) >= 3
        for step_mixed, step_alone in zip(out.logits, ref.logits):
            torch.testing.assert_close(step_mixed[i], step_alone[0], atol=1e-5, rtol=0)


def test_modules_to_save_rows_use_their_copy():
    base = tiny_bert_classifier()
    model = copy.deepcopy(base)
    for name in ("x", "y"):
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]),
                            name)
        with torch.no_grad():
            for p in model.classifier.modules_to_save[name].parameters():
                p.add_(torch.randn_like(p))
    randomize_adapters(model, std=0.3)
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(3))
    rows = ["x", None, "y"]
    with torch.no_grad(), lorakit.adapter_batch(model, rows):
        mixed = model(ids).logits
    for i, name in enumerate(rows):
        with torch.no_grad():
            expected = alone(model, base, name, lambda m, i=i: m(ids[i:i + 1]).logits[0])
        torch.testing.assert_close(mixed[i], expected, atol=1e-5, rtol=0)


def test_unknown_adapter_and_merged_model_are_refused(models):
    _, model = models
    with pytest.raises(ValueError, match="no adapter named 'zz'"), lorakit.adapter_batch(model, ["a", "zz"]):
        pass
    lorakit.set_adapter(model, "a")
    lorakit.merge(model)
    try:
        with pytest.raises(ValueError, match="unmerged"), lorakit.adapter_batch(model, ["a"]):
            pass
    finally:
        lorakit.unmerge(model)


def test_stacked_adapters_follow_weight_and_scale_changes():
    """The per-layer stacks a mixed batch reads are rebuilt when an adapter's weights change in
    place, when a weight is replaced by a new tensor, and when its scale changes."""
    base = tiny_llama()
    model = copy.deepcopy(base)
    for name in ("x", "y"):
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules="all-linear"), name)
    randomize_adapters(model, std=0.3)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(4))
    layer = model.model.layers[0].self_attn.q_proj

    def check():
        with torch.no_grad(), lorakit.adapter_batch(model, ["x", "y"]):
            mixed = model(ids).logits
        for i, name in enumerate(["x", "y"]):
            with torch.no_grad():
                expected = alone(model, base, name, lambda m, i=i: m(ids[i:i + 1]).logits[0])
            torch.testing.assert_close(mixed[i], expected, atol=1e-5, rtol=0)

    check()
    with torch.no_grad():
        layer.lora_B["y"].weight.mul_(3.0)  # in place
    check()
    layer.lora_A["x"].weight = torch.nn.Parameter(torch.randn_like(layer.lora_A["x"].weight))  # a new tensor
    check()
    layer.scaling["y"] *= 0.5
    check()
