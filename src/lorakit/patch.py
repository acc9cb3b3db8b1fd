"""Swapping a module's forward for a fused one inside a ``with`` block, and back."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

_SAVED = "_lorakit_unfused"  # the forward a patched module had before (its fused forward may call it)


def forward_like(module: nn.Module, reference: type[nn.Module]) -> bool:
    """Whether ``module``'s class has a forward compiled to the same bytecode, constants and names
    as ``reference.forward``: a model's module that computes what a known transformers module
    computes (modular transformers copies code), whatever its name."""
    forward = getattr(type(module), "forward", None)
    if not isinstance(forward, types.FunctionType):
        return False
    a, b = forward.__code__, reference.forward.__code__
    return (a.co_code, a.co_consts, a.co_names, a.co_varnames) == (b.co_code, b.co_consts, b.co_names, b.co_varnames)


def unfused(module: nn.Module) -> Callable[..., Any]:
    """The forward ``module`` had before it was patched."""
    return module.__dict__[_SAVED]


def is_patched(module: nn.Module) -> bool:
    return _SAVED in module.__dict__


@contextmanager
def patched_forward(modules: Sequence[nn.Module], forward: Callable[..., Any]) -> Iterator[int]:
    """Within the block, each module's forward is ``forward`` bound to it (modules already patched
    are left alone); yields how many were switched. On exit each gets back the forward it had."""
    switched = [m for m in modules if not is_patched(m)]
    for m in switched:
        m.__dict__[_SAVED] = m.forward  # the bound forward in use (class method or an earlier patch)
        m.forward = types.MethodType(forward, m)
    try:
        yield len(switched)
    finally:
        for m in switched:
            m.forward = m.__dict__.pop(_SAVED)
            if getattr(m.forward, "__func__", None) is type(m).forward:
                del m.forward  # back to the class's own
