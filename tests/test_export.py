"""`lorakit merge`: full model directories that plain transformers loads, equal to the adapter model."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import lorakit
from conftest import randomize_adapters
from lorakit.quant import quantize_model

CLI = [sys.executable, "-m", "lorakit", "merge"]
IDS = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))


def base(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def make_adapter(tiny_model_dir, path, seed, targets=("q_proj", "v_proj", "up_proj"), quantize=None):
    model = base(tiny_model_dir)
    if quantize:
        quantize_model(model, quantize)
    lorakit.get_lora_model(model, lorakit.LoraConfig(r=4, target_modules=list(targets)))
    randomize_adapters(model, seed=seed, std=0.5)
    lorakit.save_adapter(model, path)
    return model


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def merged(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_merge_cli_writes_a_plain_model_equal_to_the_adapter_model(tiny_model_dir, tmp_path):
    adapted = make_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    proc = subprocess.run([*CLI, "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "a"),
                           "--out", str(tmp_path / "m")], capture_output=True, text=True, check=True)
    assert "max |logit difference| unmerged vs merged" in proc.stdout
    out = merged(tmp_path / "m")
    torch.testing.assert_close(logits(out), logits(adapted), atol=1e-4, rtol=0)
    assert (tmp_path / "m" / "tokenizer.json").exists() and (tmp_path / "m" / "model.safetensors").exists()


def test_weighted_merge_of_two_adapters(tiny_model_dir, tmp_path):
    make_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    make_adapter(tiny_model_dir, tmp_path / "b", seed=2, targets=("v_proj", "down_proj"))
    subprocess.run([*CLI, "--model", str(tiny_model_dir), "--adapter", f"{tmp_path / 'a'}:0.7",
                    "--adapter", f"{tmp_path / 'b'}:0.3", "--out", str(tmp_path / "m")], check=True,
                   capture_output=True)
    reference = base(tiny_model_dir)
    parts = {}
    for name in ("a", "b"):
        m = lorakit.load_adapter(copy.deepcopy(reference), tmp_path / name)
        parts[name] = {n: layer.delta_weight("default") for n, layer in lorakit.layers.lora_layers(m)}
    expected = copy.deepcopy(reference)
    with torch.no_grad():
        for name, w in (("a", 0.7), ("b", 0.3)):
            for module, delta in parts[name].items():
                expected.get_submodule(module).weight += w * delta
    torch.testing.assert_close(logits(merged(tmp_path / "m")), logits(expected), atol=1e-4, rtol=0)


def test_dtype_and_safe_merge(tiny_model_dir, tmp_path):
    make_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    subprocess.run([*CLI, "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "a"), "--out",
                    str(tmp_path / "bf16"), "--dtype", "bf16"], check=True, capture_output=True)
    assert merged(tmp_path / "bf16").model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("inf")
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    proc = subprocess.run([*CLI, "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "a"), "--out",
                           str(tmp_path / "bad"), "--safe"], capture_output=True, text=True)
    assert proc.returncode == 2 and "NaN/Inf" in proc.stderr and not (tmp_path / "bad").exists()


def test_qlora_adapter_merges_into_the_dequantized_base(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    qlora = make_adapter(tiny_model_dir, tmp_path / "q", seed=3, quantize="nf4")
    proc = subprocess.run([*CLI, "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "q"),
                           "--out", str(tmp_path / "m")], capture_output=True, text=True, check=True)
    assert "dequantized nf4 base" in proc.stdout
    reported = float(proc.stdout.rsplit(":", 1)[1])
    assert reported < 1e-4  # the stated bound: fp32 dequantize-and-matmul rounding only
    torch.testing.assert_close(logits(merged(tmp_path / "m")), logits(qlora), atol=1e-4, rtol=0)


def test_dora_adapter_merges_to_a_plain_model_and_refuses_a_weight(tiny_model_dir, tmp_path):
    from lorakit.errors import LorakitError
    from lorakit.export import export_merged

    adapted = base(tiny_model_dir)
    lorakit.get_lora_model(adapted, lorakit.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lorakit.layers.lora_layers(adapted):
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            layer.lora_magnitude_vector["default"].mul_(1.2)
    lorakit.save_adapter(adapted, tmp_path / "d")
    report = export_merged(str(tiny_model_dir), [(str(tmp_path / "d"), 1.0)], tmp_path / "m")
    assert report.max_abs_diff < 1e-4
    out = merged(tmp_path / "m")
    assert (logits(out) - logits(base(tiny_model_dir))).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(logits(out), logits(adapted), atol=1e-4, rtol=0)
    with pytest.raises(LorakitError, match="is a DoRA adapter.*weight 1"):
        export_merged(str(tiny_model_dir), [(str(tmp_path / "d"), 0.5)], tmp_path / "w")
