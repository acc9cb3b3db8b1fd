"""Generate the bundled demo task: turn an expense note into a spreadsheet (CSV) row.

    user:      "Paid $45.20 at Golden Fork Bistro on 3 March 2025."
    assistant: Golden Fork Bistro,45.20,2025-03-03

The columns are merchant, amount (two decimals, no currency, no thousands separator) and ISO date.
Earlier versions answered in compact JSON, {"merchant":…,"amount":…,"date":…}: the keys and
quotes cost 9 more tokens a row (31 vs 22 answer tokens, 66 vs 57 tokens a row), 15% of the
training compute, for the same content and the same normalisation to learn.

The base SmolLM2-135M-Instruct answers in free text or with other keys, dates and number formats,
so it scores near zero by exact match; a LoRA fine-tune learns the format and the normalisation
(month names → numbers, "1,204.5 dollars" → 1204.50). Eval merchants are built from word lists
disjoint from the training ones, so the eval set cannot be memorised from training rows.

Run: python examples/extract/make_data.py  (fixed seed; writes train.jsonl and eval.jsonl here)
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datagen import chat_row, write_splits

SYSTEM = "Extract the expense as a CSV row: merchant,amount,date."
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
FIRST = {
    "train": ["Blue", "Golden", "Red", "Silver", "Green", "Corner", "Sunny", "Old", "Little", "Lucky", "Urban",
              "River", "Maple", "Harbor", "Copper", "Velvet", "Royal", "Happy", "North", "Crystal"],
    "eval": ["Purple", "Iron", "Misty", "Cedar", "Amber", "Coral", "Quiet", "Bright", "Stone", "Willow"],
}
SECOND = {
    "train": ["Bottle", "Fork", "Lantern", "Oak", "Anchor", "Leaf", "Bridge", "Garden", "Tiger", "Spoon",
              "Crown", "Pine", "Wave", "Falcon", "Barrel"],
    "eval": ["Kettle", "Owl", "Meadow", "Compass", "Feather", "Harvest", "Pebble", "Summit"],
}
KIND = {
    "train": ["Coffee", "Bistro", "Books", "Pharmacy", "Market", "Bakery", "Hardware", "Cinema", "Taxi", "Hotel",
              "Pizza", "Florist"],
    "eval": ["Diner", "Grocers", "Deli", "Salon", "Garage", "Tea House"],
}
TEMPLATES = [
    "Paid {amount} at {merchant} on {date}.",
    "{date}: {merchant}, {amount}.",
    "Spent {amount} at {merchant} ({date}).",
    "{merchant} charged me {amount} on {date}.",
    "Receipt from {merchant}, {date}, total {amount}.",
    "On {date} I paid {merchant} {amount}.",
    "{amount} to {merchant} on {date}",
    "Expense: {merchant} / {amount} / {date}",
]


def fmt_amount(value: float, rng: random.Random) -> str:
    whole = f"{value:,.2f}" if value >= 1000 and rng.random() < 0.5 else f"{value:.2f}"
    style = rng.randrange(4)
    if style == 0:
        return f"${whole}"
    if style == 1:
        return f"{whole} USD"
    if style == 2:
        return f"{whole} dollars"
    return f"USD {whole}"


def fmt_date(y: int, m: int, d: int, rng: random.Random) -> str:
    style = rng.randrange(4)
    if style == 0:
        return f"{MONTHS[m - 1]} {d}, {y}"
    if style == 1:
        return f"{d} {MONTHS[m - 1]} {y}"
    if style == 2:
        return f"{MONTHS[m - 1][:3]} {d} {y}"
    return f"{y}-{m:02d}-{d:02d}"


def example(split: str, rng: random.Random) -> dict:
    merchant = f"{rng.choice(FIRST[split])} {rng.choice(SECOND[split])} {rng.choice(KIND[split])}"
    value = round(rng.choice([rng.uniform(1, 60), rng.uniform(60, 400), rng.uniform(400, 3000)]), 2)
    y, m, d = rng.choice([2023, 2024, 2025]), rng.randint(1, 12), rng.randint(1, 28)
    note = rng.choice(TEMPLATES).format(amount=fmt_amount(value, rng), merchant=merchant, date=fmt_date(y, m, d, rng))
    return chat_row(SYSTEM, note, f"{merchant},{value:.2f},{y}-{m:02d}-{d:02d}")


def main(out: Path = Path(__file__).parent, n_train: int = 1000, n_eval: int = 200, seed: int = 1234) -> None:
    write_splits(example, out, n_train, n_eval, seed)


if __name__ == "__main__":
    main()
