"""Data files → tokenized, masked examples. Usable without the trainer (batches: ``lorakit.collate``).

Files: ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` or a directory of them. Each row is one of

    text                       {"text": "..."}                                    every token trains
    prompt + completion        {"prompt": "...", "completion": "..."}             completion trains
    messages                   {"messages": [{"role": "user", "content": ...}, ...]}  assistant turns train
    ShareGPT                   {"conversations": [{"from": "human", "value": ...}, ...]}  gpt turns train
    alpaca                     {"instruction": ..., "input": ... (optional), "output": ...}  output trains

In both conversation formats a turn with ``"weight": 0`` (axolotl's convention) is context, not
trained. Trained tokens carry their id in ``labels``; the rest carry -100. The end of every trained answer
(EOS, or the chat template's end-of-turn token) is trained too, so the model learns to stop.
Errors name the file and line of the offending row.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

IGNORE = -100
FORMATS = ("text | prompt+completion | messages | conversations (ShareGPT from/value) | "
           "instruction+output (alpaca, optional input)")
# ShareGPT speakers → chat roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant"}
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
    if "messages" in d or "conversations" in d:
        conversation_turns(row)  # validates
        return "messages"
    if "prompt" in d and "completion" in d:
        if isinstance(d.get("label"), bool):  # TRL's unpaired preference row: an SFT run would learn the bad answers
            raise DataError(f"{row.source}: a judged answer (prompt/completion/label true|false); train on judged "
                            f"answers with objective: kto")
        return "prompt_completion"
    if "instruction" in d and "output" in d:
        return "alpaca"
    if "text" in d:
        return "text"
    if "chosen" in d and "rejected" in d:
        raise DataError(f"{row.source}: a preference row (chosen/rejected); train on preference pairs with "
                        f"objective: dpo (or orpo, simpo, kto)")
    raise DataError(f"{row.source}: row matches no format (keys: {', '.join(sorted(d)) or 'none'}); accepted: {FORMATS}")


def conversation_turns(row: Row, trained: bool = True) -> list[tuple[dict[str, str], bool]]:
    """A ``messages`` or ShareGPT ``conversations`` row as ``({role, content}, trains)`` turns.

    ShareGPT's ``from``/``value`` turns map through ``SHAREGPT_ROLES`` (human → user, gpt → assistant).
    An assistant turn trains unless it carries ``"weight": 0``; other turns never train. With
    ``trained``, a row without a turn to train on is an error (a prompt row needs none).
    """
    sharegpt = "messages" not in row.data
    key, role_key, content_key = ("conversations", "from", "value") if sharegpt else ("messages", "role", "content")
    turns = row.data[key]
    if not isinstance(turns, list) or not all(isinstance(t, dict) and role_key in t and content_key in t
                                              for t in turns):
        raise DataError(f"{row.source}: '{key}' must be a list of {{'{role_key}', '{content_key}'}} objects")
    roles = SHAREGPT_ROLES if sharegpt else {r: r for r in ("system", "user", "assistant")}
    bad = sorted({str(t[role_key]) for t in turns} - set(roles))
    if bad:
        raise DataError(f"{row.source}: unknown {role_key} value(s) {bad} in '{key}'; use {', '.join(roles)}")
    out = []
    for i, t in enumerate(turns):
        weight = t.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, str):
            raise DataError(f"{row.source}: '{key}'[{i}] has weight {weight!r}; use 0 (context) or 1 (trained)")
        role = roles[t[role_key]]
        out.append(({"role": role, "content": str(t[content_key])}, role == "assistant" and weight == 1))
    if trained and not any(trains for _, trains in out):
        raise DataError(f"{row.source}: '{key}' has no assistant turn to train on")
    return out


def prompt_of(row: Row) -> str | list[dict[str, str]]:
    """What to generate from: a row's ``prompt`` (text, or messages as in preference rows), or its
    ``messages`` / ShareGPT ``conversations`` without the assistant turns that end it (an eval row's
    answer), so any training or eval row can be fed to ``lorakit generate --file``."""
    d = row.data
    if "prompt" in d:
        return d["prompt"]
    if "messages" not in d and "conversations" not in d:
        raise DataError(f"{row.source}: a prompt row needs 'prompt', 'messages' or 'conversations'")
    messages = [m for m, _ in conversation_turns(row, trained=False)]
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages:
        key = "messages" if "messages" in d else "conversations"
        raise DataError(f"{row.source}: '{key}' has no turn before the assistant's to generate from")
    return messages


def as_messages(row: Row, fmt: str, system_prompt: str | None) -> list[dict[str, str]]:
    """The row as chat turns (prompt/completion and alpaca become user/assistant)."""
    d = row.data
    if fmt == "messages":
        return [m for m, _ in conversation_turns(row)]
    if fmt == "prompt_completion":
        prompt, answer = str(d["prompt"]), str(d["completion"])
    else:
        prompt = str(d["instruction"]) + (f"\n\n{d['input']}" if d.get("input") else "")
        answer = str(d["output"])
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


# -- tokenizing ------------------------------------------------------------------------------------


def _chat_spans(tokenizer: Any, messages: list[dict[str, str]], source: str,
                trained: Sequence[bool] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its trained assistant turns (content plus
    the template's end-of-turn marker; ``trained[i]`` false leaves turn i out), found by rendering growing prefixes of the conversation.
    Whitespace a template puts after the final end-of-turn marker is dropped: it would cost a
    token per example and teach nothing (generation stops at the marker)."""
    render = tokenizer.apply_chat_template
    rendered = render(messages, tokenize=False)
    full = rendered.rstrip()
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or (trained is not None and not trained[i]):
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
            raise DataError("'messages' and 'conversations' rows need a tokenizer with a chat template")
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
        trained_turns = [trains for _, trains in conversation_turns(row)] if fmt == "messages" else None
        text, spans = _chat_spans(tokenizer, messages, row.source, trained_turns)
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


def load_examples(path: str | Path, tokenizer: Any, opts: DataOptions,
                  build: Callable[[Sequence[Row], Any, DataOptions], list[Any]] | None = None) -> list[Any]:
    """The file's or directory's rows through ``build`` (default ``build_examples``; DPO's pairs:
    ``preference.build_pairs``); an empty result is an error naming the path."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: the dataset is empty")
    examples = (build or build_examples)(rows, tokenizer, opts)
    if not examples:
        raise DataError(f"{path}: no usable example (all {len(rows)} rows were dropped: over max_seq_len="
                        f"{opts.max_seq_len} or with nothing to train on)")
    return examples


def split_eval(examples: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out ``fraction`` of the examples (at least one), chosen with ``seed``."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * fraction))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def show_example(example: Example, tokenizer: Any) -> str:
    """One example token by token: ``[token]`` is trained, ``·token·`` is masked."""
    parts = []
    for token, label in zip(example.input_ids, example.labels):
        text = tokenizer.decode([token]).replace("\n", "\\n")
        parts.append(f"[{text}]" if label != IGNORE else f"·{text}·")
    n = sum(1 for label in example.labels if label != IGNORE)
    return (f"{example.source}: {len(example.input_ids)} tokens, {n} trained ([trained] ·masked·)\n"
            + "".join(parts))
