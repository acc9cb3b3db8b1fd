"""The trainer's fast paths on the decoder families users fine-tune: each one's loss and LoRA
gradients equal those of the model's own forward on padded batches.

The fast paths (padding-free batches with a shared prefix, per-segment attention, the fused LoRA
linear / SwiGLU / RMSNorm nodes, the output head and cross-entropy at supervised positions only)
are written against what Llama does; these tiny random models carry what the others do
differently: sliding-window layers (Mistral, Qwen2, Gemma 3), soft-capped attention and logits
(Gemma 2, 3), attention sinks (gpt-oss), logits scaled after the head (Granite, Cohere), experts
(Mixtral, gpt-oss: only their routers are linear layers), a Llama-like MLP with multipliers and
Mamba layers beside attention (Falcon-H1), (1 + w) norms and GELU MLPs (Gemma),
fused qkv / gate-up projections (Phi-3), q/k norms (Qwen3, OLMo 2), parallel blocks and LayerNorm
(Phi, Cohere, GPT-NeoX), Conv1D and learned positions (GPT-2), layers without rotary (SmolLM3).
Computed in float64 so that a wrong function stands out: what remains of the fp32 statistics
the norms compute in is < 1e-6 of each gradient, a missing window or scale moves it by > 1e-4.
On the same families ``all-linear`` wraps the modules PEFT wraps, and PEFT loads the adapters.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import lorakit.layers
import lorakit.loss
from lorakit import LoraConfig, get_lora_model
from lorakit.attention import padding_free_obstacle, supports_padding_free
from lorakit.collate import collate, collate_flat
from lorakit.data import IGNORE, Example
from lorakit.layers import lora_layers
from lorakit.loss import causal_lm_loss, split_head
from lorakit.train import fast_paths

V = 96
LLAMA_LIKE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
PLAIN = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GEMMA = dict(LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=16)
WINDOW = 6  # shorter than most examples below (5-token prefix + 6-19 tokens)

# name: (config, runs padding-free, head split from the body)
ARCHITECTURES = {
    "llama": (lambda: T.LlamaConfig(**LLAMA_LIKE), True, True),
    "llama-tied": (lambda: T.LlamaConfig(**LLAMA_LIKE, tie_word_embeddings=True), True, True),
    "mistral-window": (lambda: T.MistralConfig(**LLAMA_LIKE, sliding_window=WINDOW), True, True),
    "qwen2-window": (lambda: T.Qwen2Config(**LLAMA_LIKE, use_sliding_window=True, sliding_window=WINDOW,
                                           max_window_layers=1), True, True),
    "qwen3": (lambda: T.Qwen3Config(**LLAMA_LIKE, head_dim=16), True, True),
    "gemma": (lambda: T.GemmaConfig(**GEMMA), True, True),
    # (no window short enough to leave a padded query without keys: eager attention's float64 mask
    # turns -inf in its fp32 softmax, and the padded batch's loss NaN)
    "gemma2": (lambda: T.Gemma2Config(**GEMMA, sliding_window=64), False, False),
    "gemma3": (lambda: T.Gemma3TextConfig(**GEMMA, sliding_window=WINDOW, sliding_window_pattern=2), True, True),
    "phi3": (lambda: T.Phi3Config(**LLAMA_LIKE), True, True),
    "olmo2": (lambda: T.Olmo2Config(**LLAMA_LIKE), True, True),
    "granite": (lambda: T.GraniteConfig(**LLAMA_LIKE, embedding_multiplier=2.0, residual_multiplier=0.5,
                                        attention_multiplier=0.2, logits_scaling=4.0), True, False),
    "cohere": (lambda: T.CohereConfig(**LLAMA_LIKE), True, False),
    "smollm3": (lambda: T.SmolLM3Config(**LLAMA_LIKE), True, True),
    "mixtral": (lambda: T.MixtralConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2), True, True),
    "gpt-oss": (lambda: T.GptOssConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                       sliding_window=WINDOW, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
                False, True),
    "phimoe": (lambda: T.PhimoeConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0,
                                      input_jitter_noise=0.0), True, True),
    # chunked attention (padded batches), a router that subclasses nn.Linear (left alone), MoE
    "llama4": (lambda: T.Llama4TextConfig(**LLAMA_LIKE, head_dim=16, num_local_experts=2, intermediate_size_mlp=96,
                                          attention_chunk_size=8, no_rope_layers=[1, 0]), False, False),
    "falcon-h1": (lambda: T.FalconH1Config(**LLAMA_LIKE, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                                           mamba_d_state=8, mamba_chunk_size=8, mlp_multipliers=[0.5, 2.0]),
                  False, True),
    "lfm2": (lambda: T.Lfm2Config(**LLAMA_LIKE, layer_types=["conv", "full_attention"]), False, True),
    # a decoder layer that drops the attention kwargs (the segment bounds): found by the probe
    "nemotron": (lambda: T.NemotronConfig(**LLAMA_LIKE, head_dim=16), False, True),
    # lightning (linear) attention layers beside softmax attention (config.layer_types; the probe too)
    "minimax": (lambda: T.MiniMaxConfig(**LLAMA_LIKE, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                                        layer_types=["linear_attention", "full_attention"], block_size=4),
                False, True),
    "phi": (lambda: T.PhiConfig(**PLAIN), True, True),
    "gpt-neox": (lambda: T.GPTNeoXConfig(**PLAIN), True, True),
    "starcoder2": (lambda: T.Starcoder2Config(**LLAMA_LIKE), True, True),
    "gpt2": (lambda: T.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2), True, True),
}


MOE = ("mixtral", "gpt-oss", "minimax", "phimoe", "llama4")
MAMBA = ("falcon-h1",)
MIXERS = (*MAMBA, "lfm2", "minimax")  # token mixing outside attention: no shared rows, no serving engine
PROBED = ("nemotron", "minimax")  # padding-free batches refused by the probe (Nemotron by nothing else)


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ARCHITECTURES[name][0]()
    implementation = "eager" if name in ("gemma2", "gpt-oss") else "sdpa"  # soft-capped scores, sinks: eager only
    # (experts as a loop of matmuls: the grouped-matmul kernel takes no float64)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation=implementation,
                                               experts_implementation="eager").double()
    return get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def _examples() -> list[Example]:
    """Chat-like rows: a 5-token system prefix shared by all, then a prompt and a trained answer."""
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, V, (5,), generator=g).tolist()
    rows = []
    for _ in range(5):
        n = int(torch.randint(6, 20, (1,), generator=g))
        ids = prefix + torch.randint(3, V, (n,), generator=g).tolist()
        answer = 5 + n // 2
        rows.append(Example(ids, [IGNORE] * answer + ids[answer:], "test"))
    return rows


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_fast_paths_equal_the_models_own_forward(name, monkeypatch):
    model = _model(name)
    model.train()
    _, flat, split = ARCHITECTURES[name]
    assert supports_padding_free(model) == flat and (split_head(model) is not None) == split
    rows = [[e] for e in _examples()]

    # reference: the model's own forward on a right-padded batch, the LoRA term as separate ops
    monkeypatch.setattr(lorakit.layers, "FUSED_LINEAR", False)
    padded = collate(rows, 0)
    logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
    targets = padded["labels"][:, 1:]
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                            reduction="sum")
    ref.backward()
    ref_grads = _grads(model)

    monkeypatch.setattr(lorakit.layers, "FUSED_LINEAR", True)
    head_rows: list[int] = []  # tokens through the head module (the fused head + CE node bypasses it)
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: head_rows.append(i[0][..., 0].numel()))
    with fast_paths(model, padding_free=flat, bf16=False, device=torch.device("cpu")):
        batch = collate_flat(rows, multiple=32, pad_id=0) if flat else collate(rows, 0, multiple=32)
        assert flat == ("shared_prefix" in batch)
        loss, n = causal_lm_loss(model, batch)
        loss.backward()
    hook.remove()
    assert n == int((targets != IGNORE).sum())
    # a model run whole still gets logits only at the columns that train (no batch × seq × vocab)
    assert head_rows == ([] if split else [batch["input_ids"].shape[0] * int(batch["labels"][:, 1:].ne(IGNORE).any(0).sum())])
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=0)
    for key, grad in _grads(model).items():
        scale = float(ref_grads[key].abs().max())
        torch.testing.assert_close(grad, ref_grads[key], rtol=0, atol=1e-6 * scale, msg=key)


def test_an_unknown_logit_post_processing_is_found_by_the_probe(monkeypatch):
    """With the known config fields forgotten, the one-time probe still sees that Granite's and
    Cohere's forwards rescale the head's output (they run whole) and that Llama's does not."""
    monkeypatch.setattr(lorakit.loss, "LOGIT_POSTPROCESSING", ())
    for name, split in (("granite", False), ("cohere", False), ("llama", True)):
        model = _model(name)
        model.train()
        assert (split_head(model) is not None) == split
        assert all(m.training for m in model.modules())  # the probe ran in eval mode and put it back


