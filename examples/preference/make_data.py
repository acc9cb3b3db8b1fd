"""Preference pairs for the demo task (expense note → ``merchant,amount,date``), for ``objective: dpo``.

Each row of ``examples/extract`` becomes a pair with the same prompt (the system and user turns):
the chosen answer is the reference row; the rejected one makes a mistake a small model makes on
this task, one per pair, picked with a fixed seed:

    unnormalised date   Copper Fork Coffee,6.35,December 3 2025
    currency kept       Copper Fork Coffee,$6.35,2025-12-03
    columns swapped     6.35,Copper Fork Coffee,2025-12-03
    chatty answer       The expense is Copper Fork Coffee, 6.35 dollars, on 2025-12-03.
    amount rounded      Copper Fork Coffee,6,2025-12-03

Run: python examples/preference/make_data.py  (writes train.jsonl and eval.jsonl here)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SOURCE = HERE.parent / "extract"
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def rejected(answer: str, rng: random.Random) -> str:
    merchant, amount, date = answer.rsplit(",", 2)
    y, m, d = (int(x) for x in date.split("-"))
    mistakes = [
        f"{merchant},{amount},{MONTHS[m - 1]} {d} {y}",
        f"{merchant},${amount},{date}",
        f"{amount},{merchant},{date}",
        f"The expense is {merchant}, {amount} dollars, on {date}.",
        f"{merchant},{round(float(amount))},{date}",
    ]
    return rng.choice(mistakes)


def pair(row: dict, rng: random.Random) -> dict:
    *prompt, answer = row["messages"]
    return {"prompt": prompt, "chosen": [answer],
            "rejected": [{"role": "assistant", "content": rejected(answer["content"], rng)}]}


def main(seed: int = 4321) -> None:
    rng = random.Random(seed)
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in (SOURCE / f"{split}.jsonl").read_text().splitlines()]
        (HERE / f"{split}.jsonl").write_text("".join(json.dumps(pair(r, rng)) + "\n" for r in rows))


if __name__ == "__main__":
    main()
