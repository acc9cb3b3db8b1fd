"""GGUF export: the file loads back (transformers' GGUF reader) to the merged model, and the embedded
model written by lorakit equals the llama.cpp-made GGUF it ships as, tensor by tensor."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import lorakit
from conftest import randomize_adapters
from lorakit.gguf_export import GgufExportError, rope_interleave, write_gguf

CLI = [sys.executable, "-m", "lorakit", "merge"]


def test_interleaved_rows_under_ggml_rope_give_transformers_rope_float64():
    """q = W x rotated the transformers way (pairs i, i + d/2) equals, up to the same row order,
    (rope_interleave(W) x) rotated the ggml way (pairs 2i, 2i + 1): the order the GGUF stores."""
    from transformers.models.llama.modeling_llama import rotate_half

    heads, d, pos = 3, 8, 5
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(heads * d, 12, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)
    angles = pos / 10000 ** (torch.arange(d // 2, dtype=torch.float64) * 2 / d)  # one angle per pair
    q = (w @ x).view(heads, d)
    cos, sin = torch.cat([angles.cos()] * 2), torch.cat([angles.sin()] * 2)
    hf = q * cos + rotate_half(q) * sin  # (heads, d)
    p = (rope_interleave(w, heads) @ x).view(heads, d // 2, 2)
    ggml = torch.stack([p[..., 0] * angles.cos() - p[..., 1] * angles.sin(),
                        p[..., 0] * angles.sin() + p[..., 1] * angles.cos()], dim=-1)  # (heads, d/2, 2)
    torch.testing.assert_close(ggml, hf.view(heads, 2, d // 2).transpose(1, 2), atol=1e-12, rtol=0)


def _adapter(model_dir, tmp_path, name="a"):
    model, _ = lorakit.models.load_model(str(model_dir))
    lorakit.get_lora_model(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(model, std=0.1)
    return lorakit.save_adapter(model, tmp_path / name), model


def _load_gguf(path, with_tokenizer: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, (AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if with_tokenizer else None)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_merge_to_gguf_loads_back_as_the_merged_model_with_its_tokenizer(tiny_model_dir, tokenizer, tmp_path):
    from gguf import GGUFReader

    adapter, adapted = _adapter(tiny_model_dir, tmp_path)
    ids = torch.randint(0, len(tokenizer), (2, 14), generator=torch.Generator().manual_seed(1))
    want = _logits(adapted.eval(), ids)
    out = tmp_path / "m.gguf"
    proc = subprocess.run([*CLI, "--model", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(out),
                           "--tokenizer-pre", "smollm", "--dtype", "fp32"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "gguf: architecture llama, 20 tensors (20 F32)" in proc.stdout  # 2 × 9 a block, embeddings, norm
    model, tok = _load_gguf(out, with_tokenizer=True)
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-5, rtol=0)
    text = "<|im_start|>user\nWhat is 12 + 30?  Tabs\tand ünïcode — ok<|im_end|>\n"
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tok.chat_template == tokenizer.chat_template and tok.eos_token_id == tokenizer.eos_token_id

    merged = lorakit.merge_and_unload(adapted)
    errors = []  # measured: 4e-4, 0.014, 0.27 (logits up to ≈ 1.3)
    for dtype, kind, atol in [("fp16", "F16", 1e-3), ("q8_0", "Q8_0", 0.03), ("q4_0", "Q4_0", 0.4)]:
        report = write_gguf(merged, tokenizer, tmp_path / f"m-{dtype}.gguf", dtype=dtype, tokenizer_pre="smollm")
        kinds = {t.name: t.tensor_type.name for t in GGUFReader(report.path).tensors}
        assert {k for n, k in kinds.items() if n.endswith("norm.weight")} == {"F32"}
        assert {k for n, k in kinds.items() if not n.endswith("norm.weight")} == {kind}
        got = _logits(_load_gguf(report.path)[0], ids)
        errors.append(float((got - want).abs().max()))
        assert errors[-1] < atol, dtype
    assert 0 < errors[0] < errors[1] < errors[2]  # 16, 8.5, 4.5 bits a weight


@pytest.mark.parametrize("family", ["llama-untied", "mistral", "qwen2", "qwen3"])
def test_an_untied_head_mistral_qwen2_biases_and_qwen3_norms_round_trip_exactly(family, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=len(tokenizer) + 3, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    config = {"llama-untied": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config,
              "qwen3": Qwen3Config}[family](**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # qwen2's q/k/v biases and qwen3's q/k norms start at 0 and 1: give them values
        for name, p in model.named_parameters():
            if name.endswith(("_proj.bias", "q_norm.weight", "k_norm.weight")):
                p.normal_()
    report = write_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="fp32", tokenizer_pre="smollm")
    assert report.architecture == {"mistral": "llama"}.get(family, family.split("-")[0])
    assert report.types == {"F32": report.tensors}
    back, _ = _load_gguf(tmp_path / "m.gguf")
    ids = torch.randint(0, config.vocab_size, (2, 9))
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), atol=1e-5, rtol=0)


def test_the_embedded_model_written_by_lorakit_equals_llama_cpps_file():
    """SmolLM2's shipped GGUF was made by llama.cpp's converter; lorakit's fp32 export of the same
    (de-quantized) weights must hold each of its tensors under the same name with the same values,
    and the same architecture and tokenizer metadata."""
    import tempfile
    from pathlib import Path

    from gguf import GGUFReader, dequantize

    from lorakit.models import DEFAULT_MODEL, load_model, source_gguf

    model, tokenizer = load_model(DEFAULT_MODEL)
    theirs = GGUFReader(source_gguf(DEFAULT_MODEL))
    with tempfile.TemporaryDirectory() as tmp:
        report = write_gguf(model, tokenizer, Path(tmp) / "m.gguf", dtype="fp32", tokenizer_pre="smollm")
        ours = GGUFReader(report.path)
        mine = {t.name: t for t in ours.tensors}
        assert sorted(mine) == sorted(t.name for t in theirs.tensors)
        for t in theirs.tensors:
            assert np.array_equal(np.asarray(mine[t.name].data), dequantize(t.data, t.tensor_type)), t.name
        for key, field in theirs.fields.items():
            if key.startswith(("llama.", "tokenizer.")) or key == "general.architecture":
                assert key in ours.fields, key
                a, b = ours.fields[key], field
                if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
                    assert [a.contents(i) for i in range(len(a.data))] == [b.contents(i) for i in range(len(b.data))]
                else:
                    assert a.contents() == pytest.approx(b.contents()), key


def _split_like(tokenizer, style: str):
    """``tokenizer`` (SmolLM2's vocabulary and merges) with the pre-tokenizer of another family."""
    import copy

    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    from lorakit.gguf_export import LLAMA3_SPLIT, QWEN2_SPLIT

    def split(regex):
        return pt.Sequence([pt.Split(Regex(regex), "isolated"), pt.ByteLevel(add_prefix_space=False, use_regex=False)])

    styles = {"gpt-2": lambda: pt.ByteLevel(add_prefix_space=False),
              "smollm": lambda: pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]),
              "llama-bpe": lambda: split(LLAMA3_SPLIT), "qwen2": lambda: split(QWEN2_SPLIT),
              "whitespace": lambda: pt.Sequence([pt.WhitespaceSplit(), pt.ByteLevel(use_regex=False)])}
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.backend_tokenizer.pre_tokenizer = styles[style]()
    return tokenizer