@pytest.mark.parametrize("name", [*PROBED, "lfm2"])
def test_the_padding_free_probe_finds_what_static_checks_miss(name, monkeypatch):
    """Nemotron's decoder layer drops the attention kwargs (the segment bounds), MiniMax's lightning
    attention and (with its static check switched off) LFM2's convolution mix packed examples: the
    one-time probe (does example B's output move when only example A's tokens change?) sees it."""
    import lorakit.attention

    monkeypatch.setattr(lorakit.attention, "sequence_mixers", lambda model: [])
    model = _model(name).train()
    assert "one packed example change another's outputs" in padding_free_obstacle(model)
    assert all(m.training for m in model.modules())  # the probe ran in eval mode and put training back


@pytest.mark.parametrize("name", [n for n, (_, flat, _) in ARCHITECTURES.items() if flat])
def test_the_probe_passes_the_families_that_keep_examples_apart_in_bf16_too(name):
    """The probe compares runs of one shape (only example A's or the prefix's tokens changed), so
    bf16 rounding, which moves a packed example's logits against the same example alone by up to
    1.2% here, cannot fail it: GPU runs keep padding-free batches."""
    model = T.AutoModelForCausalLM.from_config(ARCHITECTURES[name][0](), experts_implementation="eager")
    assert padding_free_obstacle(model.to(torch.bfloat16)) is None


