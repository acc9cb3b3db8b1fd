"""Many adapters on one base, a few in memory: hot load / unload / replace with an LRU cap.

    pool = AdapterPool(model, max_loaded=8)
    pool.register("sql", "adapters/sql")        # checked now (config, rank, targets, keys), loaded later
    with pool.use(["sql", "chat", None]) as ids: # loads what is missing, evicting the least recently used
        with adapter_batch(model, ids): ...

Registering reads and checks the adapter against the model at once, so a bad adapter fails at
registration, not at its first request. Loading and unloading touch only that adapter's own
parameters: the base and the other adapters stay bit-identical.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from lorakit.errors import LorakitError
from lorakit.inits import mutates_base
from lorakit.inject import adapter_configs, delete_adapter
from lorakit.io import load_adapter, read_adapter


class AdapterPoolError(LorakitError, ValueError):
    """An adapter that cannot be registered or used (message says which and why)."""


class AdapterPool:
    def __init__(self, model: nn.Module, max_loaded: int = 8) -> None:
        if max_loaded < 1:
            raise AdapterPoolError("max_loaded must be >= 1")
        self.model, self.max_loaded = model, max_loaded
        self.paths: dict[str, Path] = {}
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.in_use: dict[str, int] = {}
        self.loads = 0  # how many times an adapter was read from disk (for tests and metrics)

    def register(self, name: str, path: str | os.PathLike) -> None:
        """Make ``name`` available; the files are checked against the model now."""
        if name in (None, "base"):
            raise AdapterPoolError(f"{name!r} is reserved for the base model")
        self._check(path)
        self.paths[name] = Path(path)

    def _check(self, path: str | os.PathLike) -> None:
        """Load into a throw-away slot and remove again: config, targets, ranks and keys all verified."""
        config, _ = read_adapter(path)  # clear errors for missing files, pickle, bad JSON
        if mutates_base(config.init_lora_weights):
            raise AdapterPoolError(
                f"{path}: init_lora_weights={config.init_lora_weights!r} and not converted, so it is only right on "
                f"the residual base its initialisation left, not on the base served to everyone; convert it: "
                f"load_adapter(model, path) on the original base, then save_adapter(model, new_path)")
        if config.target_parameters:
            raise AdapterPoolError(
                f"{path} adapts parameters (target_parameters: {config.target_parameters[0]}, …), which the "
                f"server's batches, one adapter per row, cannot mix; merge it (lorakit merge) and serve the result")
        probe = "__lorakit_check__"
        load_adapter(self.model, path, adapter_name=probe, activate=False)
        delete_adapter(self.model, probe)

    def replace(self, name: str, path: str | os.PathLike) -> None:
        """Point ``name`` at new files; a loaded copy is swapped now (refused while in use)."""
        self._check(path)
        if self.in_use.get(name):
            raise AdapterPoolError(f"adapter {name!r} is in use by a running batch; replace it between batches")
        if name in self.loaded:
            self.unload(name)
        self.paths[name] = Path(path)

    def unregister(self, name: str) -> None:
        if self.in_use.get(name):
            raise AdapterPoolError(f"adapter {name!r} is in use by a running batch")
        if name in self.loaded:
            self.unload(name)
        self.paths.pop(name, None)

    def unload(self, name: str) -> None:
        delete_adapter(self.model, name)
        self.loaded.pop(name, None)

    def ensure(self, names: Sequence[str | None]) -> None:
        """Load every adapter in ``names`` (None/'base' need none), evicting least recently used ones
        that the batch does not need."""
        wanted = [n for n in dict.fromkeys(names) if n not in (None, "base")]
        unknown = [n for n in wanted if n not in self.paths]
        if unknown:
            raise AdapterPoolError(f"unknown adapter {unknown[0]!r}; registered: {sorted(self.paths) or 'none'}")
        if len(wanted) > self.max_loaded:
            raise AdapterPoolError(f"a batch needs {len(wanted)} adapters but at most {self.max_loaded} may be loaded")
        for name in wanted:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            while len(self.loaded) >= self.max_loaded:
                victim = next((n for n in self.loaded if n not in wanted and not self.in_use.get(n)), None)
                if victim is None:
                    raise AdapterPoolError("every loaded adapter is in use; raise max_loaded")
                self.unload(victim)
            load_adapter(self.model, self.paths[name], adapter_name=name, activate=False)
            self.loads += 1
            self.loaded[name] = None

    @contextmanager
    def use(self, names: Sequence[str | None]) -> Iterator[list[str | None]]:
        """Load what ``names`` needs and keep it loaded (not evictable) inside the block."""
        self.ensure(names)
        held = [n for n in dict.fromkeys(names) if n not in (None, "base")]
        for n in held:
            self.in_use[n] = self.in_use.get(n, 0) + 1
        try:
            yield [None if n == "base" else n for n in names]
        finally:
            for n in held:
                self.in_use[n] -= 1

    @property
    def model_adapters(self) -> list[str]:
        return list(adapter_configs(self.model))
