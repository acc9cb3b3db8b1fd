"""Batch 16 against batch 8 in lorakit's own trainer: whole optimizer steps over the same rows.

The demo configuration (``examples/extract/config.yaml``: SmolLM2-135M-Instruct, the default LoRA
recipe, fp32 on CPU / bf16 autocast on a GPU) trains on the first ``--rows`` bundled rows as
``rows / 16`` steps of 16 and as ``rows / 8`` steps of 8: forward, backward, clipping, the AdamW
step and the schedule, exactly as ``lorakit train`` runs them (``Trainer.step`` inside
``Trainer.fast_paths``). The two run in alternating rounds (ABBA) in one process, so a slow spell
of the machine falls on both; one warm-up step of each first. Prints seconds per pass over the
rows and the ratio, and appends the table to benchmarks/RESULTS.md.

    python benchmarks/batch_size.py [--rows 64] [--rounds 4]

Peak memory cannot be told apart in one process; the README's peak RSS figures come from whole
runs (``examples/extract/sweep.py``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorakit.train import Trainer
from lorakit.train_config import load_config

sys.path.insert(0, str(Path(__file__).parent))
from results import append_entry, machine

CONFIG = Path(__file__).parent.parent / "examples" / "extract" / "config.yaml"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64, help="a multiple of 16")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of both sizes (an even number: ABBA)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.rows % 16:
        ap.error("--rows must be a multiple of 16")
    out = tempfile.mkdtemp()
    cfg = load_config(CONFIG, [f"output_dir={out}", "data.eval=null", "eval.generate=false"])
    trainer = Trainer(cfg, progress=False, log=lambda _: None)
    rows = trainer.rows[:args.rows]
    sizes = (16, 8)
    steps = {b: [[rows[k:k + b]] for k in range(0, len(rows), b)] for b in sizes}  # one micro-batch a step
    tokens = sum(len(e.input_ids) for row in rows for e in row)
    times: dict[int, list[float]] = {b: [] for b in sizes}
    trainer.model.train()
    with trainer.fast_paths():
        for b in sizes:  # warm-up
            trainer.step(steps[b][0])
        for i in range(args.rounds):
            for b in sizes if i % 2 == 0 else sizes[::-1]:
                start = time.perf_counter()
                for group in steps[b]:
                    trainer.step(group)
                times[b].append(time.perf_counter() - start)
    med = {b: statistics.median(t) for b, t in times.items()}
    ratios = [t8 / t16 for t16, t8 in zip(times[16], times[8], strict=True)]
    lines = ["| batch | optimizer steps | s per pass (median) | rows/s | each round, s |", "|---|---|---|---|---|"]
    for b in sizes:
        lines.append(f"| {b} | {len(steps[b])} | {med[b]:.1f} | {len(rows) / med[b]:.2f} | "
                     f"{', '.join(f'{t:.1f}' for t in times[b])} |")
    text = (f"## {time.strftime('%Y-%m-%d')} — batch 16 vs batch 8, lorakit trainer, {machine(trainer.device)}\n\n"
            f"`python benchmarks/batch_size.py --rows {args.rows} --rounds {args.rounds}`: the demo config "
            f"({cfg.model.name}, default LoRA, {trainer.model.dtype}), the first {len(rows)} bundled rows "
            f"({tokens} tokens), whole optimizer steps, {args.rounds} alternating rounds; torch {torch.__version__}."
            f"\n\n" + "\n".join(lines) + f"\n\nBatch 16 is {statistics.median(ratios):.2f}× the rows/s of batch 8 "
            f"(median of the rounds' ratios; range {min(ratios):.2f}-{max(ratios):.2f}×).\n")
    print(text)
    if not args.no_save:
        append_entry(text)


if __name__ == "__main__":
    main()
