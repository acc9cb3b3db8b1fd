"""Train lorakit's default LoRA recipe on a random-weight Llama built from config, on whatever device
is there (bf16 autocast on CUDA), and report throughput and peak memory.

    python benchmarks/gpu_train_check.py --tokenizer DIR [--size 1b|tiny] [--steps 30]

The tokenizer directory needs tokenizer.json (+ chat template); weights are random (no download).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from results import LLAMA_SIZES as SIZES


def main() -> None:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorakit.train import train

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--size", default="1b", choices=SIZES)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data", default="examples/extract/train.jsonl")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SIZES[args.size])
    work = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train({"model": {"name": str(work / "model")}, "data": {"train": args.data, "max_seq_len": 256},
                    "train": {"max_steps": args.steps, "batch_size": args.batch_size, "resume": "never"},
                    "output_dir": str(work / "out")}, progress=False)
    records = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    steady = sorted(r["tokens_per_s"] for r in records[3:] if "tokens_per_s" in r)
    adapter = load_file(str(work / "out" / "adapter_model.safetensors"))
    print(json.dumps({
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "size": args.size, "params": result.total_params, "trainable": result.trainable_params,
        "steps": result.steps, "first_loss": records[0]["loss"], "final_loss": result.train_loss,
        "supervised_tokens_per_s_median": steady[len(steady) // 2] if steady else None,
        "wall_s": round(time.perf_counter() - start, 1),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "adapter_dtypes": sorted({str(t.dtype) for t in adapter.values()}),
    }, indent=1))


if __name__ == "__main__":
    main()
