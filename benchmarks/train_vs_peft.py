"""lorakit's trainer vs PEFT + transformers.Trainer on the same work, side by side in one run.

Same model, same bundled data (its real length distribution), same LoRA config (r=16, alpha=32,
all linear layers, no dropout), same batch, optimizer steps, lr schedule and seed. PEFT is set up as
its documentation does it: ``get_peft_model`` + ``Trainer`` with a dynamic-padding collator. Each
side runs in its own subprocess so that peak memory (RSS on CPU, ``max_memory_allocated`` on GPU)
is its own; on Linux CPUs also the peak of its anonymous part (heap and tensors, without memory-
mapped files such as the checkpoint's weights), sampled every 5 ms. Wall time is each side's training loop (lorakit's ``train_s``; the Trainer's
``on_train_begin`` to ``on_train_end``): model loading, tokenization and lorakit's closing save,
loss plot and model card are outside it on both sides. ``--padded`` instead feeds both sides
identical pre-padded batches in a plain loop (forward, backward, AdamW) so that only the per-token
kernels are compared. ``--dora`` trains DoRA adapters on both sides. On the CPU both sides run fp32 unless ``--bf16`` puts both under bf16
autocast (lorakit's ``train.bf16: true``; worth it on CPUs with native bf16, see the README).
On a CPU, lorakit's fused nodes run their fp32 products on oneDNN where it beats torch's BLAS
(``kernels.gemm``; the table's header says which); PEFT's go through torch's BLAS, as for any user
of it. ``LORAKIT_CPU_GEMM=blas`` puts lorakit on the BLAS too, to separate the two gains.

    python benchmarks/train_vs_peft.py [--steps 20] [--padded] [--repeats 2] [--bf16] [--dora]
    python benchmarks/train_vs_peft.py --model random-1b --tokenizer DIR     # on a GPU

Prints a table of supervised tokens/s, wall time, peak memory, final loss and ratios, and appends
it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
DATA = HERE.parent / "examples" / "extract" / "train.jsonl"
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def model_dir(name: str, tokenizer: str | None) -> str:
    """A local model directory: the embedded model's cache, or a random Llama built from config."""
    if not name.startswith("random-"):
        from lorakit.models import resolve_model_dir

        return str(resolve_model_dir(name)[0])
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    from results import LLAMA_SIZES

    size = LLAMA_SIZES[name.removeprefix("random-")]
    path = Path(tempfile.gettempdir()) / f"lorakit-bench-{name}"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **size)
        LlamaForCausalLM(cfg).to(torch.bfloat16 if torch.cuda.is_available() else torch.float32).save_pretrained(path)
        tok.save_pretrained(path)
    return str(path)


def bf16(args: argparse.Namespace) -> bool:
    """Both sides' matmuls under bf16 autocast: always on a GPU; on the CPU with ``--bf16`` (PEFT's
    ``TrainingArguments(bf16=True)``, lorakit's ``train.bf16: true``), else fp32 on both."""
    return torch.cuda.is_available() or args.bf16


def gemm_note() -> str:
    """Which library lorakit's fp32 CPU products ran on (``kernels.gemm``); PEFT's always use torch's BLAS."""
    from lorakit.kernels.gemm import CPU_GEMM, uses_onednn

    if torch.cuda.is_available():
        return ""
    where = "oneDNN" if uses_onednn(torch.device("cpu"), torch.float32) else "torch's BLAS"
    return f", lorakit's fp32 products on {where} (LORAKIT_CPU_GEMM={CPU_GEMM}; PEFT's on torch's BLAS)"


def peak_memory() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def anonymous_peak() -> dict[str, int]:
    """On Linux CPUs: a thread sampling this process's anonymous resident memory (``RssAnon``: heap
    and tensors, not memory-mapped files such as a checkpoint's weights) every 5 ms; the dict it
    returns holds the peak so far under "bytes". Empty elsewhere."""
    import threading

    peak: dict[str, int] = {}
    if torch.cuda.is_available() or not Path("/proc/self/status").exists():
        return peak

    def sample() -> None:
        while True:
            with open("/proc/self/status") as status:
                kib = next(int(x.split()[1]) for x in status if x.startswith("RssAnon:"))
            peak["bytes"] = max(peak.get("bytes", 0), kib * 1024)
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    return peak


def examples(path: str, n: int) -> tuple[Any, list[Any]]:
    from transformers import AutoTokenizer

    from lorakit.data import DataOptions, load_examples

    tok = AutoTokenizer.from_pretrained(path)
    return tok, load_examples(DATA, tok, DataOptions(max_seq_len=256))[:n]


