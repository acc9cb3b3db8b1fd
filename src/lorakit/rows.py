"""Mixed batches' row plans: which adapter each row uses, and each linear layer's adapters stacked.

``batch.adapter_batch`` builds one ``RowPlan`` for the whole model and hands it to every LoRA
layer. A linear layer then lays its adapters out in the model-wide slot order (``stacked``: slot
i+1 holds adapter ``order[i]``, slot 0 zeros, ranks zero-padded, the scale folded into B) and
computes all rows' updates in two batched matmuls over the slots (``linear_rows_term``), or adds
them into its base output with one Triton kernel (``linear_rows_add_``). The maths is in
``kernels.lora``; this module decides the grouping and keeps the stacks cached between steps.
"""

from __future__ import annotations

import functools
import operator
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lorakit.kernels import triton_lora
from lorakit.kernels.lora import gathered_lora, grouped_lora

if TYPE_CHECKING:
    from lorakit.layers import _LinearLora

# mixed batches run rows grouped by adapter (kernels.lora.grouped_lora) unless padding the groups to
# the largest one would multiply the rank-r work by more than this; then the per-row gathered kernel
GROUPED_MAX_PADDING = 2.0
# "triton": mixed batches at inference add each row's update into the base output with one Triton
# kernel per linear layer (kernels.triton_lora) where it can run (CUDA and triton installed, or CPU
# under TRITON_INTERPRET=1); "torch": the grouped / gathered PyTorch kernels. Opt-in until its
# speed is measured on a GPU (benchmarks/multi_adapter.py).
MIXED_KERNEL = os.environ.get("LORAKIT_MIXED_KERNEL", "torch")


@dataclass(frozen=True)
class RowPlan:
    """A mixed batch's adapters, shared by every layer (built by ``lorakit.batch.adapter_batch``).

    ``order``: the model-wide slot order (slot i+1 holds ``order[i]``; slot 0: no adapter);
    ``index`` (B,): each row's slot; ``present``: the slots some row uses, ascending, without 0;
    ``slots``: the slots the row groups run over, either every slot from the first present to the
    last (``span``: layers read that slice of their stacks in place, a view) or, where that range
    is mostly absent adapters, ``present`` only (layers copy those slots' weights);
    ``groups`` (len(slots), G), ``inverse`` (B,) and ``bare`` (rows without an adapter, or None):
    the rows grouped by slot, as ``kernels.lora.grouped_lora`` takes them (an absent slot's group
    is all padding); ``grouped``: whether layers use that kernel; ``row_slots``: ``index`` as a tuple.
    """

    order: tuple[str, ...]
    index: torch.Tensor
    present: tuple[int, ...]
    slots: tuple[int, ...]
    span: bool
    groups: torch.Tensor
    inverse: torch.Tensor
    bare: torch.Tensor | None
    grouped: bool
    row_slots: tuple[int, ...]

    @functools.cached_property
    def segments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The grouping as ``kernels.triton_lora`` takes it; built on first use (only that kernel
        reads it, and on a GPU it costs host-to-device copies)."""
        return triton_lora.segments(list(self.row_slots), self.index.device)

    @classmethod
    def build(cls, order: tuple[str, ...], row_slots: list[int], device: torch.device) -> RowPlan:
        """Group the rows. The grouped kernel's rank-r work is len(slots) × G rows (G: the largest
        group); it is used while that stays within ``GROUPED_MAX_PADDING`` × the rows with an
        adapter, over the whole present range if that fits (no weight copies), else over the
        present slots alone."""
        present = tuple(sorted(set(row_slots) - {0}))
        members = {p: [i for i, s in enumerate(row_slots) if s == p] for p in present}
        width = max((len(m) for m in members.values()), default=0)
        used = len(row_slots) - row_slots.count(0)
        span = tuple(range(present[0], present[-1] + 1)) if present else ()
        fits = len(span) * width <= GROUPED_MAX_PADDING * used
        slots = span if fits else present
        grouped = used > 0 and len(slots) * width <= GROUPED_MAX_PADDING * used
        rows = [members.get(p, []) for p in slots]
        groups = [m + [0] * (width - len(m)) for m in rows]  # padding: any row, its result unused
        place = {row: p * width + k for p, m in enumerate(rows) for k, row in enumerate(m)}
        inverse = [place.get(i, 0) for i in range(len(row_slots))]
        bare = [i for i, s in enumerate(row_slots) if s == 0]
        return cls(order, torch.tensor(row_slots, device=device), present, slots, fits and len(slots) > 0,
                   torch.tensor(groups, dtype=torch.long, device=device).reshape(len(slots), width),
                   torch.tensor(inverse, dtype=torch.long, device=device),
                   torch.tensor(bare, device=device) if bare else None, grouped,
                   tuple(row_slots))


def stacked(layer: _LinearLora, order: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (N+1, r_max, in), s·B (N+1, out, r_max)) for the model-wide adapter ``order``: slot
    i+1 holds ``order[i]`` (zeros where this layer lacks it), slot 0 is all zeros. Cached until
    the order, an adapter, its scale or its weights change (the tensors themselves or their
    version counters, which every in-place update moves). Checked on every mixed-batch forward,
    so it reads the parameters straight from the module dicts (16 adapters: ~18 µs a layer on the CPU)."""
    mods = layer._modules  # type: ignore[attr-defined]
    a_mods, b_mods = mods["lora_A"]._modules, mods["lora_B"]._modules  # (nn.Module.__getattr__ is slow)
    names = tuple(layer.r)
    weights = [a_mods[n]._parameters["weight"] for n in names] + [b_mods[n]._parameters["weight"] for n in names]  # type: ignore[index]
    versions = [w._version for w in weights]
    cached = layer.__dict__.get("_stack_cache")
    if cached is not None and cached[0] == order and cached[1] == layer.scaling and cached[2] == versions \
            and all(map(operator.is_, weights, cached[3])):  # same names (the scaling keys), tensors, versions
        return cached[4]
    r_max = max(layer.r.values())
    ref = weights[0]
    a = torch.zeros(len(order) + 1, r_max, layer.in_features, dtype=ref.dtype, device=ref.device)
    # B laid out (slot, r, out) in memory: the expand product x_r @ B_slotᵀ then streams B's rows
    # contiguously (CPU, 16 slots: 40-60% faster than B's own (out, r) layout; A's own is best)
    b = torch.zeros(len(order) + 1, r_max, layer.out_features, dtype=ref.dtype, device=ref.device).transpose(1, 2)
    slots = {name: slot for slot, name in enumerate(order, 1)}
    with torch.no_grad():
        for name, wa, wb in zip(names, weights[:len(names)], weights[len(names):], strict=True):
            if name in slots:
                a[slots[name], :layer.r[name]] = wa
                b[slots[name], :, :layer.r[name]] = wb * layer.scaling[name]
    layer.__dict__["_stack_cache"] = (order, dict(layer.scaling), versions, weights, (a, b))
    layer.__dict__.pop("_present_cache", None)
    return a, b


