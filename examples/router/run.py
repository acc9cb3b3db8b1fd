"""The router demo: two task adapters, a router trained on a small mix, scored on each task and the mix.

    python examples/router/run.py [--epochs N]   # trains what is missing under runs/, then evaluates

1. the expense adapter (examples/extract/config.yaml → runs/extract) and the meeting adapter
   (examples/meetings/config.yaml → runs/meetings), each with the default LoRA recipe;
2. a router over both (method: router) trained N epochs (default 3) on 200 rows: 100 training rows
   of each task (runs/router-eN);
3. greedy exact match on each task's eval set and on their union (the mixed eval), for each single
   adapter and for the router. Results are printed and written to examples/router/results.json (a model
   already scored there is not scored again).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
TASKS = {"extract": ROOT / "examples/extract", "meetings": ROOT / "examples/meetings"}


def train(config: Path, *overrides: str) -> None:
    subprocess.run([sys.executable, "-m", "lorakit", "train", str(config), *overrides], check=True, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3, help="router training epochs over the 200-row mix")
    epochs = ap.parse_args().epochs
    for name, task in TASKS.items():
        if not (ROOT / "runs" / name / "adapter_model.safetensors").exists():
            train(task / "config.yaml", f"output_dir=runs/{name}", "eval.generate=false")
    rng = random.Random(0)
    mix = []
    for task in TASKS.values():
        rows = (task / "train.jsonl").read_text().splitlines()
        mix += rng.sample(rows, 100)
    rng.shuffle(mix)
    (HERE / "mix_train.jsonl").write_text("\n".join(mix) + "\n")
    evals = {n: (t / "eval.jsonl").read_text().splitlines() for n, t in TASKS.items()}
    (HERE / "mix_eval.jsonl").write_text("\n".join(evals["extract"] + evals["meetings"]) + "\n")
    router = f"router-e{epochs}"
    router_dir = ROOT / "runs" / router
    if not (router_dir / "router.safetensors").exists():
        overrides = ["method=router", f"router.adapters={json.dumps({n: f'runs/{n}' for n in TASKS})}",
                     f"data.train={HERE / 'mix_train.jsonl'}", "data.eval=null", "eval.generate=false",
                     f"output_dir={router_dir}", "train.lr=5e-3", f"train.epochs={epochs}"]
        train(TASKS["extract"] / "config.yaml", *overrides)
    path = HERE / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for model in [*TASKS, router]:
        if model not in results:
            results[model] = evaluate(model, router_dir)
            path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{'model':<12} {'extract':>8} {'meetings':>9} {'mixed':>7}")
    for model, scores in results.items():
        print(f"{model:<12} " + " ".join(f"{100 * scores[k]:>8.1f}" for k in ("extract", "meetings", "mixed")))


def evaluate(model_name: str, router_dir: Path) -> dict[str, float]:
    """Greedy exact match of one model (a task adapter, or the router over both) on each eval set and the mix."""
    from lorakit import load_adapter, set_adapter
    from lorakit.data import DataOptions, load_examples
    from lorakit.evaluate import exact_match
    from lorakit.models import load_model
    from lorakit.router import load_router

    model, tok = load_model("smollm2-135m-instruct", dtype=torch.float32)
    sets = {n: load_examples(t / "eval.jsonl", tok, DataOptions()) for n, t in TASKS.items()}
    if model_name in TASKS:
        load_adapter(model, ROOT / "runs" / model_name, adapter_name=model_name)
        set_adapter(model, model_name)
    else:
        load_router(model, router_dir)
    scores = {n: exact_match(model, tok, ex, max_new_tokens=48)[0] for n, ex in sets.items()}
    scores["mixed"] = sum(scores[n] * len(sets[n]) for n in sets) / sum(len(s) for s in sets.values())
    return scores


if __name__ == "__main__":
    main()