def run_lorakit(args: argparse.Namespace, path: str) -> dict[str, Any]:
    from lorakit.train import Trainer
    from lorakit.train_config import build_config

    out = tempfile.mkdtemp()
    trainer = Trainer(build_config({
        "model": {"name": path}, "lora": LORA, "data": {"train": str(DATA), "max_seq_len": 256},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "lr": args.lr, "warmup_ratio": 0.1,
                  "bf16": bf16(args),
                  "schedule": "cosine", "max_grad_norm": 1.0, "resume": "never", "save_steps": 0,
                  "save_total_limit": 0},
        "output_dir": out, "seed": 0}), progress=False, log=lambda _: None)
    trainer.checkpoint = lambda: None  # type: ignore[method-assign]  # time training, not disk writes
    result = trainer.run()  # train_s: the training loop only (not the final save, plot and model card)
    return {"wall_s": result.train_s, "supervised_tokens": result.tokens, "final_loss": result.train_loss}


def run_peft(args: argparse.Namespace, path: str) -> dict[str, Any]:
    import peft
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tok, exs = examples(path, args.steps * args.batch * 2)
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA))
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in exs]
    supervised = {"n": 0}

    class Counting(DataCollatorForSeq2Seq):
        def __call__(self, features: list[dict[str, Any]], return_tensors: Any = None) -> dict[str, Any]:
            batch = super().__call__(features, return_tensors)
            supervised["n"] += int((batch["labels"][:, 1:] != -100).sum())
            return batch

    targs = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch,
                              max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="cosine",
                              warmup_steps=round(0.1 * args.steps), max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                              report_to=[], bf16=bf16(args), use_cpu=not cuda, seed=0, disable_tqdm=True,
                              dataloader_num_workers=0)
    clock: dict[str, float] = {}

    class Clock(TrainerCallback):  # the training loop only, as lorakit's train_s
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            clock["start"] = time.perf_counter()

        def on_train_end(self, *_: Any, **__: Any) -> None:
            clock["end"] = time.perf_counter()

    trainer = Trainer(model=model, args=targs, train_dataset=rows, callbacks=[Clock()],
                      data_collator=Counting(tok, padding=True, label_pad_token_id=-100))
    trainer.train()
    wall = clock["end"] - clock["start"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"wall_s": wall, "supervised_tokens": supervised["n"], "final_loss": losses[-1]}


def run_padded(args: argparse.Namespace, path: str, side: str) -> dict[str, Any]:
    """Both sides: identical pre-padded batches, a plain loop of forward, backward and AdamW."""
    import peft
    from transformers import AutoModelForCausalLM

    import lorakit
    from lorakit.attention import padding_free
    from lorakit.collate import collate
    from lorakit.kernels.cast import cached_casts
    from lorakit.kernels.gemm import TOKEN_MULTIPLE, onednn_scope
    from lorakit.loss import causal_lm_loss
    from lorakit.mlp import fused_mlp
    from lorakit.norm import fused_norms
    from results import hf_batch

    tok, exs = examples(path, args.steps * args.batch)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32).to(device)
    torch.manual_seed(0)
    if side == "lorakit":
        lorakit.get_lora_model(model, lorakit.LoraConfig(**LORA))
    else:
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **LORA))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    # token counts a multiple of TOKEN_MULTIPLE (32) on both sides, as lorakit's trainer pads them where oneDNN runs its products
    # (kernels.gemm; a few columns a batch, HF's pad_to_multiple_of does the same for GPUs)
    batches = [collate([[e] for e in exs[k:k + args.batch]], tok.pad_token_id, multiple=TOKEN_MULTIPLE)
               for k in range(0, len(exs), args.batch)]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16(args))
    tokens, loss_value = 0, 0.0
    start = time.perf_counter()
    with contextlib.ExitStack() as kernels:
        if side == "lorakit":  # the trainer's per-token kernels (no padding-free batches: both sides pad)
            kernels.enter_context(fused_mlp(model))
            kernels.enter_context(fused_norms(model))
            kernels.enter_context(cached_casts(release=not cuda))  # as the trainer: fp32 originals paged out
            kernels.enter_context(onednn_scope())  # as the trainer: fp32 CPU products on oneDNN where faster
            if bf16(args) and not cuda:  # as the trainer: padded attention under CPU bf16 in fp32
                kernels.enter_context(padding_free(model))
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:
                if side == "lorakit":
                    loss_sum, n = causal_lm_loss(model, batch)
                    loss = loss_sum / n
                else:
                    loss = model(**hf_batch(batch)).loss
                    n = int((batch["labels"][:, 1:] != -100).sum())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens, loss_value = tokens + n, float(loss.detach())
    if cuda:
        torch.cuda.synchronize()
    return {"wall_s": time.perf_counter() - start, "supervised_tokens": tokens, "final_loss": loss_value}


