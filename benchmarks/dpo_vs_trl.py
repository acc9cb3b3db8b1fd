"""lorakit's DPO (or KTO) against TRL's ``DPOTrainer`` (``KTOTrainer``) + PEFT on the same work, side by side.

Same model (SmolLM2-135M-Instruct), the same bundled preference pairs (``examples/preference``,
the first ``steps × batch`` of them; for ``--objective kto`` the first ``steps × batch / 2`` pairs
as ``steps × batch`` judged answers, TRL's ``unpair_preference_dataset``), the same LoRA config
(r=16, alpha=32, all linear layers, no dropout), β = 0.1, the same batch of pairs (answers),
optimizer steps, lr schedule and seed. KTO's KL estimate pairs each prompt with another answer on
both sides (TRL: the next one in its batch; lorakit: a fixed permutation), so KTO's losses agree at
the first step (0.5) and not exactly after. Both compute
the reference log-probabilities once before training (TRL's ``precompute_ref_log_probs=True``;
with a PEFT model TRL's reference is the base with the adapter switched off) and TRL is set up as
its documentation does it, with its own chat-template tokenization and padding collator. Each
side runs in its own subprocess so that peak RSS is its own. fp32 on the CPU.

    pip install trl datasets   # TRL is not a lorakit dependency
    python benchmarks/dpo_vs_trl.py [--objective dpo|kto] [--steps 16] [--batch 8] [--no-save]

Prints pairs (answers) per second over the whole job (model loaded, data tokenized, trainer built
and trained: TRL's KTOTrainer computes its reference while it is built), the parts' times, peak
RSS, first / final / mean train loss and the ratios, and appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
DATA = HERE.parent / "examples" / "preference" / "train.jsonl"
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
sys.path.insert(0, str(HERE))


def rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The pairs of the run: steps × batch of them, or for KTO half as many (each gives two answers)."""
    n = args.steps * args.batch // (2 if args.objective == "kto" else 1)
    return [json.loads(line) for line in DATA.read_text().splitlines()[:n]]


def run_lorakit(args: argparse.Namespace, path: str) -> dict[str, Any]:
    from lorakit.train import Trainer
    from lorakit.train_config import build_config

    data = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(args)))
    out = tempfile.mkdtemp()
    built = time.perf_counter()
    trainer = Trainer(build_config({
        "model": {"name": path}, "objective": args.objective, "dpo": {"beta": 0.1}, "kto": {"beta": 0.1}, "lora": LORA,
        "data": {"train": str(data), "max_seq_len": 256},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "lr": args.lr, "warmup_ratio": 0.1,
                  "schedule": "cosine", "max_grad_norm": 1.0, "resume": "never", "save_steps": 0, "bf16": False},
        "output_dir": out, "seed": 0}), progress=False, log=lambda _: None)
    trainer.checkpoint = lambda: None  # type: ignore[method-assign]  # time training, not disk writes
    start = time.perf_counter()
    result = trainer.run()
    wall = time.perf_counter() - start
    losses = [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    return {"wall_s": wall, "build_s": start - built, "train_s": result.train_s, "losses": losses}


def run_trl(args: argparse.Namespace, path: str) -> dict[str, Any]:
    import datasets
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
    from trl.data_utils import unpair_preference_dataset

    built = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    kto = args.objective == "kto"
    dataset = datasets.Dataset.from_list(rows(args))
    if kto:
        dataset = unpair_preference_dataset(dataset)
    config = (KTOConfig if kto else DPOConfig)(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=round(0.1 * args.steps), max_grad_norm=1.0,
        beta=0.1, max_length=256, precompute_ref_log_probs=True, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, bf16=False, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    clock: dict[str, float] = {}

    class Clock(TrainerCallback):  # the training loop, as lorakit's train_s
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            clock["start"] = time.perf_counter()

        def on_train_end(self, *_: Any, **__: Any) -> None:
            clock["end"] = time.perf_counter()

    # TRL's KTOTrainer computes the reference log-probabilities while it is built (DPOTrainer in train)
    trainer = (KTOTrainer if kto else DPOTrainer)(
        model=model, args=config, train_dataset=dataset, processing_class=tok, callbacks=[Clock()],
        peft_config=peft.LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA))
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"wall_s": wall, "build_s": start - built, "train_s": clock["end"] - clock["start"], "losses": losses}


def child(args: argparse.Namespace) -> None:
    from train_vs_peft import model_dir, peak_memory

    path = model_dir("smollm2-135m-instruct", None)
    result = run_lorakit(args, path) if args.side == "lorakit" else run_trl(args, path)
    result["peak_memory_bytes"] = peak_memory()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objective", choices=["dpo", "kto"], default="dpo")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--side", choices=["lorakit", "trl"])
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.side:
        return child(args)
    runs: dict[str, dict[str, Any]] = {}
    for side in ("trl", "lorakit"):
        out = subprocess.run([sys.executable, __file__, "--side", side, *sys.argv[1:]], capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{side} side failed:\n{out.stderr[-3000:]}")
        runs[side] = json.loads(line[len("RESULT "):])
    import peft
    import transformers
    import trl

    from results import machine, report

    pairs = args.steps * args.batch
    kto = args.objective == "kto"
    unit, name = ("answers", "KTO") if kto else ("pairs", "DPO")
    what = f"{pairs // 2} bundled pairs as {pairs} judged answers" if kto else f"{pairs} bundled pairs"
    t, o = runs["trl"], runs["lorakit"]
    lines = [f"## {time.strftime('%Y-%m-%d')} — {name}, lorakit vs TRL {name}Trainer + PEFT, smollm2-135m-instruct on "
             f"{machine()}", "", f"`python benchmarks/dpo_vs_trl.py --objective {args.objective} --steps {args.steps} "
             f"--batch {args.batch}`: {what} (examples/preference), {args.batch} a step, LoRA r=16, alpha=32, all linear "
             f"layers, β 0.1, lr {args.lr}, fp32, the reference precomputed on both sides; torch {torch.__version__}, "
             f"transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}.", "",
             f"| side | {unit}/s (built + trained) | s: model loaded, data tokenized, trainer built | s: train call "
             f"(of it training loop) | peak RSS | first / final / mean train loss |",
             "|---|---|---|---|---|---|"]
    for side, r in ((f"TRL {name}Trainer + PEFT", t), ("lorakit", o)):
        losses = r["losses"]
        lines.append(f"| {side} | {pairs / (r['build_s'] + r['wall_s']):.2f} | {r['build_s']:.1f} | {r['wall_s']:.1f} "
                     f"({r['train_s']:.1f}) | {r['peak_memory_bytes'] / 2**30:.2f} GiB | {losses[0]:.4f} / "
                     f"{losses[-1]:.4f} / {sum(losses) / len(losses):.4f} |")
    whole = (t["build_s"] + t["wall_s"]) / (o["build_s"] + o["wall_s"])
    lines += ["", f"lorakit / TRL: throughput {whole:.2f}× built + trained, {t['wall_s'] / o['wall_s']:.2f}× the train "
                  f"call (training loop alone {t['train_s'] / o['train_s']:.2f}×), peak RSS "
                  f"{o['peak_memory_bytes'] / t['peak_memory_bytes']:.2f}×.", ""]
    if kto:
        lines[-1:-1] = ["TRL batches its unpaired rows in order (the desirable half first, "
                        "`train_sampling_strategy='sequential'`), lorakit shuffles, so per-step losses differ in mix; "
                        "TRL's KTOTrainer computes its reference while it is built, lorakit in the train call.", ""]
    report(lines, save=not args.no_save)


if __name__ == "__main__":
    main()
