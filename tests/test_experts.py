"""``target_parameters``: LoRA on transformers' fused MoE expert weights (and other bare parameters).

References: the update written out per expert in float64 from the file's tensors in PEFT's
documented layout; PEFT itself on the same file (logits, gradients, both directions of loading);
the model's own forward with the merged weights; an uninterrupted run for resuming.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig, get_lora_model, load_adapter, merge_and_unload, save_adapter
from lorakit.experts import LoraExperts, ParamLora
from lorakit.inject import add_adapter, delete_adapter, set_adapter
from lorakit.io import adapter_state_dict
from lorakit.merge import merge, unmerge

V = 64
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
FAMILIES = {  # (config, the experts' parameters, stored transposed)
    "mixtral": (lambda: T.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2), False),
    "qwen3-moe": (lambda: T.Qwen3MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                           head_dim=8), False),
    "gpt-oss": (lambda: T.GptOssConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                       sliding_window=6, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
                True),
}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _base(name: str, implementation: str = "eager", dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    attention = "eager" if name == "gpt-oss" else "sdpa"  # (sinks: eager only)
    model = T.AutoModelForCausalLM.from_config(FAMILIES[name][0](), attn_implementation=attention,
                                               experts_implementation=implementation)
    return model.to(dtype).eval()


def _ids(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(seed))


def _adapted(base: torch.nn.Module, **fields) -> torch.nn.Module:
    config = dict(r=4, lora_alpha=8, target_modules=[], target_parameters=EXPERTS, init_lora_weights=False)
    return get_lora_model(copy.deepcopy(base), LoraConfig(**{**config, **fields}))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_expert_gets_its_own_update_in_pefts_file_layout(name, tmp_path):
    """The saved ``lora_A`` (E·r, in) / ``lora_B`` (out, r·E), read per expert as PEFT documents them
    (A_e: rows e·r…; B_e: columns j·E + e), give exactly the merged weights W_e + s·B_e A_e, also
    for gpt-oss's (E, in, out) layout; the gate-up parameter is saved one ``.base_layer`` deeper."""
    base = _base(name)
    model = _adapted(base)
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    merged = merge_and_unload(copy.deepcopy(model))
    transposed = FAMILIES[name][1]
    s = 8 / 4
    for layer in range(2):
        path = f"base_model.model.model.layers.{layer}.mlp.experts"
        for param, key in (("gate_up_proj", f"{path}.base_layer"), ("down_proj", path)):
            a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
            w = getattr(base.model.layers[layer].mlp.experts, param).detach()
            experts = w.shape[0]
            for e in range(experts):
                a_e = a[e * 4:(e + 1) * 4]  # (r, in)
                b_e = b[:, [j * experts + e for j in range(4)]]  # (out, r)
                delta = s * (b_e @ a_e)
                expected = w[e] + (delta.T if transposed else delta)
                got = getattr(merged.model.layers[layer].mlp.experts, param)[e]
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_and_gradients_equal_peft_on_the_same_file_both_ways(name, tmp_path):
    """Our adapter in PEFT, and PEFT's adapter here: the same logits, and one backward gives PEFT's
    gradients for every factor (matched by file key)."""
    from peft import LoraConfig as PeftConfig
    from peft import PeftModel, get_peft_model

    base = _base(name)
    ours = _adapted(base)
    save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True)
    ids = _ids()
    ours(ids, labels=ids).loss.backward()
    theirs(ids, labels=ids).loss.backward()
    named = dict(theirs.named_parameters())
    keys, _ = adapter_state_dict(ours)
    assert len(keys) == 8
    for key, param in keys.items():
        peft_param = named[key.replace(".weight", ".default.weight")]
        torch.testing.assert_close(param.grad, peft_param.grad, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=1e-12)
        assert (ours(ids).logits - base(ids).logits).abs().max() > 1e-2  # the adapter does something

    peft_model = get_peft_model(copy.deepcopy(base), PeftConfig(r=4, lora_alpha=8, target_modules=[],
                                                                target_parameters=EXPERTS, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, peft_model(ids).logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_per_token_path_equals_the_adapted_weights_path(name, monkeypatch):
    """The per-routed-token path (x W_eᵀ + s (x A_eᵀ) B_eᵀ per expert) gives the logits and
    gradients of the module's own forward on W + s·B A (float64), with two adapters active."""
    import lorakit.experts

    model = _adapted(_base(name))
    add_adapter(model, LoraConfig(r=2, lora_alpha=3, target_modules=[], target_parameters=["experts.down_proj"],
                                  init_lora_weights=False), "b")
    set_adapter(model, ["default", "b"])
    ids = _ids()
    routed = []
    original = LoraExperts._routed_forward
    monkeypatch.setattr(LoraExperts, "_routed_forward", lambda self, *a: routed.append(1) or original(self, *a))
    results = []
    for tokenwise in (True, False):
        monkeypatch.setattr(lorakit.experts, "TOKENWISE", tokenwise)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        model.zero_grad(set_to_none=True)
        assert len(routed) == 2  # each layer on the per-token pass, none on the reference pass
    (loss, grads), (ref_loss, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-13, atol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) == 12
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-10, atol=1e-13, msg=n)


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_every_experts_implementation_trains_alike(implementation):
    """transformers runs experts as a loop, batched or grouped matmuls; the adapted weights go
    through each the same way (fp32: the grouped kernel takes no float64)."""
    base = _base("mixtral", "eager", torch.float32)
    reference = _adapted(base)
    other = copy.deepcopy(reference)
    other.config._experts_implementation = implementation
    for layer in other.model.layers:
        layer.mlp.experts.config._experts_implementation = implementation
    ids = _ids()
    losses = [m(ids, labels=ids).loss for m in (reference, other)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for (n, p), (_, q) in zip(reference.named_parameters(), other.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_router_weight_and_linear_layers_beside_the_experts():
    """A router's 2-D ``gate.weight`` (out, in) takes an adapter too, next to ``q_proj`` (a linear
    layer) and the experts; the model equals the one with each update merged by hand."""
    base = _base("mixtral")
    model = _adapted(base, target_modules=["q_proj"], target_parameters=[*EXPERTS, "mlp.gate.weight"])
    gate = model.model.layers[0].mlp.gate
    assert isinstance(gate, LoraExperts) and gate.lora_params["weight"].num_experts == 1
    by_hand = copy.deepcopy(base)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            target = by_hand.model.layers[i]
            lora = layer.mlp.gate.lora_params["weight"]
            a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
            target.mlp.gate.weight += 2.0 * b @ a
            for param in ("gate_up_proj", "down_proj"):
                getattr(target.mlp.experts, param).add_(layer.mlp.experts.lora_params[param].delta_weight("default"))
            q = layer.self_attn.q_proj
            target.self_attn.q_proj.weight += 2.0 * q.lora_B["default"].weight @ q.lora_A["default"].weight
        torch.testing.assert_close(model(_ids()).logits, by_hand(_ids()).logits, rtol=0, atol=1e-12)


def test_merge_unmerge_two_adapters_and_delete():
    """Two adapters' updates add up (their merge equals the unmerged forward); unmerge restores the
    weights exactly as they were up to rounding; deleting both gives back the plain experts class
    and the base model's logits."""
    base = _base("mixtral")
    model = _adapted(base)
    add_adapter(model, LoraConfig(r=2, lora_alpha=2, target_modules=[], target_parameters=["experts.down_proj"],
                                  init_lora_weights=False), "b")
    set_adapter(model, ["default", "b"])
    ids = _ids()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        both = model(ids).logits
        set_adapter(model, "default")
        one = model(ids).logits
        set_adapter(model, ["default", "b"])
        merge(model)
        torch.testing.assert_close(model(ids).logits, both, rtol=0, atol=1e-12)
        unmerge(model)
        for n, p in model.named_parameters():
            if n in weights:
                torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-14)
        assert (both - one).abs().max() > 1e-3
        with lorakit.disable_adapter(model):
            torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)
    for name in ("default", "b"):
        delete_adapter(model, name)
    experts = model.model.layers[0].mlp.experts
    assert type(experts) is T.models.mixtral.modeling_mixtral.MixtralExperts and "lora_params" not in experts._modules
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)


