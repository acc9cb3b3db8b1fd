"""The sweep behind lorakit's default LoRA recipe, on the bundled extraction task.

Each run trains 1 epoch on examples/extract/train.jsonl and scores exact match on the 200 held-out
rows; results (with peak RSS and wall time) are appended to examples/extract/sweep.jsonl, each
tagged with the version of the data it ran on ("csv" now; "json" for runs on the earlier JSON
answers, which carry no tag).

    python examples/extract/sweep.py                 # every run below not yet done on the current data
    python examples/extract/sweep.py full r-8        # just these
    python examples/extract/sweep.py --table [json]  # the results so far (on the current or the JSON data)
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "sweep.jsonl"
DATA = "csv"  # the answer format of make_data.py; older records without a "data" tag ran on "json"

RUNS: dict[str, list[str]] = {
    # full fine-tuning: the quality and memory reference
    "full": ["method=full", "train.lr=2e-5"],
    # the seeds' recipe (r=16, alpha=32, dropout 0.05, lr 2e-4, all seven projections)
    "seeds": ["lora.r=16", "lora.lora_alpha=32", "lora.lora_dropout=0.05", "train.lr=2e-4"],
    # the default (no overrides) and one-factor changes around it
    "default": [],
    "qlora-nf4": ["model.quantize=nf4"],
    "lr-5e-4": ["train.lr=5e-4"],
    "lr-5e-3": ["train.lr=5e-3"],
    "r-8": ["lora.r=8", "lora.lora_alpha=8"],
    "r-32": ["lora.r=32", "lora.lora_alpha=32"],
    "alpha-2r": ["lora.lora_alpha=32"],
    "dropout-0.05": ["lora.lora_dropout=0.05"],
    "qv-only": ["lora.target_modules=[q_proj, v_proj]"],
    # batch 8, the default before batch 16: the first CSV runs of default, full and qlora-nf4 (and
    # the whole JSON sweep) used it. Batch 16 pays the shared system prefix and the optimizer step
    # once per 16 rows and makes the matmuls twice as tall.
    "default-b8": ["train.batch_size=8"],
    "full-b8": ["method=full", "train.lr=2e-5", "train.batch_size=8"],
    "qlora-nf4-b8": ["model.quantize=nf4", "train.batch_size=8"],
    # DoRA (use_dora) and LoRA+ (B at 16x the lr; the paper advises a lower lr with it)
    "dora": ["lora.use_dora=true"],
    "loraplus-16": ["train.loraplus_lr_ratio=16"],
    "loraplus-16-lr-5e-4": ["train.loraplus_lr_ratio=16", "train.lr=5e-4"],
    # initialisations from the base weight (PiSSA: its top singular part; OLoRA: its QR factors), which
    # start the adapter large, so also at a lower lr
    "pissa": ["lora.init_lora_weights=pissa"],
    "pissa-lr-5e-4": ["lora.init_lora_weights=pissa", "train.lr=5e-4"],
    "pissa-lr-2e-4": ["lora.init_lora_weights=pissa", "train.lr=2e-4"],
    "olora": ["lora.init_lora_weights=olora"],
    "olora-lr-5e-4": ["lora.init_lora_weights=olora", "train.lr=5e-4"],
    # adapters on the top layers only: the backward pass stops below them (SmolLM2-135M has 30 layers)
    "top-15-layers": [f"lora.layers_to_transform=[{', '.join(map(str, range(15, 30)))}]"],
}


def machine_gflops(seconds: float = 1.0) -> float:
    """This machine's fp32 matmul speed right now, on a shape of the demo's training step (a batch's
    ≈460 tokens through an MLP projection): the median over ``seconds``. A shared machine's speed
    drifts from hour to hour; recorded before and after each run, it says what a time was measured at."""
    import torch

    x, w = torch.randn(460, 576), torch.randn(1536, 576)
    rates, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        x @ w.T
        rates.append(2 * 460 * 576 * 1536 / (time.perf_counter() - t) / 1e9)
    return round(statistics.median(rates), 1)


def run(name: str, overrides: list[str]) -> dict:
    out = Path("runs/sweep") / name
    cmd = [sys.executable, "-m", "lorakit", "train", str(HERE / "config.yaml"), f"output_dir={out}",
           "train.resume=never", "eval.steps=0", *overrides]
    speed_before = machine_gflops()
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    # the run reports its own peak; the children's maximum is only right for the first run of a sweep
    peak_rss = final.get("peak_memory_bytes") or resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"run": name, "data": DATA, "overrides": overrides, "exact_match": final.get("exact_match"),
            "eval_loss": final.get("eval_loss"), "train_s": final.get("train_s"), "wall_s": round(wall, 1),
            "peak_rss_bytes": peak_rss, "matmul_gflops": [speed_before, machine_gflops()]}


def records(data: str = DATA) -> dict[str, dict]:
    """The finished runs in sweep.jsonl on data version ``data``, by name."""
    rows = map(json.loads, RESULTS.read_text().splitlines()) if RESULTS.exists() else []
    return {r["run"]: r for r in rows if r.get("data", "json") == data}


def table(data: str = DATA) -> str:
    """sweep.jsonl as a markdown table, in the order of RUNS (exact match relative to the default)."""
    found = records(data)
    base = found.get("default", {}).get("exact_match")
    timed = data == DATA  # earlier data versions ran on earlier, slower code: their times say little now
    lines = ["| run | overrides | exact match | vs default | eval loss | peak RSS |"
             + (" train time (machine GFLOP/s before/after) |" if timed else ""),
             "|---|---|---|---|---|---|" + ("---|" if timed else "")]
    for name in RUNS:
        if name not in found:
            continue
        r = found[name]
        delta = f"{100 * (r['exact_match'] - base):+.1f}" if base is not None and name != "default" else "—"
        lines.append(f"| {name} | `{' '.join(r['overrides']) or '(none)'}` | {100 * r['exact_match']:.1f}% | {delta} | "
                     f"{r['eval_loss']:.4f} | {r['peak_rss_bytes'] / 1e9:.2f} GB |" + (f" {_time(r)} |" if timed else ""))
    return "\n".join(lines)


def _time(record: dict) -> str:
    speeds = record.get("matmul_gflops")
    return f"{record['train_s']:.0f} s" + (f" ({speeds[0]:.0f}/{speeds[1]:.0f})" if speeds else "")


def main(names: list[str]) -> None:
    if names[:1] == ["--table"]:
        print(table(*names[1:2]))
        return
    done = records()
    for name in names or [n for n in RUNS if n not in done]:
        record = run(name, RUNS[name])
        print(json.dumps(record))
        with RESULTS.open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
