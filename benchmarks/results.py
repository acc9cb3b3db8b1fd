"""Shared by the benchmark scripts: entries go into RESULTS.md newest first; the Llama shapes of
the random-weight models they build from config (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "RESULTS.md"
LLAMA_SIZES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),  # 1.2 B parameters with SmolLM2's 49 152-token vocabulary, untied
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}


def hf_batch(batch: dict) -> dict:
    """A lorakit batch as a transformers model's forward takes it: lorakit's own keys (NEFTune's
    ``example_lengths``) left out."""
    return {k: v for k, v in batch.items() if k != "example_lengths"}


def random_llama(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``random-<size>``: a Llama of ``LLAMA_SIZES[size]`` with random weights (seed 0), SmolLM2's
    49 152-token vocabulary and an untied head, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, tie_word_embeddings=False, **LLAMA_SIZES[name.removeprefix("random-")])
    return LlamaForCausalLM(cfg).to(device, dtype).eval()


def add_random_adapters(model: torch.nn.Module, n: int, g: torch.Generator) -> list[str]:
    """Adapters ``a0`` … ``a{n-1}`` on ``model`` (r=16, all linear layers, not trainable), every A
    and B drawn from N(0, 0.02²) with ``g``; returns their names."""
    import lorakit
    from lorakit.layers import lora_layers

    names = [f"a{i}" for i in range(n)]
    for name in names:
        lorakit.add_adapter(model, lorakit.LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"), name,
                            trainable=False)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.adapter_names:
                for p in layer.adapter_parameters(name):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return names


def machine(device: torch.device | str | None = None) -> str:
    """The machine in words for a table's heading: the GPU's name, or the CPU's model, its vector
    instruction set as torch uses it and the thread count (CPU speed across sessions differs by
    ISA: the same 2 cores gave a 65 GFLOP/s fp32 matmul peak with AVX2 and 211 with AVX-512)."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                           else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU {name} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads"


def append_entry(text: str) -> None:
    """Insert ``text`` (a '## ' section) before the newest existing entry."""
    content = RESULTS.read_text()
    i = content.find("\n## ")
    text = text.strip("\n") + "\n"
    RESULTS.write_text(content[:i].rstrip("\n") + "\n\n" + text + content[i:] if i >= 0
                       else content.rstrip("\n") + "\n\n" + text)


def report(lines: list[str], save: bool) -> None:
    """Print a result section (its lines) and, with ``save``, append it to RESULTS.md."""
    text = "\n".join(lines)
    print(text)
    if save:
        append_entry(text)
