"""Training checkpoints that are never half-written and resume bit-exactly.

A checkpoint directory ``checkpoint-<step>`` holds the trainable weights, the optimizer state, the
scheduler position, every RNG state and the data position, all as safetensors + JSON (no pickle).
It is written into a temporary directory, completed with a ``COMPLETE`` marker, then renamed into
place: a crash at any moment leaves either the old set of checkpoints or the new one, and a
directory without the marker is never picked for resuming.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

MARKER = "COMPLETE"
PREFIX = "checkpoint-"


@dataclass
class TrainState:
    """Where the run stands: optimizer steps done, epoch, and the next step's index in the epoch."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens: int = 0
    fingerprint: str = ""
    world_size: int = 1


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


RngState = tuple[dict[str, torch.Tensor], dict[str, Any]]


def rng_state() -> RngState:
    """This process's RNG states: (tensors: torch CPU and each CUDA device, json-able: python's)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    return tensors, {"python": random.getstate()}


def _rank_prefix(rank: int) -> str:
    return "" if rank == 0 else f"rank{rank}."


def save_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState,
    save_model: Any, rng: list[RngState] | None = None,
) -> Path:
    """Write ``directory/checkpoint-<step>`` atomically; ``save_model(model, dir)`` writes the weights.

    ``rng``: the RNG states of every rank (rank k's under the ``rank<k>.`` prefix, rank 0 unprefixed);
    default: this process's.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{state.step}"
    tmp = directory / f".tmp-{PREFIX}{state.step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, tmp)
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_meta = {}, {}
    for rank, (tensors, py) in enumerate(rng or [rng_state()]):
        rng_tensors.update({_rank_prefix(rank) + k: v for k, v in tensors.items()})
        rng_meta.update({_rank_prefix(rank) + k: v for k, v in py.items()})
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    meta = {"state": asdict(state), "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta}
    (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1, default=_json_default))
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    (tmp / MARKER).write_text("ok")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest step first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.name.startswith(PREFIX) and (p / MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove leftovers of interrupted writes."""
    for leftover in directory.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep > 0:
        for old in complete_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, load_model: Any, rank: int = 0
) -> TrainState:
    """Restore everything ``save_checkpoint`` wrote (the RNG states of ``rank``); returns the saved
    ``TrainState``."""
    if not (path / MARKER).exists():
        raise ValueError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    meta = json.loads((path / "trainer_state.json").read_text())
    load_model(model, path)
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for key, value in opt_tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["optimizer"]["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    prefix = _rank_prefix(rank)
    torch.set_rng_state(rng[prefix + "torch"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith(prefix + "cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["rng"][prefix + "python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    return TrainState(**meta["state"])


def save_trainable(model: nn.Module, directory: Path) -> None:
    """The trainable parameters by name (full fine-tuning checkpoints)."""
    save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()},
              str(directory / "trainable.safetensors"))


def load_trainable(model: nn.Module, directory: Path) -> None:
    tensors = load_file(str(directory / "trainable.safetensors"))
    params = _trainable(model)
    if set(tensors) != set(params):
        raise ValueError(f"checkpoint {directory} holds other trainable parameters than this model")
    from lorakit.distributed import shard_like

    with torch.no_grad():
        for name, p in params.items():
            p.copy_(shard_like(tensors[name], p))
