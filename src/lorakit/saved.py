"""Modules trained in full and saved with an adapter (``modules_to_save``, e.g. a classifier head).

Like a LoRA layer, the wrapper *is* the original module (a subclass made for its class), so the
original keeps its parameters under their own names and stays frozen; each adapter gets a
trainable copy in ``modules_to_save.<adapter>`` (PEFT's in-memory name), used while it is active.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from lorakit.layers import adopt, find_modules, release


class ModulesToSave:
    """Mixin for a module trained in full and saved with the adapter (e.g. a classifier head).

    The original keeps its parameters under their own names and stays frozen; each adapter gets a
    trainable copy in ``modules_to_save.<adapter>`` (PEFT's in-memory name), used when active.
    """

    base_class: ClassVar[type[nn.Module]]
    active_adapters: list[str]
    adapters_disabled: bool
    modules_to_save: nn.ModuleDict

    @classmethod
    def from_base(cls, base: nn.Module) -> ModulesToSave:
        wrapped = adopt(saved_class_for(type(base)), base)
        wrapped.modules_to_save = nn.ModuleDict()
        wrapped.active_adapters, wrapped.adapters_disabled = [], False
        return wrapped

    def add_copy(self, name: str) -> nn.Module:
        copy_ = copy.deepcopy(self.to_base())
        for p in copy_.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = copy_
        return copy_

    def to_base(self, adapter: str | None = None) -> nn.Module:
        """The plain original module, or adapter ``adapter``'s trained copy."""
        if adapter is not None:
            return self.modules_to_save[adapter]
        return release(self, self.base_class, ("modules_to_save",),  # type: ignore[arg-type]
                       ("active_adapters", "adapters_disabled"))

    def remove_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        rows = self.__dict__.get("row_adapters")
        if rows is not None and not self.adapters_disabled:
            return self._rows_forward(rows, *args, **kwargs)
        if not self.adapters_disabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name](*args, **kwargs)
        return super().forward(*args, **kwargs)  # type: ignore[misc]


    def _rows_forward(self, rows: list[str | None], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Row b through adapter ``rows[b]``'s copy (the original for None or adapters without one)."""
        groups: dict[str | None, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r if r in self.modules_to_save else None, []).append(i)
        out = None
        for name, members in groups.items():
            idx = torch.tensor(members, device=x.device)
            module = self.modules_to_save[name] if name is not None else super().forward  # type: ignore[misc]
            y = module(x.index_select(0, idx), *args, **kwargs)
            out = y.new_empty(x.shape[0], *y.shape[1:]) if out is None else out
            out.index_copy_(0, idx, y)
        return out


_SAVED_CLASSES: dict[type[nn.Module], type[ModulesToSave]] = {}


def saved_class_for(base_cls: type[nn.Module]) -> type[ModulesToSave]:
    if base_cls not in _SAVED_CLASSES:
        _SAVED_CLASSES[base_cls] = type(f"Saved{base_cls.__name__}", (ModulesToSave, base_cls),
                                        {"base_class": base_cls})
    return _SAVED_CLASSES[base_cls]


def saved_modules(model: nn.Module) -> list[tuple[str, ModulesToSave]]:
    return find_modules(model, ModulesToSave)
