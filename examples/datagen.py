"""Shared by the bundled task generators: the chat row and writing train/eval files with one seed."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path


def chat_row(system: str, user: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


def write_splits(example: Callable[[str, random.Random], dict], out: Path, n_train: int, n_eval: int,
                 seed: int) -> None:
    """``out/train.jsonl`` and ``out/eval.jsonl`` from ``example(split, rng)``, one generator for both."""
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("eval", n_eval)):
        with (out / f"{split}.jsonl").open("w") as f:
            for _ in range(n):
                f.write(json.dumps(example(split, rng)) + "\n")
