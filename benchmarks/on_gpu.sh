#!/usr/bin/env bash
# Every GPU measurement issue 7 asks for, in three calls of the `device` tool's run (H100 or H200),
# each with carry [".gpu"] and one of the train/serve commands (each fits the tool's 10 minutes a call):
#
#   bash benchmarks/on_gpu.sh prepare   # first, HERE (not on the device): writes .gpu/tok (git-ignored)
#   bash benchmarks/on_gpu.sh train     # train_vs_peft.py: each side's own trainer (2 ABBA pairs), then padded
#   bash benchmarks/on_gpu.sh train 32  # the same at batch 32 (saved_memory.py predicts 0.48x PEFT's peak
#                                       # there, 0.74x at batch 8, where the 1.2 B model's weights dominate)
#   bash benchmarks/on_gpu.sh serve     # multi_adapter.py: PyTorch and Triton mixed-batch kernels vs PEFT;
#                                       # engine_cache.py: the serving engine's in-place KV cache
#   bash benchmarks/on_gpu.sh dora      # (if device time is left) train_vs_peft.py --dora: the fused DoRA
#                                       # node on CUDA against PEFT's DoRA
#
# `.gpu/tok` holds the SmolLM2 tokenizer (the bundled data's token counts); the 1.2 B Llama has
# random weights built from config, nothing is downloaded. Tables go to $OUT (the device's
# RESULTS.md is not copied back): paste them into benchmarks/RESULTS.md with the device named.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src
out=${OUT:-/tmp}
case "${1:-}" in prepare|train|serve|dora) ;; *) echo "usage: bash benchmarks/on_gpu.sh prepare|train|serve|dora" >&2; exit 2 ;; esac
if [ "$1" = prepare ]; then  # the embedded model's tokenizer, saved where the device calls carry it from
  "${PYTHON:-.venv/bin/python}" -c "
from transformers import AutoTokenizer
from lorakit.models import ensure_converted
AutoTokenizer.from_pretrained(ensure_converted('smollm2-135m-instruct')).save_pretrained('.gpu/tok')"
  ls .gpu/tok
  exit 0
fi
[ -f .gpu/tok/tokenizer.json ] || { echo "no .gpu/tok: run 'bash benchmarks/on_gpu.sh prepare' here, then carry .gpu" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
case "$1" in
  train)
    batch=${2:-8}
    python3 benchmarks/train_vs_peft.py --model random-1b --tokenizer .gpu/tok --steps 40 --batch "$batch" \
      --repeats 2 --no-save | tee "$out/train_vs_peft_b$batch.txt"
    python3 benchmarks/train_vs_peft.py --model random-1b --tokenizer .gpu/tok --steps 40 --batch "$batch" \
      --padded --no-save | tee "$out/train_vs_peft_padded_b$batch.txt"
    ;;
  dora)
    python3 benchmarks/train_vs_peft.py --model random-1b --tokenizer .gpu/tok --steps 40 --dora --no-save \
      | tee "$out/train_vs_peft_dora.txt"
    ;;
  serve)
    python3 benchmarks/multi_adapter.py --model random-1b --repeat 20 --no-save | tee "$out/multi_adapter.txt"
    python3 benchmarks/engine_cache.py --model random-1b --tokenizer .gpu/tok --rows 32 --prompt-len 2048 --no-save \
      | tee "$out/engine_cache.txt"
    ;;
esac