def child(args: argparse.Namespace) -> None:
    path = model_dir(args.model, args.tokenizer)
    anon = anonymous_peak()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if args.padded:
        result = run_padded(args, path, args.side)
    else:
        result = run_lorakit(args, path) if args.side == "lorakit" else run_peft(args, path)
    result["peak_memory_bytes"] = peak_memory()
    if anon:
        result["peak_anon_bytes"] = anon["bytes"]
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokenizer", help="tokenizer directory for random-* models")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--padded", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="CPU: both sides under bf16 autocast (a GPU always is)")
    ap.add_argument("--dora", action="store_true", help="both sides train DoRA adapters (use_dora) instead of LoRA")
    ap.add_argument("--side", choices=["lorakit", "peft"])
    ap.add_argument("--repeats", type=int, default=1, help="runs per side, alternating which goes first")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.dora:
        LORA["use_dora"] = True
    if args.side:
        return child(args)
    model_dir(args.model, args.tokenizer)  # build once, before either side is timed
    runs: dict[str, list[dict[str, Any]]] = {"peft": [], "lorakit": []}
    for k in range(args.repeats):  # ABBA order: a slow spell of a shared machine hits both sides
        for side in ("peft", "lorakit") if k % 2 == 0 else ("lorakit", "peft"):
            cmd = [sys.executable, __file__, "--side", side, *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{side} side failed:\n{out.stderr[-3000:]}")
            r = json.loads(line[len("RESULT "):])
            r["tokens_per_s"] = r["supervised_tokens"] / r["wall_s"]
            runs[side].append(r)
    # each side: the median of its runs (throughput and wall time; the largest peak memory)
    p, o = ({**rs[0], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
             "wall_s": statistics.median(r["wall_s"] for r in rs),
             "peak_memory_bytes": max(r["peak_memory_bytes"] for r in rs),
             "peak_anon_bytes": max(r.get("peak_anon_bytes", 0) for r in rs)} for rs in (runs["peft"], runs["lorakit"]))
    pairs = [lo["tokens_per_s"] / pe["tokens_per_s"] for pe, lo in zip(runs["peft"], runs["lorakit"], strict=True)]
    cuda = torch.cuda.is_available()
    mem = "max_memory_allocated" if cuda else "peak RSS"
    variant = "identical padded batches, plain loop" if args.padded else "each side's own trainer, dynamic padding"
    variant += ", DoRA" if args.dora else ""
    import peft
    import transformers

    sys.path.insert(0, str(HERE))
    from results import machine, report

    anon = bool(p["peak_anon_bytes"] and o["peak_anon_bytes"])
    lines = [f"## {time.strftime('%Y-%m-%d')} — training, lorakit vs PEFT + Trainer ({variant}), {args.model} on {machine()}",
             "", f"`python benchmarks/train_vs_peft.py --model {args.model} --steps {args.steps}"
             f"{f' --batch {args.batch}' if args.batch != 8 else ''}{f' --repeats {args.repeats}' if args.repeats > 1 else ''}"
             f"{' --padded' if args.padded else ''}{' --bf16' if args.bf16 else ''}{' --dora' if args.dora else ''}`: "
             f"batch {args.batch}, {'DoRA' if args.dora else 'LoRA'} r=16, alpha=32, all linear layers, lr {args.lr}, {'bf16 autocast' if bf16(args) else 'fp32'}{gemm_note()}; "
             f"torch {torch.__version__}, transformers "
             f"{transformers.__version__}, peft {peft.__version__}.", "",
             f"| side | supervised tokens/s | wall s | {mem} |{' of it anonymous (peak) |' if anon else ''} "
             f"final train loss |", "|---|---|---|---|---|" + ("---|" if anon else "")]
    for side, r in (("PEFT + Trainer" if not args.padded else "PEFT", p), ("lorakit", o)):
        lines.append(f"| {side} | {r['tokens_per_s']:.1f} | {r['wall_s']:.1f} | "
                     f"{r['peak_memory_bytes'] / 2**30:.2f} GiB |"
                     + (f" {r['peak_anon_bytes'] / 2**30:.2f} GiB |" if anon else "") + f" {r['final_loss']:.4f} |")
    lines += ["", f"lorakit / PEFT: throughput {o['tokens_per_s'] / p['tokens_per_s']:.2f}×, peak memory "
                  f"{o['peak_memory_bytes'] / p['peak_memory_bytes']:.2f}×"
                  + (f" (anonymous {o['peak_anon_bytes'] / p['peak_anon_bytes']:.2f}×)" if anon else "")
                  + (f" ({args.repeats} runs a side in ABBA order: median throughput, largest peak memory; "
                     f"each pair's throughput ratio: "
                     f"{', '.join(f'{x:.2f}×' for x in pairs)})" if args.repeats > 1 else "") + ".", ""]
    report(lines, save=not args.no_save)


if __name__ == "__main__":
    main()