SPLIT_TEXT = ("Hello World! It's 2024-11-25, we'VE paid $1234567.89 for 3 items...\n\n  indented\tTab  ÜNÏCODE café "
              "東京タワー 'S 'll $hello #tag @user foo_bar x=y+z\r\n\r\nEnd   ")


def test_the_pre_tokenizer_name_is_detected_from_how_the_tokenizer_splits_text(tiny_model_dir, tokenizer, tmp_path):
    from gguf import GGUFReader

    from lorakit.export import export_merged
    from lorakit.gguf_export import detect_pre_tokenizer

    for style in ["gpt-2", "smollm", "llama-bpe", "qwen2"]:
        assert detect_pre_tokenizer(_split_like(tokenizer, style)) == style
    assert detect_pre_tokenizer(_split_like(tokenizer, "whitespace")) is None
    # the tiny model's tokenizer, as transformers rebuilds it from SmolLM2's GGUF, splits with GPT-2's regex alone
    adapter, _ = _adapter(tiny_model_dir, tmp_path)
    report = export_merged(str(tiny_model_dir), [(str(adapter), 1.0)], tmp_path / "m.gguf")
    assert GGUFReader(report.gguf.path).fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    model, _ = lorakit.models.load_model(str(tiny_model_dir))
    with pytest.raises(GgufExportError, match="splits text in a way lorakit does not know .* give --tokenizer-pre"):
        write_gguf(model, _split_like(tokenizer, "whitespace"), tmp_path / "w.gguf")