def test_models_with_attention_features_padding_free_lacks_say_why():
    assert "attn_logit_softcapping" in padding_free_obstacle(_model("gemma2"))
    bert = T.BertForMaskedLM(T.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=32))
    assert "bidirectional" in padding_free_obstacle(bert)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_all_linear_wraps_what_peft_wraps_and_the_adapter_loads_in_peft(name, tmp_path):
    """``all-linear`` picks PEFT's modules on every family (fused qkv / gate-up projections, Conv1D
    included; on MoE models PEFT also adapts the fused expert weights, which lorakit leaves to
    ``target_parameters`` and names in a warning), and PEFT loads the saved adapter to the same logits."""
    import contextlib
    import copy

    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    from lorakit import save_adapter

    torch.manual_seed(0)
    implementation = "eager" if name in ("gemma2", "gpt-oss") else "sdpa"
    base = T.AutoModelForCausalLM.from_config(ARCHITECTURES[name][0](), attn_implementation=implementation,
                                              experts_implementation="eager").double()
    base.eval()
    with pytest.warns(UserWarning, match="fused expert weights") if name in MOE else contextlib.nullcontext():
        ours = get_lora_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               init_lora_weights=False))
    # PEFT refuses all-linear on Mamba hybrids (it would take the mixers' kernel-read out_proj): name ours
    spec = sorted({n.rsplit(".", 1)[-1] for n, _ in lora_layers(ours)}) if name in MAMBA else "all-linear"
    theirs = get_peft_model(copy.deepcopy(base), PeftLoraConfig(r=4, target_modules=spec))
    trained = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    peft_trained = sorted(n.removeprefix("base_model.model.") for n, p in theirs.named_parameters() if p.requires_grad)
    if name in MOE:  # PEFT's all-linear also adapts the fused 3-D expert weights; lorakit's names them in a warning
        # (target_parameters then adapts them: tests/test_experts.py)
        peft_trained = [n for n in peft_trained if ".experts." not in n and ".mlp.gate." not in n and "router" not in n]
        trained = [n for n in trained if ".mlp.gate." not in n and ".router." not in n]
    assert trained == peft_trained
    save_adapter(ours, tmp_path)
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(base, tmp_path)(ids).logits, ours(ids).logits,
                                   rtol=0, atol=1e-12)


def test_mamba_out_proj_is_left_to_its_kernel():
    """A Mamba mixer's fused scan reads ``out_proj.weight`` itself: all-linear skips it (and takes
    ``in_proj``, which the mixer calls), naming it is refused with the fix."""
    wrapped = [n for n, _ in lora_layers(_model("falcon-h1"))]
    assert "model.layers.0.mamba.in_proj" in wrapped and not any(n.endswith("mamba.out_proj") for n in wrapped)
    base = T.AutoModelForCausalLM.from_config(ARCHITECTURES["falcon-h1"][0]())
    with pytest.raises(ValueError, match="output projection of a Mamba mixer.*exclude_modules"):
        get_lora_model(base, LoraConfig(target_modules=["in_proj", "out_proj"]))


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_default_targets_are_peffts_defaults(name):
    """With ``target_modules`` unset, a model type PEFT has a default for gets the same modules;
    others get lorakit's own default where it has one, else an error that names the fix."""
    import copy

    import peft
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    from lorakit.config import DEFAULT_TARGETS

    base = T.AutoModelForCausalLM.from_config(ARCHITECTURES[name][0]())
    model_type = base.config.model_type
    if model_type in PEFT_DEFAULTS:
        ours = sorted(n for n, _ in lora_layers(get_lora_model(copy.deepcopy(base), LoraConfig(r=2))))
        assert ours and {n.rsplit(".", 1)[-1] for n in ours} == set(PEFT_DEFAULTS[model_type])
        if name in MOE:  # PEFT 0.21 looks for expert parameters there and, finding none by default, refuses
            return
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2))
        assert ours == sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                              if isinstance(m, peft.tuners.lora.LoraLayer))
    elif model_type in DEFAULT_TARGETS:
        assert lora_layers(get_lora_model(base, LoraConfig(r=2)))
    else:
        with pytest.raises(ValueError, match="target_modules is not set.*all-linear"):
            get_lora_model(base, LoraConfig(r=2))