def test_merged_export_is_plain_and_equal():
    base = _base("gpt-oss")
    model = _adapted(base)
    ids = _ids()
    with torch.no_grad():
        adapted = model(ids).logits
        merged = merge_and_unload(model)
        assert not any(isinstance(m, (LoraExperts, ParamLora)) for m in merged.modules())
        assert sorted(merged.state_dict()) == sorted(base.state_dict())
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=0, atol=1e-12)


def test_rank_pattern_and_rslora_apply_per_parameter(tmp_path):
    base = _base("mixtral")
    model = _adapted(base, rank_pattern={"down_proj": 2}, use_rslora=True)
    down = model.model.layers[0].mlp.experts.lora_params["down_proj"]
    gate_up = model.model.layers[0].mlp.experts.lora_params["gate_up_proj"]
    assert (down.r["default"], gate_up.r["default"]) == (2, 4)
    assert down.lora_A["default"].weight.shape == (2 * 4, 24 * 2)  # E·r × I
    assert down.scaling["default"] == pytest.approx(8 / 2 ** 0.5)
    save_adapter(model, tmp_path)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(copy.deepcopy(base), tmp_path)(ids).logits, model(ids).logits,
                                   rtol=0, atol=0)


def test_errors_name_the_problem_and_the_fix():
    base = _base("mixtral")
    for fields, match in [
        ({"lora_dropout": 0.1}, "lora_dropout must be 0"),
        ({"use_dora": True}, "use_dora must be false"),
        ({"init_lora_weights": "pissa"}, "applies to linear layers only"),
        ({"target_parameters": "mlp.experts.down_proj"}, "must be a list of parameter names"),
    ]:
        with pytest.raises(ValueError, match=match):
            LoraConfig(**{"target_parameters": EXPERTS, **fields})
    with pytest.raises(ValueError, match=r"matched no parameter.*parameters it can take: .*experts\.down_proj"):
        _adapted(base, target_parameters=["experts.up_proj"])
    with pytest.raises(ValueError, match="weight of a Linear; put 'q_proj' in target_modules"):
        _adapted(base, target_parameters=["q_proj.weight"])
    with pytest.warns(UserWarning, match=r"matched no parameter and were ignored"):
        _adapted(base, target_parameters=[*EXPERTS, "experts.up_proj"])
    with pytest.warns(UserWarning, match=r"4 fused expert weights stay frozen; .*set target_parameters: "
                                         r"\['mlp.experts.down_proj', 'mlp.experts.gate_up_proj'\]"):
        get_lora_model(copy.deepcopy(base), LoraConfig(target_modules="all-linear"))
    with pytest.warns(UserWarning, match=r"all-linear adapts linear layers only: 2 fused expert weights stay "
                                         r"frozen; .*set target_parameters: \['mlp.experts.gate_up_proj'\]"):
        get_lora_model(copy.deepcopy(base), LoraConfig(target_modules="all-linear",
                                                       target_parameters=["experts.down_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both taken: nothing to warn about
        get_lora_model(copy.deepcopy(base), LoraConfig(target_modules="all-linear", target_parameters=EXPERTS))


def test_mixed_adapter_batches_and_the_server_refuse_them(tmp_path):
    from lorakit.batch import adapter_batch
    from lorakit.pool import AdapterPool, AdapterPoolError

    base = _base("mixtral")
    model = _adapted(base)
    with pytest.raises(ValueError, match="target_parameters.*cannot mix"), adapter_batch(model, ["default", None]):
        pass
    # an adapter on linear layers beside it mixes as usual: the experts' adapter stays out of those rows
    add_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False), "x")
    ids = _ids()
    with torch.no_grad():
        set_adapter(model, "x")
        alone = model(ids).logits
        plain = base(ids).logits
        set_adapter(model, ["default", "x"])
        with adapter_batch(model, ["x", None]):
            mixed = model(ids).logits
    torch.testing.assert_close(mixed[0], alone[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(mixed[1], plain[1], rtol=0, atol=1e-12)
    assert (alone[0] - plain[0]).abs().max() > 1e-3
    delete_adapter(model, "x")
    save_adapter(model, tmp_path)
    with pytest.raises(AdapterPoolError, match="target_parameters.*lorakit merge"):
        AdapterPool(copy.deepcopy(base)).register("moe", tmp_path)


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory):
    """A tiny random Mixtral with SmolLM2's tokenizer, saved as an HF directory."""
    from transformers import AutoTokenizer

    from lorakit.models import ensure_converted

    tokenizer = AutoTokenizer.from_pretrained(ensure_converted("smollm2-135m-instruct"))
    torch.manual_seed(0)
    config = T.MixtralConfig(**{**SMALL, "vocab_size": len(tokenizer)}, num_local_experts=4, num_experts_per_tok=2,
                             max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1, pad_token_id=2,
                             eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny-mixtral")
    T.MixtralForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_run_trains_the_experts_resumes_exactly_and_peft_loads_the_result(tiny_moe_dir, tmp_path):
    """``lorakit train`` with ``lora.target_parameters``: the expert factors train, the run resumed
    from a checkpoint ends with the same adapter bit for bit, and PEFT loads it to our logits."""
    import shutil

    import peft

    from conftest import run_configs
    from lorakit.checkpoint import complete_checkpoints
    from lorakit.train import train
    from test_train import adapter_tensors, assert_identical, rows

    make = run_configs(tmp_path, tiny_moe_dir, rows(12), rows(4, seed=1),
                       lora={"r": 4, "lora_alpha": 8, "target_parameters": EXPERTS}, data={"max_seq_len": 96},
                       train={"epochs": 1, "batch_size": 2, "lr": 1e-2, "save_steps": 2}, eval={"steps": 0}, seed=3)
    cfg = make()
    whole = train(cfg, progress=False)
    final = adapter_tensors(whole.output_dir)
    expert_b = [k for k in final if ".experts." in k and k.endswith("lora_B.weight")]
    assert len(expert_b) == 4 and all(final[k].abs().max() > 0 for k in expert_b)  # B starts at 0: it trained
    shutil.rmtree(complete_checkpoints(whole.output_dir / "checkpoints")[-1])
    resumed = train(cfg, progress=False)
    assert resumed.steps == whole.steps == 6 and resumed.resumed_from == 4
    assert_identical(adapter_tensors(resumed.output_dir), final)

    base = T.AutoModelForCausalLM.from_pretrained(tiny_moe_dir).eval()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = load_adapter(copy.deepcopy(base), whole.output_dir)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), whole.output_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)
