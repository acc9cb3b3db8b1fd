"""`lorakit generate` and `lorakit chat` driven as a user would, on the embedded model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lorakit.generate import SamplingOptions, chat_input_ids, generate, prompt_ids
from lorakit.kernels import gemm
from lorakit.models import load_model

CLI = [sys.executable, "-m", "lorakit"]


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m-instruct")


def test_generate_prompt_streams_the_greedy_answer(smollm):
    model, tokenizer = smollm
    expected = generate(model, tokenizer, prompt_ids(tokenizer, "What is the capital of France?"),
                        SamplingOptions(max_new_tokens=16))
    out = subprocess.run([*CLI, "generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "16"],
                         capture_output=True, text=True, check=True).stdout
    assert out == expected + "\n" and "Paris" in out


def test_stop_strings_cut_the_output():
    out = subprocess.run([*CLI, "generate", "--prompt", "What is the capital of France?", "--stop", "Paris"],
                         capture_output=True, text=True, check=True).stdout
    assert "Paris" not in out and out.strip() == "The capital of France is"


def test_streaming_callback_sees_the_whole_text_in_pieces(smollm):
    model, tokenizer = smollm
    pieces: list[str] = []
    text = generate(model, tokenizer, prompt_ids(tokenizer, "Count from one to five."),
                    SamplingOptions(max_new_tokens=20), on_text=pieces.append)
    assert len(pieces) > 3 and "".join(pieces) == text


def test_sampling_with_a_seed_is_reproducible(smollm):
    model, tokenizer = smollm
    ids = prompt_ids(tokenizer, "Write a word.")
    opts = SamplingOptions(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    assert generate(model, tokenizer, ids, opts) == generate(model, tokenizer, ids, opts)


def test_generate_file_writes_jsonl(tmp_path, smollm):
    model, tokenizer = smollm
    prompts = tmp_path / "p.jsonl"
    sharegpt = {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hello!"}]}
    prompts.write_text(json.dumps({"prompt": "What is the capital of France?"}) + "\n" +
                       json.dumps({"messages": [{"role": "user", "content": "Say hi."}]}) + "\n" +
                       json.dumps(sharegpt) + "\n")
    out = subprocess.run([*CLI, "generate", "--file", str(prompts), "--max-new-tokens", "12"],
                         capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r.get("prompt") for r in rows] == ["What is the capital of France?", None, None]
    second = generate(model, tokenizer, chat_input_ids(tokenizer, [{"role": "user", "content": "Say hi."}]),
                      SamplingOptions(max_new_tokens=12))
    assert rows[1]["completion"] == second != "Hello!"
    assert rows[2]["completion"] == second  # the ShareGPT row's own answer is dropped, its user turn kept


def test_chat_keeps_history_until_reset(smollm):
    model, tokenizer = smollm
    opts = SamplingOptions(max_new_tokens=12)
    turns = ["My name is Ada.", "What is my name?"]
    history: list[dict[str, str]] = []
    expected = []
    for turn in turns:
        history.append({"role": "user", "content": turn})
        answer = generate(model, tokenizer, chat_input_ids(tokenizer, history), opts)
        expected.append(answer)
        history.append({"role": "assistant", "content": answer.strip()})
    fresh = generate(model, tokenizer, chat_input_ids(tokenizer, [{"role": "user", "content": turns[1]}]), opts)
    stdin = "\n".join([*turns, "/reset", turns[1], "/exit"]) + "\n"
    out = subprocess.run([*CLI, "chat", "--max-new-tokens", "12"], input=stdin, capture_output=True, text=True,
                         check=True).stdout
    answers = [part.split("\n")[0] for part in out.split("assistant> ")[1:]]
    assert answers == [expected[0], expected[1], fresh]
    assert "(history cleared)" in out


@pytest.mark.skipif(gemm._linear_op() is None, reason="this torch build has no oneDNN linear")
def test_generation_on_onednn_gives_the_blas_text(tiny_model_dir, monkeypatch, onednn_rows):
    """A frozen model's fp32 products run on oneDNN: the prompt's rows padded to a bucket size, the
    decode steps on one row each: the same greedy text as with oneDNN off."""
    model, tok = load_model(str(tiny_model_dir))
    model.requires_grad_(False)
    ids = prompt_ids(tok, "Count to five.")
    rows_seen = onednn_rows
    monkeypatch.setattr(gemm, "CPU_GEMM", "blas")
    blas = generate(model, tok, ids, SamplingOptions(max_new_tokens=16))
    assert rows_seen == []
    monkeypatch.setattr(gemm, "CPU_GEMM", "onednn")
    assert generate(model, tok, ids, SamplingOptions(max_new_tokens=16)) == blas and len(blas) > 0
    assert set(rows_seen) == {gemm.row_bucket(ids.shape[1]), 1}  # the prompt, then one row a step
    assert gemm.row_bucket(ids.shape[1]) > ids.shape[1]  # (the prompt's rows really were padded)
