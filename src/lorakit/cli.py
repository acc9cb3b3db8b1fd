"""The ``lorakit`` command: the only module that knows about argv and the terminal."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorakit.train import TrainResult

from lorakit.errors import LorakitError
from lorakit.models import DEFAULT_MODEL

# Errors a user can fix (bad config, bad file, unknown model): printed as one line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (LorakitError, ValueError, FileNotFoundError)


def _targets(args: argparse.Namespace) -> list[str] | str | None:
    if args.target_regex:
        return args.target_regex
    if args.target_modules:
        return "all-linear" if args.target_modules == "all-linear" else args.target_modules.split(",")
    return None


def cmd_inspect(args: argparse.Namespace) -> int:
    """List module names and types grouped by pattern, and which ones the given targets would wrap."""
    from lorakit.config import LoraConfig
    from lorakit.inject import block_pattern, group_module_names, resolve_targets
    from lorakit.models import load_model

    model, _ = load_model(args.model)
    targets = _targets(args)
    wrapped: set[str] = set()
    if targets is not None:
        wrapped = {block_pattern(n) for n in resolve_targets(model, LoraConfig(target_modules=targets))}
    leaves = {n for n, m in model.named_modules() if n and not list(m.children())}
    leaf_patterns = {block_pattern(n) for n in leaves}
    rows = [(p, t, c) for p, t, c in group_module_names(model) if p in leaf_patterns]
    total = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__}: {total:,d} parameters, {len(leaves)} leaf modules")
    width = max(len(p) for p, _, _ in rows)
    header = f"{'module':<{width}}  {'type':<16} {'count':>5}"
    print(header + ("  wrapped" if targets is not None else ""))
    for pattern, type_name, count in rows:
        mark = ("  yes" if pattern in wrapped else "") if targets is not None else ""
        print(f"{pattern:<{width}}  {type_name:<16} {count:>5}{mark}")
    if targets is not None:
        print(f"target_modules={targets!r} wraps {sum(c for p, _, c in rows if p in wrapped)} modules")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job end to end on the embedded model: base score, LoRA training, adapted score."""
    from pathlib import Path

    from lorakit.evaluate import exact_match, generate_answers
    from lorakit.merge import disable_adapter
    from lorakit.train import Trainer
    from lorakit.train_config import load_config

    if not Path(args.config).exists():
        raise ValueError(f"{args.config} not found: run `make demo` from the repository root")
    config = load_config(args.config, args.overrides)
    trainer = Trainer(config)
    sample = trainer.eval_examples[0]
    with disable_adapter(trainer.model):
        base_em, _ = exact_match(trainer.model, trainer.tokenizer, trainer.eval_examples,
                                 max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size)
        before = generate_answers(trainer.model, trainer.tokenizer, [sample.prompt], max_new_tokens=48)[0]
    print(f"base model exact match on {len(trainer.eval_examples)} held-out examples: {100 * base_em:.1f}%")
    result = trainer.run()
    if result.interrupted:
        return 130
    after = generate_answers(trainer.model, trainer.tokenizer, [sample.prompt], max_new_tokens=48)[0]
    out = result.output_dir
    print(f"\n{run_summary(result)}")
    print(f"exact match: base {100 * base_em:.1f}% -> LoRA {100 * result.metrics.get('exact_match', 0.0):.1f}%")
    print(f"adapter: {out}/adapter_model.safetensors  metrics: {out}/metrics.jsonl  plot: {out}/loss.png")
    print(f"\nsample ({sample.source})\n  expected: {sample.reference}\n  before:   {before.strip()}\n"
          f"  after:    {after.strip()}")
    return 0


