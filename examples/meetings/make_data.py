"""Generate a second bundled task: turn a meeting request into JSON with the weekday, 24-hour start
time and duration in minutes.

    user:      "Can we meet Tuesday at 3pm for half an hour?"
    assistant: {"day":"Tuesday","time":"15:00","minutes":30}

Used with the expense task (examples/extract) by the router demo (examples/router). The base
SmolLM2-135M-Instruct does not produce this format; people's names and wording in the eval rows come
from lists disjoint from the training ones.

Run: python examples/meetings/make_data.py  (fixed seed; writes train.jsonl and eval.jsonl here)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datagen import chat_row, write_splits

SYSTEM = "Extract the meeting as JSON."
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PEOPLE = {
    "train": ["Ana", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kira", "Liam"],
    "eval": ["Mona", "Nils", "Olga", "Pedro", "Quinn", "Rosa"],
}
TOPICS = {
    "train": ["the budget", "the launch", "hiring", "the roadmap", "Q3 numbers", "the offsite", "onboarding"],
    "eval": ["the audit", "vendor terms", "the redesign", "support load"],
}
DURATIONS = {15: ["15 minutes", "a quarter of an hour", "15 min"], 30: ["30 minutes", "half an hour", "30 min"],
             45: ["45 minutes", "three quarters of an hour", "45 min"], 60: ["an hour", "60 minutes", "1 hour"],
             90: ["90 minutes", "an hour and a half", "1.5 hours"], 120: ["two hours", "2 hours", "120 minutes"]}
TEMPLATES = [
    "Can we meet {day} at {time} for {dur}?",
    "{person} wants {dur} on {day} at {time} about {topic}.",
    "Book {dur} with {person} on {day}, {time}.",
    "Let's sync {day} {time}, {dur}, re {topic}.",
    "Meeting with {person}: {day} at {time} ({dur}).",
    "Are you free {day} at {time}? Need {dur} for {topic}.",
]


def fmt_time(hour: int, minute: int, rng: random.Random) -> str:
    style = rng.randrange(3)
    if style == 0:
        return f"{hour:02d}:{minute:02d}"
    suffix = "am" if hour < 12 else "pm"
    h12 = hour % 12 or 12
    if style == 1 and minute == 0:
        return f"{h12}{suffix}"
    return f"{h12}:{minute:02d} {suffix}"


def example(split: str, rng: random.Random) -> dict:
    day = rng.choice(DAYS)
    hour, minute = rng.randint(8, 18), rng.choice([0, 0, 15, 30, 45])
    minutes = rng.choice(list(DURATIONS))
    note = rng.choice(TEMPLATES).format(
        day=day if rng.random() < 0.7 else day[:3], time=fmt_time(hour, minute, rng),
        dur=rng.choice(DURATIONS[minutes]), person=rng.choice(PEOPLE[split]), topic=rng.choice(TOPICS[split]))
    answer = json.dumps({"day": day, "time": f"{hour:02d}:{minute:02d}", "minutes": minutes}, separators=(",", ":"))
    return chat_row(SYSTEM, note, answer)


def main(out: Path = Path(__file__).parent, n_train: int = 1000, n_eval: int = 200, seed: int = 4321) -> None:
    write_splits(example, out, n_train, n_eval, seed)


if __name__ == "__main__":
    main()
