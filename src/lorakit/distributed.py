"""Multi-process training on torch.distributed: DDP or FSDP2, launched by torchrun.

    torchrun --nproc_per_node 2 -m lorakit train config.yaml train.distributed=ddp
    lorakit train config.yaml --nproc 2                       # the same, torchrun started for you

Each process holds one rank (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` from torchrun). The
process group uses NCCL on CUDA and gloo on CPU, is set up once per run, and is torn down even
when training fails.

* ``ddp``: ``DistributedDataParallel`` over the model; only parameters that train (the adapter)
  are all-reduced, and micro-batches before the last one of a step run under ``no_sync``.
* ``fsdp``: FSDP2's ``fully_shard`` on every transformer block, then on the whole model: base
  and adapter weights are sharded across ranks and gathered block by block in forward/backward.
  The adapter is gathered to rank 0 to be saved in PEFT's format.

Exactness: the global batch of a step is the one a single process with ``batch_size × world``
rows would see (rank r takes rows r, r+W, … of it), and every rank divides its summed token
losses by the step's *global* token count times ``1/W`` (DDP and FSDP average over ranks), so
the gradient is the single-process gradient (tested ≤ 1e-5).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lorakit.errors import LorakitError

MODES = ("auto", "none", "ddp", "fsdp")


class DistributedError(LorakitError, RuntimeError):
    """A multi-process run cannot go on (the message says why and what to do)."""


@dataclass
class World:
    """This process's place in the job; ``size == 1`` and ``mode == 'none'`` for a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    mode: str = "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """``[value of rank 0, value of rank 1, …]`` on every rank (any picklable value)."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def sum(self, value: float) -> float:
        """Sum of ``value`` over ranks."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return float(t.item())


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def world_from_env(mode: str) -> World:
    """The ``World`` for ``train.distributed = mode``, read from torchrun's environment."""
    if mode not in MODES:
        raise DistributedError(f"train.distributed must be one of {', '.join(MODES)}; got {mode!r}")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if mode in ("ddp", "fsdp") and "RANK" not in os.environ:
        raise DistributedError(f"train.distributed={mode} needs torchrun: `torchrun --nproc_per_node N -m lorakit "
                               f"train CONFIG` or `lorakit train CONFIG --nproc N`")
    if mode == "auto":
        mode = "ddp" if size > 1 else "none"
    if mode == "none":
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")), mode)


@contextmanager
def process_group(world: World) -> Iterator[World]:
    """Set up the process group for ``world`` (NCCL on CUDA, gloo on CPU) and always tear it down."""
    if not world.active:
        yield world
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend)
    try:
        yield world
    finally:
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World) -> nn.Module:
    """The module to call for training: DDP over ``model``, or ``model`` itself sharded by FSDP2."""
    if world.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.local_rank] if torch.cuda.is_available() else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    if world.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        if getattr(model, "is_loaded_in_4bit", False) or _has_quantized(model):
            raise DistributedError("train.distributed=fsdp does not shard a 4-bit / 8-bit base; use ddp for QLoRA")
        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    return model


def _has_quantized(model: nn.Module) -> bool:
    from lorakit.quant import is_quantized

    return any(is_quantized(m) for m in model.modules())


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the children of the model's largest ``nn.ModuleList``."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise DistributedError(f"{type(model).__name__} has no list of blocks to shard; use train.distributed=ddp")
    return list(max(lists, key=len))


def no_sync(wrapped: nn.Module, world: World, last: bool) -> Any:
    """Context for one micro-batch's backward: gradients are synchronised only on the last one."""
    if last or not world.active:
        if world.mode == "fsdp":
            wrapped.set_requires_gradient_sync(True)  # type: ignore[operator]
        return nullcontext()
    if world.mode == "ddp":
        return wrapped.no_sync()  # type: ignore[operator]
    wrapped.set_requires_gradient_sync(False)  # type: ignore[operator]
    return nullcontext()


