"""The ``lorakit`` command: the only module that knows about argv and the terminal."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lorakit.models import DEFAULT_MODEL

# Errors a user can fix (bad config, bad file, unknown model): printed as one line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


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
    """Load the embedded model, wrap it with LoRA, report trainable parameters, answer one prompt."""
    import time

    from lorakit import LoraConfig, get_lora_model, print_trainable_parameters
    from lorakit.generate import generate_text
    from lorakit.models import load_model

    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f}s")
    model = get_lora_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    print_trainable_parameters(model)
    prompt = "What is the capital of France?"
    print(f"user: {prompt}\nassistant: {generate_text(model, tokenizer, prompt, max_new_tokens=32)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA and QLoRA fine-tuning for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list a model's modules and which ones LoRA targets would wrap")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="embedded name, HF directory or .gguf file")
    p.add_argument("--target-modules", help="comma-separated names (exact or suffix) or 'all-linear'")
    p.add_argument("--target-regex", help="a regex matched against full module names")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="load the embedded model, wrap it with LoRA and answer one prompt")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"lorakit: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130