def run_summary(result: TrainResult) -> str:
    """One line on what ``trainer.run()`` did: the steps trained in this process, or that the output
    directory already held the finished run (resumed at its end: only evaluated again)."""
    if result.resumed_from >= result.steps:
        return (f"{result.output_dir} already held the finished run ({result.steps} steps): evaluated it again in "
                f"{result.elapsed_s:.0f} s; delete it or add train.resume=never to train from scratch")
    loss = f", final train loss {result.train_loss:.4f}" if result.train_loss is not None else ""
    return (f"trained {result.steps - result.resumed_from} steps"
            + (f" (resumed at step {result.resumed_from})" if result.resumed_from else "")
            + f" in {result.train_s / 60:.1f} min (then {result.elapsed_s - result.train_s:.0f} s of evaluation){loss}; "
            f"trainable {100 * result.trainable_params / result.total_params:.2f}% of {result.total_params:,d} parameters")


def cmd_train(args: argparse.Namespace) -> int:
    """Train from a YAML config with dotted overrides; or show the resolved config / one example."""
    from lorakit.train_config import dump_config, load_config

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    if args.show_example is not None:
        from lorakit.data import load_examples, show_example
        from lorakit.models import load_model

        _, tokenizer = load_model(config.model.name)
        from lorakit.preference import load_pairs

        pairs = config.objective != "sft"
        options = config.data_options()
        examples = (load_pairs(config.data.train, tokenizer, options, config.objective) if pairs
                    else load_examples(config.data.train, tokenizer, options))
        if not 0 <= args.show_example < len(examples):
            raise ValueError(f"--show-example must be in 0..{len(examples) - 1}")
        shown = examples[args.show_example]
        names = ("chosen", "rejected")
        if config.objective == "kto":
            names = ("desirable" if shown.desirable else "undesirable", "mismatched, for the KL estimate")
        sides = zip(names, shown) if pairs else [("", shown)]
        print("\n\n".join((f"[{name}]\n" if name else "") + show_example(e, tokenizer) for name, e in sides))
        return 0
    if args.nproc and args.nproc > 1:
        import subprocess

        from lorakit.distributed import torchrun_command

        overrides = list(args.overrides)
        if not any(o.startswith("train.distributed=") for o in overrides):
            overrides.append("train.distributed=ddp")
        return subprocess.call(torchrun_command(args.nproc, [args.config, *overrides]))
    from lorakit.train import train

    result = train(config)
    if result.interrupted:
        return 130
    import os

    if os.environ.get("RANK", "0") != "0":
        return 0
    print(run_summary(result))
    for key, value in result.metrics.items():
        print(f"  {key}: {value:.4f}")
    out = result.output_dir
    print(f"adapter: {out}  metrics: {out / 'metrics.jsonl'}  plot: {out / 'loss.png'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Eval loss, perplexity and exact match of a model (with optional adapters) on a data file, or
    preference pairs' ranking accuracy and rewards (judged answers: KTO's) against the base."""
    from lorakit.evaluate import evaluate_file

    metrics = evaluate_file(args.model, args.data, adapters=args.adapter or [], generate=not args.no_generate,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            max_examples=args.max_examples, beta=args.beta)
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def _load_with_adapters(model_name: str, adapters: list[str] | None):
    from lorakit.io import load_adapters
    from lorakit.models import load_model

    model, tokenizer = load_model(model_name)
    load_adapters(model, adapters or [])
    model.requires_grad_(False)  # inference only: every weight frozen, so frozen layers' fast paths apply
    return model, tokenizer


def _sampling(args: argparse.Namespace):
    from lorakit.generate import SamplingOptions

    return SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           stop=args.stop or (), seed=args.seed)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate for one prompt (streamed) or for every row of a JSONL file (JSONL out)."""
    import json

    from lorakit.generate import generate, prompt_ids

    if (args.prompt is None) == (args.file is None):
        raise ValueError("give exactly one of --prompt TEXT or --file PROMPTS.jsonl")
    model, tokenizer = _load_with_adapters(args.model, args.adapter)
    options = _sampling(args)
    if args.prompt is not None:
        generate(model, tokenizer, prompt_ids(tokenizer, args.prompt, chat=not args.raw, system=args.system),
                 options, on_text=_write)
        _write("\n")
        return 0
    from lorakit.data import prompt_of, read_rows

    for row in read_rows(args.file):
        prompt = prompt_of(row)
        text = generate(model, tokenizer, prompt_ids(tokenizer, prompt, chat=not args.raw, system=args.system),
                        options)
        print(json.dumps({**row.data, "completion": text}), flush=True)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive multi-turn chat; /reset clears the history, /exit (or end of input) quits."""
    from lorakit.generate import chat_input_ids, generate

    model, tokenizer = _load_with_adapters(args.model, args.adapter)
    options = _sampling(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    print("chat with the model: /reset clears the history, /exit quits", flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        line = line.strip()
        if line == "/exit":
            break
        if line == "/reset":
            history = []
            print("(history cleared)", flush=True)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        _write("assistant> ")
        answer = generate(model, tokenizer, chat_input_ids(tokenizer, system + history), options, on_text=_write)
        _write("\n")
        history.append({"role": "assistant", "content": answer.strip()})
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge weighted adapters into the base and write a plain model directory or a GGUF file."""
    from lorakit.export import export_merged, parse_adapter_arg

    report = export_merged(args.model, [parse_adapter_arg(a) for a in args.adapter], args.out,
                           dtype=args.dtype, safe=args.safe, tokenizer_pre=args.tokenizer_pre)
    weights = ", ".join(f"{p} × {w:g}" for p, w in report.adapters)
    base = f"dequantized {report.quantization['method']} base" if report.quantization else "base"
    print(f"merged {weights} into the {base} of {args.model}; wrote {report.out} ({report.dtype})")
    if report.gguf is not None:
        g = report.gguf
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(g.types.items()))
        print(f"gguf: architecture {g.architecture}, {g.tensors} tensors ({kinds}), {g.bytes / 2**20:.1f} MiB")
    print(f"max |logit difference| unmerged vs merged (fp32, probe batch): {report.max_abs_diff:.3g}")
    return 0