def group_stacks(layer: _LinearLora, plan: RowPlan, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (S, r_max, in), s·B (S, out, r_max)) for the S slots of ``plan.slots``, from the stacks
    ``a``, ``b`` (``stacked``). A contiguous range of slots (``plan.span``) is a slice of the
    stacks, no copy; otherwise those slots are copied, and the copy cached for the last set of
    slots until ``stacked`` rebuilds the stacks (which drops this cache). A serving batch's
    adapters change from step to step, so copying would cost a full read and write of the
    adapters' weights a step (16 × r16 adapters on a 135 M model: 330 MB)."""
    if plan.span:
        return a[plan.slots[0]:plan.slots[-1] + 1], b[plan.slots[0]:plan.slots[-1] + 1]
    cached = layer.__dict__.get("_present_cache")
    if cached is None or cached[0] != plan.slots:
        slots = torch.tensor(plan.slots, device=a.device)
        cached = layer.__dict__["_present_cache"] = (plan.slots, (a.index_select(0, slots),
                                                                 b.index_select(0, slots)))
    return cached[1]


def linear_rows_add_(layer: _LinearLora, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """A mixed batch's updates added into the base output ``result`` (B, T, out) in place by the
    Triton segmented kernel (``MIXED_KERNEL = "triton"``, inference, where Triton runs), else None."""
    if MIXED_KERNEL != "triton" or torch.is_grad_enabled() or not result.is_contiguous() \
            or not triton_lora.available(x):
        return None
    plan: RowPlan = layer.__dict__["row_index"]
    a, b = stacked(layer, plan.order)
    batch = x.shape[0]
    triton_lora.segmented_lora_add_(result.view(batch, -1, result.shape[-1]), x.reshape(batch, -1, x.shape[-1]),
                                    a, b, *plan.segments)
    return result


def linear_rows_term(layer: _LinearLora, x: torch.Tensor) -> torch.Tensor:
    """Every row's update for input x (B, …, in) → (B, …, out): rows grouped by adapter slot
    (``kernels.lora.grouped_lora``) or, for very uneven groups, each row's A and B gathered."""
    plan: RowPlan = layer.__dict__["row_index"]
    a, b = stacked(layer, plan.order)
    shape = x.shape
    x3 = x.reshape(shape[0], -1, shape[-1]).to(a.dtype)  # (B, T, in)
    if plan.grouped:
        a_p, b_p = group_stacks(layer, plan, a, b)
        out = grouped_lora(x3, a_p, b_p, plan.groups, plan.inverse, plan.bare)
    else:
        out = gathered_lora(x3, a, b, plan.index)
    return out.reshape(*shape[:-1], b.shape[1])