@pytest.mark.parametrize("style", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_llama_cpp_tokenizes_like_transformers_under_the_detected_name(tokenizer, tmp_path, style):
    """Where llama.cpp is installed (CI skips this): each family's split, detected and written to the GGUF,
    makes llama.cpp encode a text of contractions, digits, symbols, accents, CJK and blank lines to
    transformers' ids; the regex families (GPT-2's vs Llama 3's) encode it differently from each other."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = _split_like(tokenizer, style)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True))
    want = tok(SPLIT_TEXT, add_special_tokens=False)["input_ids"]
    other = {"gpt-2": "llama-bpe", "smollm": "qwen2", "llama-bpe": "gpt-2", "qwen2": "smollm"}[style]
    encoded = {}
    for name in (None, other):
        path = write_gguf(model, tok, tmp_path / f"{name}.gguf", dtype="fp32", tokenizer_pre=name).path
        encoded[name] = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False).tokenize(
            SPLIT_TEXT.encode(), add_bos=False, special=False)
    assert encoded[None] == want
    assert encoded[other] != want


ROPE_SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


def _scaled_model(tokenizer, rope: str, family: str = "llama"):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family](
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rope_scaling=ROPE_SCALINGS[rope],
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger projections: attention far from uniform, so rope errors show in the logits
        for name, p in model.named_parameters():
            if name.endswith("_proj.weight"):
                p.mul_(3)
    return model


@pytest.mark.parametrize("rope", ["llama3", "linear"])
def test_scaled_rope_read_as_llama_cpp_reads_it_gives_transformers_frequencies(tokenizer, tmp_path, rope):
    """llama.cpp rotates pair i at position p by p · s · base^(−2i/d) / f_i, with s = 1/factor for
    ``linear`` scaling and f = ``rope_freqs.weight`` (1 without it): from the GGUF's keys and tensor
    this must be the model's own (transformers') inverse frequencies, the original ones being different."""
    from gguf import GGUFReader

    from lorakit.gguf_export import llama3_rope_factors

    model = _scaled_model(tokenizer, rope)
    reader = GGUFReader(write_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="fp32", tokenizer_pre="smollm").path)
    field = {k: f.contents() for k, f in reader.fields.items() if k.startswith("llama.rope")}
    d = field["llama.rope.dimension_count"]
    original = field["llama.rope.freq_base"] ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    scale = 1 / field.get("llama.rope.scaling.factor", 1.0) if field.get("llama.rope.scaling.type") == "linear" else 1
    tensors = {t.name: torch.from_numpy(np.asarray(t.data, dtype=np.float64)) for t in reader.tensors}
    divisors = tensors.get("rope_freqs.weight", torch.ones(d // 2, dtype=torch.float64))
    want = model.model.rotary_emb.inv_freq.double()
    torch.testing.assert_close(original * scale / divisors, want, rtol=1e-6, atol=0)
    assert not torch.allclose(original, want)
    assert ("rope_freqs.weight" in tensors) == (rope == "llama3")
    if rope == "llama3":  # the divisors run 1 (short wavelengths) … 8 (long ones), smoothly between
        f = llama3_rope_factors(ROPE_SCALINGS["llama3"] | {"rope_theta": 10000.0}, d)
        assert f[0] == 1 and f[-1] == 8 and bool((f.diff() >= 0).all()) and bool(((f > 1) & (f < 8)).any())


@pytest.mark.parametrize("rope", ["llama3", "linear", "yarn"])
def test_llama_cpp_runs_a_scaled_rope_export_to_transformers_logits(tokenizer, tmp_path, rope):
    """Where llama.cpp is installed (llama-cpp-python; not a dependency, so CI skips this): the fp32
    export of a tiny model with scaled rope gives transformers' logits at all 200 positions, 168 of them
    past the original context of 32. Measured: ≤ 8e-4 (llama.cpp keeps its KV cache in f16); written as
    plain rope, 0.5-1.1."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = _scaled_model(tokenizer, rope)
    write_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="fp32", tokenizer_pre="smollm")
    ids = torch.randint(10, len(tokenizer), (1, 200), generator=torch.Generator().manual_seed(0))
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=256, n_batch=256, logits_all=True,
                          verbose=False, n_threads=2)
    llm.eval(ids[0].tolist())
    got = torch.from_numpy(np.array(llm.scores[:200]))
    torch.testing.assert_close(got, _logits(model, ids)[0], atol=3e-3, rtol=0)


def test_gguf_errors_name_the_problem(tiny_model_dir, tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorakit.errors import LorakitError
    from lorakit.export import export_merged

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).eval()
    with pytest.raises(GgufExportError, match="writes llama, mistral, qwen2, qwen3 models; this one is 'gpt2'"):
        write_gguf(gpt2, tokenizer, tmp_path / "g.gguf", tokenizer_pre="gpt-2")
    with pytest.raises(GgufExportError, match="this qwen2 model has rope_type 'llama3'"):
        write_gguf(_scaled_model(tokenizer, "llama3", "qwen2"), tokenizer, tmp_path / "q.gguf", tokenizer_pre="qwen2")
    yarn = _scaled_model(tokenizer, "yarn")
    yarn.config.rope_scaling = yarn.config.rope_parameters = ROPE_SCALINGS["yarn"] | {"beta_fast": 8.0}
    with pytest.raises(GgufExportError, match="yarn rope with its default settings; this model sets beta_fast"):
        write_gguf(yarn, tokenizer, tmp_path / "y.gguf", tokenizer_pre="smollm")
    adapter, _ = _adapter(tiny_model_dir, tmp_path)
    report = export_merged(str(tiny_model_dir), [(str(adapter), 1.0)], tmp_path / "d.gguf", tokenizer_pre="smollm")
    assert report.dtype == "fp16" and report.gguf.types == {"F16": 15, "F32": 5}  # the default for GGUF
    (tmp_path / "d.gguf").unlink()
    with pytest.raises(LorakitError, match="q8_0, q4_0 are for a .gguf --out"):
        export_merged(str(tiny_model_dir), [(str(adapter), 1.0)], tmp_path / "dir", dtype="q8_0")
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written left behind


