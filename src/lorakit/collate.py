"""Examples → batches: packing, padded and padding-free collation, and each epoch's order.

``pack`` puts several examples in one row; ``collate`` right-pads rows into (B, T) tensors (with a
block-diagonal mask for packed rows); ``collate_flat`` concatenates a batch's examples into one
(1, N) row of real tokens with segment bounds for ``lorakit.attention``, the shared prefix stored
once; ``batches`` is the seeded, resumable shuffle. Labels of tokens that train nothing are
``data.IGNORE``; no target ever crosses from one example into the next.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch

from lorakit.data import IGNORE, Example


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

    Returns ``input_ids``, ``labels`` (B, T), ``position_ids`` (B, T, restarting at each example),
    ``example_lengths`` (B, T: the length of the example each token belongs to, 0 for padding; for
    ``lorakit.neftune``) and ``attention_mask``: (B, T) for one example per row, else a (B, 1, T, T) boolean
    block-diagonal causal mask so that packed examples cannot see each other.
    """
    length = max(sum(len(e.input_ids) for e in row) for row in rows)
    step = multiple // math.gcd(len(rows), multiple)
    length += -length % step
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    segments = torch.full((len(rows), length), -1, dtype=torch.long)
    example_lengths = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for s, ex in enumerate(row):
            n = len(ex.input_ids)
            ids[b, t:t + n] = torch.tensor(ex.input_ids)
            labels[b, t:t + n] = torch.tensor(ex.labels)
            labels[b, t] = IGNORE  # no target crosses from the previous example into this one
            positions[b, t:t + n] = torch.arange(n)
            segments[b, t:t + n] = s
            example_lengths[b, t:t + n] = n
            t += n
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions, "example_lengths": example_lengths}
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
    segment bounds ``cu_seq_lens_q``/``_k`` (S+1,) and ``max_length_q``/``_k`` (the longest, int),
    and ``example_lengths`` (1, N: each token's whole example's length; the shared prefix: their mean;
    filler: 0). Labels of each example's first token are ignored, so no target crosses between examples.

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
    whole = [len(e.input_ids) for e in examples]
    owner = ([round(sum(whole) / len(whole))] if p else []) + whole + ([0] if filler else [])
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
             "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
             "example_lengths": torch.tensor(owner).repeat_interleave(torch.tensor(lengths))[None]}
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
