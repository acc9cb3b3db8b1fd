"""Data files → tokenized, masked, packed batches. Usable without the trainer.

Files: ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` or a directory of them. Each row is one of

    text                       {"text": "..."}                                    every token trains
    prompt + completion        {"prompt": "...", "completion": "..."}             completion trains
    messages                   {"messages": [{"role": "user", "content": ...}, ...]}  assistant turns train
    alpaca                     {"instruction": ..., "input": ... (optional), "output": ...}  output trains

Trained tokens carry their id in ``labels``; the rest carry -100. The end of every trained answer
(EOS, or the chat template's end-of-turn token) is trained too, so the model learns to stop.
Errors name the file and line of the offending row.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import LorakitError

IGNORE = -100
FORMATS = "text | prompt+completion | messages | instruction+output (alpaca, optional input)"
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


class DataError(LorakitError, ValueError):
    """A data file or row that cannot be used; the message names the file and line."""


@dataclass
class Row:
    data: dict[str, Any]
    source: str  # "path:line"


@dataclass
class Example:
    """One tokenized example: ``input_ids`` and ``labels`` (T,), plus what generation-based
    evaluation needs (the prompt text and the reference answer)."""

    input_ids: list[int]
    labels: list[int]
    source: str
    prompt: str = ""
    reference: str = ""
    prompt_is_chat: bool = False  # the prompt is chat-template text (tokenize without special tokens)

    @property
    def n_supervised(self) -> int:
        return sum(1 for label in self.labels[1:] if label != IGNORE)


@dataclass
class DataOptions:
    max_seq_len: int = 512
    overlong: str = "truncate"  # or "drop"
    train_on_inputs: bool = False
    chat_template: bool | str = "auto"  # render prompt/completion and alpaca rows as chat turns
    system_prompt: str | None = None
    stats: dict[str, int] = field(default_factory=dict)


# -- reading files ---------------------------------------------------------------------------------


def read_rows(path: str | Path) -> list[Row]:
    """All rows of a file or of every supported file in a directory (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in EXTENSIONS)
        if not files:
            raise DataError(f"{path}: directory holds no {', '.join(EXTENSIONS)} files")
        return [row for f in files for row in read_rows(f)]
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if path.suffix not in readers:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(EXTENSIONS)}")
    rows = list(readers[path.suffix](path))
    for row in rows:
        if not isinstance(row.data, dict):
            raise DataError(f"{row.source}: expected a JSON object per row, got {type(row.data).__name__}")
    return rows


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Row(json.loads(line.rstrip("\r\n")), f"{path}:{lineno}")  # columns within the line
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from None


