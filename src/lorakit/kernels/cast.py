"""Casts of frozen weights for autocast, made once per training run instead of once per matmul.

Under autocast every matmul rounds its operands to the autocast dtype. For a frozen fp32 base
(LoRA on a CPU with ``train.bf16``) that is a full copy of every projection weight in every
forward pass, 4 bytes read and 2 written per parameter: on SmolLM2-135M about a tenth of a bf16
training step. The rounded copy of a weight that does not change is the same every time, so
inside ``cached_casts()`` it is made once and reused for as long as the weight is unchanged (its
version counter, which every in-place update moves, and its storage).

Memory: during a training step the casts are alive anyway (the fused nodes keep them for the
backward pass), so the peak does not grow; between steps the copies stay, which is why the cache
lives only inside the block (the trainer's loop and its evaluation) and is dropped on exit.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lorakit.memory import Mappings, file_mappings, page_out

_Entry = tuple["weakref.ref[torch.Tensor]", int, int, torch.Tensor]
_cache: dict[tuple[int, torch.dtype], _Entry] | None = None
_mappings: Mappings | None = None  # inside cached_casts(release=True): the file mappings at its start


def cast_frozen(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``; inside ``cached_casts()``, for a tensor that needs no gradient and is not a
    view, the same copy while ``t`` is unchanged (exactly the values ``t.to(dtype)`` gives)."""
    if t.dtype == dtype or _cache is None or t.requires_grad or t._base is not None:
        return t.to(dtype)
    key = (id(t), dtype)
    hit = _cache.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version and hit[2] == t.data_ptr():
        return hit[3]
    out = t.to(dtype)
    _cache[key] = (weakref.ref(t), t._version, t.data_ptr(), out)
    if _mappings is not None and out.element_size() < t.element_size():
        page_out(t, _mappings)  # a memory-mapped original is not read again while the copy serves
    return out


@contextmanager
def cached_casts(release: bool = False) -> Iterator[None]:
    """Within the block ``cast_frozen`` reuses its copies; they are released on exit (nesting keeps
    the outer block's cache). With ``release``, an original that is a view of a memory-mapped
    checkpoint is paged out once its narrower copy is made (``memory.page_out``): a bf16 run on
    a CPU then holds its frozen weights once, in bf16, rather than in both dtypes."""
    global _cache, _mappings
    if _cache is not None:
        yield
        return
    _cache, _mappings = {}, file_mappings() if release else None  # read once: the model is loaded
    try:
        yield
    finally:
        _cache, _mappings = None, None