@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if n not in MIXERS])
def test_serving_engine_decodes_each_family_like_generate(name, tmp_path):
    """The engine (rows joining and leaving a left-padded batch, two adapters and the base mixed in
    it, its own growing KV cache) gives each request the greedy tokens transformers' ``generate``
    gives it alone with its adapter: sliding windows, soft-capping, sinks, Conv1D all included."""
    import copy
    import warnings

    from conftest import randomize_adapters, serve_greedy
    from lorakit import load_adapter, save_adapter
    from lorakit.pool import AdapterPool

    torch.manual_seed(0)
    implementation = "eager" if name in ("gemma2", "gpt-oss") else "sdpa"
    base = T.AutoModelForCausalLM.from_config(ARCHITECTURES[name][0](), attn_implementation=implementation,
                                              experts_implementation="eager").eval().requires_grad_(False)
    pool = AdapterPool(base, max_loaded=2)
    for seed, adapter in enumerate(["x", "y"], 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MoE: expert weights stay frozen
            model = get_lora_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        randomize_adapters(model, seed=seed, std=0.5)
        save_adapter(model, tmp_path / adapter)
        pool.register(adapter, tmp_path / adapter)
    g = torch.Generator().manual_seed(0)
    work = [(torch.randint(3, V, (n,), generator=g).tolist(), [None, "x", "y"][k % 3])
            for k, n in enumerate((3, 17, 9, 25, 11, 4))]  # most prompts longer than the window
    expected = []
    for ids, adapter in work:
        model = base if adapter is None else load_adapter(copy.deepcopy(base), tmp_path / adapter)
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
        expected.append(out[0, len(ids):].tolist())

    assert serve_greedy(base, pool, work) == expected


@pytest.mark.parametrize("name", MIXERS)
def test_models_mixing_tokens_outside_attention_never_share_a_row_and_are_not_served(name, tokenizer, tmp_path):
    """Mamba mixers and LFM2's short convolutions carry tokens past any attention mask: such a model
    trains on padded batches, packing is refused with the fix, and the engine refuses it."""
    from conftest import write_jsonl
    from lorakit.engine import Engine, EngineError
    from lorakit.pool import AdapterPool
    from lorakit.train import Trainer
    from lorakit.train_config import ConfigError, build_config

    base = T.AutoModelForCausalLM.from_config(ARCHITECTURES[name][0]())
    assert "mixes tokens outside attention" in padding_free_obstacle(base)
    with pytest.raises(EngineError, match="outside attention.*lorakit generate"):
        Engine(base, None, AdapterPool(base))
    config = ARCHITECTURES[name][0]()
    config.vocab_size = len(tokenizer)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "1+1=", "completion": "2"}] * 4)
    with pytest.raises(ConfigError, match="data.packing: .*outside attention.*data.packing=false"):
        Trainer(build_config({"model": {"name": str(tmp_path / "model")},
                              "data": {"train": str(tmp_path / "train.jsonl"), "packing": True},
                              "output_dir": str(tmp_path / "out")}), progress=False)


def test_linear_subclasses_that_compute_more_are_left_alone():
    """Llama 4's router subclasses nn.Linear but returns top-k scores: all-linear skips it with a
    warning naming it (Falcon's FalconLinear, a plain x Wᵀ + b, is wrapped), and naming it is refused."""
    base = T.AutoModelForCausalLM.from_config(ARCHITECTURES["llama4"][0](), experts_implementation="eager")
    with pytest.warns(UserWarning, match=r"skips 2 nn.Linear subclasses.*feed_forward.router \(Llama4Router\)"):
        wrapped = [n for n, _ in lora_layers(get_lora_model(base, LoraConfig(r=2, target_modules="all-linear")))]
    assert wrapped and not any("router" in n for n in wrapped)
    base = T.AutoModelForCausalLM.from_config(ARCHITECTURES["llama4"][0](), experts_implementation="eager")
    with pytest.raises(ValueError, match="Llama4Router, an nn.Linear whose forward computes more than"):
        get_lora_model(base, LoraConfig(r=2, target_modules=["q_proj", "router"]))
    falcon = T.AutoModelForCausalLM.from_config(T.FalconConfig(vocab_size=V, hidden_size=64, num_hidden_layers=1,
                                                               num_attention_heads=4, new_decoder_architecture=True,
                                                               num_kv_heads=2))
    wrapped = dict(lora_layers(get_lora_model(falcon, LoraConfig(r=2, target_modules=["query_key_value"]))))
    assert type(wrapped["transformer.h.0.self_attention.query_key_value"]).__name__ == "LoraFalconLinear"