def _read_json(path: Path) -> Iterator[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of rows (or {{'data': [...]}})")
    for i, item in enumerate(data):
        yield Row(item, f"{path}:row {i + 1}")


def _read_csv(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for item in reader:
            yield Row({k: v for k, v in item.items() if v not in (None, "")}, f"{path}:{reader.line_num}")


def _read_parquet(path: Path) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow: pip install pyarrow") from None
    for i, item in enumerate(pq.read_table(path).to_pylist()):
        yield Row(item, f"{path}:row {i + 1}")


# -- formats ---------------------------------------------------------------------------------------


def detect_format(row: Row) -> str:
    d = row.data
    if "messages" in d:
        msgs = d["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise DataError(f"{row.source}: 'messages' must be a list of {{'role', 'content'}} objects")
        bad = {m["role"] for m in msgs} - {"system", "user", "assistant"}
        if bad:
            raise DataError(f"{row.source}: unknown role(s) {sorted(bad)}; use system, user, assistant")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{row.source}: 'messages' has no assistant turn to train on")
        return "messages"
    if "prompt" in d and "completion" in d:
        return "prompt_completion"
    if "instruction" in d and "output" in d:
        return "alpaca"
    if "text" in d:
        return "text"
    raise DataError(f"{row.source}: row matches no format (keys: {', '.join(sorted(d)) or 'none'}); accepted: {FORMATS}")


def as_messages(row: Row, fmt: str, system_prompt: str | None) -> list[dict[str, str]]:
    """The row as chat turns (prompt/completion and alpaca become user/assistant)."""
    d = row.data
    if fmt == "messages":
        return [{"role": m["role"], "content": str(m["content"])} for m in d["messages"]]
    if fmt == "prompt_completion":
        prompt, answer = str(d["prompt"]), str(d["completion"])
    else:
        prompt = str(d["instruction"]) + (f"\n\n{d['input']}" if d.get("input") else "")
        answer = str(d["output"])
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


# -- tokenizing ------------------------------------------------------------------------------------


def _chat_spans(tokenizer: Any, messages: list[dict[str, str]], source: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (content plus the
    template's end-of-turn marker), found by rendering growing prefixes of the conversation.
    Whitespace a template puts after the final end-of-turn marker is dropped: it would cost a
    token per example and teach nothing (generation stops at the marker)."""
    render = tokenizer.apply_chat_template
    rendered = render(messages, tokenize=False)
    full = rendered.rstrip()
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = render(messages[: i + 1], tokenize=False)
        if not (through.startswith(before) and rendered.startswith(through)):
            raise DataError(f"{source}: the tokenizer's chat template does not render conversations prefix by "
                            f"prefix, so assistant turns cannot be located; use prompt/completion rows")
        spans.append((len(before), min(len(through), len(full))))
    return full, spans


def _tokenize_spans(tokenizer: Any, text: str, spans: Sequence[tuple[int, int]], add_special: bool) -> tuple[list[int], list[bool]]:
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    trained = [any(a <= start < b for a, b in spans) and end > start for start, end in offsets]
    return ids, trained


def use_chat(tokenizer: Any, opts: DataOptions, fmt: str) -> bool:
    if fmt == "messages":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("'messages' rows need a tokenizer with a chat template")
        return True
    if fmt == "text":
        return False
    return bool(getattr(tokenizer, "chat_template", None)) if opts.chat_template == "auto" else bool(opts.chat_template)


def tokenize_row(row: Row, tokenizer: Any, opts: DataOptions) -> Example:
    """Tokenize one row; ``labels`` are -100 except on answer tokens (or everywhere with
    ``train_on_inputs``)."""
    fmt = detect_format(row)
    eos = tokenizer.eos_token_id
    chat = use_chat(tokenizer, opts, fmt)
    if chat:
        messages = as_messages(row, fmt, opts.system_prompt)
        text, spans = _chat_spans(tokenizer, messages, row.source)
        ids, trained = _tokenize_spans(tokenizer, text, spans, add_special=False)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        reference = messages[last]["content"]
    elif fmt == "text":
        text = str(row.data["text"])
        ids, trained = _tokenize_spans(tokenizer, text, [(0, len(text))], add_special=True)
        ids, trained = [*ids, eos], [*trained, True]
        prompt, reference = "", text
    else:
        messages = as_messages(row, fmt, None)
        prompt, reference = messages[-2]["content"], messages[-1]["content"]
        ids, trained = _tokenize_spans(tokenizer, prompt + reference, [(len(prompt), len(prompt) + len(reference))],
                                       add_special=True)
        ids, trained = [*ids, eos], [*trained, True]
    if "answer" in row.data:
        reference = str(row.data["answer"])
    labels = [t if (keep or opts.train_on_inputs) else IGNORE for t, keep in zip(ids, trained)]
    return Example(list(ids), labels, row.source, prompt, reference, chat)


def build_examples(rows: Sequence[Row], tokenizer: Any, opts: DataOptions) -> list[Example]:
    """Tokenize rows, truncating or dropping those over ``max_seq_len``; counts land in ``opts.stats``."""
    out, truncated, dropped = [], 0, 0
    for row in rows:
        ex = tokenize_row(row, tokenizer, opts)
        cut = len(ex.input_ids) > opts.max_seq_len
        if cut and opts.overlong == "truncate":
            ex.input_ids, ex.labels = ex.input_ids[: opts.max_seq_len], ex.labels[: opts.max_seq_len]
        if (cut and opts.overlong == "drop") or ex.n_supervised == 0:
            dropped += 1
            continue
        truncated += cut
        out.append(ex)
    opts.stats.update(truncated=truncated, dropped=dropped, kept=len(out))
    return out


def load_examples(path: str | Path, tokenizer: Any, opts: DataOptions) -> list[Example]:
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: the dataset is empty")
    examples = build_examples(rows, tokenizer, opts)
    if not examples:
        raise DataError(f"{path}: no usable example (all {len(rows)} rows were dropped: over max_seq_len="
                        f"{opts.max_seq_len} or with nothing to train on)")
    return examples


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of the examples (at least one), chosen with ``seed``."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * fraction))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


# -- packing and batches ---------------------------------------------------------------------------


def pack(examples: Sequence[Example], max_len: int) -> list[list[Example]]:
    """Group examples into rows of at most ``max_len`` tokens, first-fit in the given order."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for ex in examples:
        n = len(ex.input_ids)
        for i, free in enumerate(room):
            if n <= free:
                rows[i].append(ex)
                room[i] -= n
                break
        else:
            rows.append([ex])
            room.append(max_len - n)
    return rows


def collate(rows: Sequence[Sequence[Example]], pad_id: int, *, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Batch rows of one or more examples each, right-padded to the longest row (and further, to
    the fewest extra columns that make the token count B·T a multiple of ``multiple``: T rounded
    up to a multiple of ``multiple / gcd(B, multiple)``; see ``collate_flat``).

    Returns ``input_ids``, ``labels`` (B, T), ``position_ids`` (B, T, restarting at each example)
    and ``attention_mask``: (B, T) for one example per row, else a (B, 1, T, T) boolean
    block-diagonal causal mask so that packed examples cannot see each other.
    """
    length = max(sum(len(e.input_ids) for e in row) for row in rows)
    step = multiple // math.gcd(len(rows), multiple)
    length += -length % step
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    segments = torch.full((len(rows), length), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for s, ex in enumerate(row):
            n = len(ex.input_ids)
            ids[b, t:t + n] = torch.tensor(ex.input_ids)
            labels[b, t:t + n] = torch.tensor(ex.labels)
            labels[b, t] = IGNORE  # no target crosses from the previous example into this one
            positions[b, t:t + n] = torch.arange(n)
            segments[b, t:t + n] = s
            t += n
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    if all(len(row) == 1 for row in rows):
        batch["attention_mask"] = (segments >= 0).long()
    else:
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
        batch["attention_mask"] = (same & causal)[:, None]  # (B, 1, T, T)
    return batch


def shared_prefix(examples: Sequence[Example]) -> int:
    """Length P of the token prefix that every example starts with and that trains nothing: labels of
    tokens 0..P are all ignored (token P too, so the prefix's last position predicts nothing).
    Each example keeps at least one token of its own; P = 0 for fewer than two examples."""
    if len(examples) < 2:
        return 0
    limit = min(len(e.input_ids) for e in examples) - 1
    p = 0
    first = examples[0].input_ids
    while p < limit and all(e.input_ids[p] == first[p] and e.labels[p] == IGNORE for e in examples):
        p += 1
    while p > 0 and any(e.labels[p] != IGNORE for e in examples):
        p -= 1
    return p


def collate_flat(rows: Sequence[Sequence[Example]], share_prefix: bool = True, *, multiple: int = 1,
                 pad_id: int = 0, trim: bool = True) -> dict[str, Any]:
    """All examples of ``rows`` concatenated into one (1, N) row with no padding (see
    ``lorakit.attention``): ``input_ids``, ``labels`` and ``position_ids`` (1, N), plus the
    segment bounds ``cu_seq_lens_q``/``_k`` (S+1,) and ``max_length_q``/``_k`` (the longest, int).
    Labels of each example's first token are ignored, so no target crosses between examples.

    With ``share_prefix``, a prefix common to all examples that trains nothing (a chat template's
    system turn, say; see ``shared_prefix``) is placed once at the start, as its own segment, and
    ``shared_prefix`` = P tells attention that every other segment also attends to it. Each
    example's own tokens keep their positions (P, P+1, …), so the result is exactly that of the
    examples side by side, for P fewer tokens per example.

    ``multiple`` > 1 rounds N up to a multiple of it with a last segment of ``pad_id`` tokens that
    trains nothing and that no other segment attends to (the results are unchanged): the trainer
    does so under bf16 autocast on a CPU, whose bf16 matmuls keep memory for every shape they see.

    With ``trim``, an example's last token is left out when a segment follows it: that token
    predicts nothing (its target would lie past the example) and no earlier query attends to it,
    so it only costs a forward and backward pass through every layer. Its own label, the target of
    the token before it, moves into the next segment's first label slot, which is otherwise always
    ignored: position j still predicts ``labels[j + 1]``. Same loss and gradients, one token fewer
    per example (1.7% of the bundled demo's tokens).
    """
    examples = [e for row in rows for e in row]
    p = shared_prefix(examples) if share_prefix else 0
    parts = [(examples[0].input_ids[:p], [IGNORE] * p, 0)] if p else []
    parts += [(e.input_ids[p:], e.labels[p:], p) for e in examples]
    first = 1 if p else 0  # parts[first:] are the examples
    cut = [trim and k >= first and len(ids) > 1 for k, (ids, _, _) in enumerate(parts)]
    total = sum(len(ids) for ids, _, _ in parts) - sum(cut)
    if cut[-1] and -total % multiple == 0:  # the last example is followed by nothing: keep its last token
        cut[-1], total = False, total + 1
    filler = -total % multiple
    moved = [labels[-1] if c else IGNORE for c, (_, labels, _) in zip(cut, parts)]
    parts = [(ids[:-1], labels[:-1], off) if c else (ids, labels, off) for c, (ids, labels, off) in zip(cut, parts)]
    if filler:
        parts.append(([pad_id] * filler, [IGNORE] * filler, p))
    lengths = [len(ids) for ids, _, _ in parts]
    ids = torch.tensor([t for part, _, _ in parts for t in part])[None]
    labels = torch.tensor([t for _, part, _ in parts for t in part])
    starts = torch.tensor([0, *lengths]).cumsum(0)
    labels[starts[:-1]] = IGNORE
    slots = starts[1:len(moved) + 1]  # where each part's successor starts (N after the last part)
    follow = slots < len(labels)
    labels[slots[follow]] = torch.tensor(moved, dtype=labels.dtype)[follow]  # the cut tokens' labels
    positions = torch.cat([torch.arange(offset, offset + n) for (_, _, offset), n in zip(parts, lengths)])[None]
    cu = starts.to(torch.int32)
    longest = max(lengths[1:] if p else lengths)
    batch = {"input_ids": ids, "labels": labels[None], "position_ids": positions, "cu_seq_lens_q": cu,
             "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    if p:
        batch["shared_prefix"] = p
    return batch


def batches(rows: Sequence[Sequence[Example]], batch_size: int, epoch: int, seed: int,
            shuffle: bool = True) -> list[list[Sequence[Example]]]:
    """The epoch's batches: rows shuffled with a generator seeded by (seed, epoch), so that the
    order is the same in every run and after a resume."""
    order = list(range(len(rows)))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [[rows[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]


def show_example(example: Example, tokenizer: Any) -> str:
    """One example token by token: ``[token]`` is trained, ``·token·`` is masked."""
    parts = []
    for token, label in zip(example.input_ids, example.labels):
        text = tokenizer.decode([token]).replace("\n", "\\n")
        parts.append(f"[{text}]" if label != IGNORE else f"·{text}·")
    n = sum(1 for label in example.labels if label != IGNORE)
    return (f"{example.source}: {len(example.input_ids)} tokens, {n} trained ([trained] ·masked·)\n"
            + "".join(parts))
