"""Continuous batching over many adapters: requests join and leave the running batch at every token.

One worker thread owns the model. Each loop iteration

1. admits waiting requests (up to ``max_batch`` rows): their prompts are prefilled in groups of
   similar length (``prefill_groups``), left-padded, each row with its own adapter
   (``lorakit.batch.adapter_batch``), and their KV caches are appended to the running batch's
   (both left-padded to a common length);
2. runs one decode step for every running row: input (B, 1), the attention mask marking each
   row's left padding, position ids = each row's own length, the LoRA term gathered per row;
3. samples each row's next token with its own settings (greedy, or temperature / top-p with its
   own seeded generator), streams the new text, and drops finished rows (end of turn / EOS, a stop
   string, ``max_tokens``, or a cancelled client) from the cache.

Left padding plus the mask gives every row the same attention it would have alone, so a greedy
completion in a full batch equals the same prompt generated alone with that adapter (tested).
Adapter changes (load / unload) run on the worker between steps, never during a forward.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from lorakit.batch import adapter_batch
from lorakit.errors import LorakitError
from lorakit.generate import SamplingOptions, _Streamer
from lorakit.memory import return_freed_memory
from lorakit.models import sequence_mixers
from lorakit.plain import inference_on_onednn
from lorakit.pool import AdapterPool

Emit = Callable[[tuple[str, Any]], None]
PREFILL_WASTE = 1 / 8  # prompts joining together are prefilled in groups padded by at most this much


@dataclass
class Request:
    """One generation: prompt ids, adapter (None = base), sampling options and where output goes.

    ``emit`` receives ("text", chunk) for each new piece of text and finally ("done", info) with
    ``finish_reason`` ("stop" or "length"), ``prompt_tokens`` and ``completion_tokens``, or
    ("error", message) if the request failed.
    """

    ids: list[int]
    adapter: str | None
    options: SamplingOptions
    emit: Emit
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    streamer: Any = None
    generator: torch.Generator | None = None


class EngineError(LorakitError, ValueError):
    """A model the serving engine cannot run."""


class Engine:
    """The worker: ``submit`` requests from any thread; ``call`` runs a function on the worker."""

    def __init__(self, model: nn.Module, tokenizer: Any, pool: AdapterPool, max_batch: int = 64) -> None:
        mixers = sequence_mixers(model)
        if mixers:
            raise EngineError(f"{type(model).__name__} carries state from token to token outside attention "
                              f"({mixers[0]}, {len(mixers)} modules), which the serving engine's attention-only "
                              f"KV cache cannot batch; use `lorakit generate` for this model")
        self.model, self.tokenizer, self.pool, self.max_batch = model, tokenizer, pool, max_batch
        self.device = next(model.parameters()).device
        eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos))
        self.waiting: queue.Queue[Request | tuple[Callable[[], Any], queue.Queue]] = queue.Queue()
        self.rows: list[Request] = []
        self.cache: list[_GrowingLayer] = []  # per layer: keys, values (B, H, T, D), appended in place
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # (B, T): 0 = left padding
        self.steps = 0  # decode steps run (for tests and metrics)
        self.trims = 0  # times the idle engine gave freed heap memory back
        self.max_rows_seen = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)

    # -- API (any thread) --------------------------------------------------------------------------

    def start(self) -> Engine:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.waiting.put(None)  # type: ignore[arg-type]
        self.thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        self.waiting.put(request)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker between two steps and return its result (or raise its error)."""
        done: queue.Queue = queue.Queue(maxsize=1)
        self.waiting.put((fn, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    # -- the worker --------------------------------------------------------------------------------

    def _run(self) -> None:
        self.model.eval()
        worked = False  # a prefill or decode step ran since the heap was last trimmed
        while not self._stop.is_set():
            if worked and not self.rows and self.waiting.empty():
                # idle: hand the burst's freed heap back (glibc keeps it otherwise; 2.4 → 1.7 GiB
                # after 64 requests on the 135 M model) before waiting for the next request
                return_freed_memory()
                self.trims += 1
                worked = False
            for group in prefill_groups(self._take(block=not self.rows)):
                self._guard(group, self._prefill)
                worked = True
            if self.rows:
                self._guard(list(self.rows), self._decode)
                worked = True

    def _take(self, block: bool) -> list[Request]:
        """Waiting requests that fit in the batch; runs queued ``call``s on the way."""
        new: list[Request] = []
        while len(self.rows) + len(new) < self.max_batch:
            try:
                item = self.waiting.get(block=block and not new, timeout=None)
            except queue.Empty:
                break
            if item is None:  # stop()
                break
            if isinstance(item, tuple):
                fn, done = item
                try:
                    done.put((True, fn()))
                except Exception as exc:  # handed back to the caller
                    done.put((False, exc))
                continue
            if not item.cancelled:
                new.append(item)
        return new

    def _guard(self, requests: list[Request], step: Callable[[list[Request]], None]) -> None:
        """A failing step fails only the requests in it; the engine keeps serving."""
        try:
            step(requests)
        except Exception as exc:  # reported to each client, never kills the worker
            failed = set(map(id, requests))
            for r in requests:
                self._release(r)
                r.emit(("error", f"{type(exc).__name__}: {exc}"))
            keep = [i for i, r in enumerate(self.rows) if id(r) not in failed]
            self._select(keep)

    @torch.no_grad()
    def _prefill(self, new: list[Request]) -> None:
        for r in new:
            self.pool.ensure([r.adapter])
            if r.adapter is not None:
                self.pool.in_use[r.adapter] = self.pool.in_use.get(r.adapter, 0) + 1
            r.streamer = _Streamer(self.tokenizer, r.options.stop, lambda text, r=r: r.emit(("text", text)))
            r.streamer.prompt_seen = True
            if r.options.temperature > 0:
                r.generator = torch.Generator(device=self.device)
                r.generator.manual_seed(r.options.seed if r.options.seed is not None else torch.seed())
        length = max(len(r.ids) for r in new)
        ids = torch.full((len(new), length), self.pad, dtype=torch.long)
        mask = torch.zeros(len(new), length, dtype=torch.long)
        for b, r in enumerate(new):
            ids[b, length - len(r.ids):] = torch.tensor(r.ids)
            mask[b, length - len(r.ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = _new_cache()
        with adapter_batch(self.model, [r.adapter for r in new]), inference_on_onednn(self.model):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True)
        self._append(new, _cache_tensors(out.past_key_values), mask)
        self._advance(new, out.logits[:, -1])

    @torch.no_grad()
    def _decode(self, rows: list[Request]) -> None:
        last = torch.tensor([[r.generated[-1]] for r in rows], device=self.device)
        positions = self.mask.sum(1, keepdim=True)  # each row's own length so far
        mask = torch.cat([self.mask, torch.ones_like(positions)], dim=1)
        cache = _new_cache()
        cache.layers = self.cache  # each layer writes this step's token into its buffers
        with adapter_batch(self.model, [r.adapter for r in rows]), inference_on_onednn(self.model):
            out = self.model(input_ids=last, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True)
        self.mask = mask
        self.steps += 1
        self._advance(rows, out.logits[:, -1])

    def _advance(self, rows: list[Request], logits: torch.Tensor) -> None:
        """Sample one token for each of ``rows`` (the last ``len(rows)`` rows of the batch), stream it,
        and retire the rows that are done."""
        offset = len(self.rows) - len(rows)
        finished = []
        for b, r in enumerate(rows):
            token = _sample(logits[b], r.options, r.generator)
            r.generated.append(token)
            reason = None
            if token in self.eos:
                reason = "stop"
            else:
                r.streamer.put(torch.tensor([token]))
                if r.streamer.stopped:
                    reason = "stop"
                elif len(r.generated) >= r.options.max_new_tokens:
                    reason = "length"
            if reason or r.cancelled:
                finished.append(offset + b)
                r.streamer.end()
                self._release(r)
                r.emit(("done", {"finish_reason": reason or "cancelled", "prompt_tokens": len(r.ids),
                                 "completion_tokens": len(r.generated)}))
        if finished:
            gone = set(finished)
            self._select([i for i in range(len(self.rows)) if i not in gone])

    def _release(self, r: Request) -> None:
        if r.adapter is not None and self.pool.in_use.get(r.adapter):
            self.pool.in_use[r.adapter] -= 1

    # -- the running batch's cache -----------------------------------------------------------------

    def _append(self, new: list[Request], cache: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        """Add prefilled rows to the running batch, left-padding whichever side is shorter."""
        if not self.rows:
            self.rows, self.mask = list(new), mask
        else:
            length = max(self.mask.shape[1], mask.shape[1])
            cache = [(torch.cat([_left_pad(old.keys, length), _left_pad(k, length)]),
                      torch.cat([_left_pad(old.values, length), _left_pad(v, length)]))
                     for old, (k, v) in zip(self.cache, cache)]
            self.mask = torch.cat([_left_pad_mask(self.mask, length), _left_pad_mask(mask, length)])
            self.rows = self.rows + list(new)
        self.cache = [_GrowingLayer(k, v) for k, v in cache]
        self.max_rows_seen = max(self.max_rows_seen, len(self.rows))

    def _select(self, keep: list[int]) -> None:
        """Keep rows ``keep``; drop leading columns that are padding in every remaining row."""
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.mask = [], self.mask[:0, :0]
            return
        index = torch.tensor(keep, device=self.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) == 0).long().cumprod(0).sum())  # all-padding columns on the left
        self.mask = mask[:, start:]
        self.cache = [_GrowingLayer(layer.keys.index_select(0, index)[:, :, start:],
                                    layer.values.index_select(0, index)[:, :, start:]) for layer in self.cache]


def prefill_groups(requests: list[Request], waste: float = PREFILL_WASTE) -> list[list[Request]]:
    """``requests`` in groups to prefill together, shortest prompts first: a group takes the next
    prompt while padding every row to it keeps the padding within ``waste`` of the group's real
    tokens (left padding to the longest prompt is computed and thrown away). 32 prompts of 16-96
    tokens in one batch are 40% padding; grouped, at most 1/8."""
    groups: list[list[Request]] = []
    real = 0
    for r in sorted(requests, key=lambda r: len(r.ids)):
        group = groups[-1] if groups else None
        if group is None or (len(group) + 1) * len(r.ids) > (1 + waste) * (real + len(r.ids)):
            groups.append([r])
            real = len(r.ids)
        else:
            group.append(r)
            real += len(r.ids)
    return groups


def _sample(logits: torch.Tensor, o: SamplingOptions, generator: torch.Generator | None) -> int:
    """Greedy when ``temperature == 0``; else softmax(logits / T) restricted to the top-p nucleus."""
    if o.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / o.temperature, dim=-1)
    if o.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(0) - sorted_p > o.top_p  # keep the smallest prefix reaching top_p
        sorted_p[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    extra = length - t.shape[2]
    return t if extra == 0 else torch.cat([t.new_zeros(*t.shape[:2], extra, t.shape[3]), t], dim=2)


def _left_pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    extra = length - mask.shape[1]
    return mask if extra == 0 else torch.cat([mask.new_zeros(mask.shape[0], extra), mask], dim=1)


def _new_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


class _GrowingLayer(DynamicLayer):
    """A cache layer whose keys and values (B, H, T, D) are the first T columns of buffers with spare
    columns: ``update`` writes the new tokens into that room instead of concatenating, so a decode
    step copies one token per layer, not the whole cache (a dynamic cache copies all T tokens every
    step). When the room runs out the buffers move to new ones with space for half as many tokens
    again: amortised O(1) copying per token."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.keys, self.values = keys, values
        self.buffers = [keys, values]  # no room yet: the first update moves them

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        length, n = self.keys.shape[2], key_states.shape[2]
        if length + n > self.buffers[0].shape[2]:
            room = max(16, (length + n) // 2)
            self.buffers = [_with_room(t, room) for t in (self.keys, self.values)]
        for buffer, new in zip(self.buffers, (key_states, value_states), strict=True):
            buffer[:, :, length:length + n] = new
        self.keys, self.values = (b[:, :, :length + n] for b in self.buffers)
        return self.keys, self.values


def _with_room(t: torch.Tensor, room: int) -> torch.Tensor:
    """A new (B, H, T + room, D) buffer whose first T columns hold ``t``."""
    buffer = t.new_empty(*t.shape[:2], t.shape[2] + room, t.shape[3])
    buffer[:, :, :t.shape[2]] = t
    return buffer


def _cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


_ids = itertools.count()


def request_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids):08d}"


def resolve_inside(root: Path, path: str) -> Path:
    """``path`` (relative to ``root``, or absolute) resolved, refused unless it lies inside ``root``."""
    base = root.resolve()
    target = (base / path).resolve()
    if not target.is_relative_to(base):
        raise ValueError(f"adapter path {path!r} is outside the adapter root {str(base)!r}")
    return target
