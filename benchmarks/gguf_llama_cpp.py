"""A fine-tune exported to GGUF, run by llama.cpp: does it give the answers lorakit's model gives?

Merges ``--adapter`` into the embedded SmolLM2-135M-Instruct and writes one GGUF file per
``--dtypes`` entry (``lorakit merge --out X.gguf``), then answers the bundled demo task's eval
prompts greedily with llama.cpp (through ``llama-cpp-python``: the file's own tokenizer, chat
prompt given as text) and with lorakit (base + adapter, unmerged, fp32); also the adapter alone
(``lorakit export-adapter``) applied by llama.cpp with ``--lora`` to an fp16 base GGUF and to the
shipped Q4_1 file. Reports per runtime: exact
match against the reference answers, the share of answers identical to lorakit's, the share of
prompts llama.cpp tokenizes to the same ids as transformers, the file size and the time; prints
the table and appends it to benchmarks/RESULTS.md.

    make demo                                           # trains runs/extract first
    pip install llama-cpp-python                        # builds llama.cpp (not a lorakit dependency)
    python benchmarks/gguf_llama_cpp.py --adapter runs/extract [--n 200] [--no-save]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from lorakit.data import load_examples
from lorakit.evaluate import exact_match, normalise
from lorakit.export import export_merged
from lorakit.gguf_export import write_gguf, write_gguf_adapter
from lorakit.io import load_adapter
from lorakit.models import DEFAULT_MODEL, load_model, source_gguf
from lorakit.train_config import load_config
from results import machine, report

ROOT = Path(__file__).resolve().parent.parent


def llama_cpp_answers(path: Path, prompts: list[str], max_new_tokens: int, threads: int, lora: Path | None = None):
    """(answers, token ids llama.cpp gives each prompt, seconds) for greedy decoding of ``prompts``
    (with the adapter GGUF ``lora`` applied at scale 1)."""
    from llama_cpp import Llama

    extra = {"lora_path": str(lora)} if lora else {}
    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_batch=512, verbose=False, seed=0, **extra)
    answers, ids = [], []
    start = time.perf_counter()
    for prompt in prompts:
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        ids.append(tokens)
        out = llm.create_completion(tokens, max_tokens=max_new_tokens, temperature=0.0, top_k=1)
        answers.append(out["choices"][0]["text"])
    return answers, ids, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=str(ROOT / "runs" / "extract"))
    parser.add_argument("--config", default=str(ROOT / "examples" / "extract" / "config.yaml"))
    parser.add_argument("--n", type=int, default=200, help="eval examples (the demo has 200)")
    parser.add_argument("--dtypes", default="fp16,q8_0,q4_0")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("needs llama-cpp-python: pip install llama-cpp-python (it compiles llama.cpp)")
    if not (Path(args.adapter) / "adapter_config.json").exists():
        sys.exit(f"no adapter in {args.adapter}: run `make demo` (or lorakit train) first")
    threads = torch.get_num_threads()

    config = load_config(args.config)
    model, tokenizer = load_model(DEFAULT_MODEL)
    load_adapter(model, args.adapter)
    examples = load_examples(ROOT / config.data.eval, tokenizer, config.data_options())[:args.n]
    prompts = [e.prompt for e in examples]
    start = time.perf_counter()
    ours_em, pairs = exact_match(model, tokenizer, examples, max_new_tokens=args.max_new_tokens, batch_size=16)
    ours_s = time.perf_counter() - start
    ours = [a for _, a in pairs]
    hf_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]

    rows = [f"| lorakit (transformers, base + adapter unmerged) | fp32 | — | {100 * ours_em:.1f}% | — | — | "
            f"{ours_s:.0f} s (batches of 16) |"]

    def row(what: str, dtype: str, files: list[Path], lora: Path | None = None) -> None:
        answers, ids, seconds = llama_cpp_answers(files[0], prompts, args.max_new_tokens, threads, lora)
        em = sum(normalise(a) == normalise(e.reference) for a, e in zip(answers, examples)) / len(examples)
        same = sum(normalise(a) == normalise(b) for a, b in zip(answers, ours)) / len(examples)
        tokenized = sum(a == b for a, b in zip(ids, hf_ids)) / len(examples)
        size = sum(f.stat().st_size for f in files) / 2**20
        rows.append(f"| llama.cpp (llama-cpp-python {llama_cpp.__version__}): {what} | {dtype} | {size:.0f} MiB | {100 * em:.1f}% | "
                    f"{100 * same:.1f}% | {100 * tokenized:.1f}% | {seconds:.0f} s (one prompt at a time) |")

    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            path = Path(tmp) / f"extract-{dtype}.gguf"
            export_merged(DEFAULT_MODEL, [(args.adapter, 1.0)], path, dtype=dtype)
            row("`lorakit merge --out x.gguf`", dtype, [path])
        lora = Path(tmp) / "extract-lora.gguf"
        write_gguf_adapter(args.adapter, model.config, lora, dtype="fp16")
        base = Path(tmp) / "base-fp16.gguf"
        base_model, _ = load_model(DEFAULT_MODEL)
        write_gguf(base_model, tokenizer, base, dtype="fp16", tokenizer_pre="smollm")
        row("lorakit's fp16 base GGUF + `lorakit export-adapter` (`--lora`)", "fp16 + fp16 adapter", [base, lora], lora)
        shipped = source_gguf(DEFAULT_MODEL)
        row("the shipped Q4_1 GGUF alone (no adapter: the base's score)", "q4_1", [shipped])
        row("the shipped Q4_1 GGUF + `lorakit export-adapter` (`--lora`)", "q4_1 + fp16 adapter", [shipped, lora],
            lora)
    adapter = Path(args.adapter).resolve()
    shown = adapter.relative_to(ROOT) if adapter.is_relative_to(ROOT) else adapter
    lines = [f"## GGUF export run by llama.cpp ({time.strftime('%Y-%m-%d')})", "",
             f"{machine()}; torch {torch.__version__}; adapter {shown} merged into {DEFAULT_MODEL}; "
             f"{len(examples)} eval prompts of the demo task, greedy, ≤ {args.max_new_tokens} new tokens.", "",
             "| runtime | weights | file | exact match | same answer as lorakit | prompt ids = transformers' | time |",
             "|---|---|---|---|---|---|---|", *rows]
    report(lines, save=not args.no_save)


if __name__ == "__main__":
    main()