def cmd_export_adapter(args: argparse.Namespace) -> int:
    """Write an adapter as llama.cpp's adapter GGUF, for a GGUF of its base model."""
    from lorakit.gguf_export import write_gguf_adapter
    from lorakit.models import model_config

    report = write_gguf_adapter(args.adapter, model_config(args.model), args.out, dtype=args.dtype)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(report.types.items()))
    print(f"wrote {report.path}: llama.cpp LoRA adapter for a "
          f"{report.architecture} base, {report.tensors} tensors ({kinds}), {report.bytes / 2**20:.1f} MiB")
    print(f"use it with a GGUF of {args.model}: llama-cli -m BASE.gguf --lora {report.path}")
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    """Combine weighted adapters into one new adapter (cat / linear / svd) saved in PEFT format."""
    from lorakit.compose import combine_adapters
    from lorakit.export import parse_adapter_arg
    from lorakit.io import load_adapter, save_adapter
    from lorakit.models import load_model

    model, _ = load_model(args.model)
    weights = {}
    for i, spec in enumerate(args.adapter):
        path, weight = parse_adapter_arg(spec)
        load_adapter(model, path, adapter_name=f"adapter{i}", activate=False)
        weights[f"adapter{i}"] = weight
    config = combine_adapters(model, weights, method=args.method, new_name="combined", rank=args.rank)
    save_adapter(model, args.out, adapter_name="combined")
    print(f"combined {len(weights)} adapters ({args.method}) into rank {config.r} over "
          f"{len(config.target_modules)} modules; wrote {args.out}")
    return 0


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--adapter", action="append", help="adapter directory (repeatable; all are active)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--system", help="system prompt")


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the OpenAI-compatible server with the given adapters (``name=DIR``)."""
    from lorakit.models import load_model
    from lorakit.serve import serve

    adapters = {}
    for spec in args.adapter or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=DIR, e.g. --adapter sql=runs/sql")
        adapters[name] = path
    dtype = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.dtype]
    import torch

    model, tokenizer = load_model(args.model, dtype=getattr(torch, dtype) if dtype else None)
    if torch.cuda.is_available():
        model.cuda()
    serve(model, tokenizer, args.served_model_name or args.model, adapters, host=args.host, port=args.port,
          api_key=args.api_key, allow_adapter_updates=args.allow_adapter_updates, adapter_root=args.adapter_root,
          max_batch=args.max_batch, max_loaded=args.max_loaded)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA and QLoRA fine-tuning for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list a model's modules and which ones LoRA targets would wrap")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="embedded name, HF directory or .gguf file")
    p.add_argument("--target-modules", help="comma-separated names (exact or suffix) or 'all-linear'")
    p.add_argument("--target-regex", help="a regex matched against full module names")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("train", help="fine-tune from a YAML config (lorakit train CONFIG.yaml key=value ...)")
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.r=16 train.lr=1e-4")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--show-example", type=int, metavar="N", help="print training example N token by token")
    p.add_argument("--nproc", type=int, help="run on N local processes (starts torchrun; train.distributed=ddp "
                                             "unless set)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a model (and adapters) on a data file")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--adapter", action="append", help="adapter directory (repeatable)")
    p.add_argument("--data", required=True, help="data file or directory")
    p.add_argument("--no-generate", action="store_true", help="skip generation-based exact match")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-examples", type=int, default=0)
    p.add_argument("--beta", type=float, default=0.1,
                   help="preference pairs (judged answers): DPO's (KTO's) beta for the rewards against the base")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate text (streamed) for a prompt or a JSONL file of prompts")
    _add_sampling(p)
    p.add_argument("--prompt", help="the prompt (a user turn for chat models)")
    p.add_argument("--file", help="JSONL rows with 'prompt', 'messages' or 'conversations' (a trailing assistant "
                                  "turn is dropped); prints rows with 'completion'")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat in the terminal")
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("merge", help="merge adapters into the base and save a plain model directory or GGUF file")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--adapter", action="append", required=True, help="DIR or DIR:WEIGHT (repeatable)")
    p.add_argument("--out", required=True, help="output model directory, or FILE.gguf for llama.cpp / Ollama")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16", "q8_0", "q4_0"],
                   help="weights' type; default fp32 for a directory, fp16 for a .gguf --out (q8_0 and q4_0: ggml "
                   "block quantizations, for a .gguf --out only)")
    p.add_argument("--safe", action="store_true", help="refuse NaN/Inf merged weights")
    p.add_argument("--tokenizer-pre", help="GGUF: llama.cpp's pre-tokenizer name (smollm, llama-bpe, qwen2, ...); "
                   "default: the base GGUF's own, else detected from the tokenizer's splitting rules")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export-adapter", help="write an adapter as llama.cpp's LoRA GGUF (llama-cli --lora, "
                       "Ollama ADAPTER)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the adapter's base (for its architecture and shapes)")
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument("--out", required=True, help="output FILE.gguf")
    p.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    p.set_defaults(func=cmd_export_adapter)

    p = sub.add_parser("combine", help="combine weighted adapters into one new adapter (cat, linear or svd)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--adapter", action="append", required=True, help="DIR or DIR:WEIGHT (repeatable)")
    p.add_argument("--method", default="cat", choices=["cat", "linear", "svd"])
    p.add_argument("--rank", type=int, help="target rank for svd (default: the largest input rank)")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.set_defaults(func=cmd_combine)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server, one adapter per request")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--adapter", action="append", help="NAME=DIR (repeatable); requests pick it with \"model\": NAME")
    p.add_argument("--served-model-name", help="the base model's name in requests (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--allow-adapter-updates", action="store_true",
                   help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    p.add_argument("--adapter-root", help="directory that adapters loaded at run time must lie in")
    p.add_argument("--max-batch", type=int, default=64, help="rows in the running batch")
    p.add_argument("--max-loaded", type=int, default=16, help="adapters held in memory (LRU)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="fine-tune the embedded model on the bundled task and compare scores")
    p.add_argument("--config", default="examples/extract/config.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"lorakit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130