@contextmanager
def gathered(model: nn.Module, world: World, trainable_only: bool = True) -> Iterator[nn.Module]:
    """Inside the block the model's (trainable) parameters are whole tensors on every rank, so that
    the adapter (or, for full fine-tuning, the model) can be read and saved; elsewhere a no-op.

    FSDP2 keeps each parameter as a sharded DTensor; here each is all-gathered (a collective: every
    rank must enter) and swapped in as a plain parameter, and the shards are put back on exit.
    """
    if world.mode != "fsdp":
        yield model
        return
    from torch.distributed.tensor import DTensor

    swapped, whole = [], {}  # whole: one gathered tensor per parameter, so tied weights stay tied
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor) and (param.requires_grad or not trainable_only):
                if id(param) not in whole:
                    whole[id(param)] = nn.Parameter(param.full_tensor().detach(), requires_grad=param.requires_grad)
                module._parameters[name] = whole[id(param)]
                swapped.append((module, name, param))
    try:
        yield model
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


@contextmanager
def full_optimizer_state(optimizer: torch.optim.Optimizer, world: World) -> Iterator[torch.optim.Optimizer]:
    """Inside the block the optimizer's state tensors of FSDP-sharded parameters are whole (gathered
    on every rank: all must enter), ready to be written; elsewhere a no-op."""
    if world.mode != "fsdp":
        yield optimizer
        return
    from torch.distributed.tensor import DTensor

    saved = {}
    for p, state in optimizer.state.items():
        for k, v in list(state.items()):
            if isinstance(v, DTensor):
                saved[(id(p), k)] = (state, v)
                state[k] = v.full_tensor()
    try:
        yield optimizer
    finally:
        for (_, k), (state, v) in saved.items():
            state[k] = v


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (whole) laid out like ``like``: its shard when ``like`` is an FSDP DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor) and not isinstance(value, DTensor):
        return distribute_tensor(value.to(like.device), like.device_mesh, like.placements)
    return value


def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading whole state tensors: shard those of FSDP-sharded parameters like the parameter."""
    for p, state in optimizer.state.items():
        for k, v in list(state.items()):
            if torch.is_tensor(v) and v.ndim > 0:
                state[k] = shard_like(v, p)


def detach_to_meta(model: nn.Module) -> dict[str, torch.Tensor]:
    """Move the parameters that hold values (the freshly initialised adapter of a model built on
    meta) to the meta device too, and return their values by name, for ``load_shards``."""
    from lorakit.models import meta_parameter

    values = {}
    for name, param in model.named_parameters():
        if param.device.type != "meta":
            values[name] = param.detach().clone()
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            module._parameters[leaf] = meta_parameter(param)
    return values


def load_shards(model: nn.Module, files: dict[str, Path], device: torch.device,
                values: dict[str, torch.Tensor] | None = None) -> tuple[int, int]:
    """Materialise a model built on meta and sharded by ``fully_shard``: every rank allocates its
    shards only and reads its own rows of each weight from the safetensors ``files`` (a memory-mapped
    slice: the other rows are never read); parameters named in ``values`` are taken from there.

    FSDP2 shards dim 0 like ``torch.chunk``: with n rows on W ranks, rank k holds rows
    [k·⌈n/W⌉, min(n, (k+1)·⌈n/W⌉)). Buffers keep their values. Returns (bytes read, bytes in files).
    """
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    values = values or {}
    read = total = 0
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for name, param in model.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            start, stop = _local_rows(name, param)
            if name in values:
                source = values[name][start:stop] if param.ndim else values[name]
            else:
                path = files[name]
                if path not in handles:
                    handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
                source = handles[path].get_slice(name)[start:stop] if param.ndim else handles[path].get_tensor(name)
                read += source.numel() * source.element_size()
                total += param.numel() * source.element_size()
            if tuple(source.shape) != tuple(local.shape):
                raise DistributedError(f"{name}: this rank's shard is {tuple(local.shape)}, read {tuple(source.shape)}")
            with torch.no_grad():
                local.copy_(source)
    return read, total


def _local_rows(name: str, param: torch.Tensor) -> tuple[int, int]:
    """The rows [start, stop) of dim 0 that this rank holds of ``param`` (all of them unless sharded)."""
    from torch.distributed.tensor import DTensor, Shard

    rows = param.shape[0] if param.ndim else 0
    if not (isinstance(param, DTensor) and param.placements and isinstance(param.placements[0], Shard)):
        return 0, rows
    if param.placements[0].dim != 0:
        raise DistributedError(f"{name}: sharded on dim {param.placements[0].dim}, expected 0")
    step = -(-rows // param.device_mesh.size())
    start = min(rows, param.device_mesh.get_local_rank() * step)
    return start, min(rows, start + step)


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command line that runs ``lorakit train`` with ``argv`` on ``nproc`` local ranks."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            "lorakit", "train", *argv]