def _gguf_arrays(path) -> tuple[dict[str, np.ndarray], dict]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return ({t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors},
            {k: f.contents() for k, f in reader.fields.items() if k.startswith(("general.", "adapter."))})


@pytest.mark.parametrize("patterns", [False, True])
def test_adapter_gguf_applied_as_llama_cpp_applies_it_gives_the_merged_gguf(tiny_model_dir, tokenizer, tmp_path,
                                                                            patterns):
    """llama.cpp adds (α / r)·B·A (r = B's columns) to each base tensor the adapter file names; on
    lorakit's base GGUF that gives lorakit's merged GGUF, q/k reordering included. With rank and
    alpha patterns and rsLoRA each B carries its own scale and α is 1."""
    from lorakit.models import load_model, model_config

    model, _ = load_model(str(tiny_model_dir))
    write_gguf(model, tokenizer, tmp_path / "base.gguf", dtype="fp32", tokenizer_pre="smollm")
    extra = dict(rank_pattern={"k_proj": 2}, alpha_pattern={"down_proj": 3.0}, use_rslora=True) if patterns else {}
    lorakit.get_lora_model(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **extra))
    randomize_adapters(model, std=0.2)
    lorakit.save_adapter(model, tmp_path / "a")
    proc = subprocess.run([sys.executable, "-m", "lorakit", "export-adapter", "--model", str(tiny_model_dir),
                           "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "a.gguf"), "--dtype", "fp32"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "llama.cpp LoRA adapter for a llama base, 28 tensors (28 F32)" in proc.stdout  # 2 × 7 pairs
    write_gguf(lorakit.merge_and_unload(model), tokenizer, tmp_path / "merged.gguf", dtype="fp32",
               tokenizer_pre="smollm")

    base, _ = _gguf_arrays(tmp_path / "base.gguf")
    merged, _ = _gguf_arrays(tmp_path / "merged.gguf")
    lora, meta = _gguf_arrays(tmp_path / "a.gguf")
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama" and meta["adapter.lora.alpha"] == (1.0 if patterns else 8.0)
    assert model_config(str(tiny_model_dir)).num_hidden_layers == 2
    adapted = {n.removesuffix(".lora_a") for n in lora if n.endswith(".lora_a")}
    assert len(adapted) == 14 and adapted <= set(base)
    for name, weight in base.items():
        if name in adapted:
            a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]  # (r, in), (out, r)
            weight = weight + meta["adapter.lora.alpha"] / b.shape[1] * (b @ a)
        np.testing.assert_allclose(weight, merged[name], atol=1e-5, rtol=0, err_msg=name)
    assert lora["blk.0.attn_k.weight.lora_a"].shape[0] == (2 if patterns else 4)


def test_adapter_gguf_refuses_what_llama_cpp_cannot_apply(tiny_model_dir, tmp_path):
    from lorakit.gguf_export import write_gguf_adapter
    from lorakit.models import load_model, model_config

    config = model_config(str(tiny_model_dir))
    for name, extra, message in [("dora", dict(use_dora=True), "is a DoRA adapter"),
                                 ("embed", dict(target_modules=["embed_tokens", "q_proj"]), "an embedding adapter"),
                                 ("bias", dict(bias="lora_only"), "trains biases")]:
        model, _ = load_model(str(tiny_model_dir))
        lorakit.get_lora_model(model, lorakit.LoraConfig(**{"r": 4, "target_modules": ["q_proj"], **extra}))
        lorakit.save_adapter(model, tmp_path / name)
        with pytest.raises(GgufExportError, match=f"{message}.*merge it instead: lorakit merge --adapter"):
            write_gguf_adapter(tmp_path / name, config, tmp_path / f"{name}.gguf")
    with pytest.raises(GgufExportError, match="must be one of fp32, fp16, bf16"):
        write_gguf_adapter(tmp_path / "dora", config, tmp_path / "x.gguf", dtype="q4_0")
