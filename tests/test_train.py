"""The trainer on a tiny model: exact resume after SIGKILL, accumulation, errors, outputs."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lorakit
import lorakit.optim
from conftest import run_configs, write_jsonl
from lorakit.checkpoint import complete_checkpoints
from lorakit.io import adapter_state_dict
from lorakit.kernels import gemm
from lorakit.train import Trainer, TrainingError, train
from lorakit.train_config import ConfigError, build_config, load_config


def rows(n: int, seed: int = 0) -> list[dict]:
    import random

    r = random.Random(seed)
    out = []
    for i in range(n):
        a, b = r.randint(1, 99), r.randint(1, 99)
        out.append({"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": f"{a}+{b}"},
                                 {"role": "assistant", "content": str(a + b)}]} if i % 2 else
                   {"prompt": f"What is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."})
    return out


@pytest.fixture
def run_config(tiny_model_dir, tmp_path):
    return run_configs(tmp_path, tiny_model_dir, rows(24), rows(6, seed=1),
                       lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}, data={"max_seq_len": 96},
                       train={"epochs": 2, "batch_size": 4, "lr": 1e-2, "save_steps": 3, "logging_steps": 1},
                       eval={"steps": 4, "batch_size": 8}, seed=3)


def adapter_tensors(directory):
    return load_file(os.path.join(directory, "adapter_model.safetensors"))


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_training_reduces_loss_and_writes_outputs(run_config):
    result = train(run_config(), progress=False)
    out = result.output_dir
    assert {"adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl", "loss.png",
            "README.md"} <= {p.name for p in out.iterdir()}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert len(train_losses) == result.steps == 12
    assert train_losses[-1] < train_losses[0]
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= records[0].keys()
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8, 12] and evals[-1]["eval_ppl"] == pytest.approx(
        torch.tensor(evals[-1]["eval_loss"]).exp().item(), rel=1e-6)
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["checkpoint-9", "checkpoint-12"]
    assert "eval_loss" in (out / "README.md").read_text()
    assert yaml.safe_load((out / "config.yaml").read_text())["lora"]["r"] == 4


def test_adapter_loads_in_lorakit_and_peft_with_equal_outputs(run_config, tiny_model_dir):
    import peft
    from transformers import AutoModelForCausalLM

    out = train(run_config(train={"epochs": 1}), progress=False).output_dir
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(0, 1000, (2, 12))
    ours = lorakit.load_adapter(copy.deepcopy(base), out)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    with torch.no_grad():
        a, b, c = ours(ids).logits, theirs(ids).logits, base(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - c).abs().max() > 1e-4


def test_grad_accumulation_matches_a_larger_batch(run_config, tmp_path):
    common = {"epochs": 1, "save_steps": 0}
    lora = {"lora_dropout": 0.0}
    big = train(run_config(train={**common, "batch_size": 4}, lora=lora, output_dir=str(tmp_path / "a")), progress=False)
    acc = train(run_config(train={**common, "batch_size": 2, "grad_accum": 2}, lora=lora,
                           output_dir=str(tmp_path / "b")), progress=False)
    assert big.steps == acc.steps == 6
    a, b = adapter_tensors(big.output_dir), adapter_tensors(acc.output_dir)
    for k in a:  # Adam moves each weight by ~lr = 1e-2 per step; summation order differs at ~1e-7
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("padding_free", [False, True])
def test_packing_trains_the_same_as_unpacked(run_config, tmp_path, padding_free):
    common = {"train": {"epochs": 1, "batch_size": 24, "save_steps": 0}, "lora": {"lora_dropout": 0.0}}
    plain = train(run_config(**common, data={"padding_free": False}, output_dir=str(tmp_path / "a")), progress=False)
    packed = train(run_config(**common, data={"packing": True, "max_seq_len": 96, "padding_free": padding_free},
                              output_dir=str(tmp_path / "b")), progress=False)
    assert plain.steps == packed.steps == 1
    assert abs(plain.train_loss - packed.train_loss) <= 1e-5


def test_padding_free_with_a_shared_prefix_trains_like_padded_batches(run_config, tmp_path):
    common = {"train": {"epochs": 1, "save_steps": 0}, "lora": {"lora_dropout": 0.0}}
    padded = train(run_config(**common, data={"padding_free": False}, output_dir=str(tmp_path / "a")), progress=False)
    flat = train(run_config(**common, output_dir=str(tmp_path / "b")), progress=False)  # auto: on for Llama
    assert padded.steps == flat.steps == 6
    assert abs(padded.train_loss - flat.train_loss) <= 1e-5
    a, b = adapter_tensors(padded.output_dir), adapter_tensors(flat.output_dir)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="padding_free must be auto, true or false"):
        build_config(run_config(data={"padding_free": "sometimes"}))


def test_dora_run_resumes_exactly_and_its_adapter_loads_in_peft(run_config, tiny_model_dir):
    """``lora.use_dora``: the magnitudes train, go into the checkpoints (a run resumed from one ends
    with the same adapter, bit for bit) and into the adapter file, which PEFT loads to our outputs."""
    import shutil

    import peft
    from transformers import AutoModelForCausalLM

    cfg = run_config(lora={"use_dora": True, "lora_dropout": 0.0}, train={"epochs": 1, "save_steps": 2},
                     eval={"steps": 0})
    whole = train(cfg, progress=False)
    final = adapter_tensors(whole.output_dir)
    magnitudes = [k for k in final if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == sum(k.endswith(".lora_A.weight") for k in final) > 0
    shutil.rmtree(complete_checkpoints(whole.output_dir / "checkpoints")[-1])
    resumed = train(cfg, progress=False)
    assert resumed.steps == whole.steps == 6 and resumed.resumed_from == 4
    assert_identical(adapter_tensors(resumed.output_dir), final)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    fresh = lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    assert any(not torch.equal(final[k], v) for k, v in adapter_state_dict(fresh)[0].items() if k in magnitudes)
    ids = torch.randint(0, 1000, (2, 12))
    ours = lorakit.load_adapter(copy.deepcopy(base), whole.output_dir)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), whole.output_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)


def test_pissa_run_resumes_exactly_and_saves_a_plain_lora_for_the_original_base(run_config, tiny_model_dir):
    """``lora.init_lora_weights: pissa``: checkpoints keep the trained factors and a resumed run
    rebuilds the same residual base (same adapter, bit for bit); the final adapter is the rank-2r
    plain LoRA that gives the trained model on the untouched base, in lorakit and PEFT."""
    import shutil

    import peft
    from transformers import AutoModelForCausalLM

    cfg = run_config(lora={"init_lora_weights": "pissa", "lora_dropout": 0.0}, train={"epochs": 1, "save_steps": 2},
                     eval={"steps": 0})
    whole = train(cfg, progress=False)
    final = adapter_tensors(whole.output_dir)
    saved = json.loads((whole.output_dir / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
    last = complete_checkpoints(whole.output_dir / "checkpoints")[-1]
    assert json.loads((last / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    shutil.rmtree(last)
    resumed = train(cfg, progress=False)
    assert resumed.steps == whole.steps == 6 and resumed.resumed_from == 4
    assert_identical(adapter_tensors(resumed.output_dir), final)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    trained = lorakit.load_adapter(copy.deepcopy(base), last)  # raw factors: the base decomposed again
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        expected = trained(ids).logits
        assert (expected - base(ids).logits).abs().max() > 1e-3
        for loaded in (lorakit.load_adapter(copy.deepcopy(base), whole.output_dir),
                       peft.PeftModel.from_pretrained(copy.deepcopy(base), whole.output_dir).eval()):
            torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=0)


def test_neftune_run_trains_differently_and_resumes_exactly(run_config, tmp_path):
    """``train.neftune_noise_alpha``: the noise changes every step's loss (drawn from the run's RNG,
    which checkpoints carry, so a resumed run ends with the same adapter, bit for bit)."""
    import shutil

    sections = {"lora": {"lora_dropout": 0.0}, "eval": {"steps": 0}}
    cfg = run_config(train={"epochs": 1, "save_steps": 2, "neftune_noise_alpha": 5.0}, **sections)
    whole = train(cfg, progress=False)
    final = adapter_tensors(whole.output_dir)
    shutil.rmtree(complete_checkpoints(whole.output_dir / "checkpoints")[-1])
    resumed = train(cfg, progress=False)
    assert resumed.steps == whole.steps == 6 and resumed.resumed_from == 4
    assert_identical(adapter_tensors(resumed.output_dir), final)
    plain = train(run_config(train={"epochs": 1, "save_steps": 2}, output_dir=str(tmp_path / "plain"), **sections),
                  progress=False)

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line]

    noisy, clean = losses(whole.output_dir), losses(plain.output_dir)
    assert all(a != b for a, b in zip(noisy, clean)) and len(noisy) == len(clean) == 6
    with pytest.raises(ConfigError, match="train.neftune_noise_alpha must be >= 0"):
        build_config(run_config(train={"neftune_noise_alpha": -1}))


def _run_cli(config_path, *extra):
    return subprocess.Popen([sys.executable, "-m", "lorakit", "train", str(config_path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_is_bit_identical(run_config, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", rows(100))
    cfg = run_config(train={"epochs": 2, "batch_size": 2, "save_steps": 5, "save_total_limit": 2},
                     eval={"steps": 0}, output_dir=str(tmp_path / "killed"))
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump(cfg))
    reference = train({**cfg, "output_dir": str(tmp_path / "whole")}, progress=False)
    assert reference.steps == 100

    proc = _run_cli(tmp_path / "killed.yaml")
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts / "checkpoint-20").exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run must be killed mid-training"
    done = complete_checkpoints(ckpts)
    assert done and int(done[-1].name.split("-")[1]) < 100

    resumed = _run_cli(tmp_path / "killed.yaml", "train.resume=auto")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resumed from {done[-1]}" in out
    assert_identical(adapter_tensors(tmp_path / "killed"), adapter_tensors(reference.output_dir))
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(steps) and steps[-1] == 100 and len(steps) == len(set(steps))


def test_half_written_checkpoint_is_never_picked(run_config, tmp_path):
    cfg = run_config(train={"epochs": 1, "save_steps": 2})
    train(cfg, progress=False)
    ckpts = tmp_path / "out" / "checkpoints"
    (ckpts / "checkpoint-999").mkdir()  # no COMPLETE marker: a crash mid-write
    (ckpts / "checkpoint-999" / "adapter_model.safetensors").write_bytes(b"garbage")
    assert complete_checkpoints(ckpts)[-1].name == "checkpoint-6"
    result = train(cfg, progress=False)  # resume=auto picks checkpoint-6 (the end): nothing left to do
    assert result.steps == 6 and result.resumed_from == 6


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(run_config, monkeypatch):
    import lorakit.train as train_module

    real, calls = train_module.causal_lm_loss, {"n": 0}

    def poisoned(model, batch, **kwargs):
        calls["n"] += 1
        loss, n = real(model, batch, **kwargs)
        return (loss * float("nan"), n) if calls["n"] == 5 else (loss, n)

    monkeypatch.setattr(train_module, "causal_lm_loss", poisoned)
    cfg = run_config(train={"epochs": 1, "save_steps": 3}, eval={"steps": 0})
    with pytest.raises(TrainingError, match=r"non-finite loss at step 5; .*checkpoint-3"):
        train(cfg, progress=False)
    ckpt = complete_checkpoints(cfg_out := __import__("pathlib").Path(cfg["output_dir"]) / "checkpoints")
    assert [p.name for p in ckpt] == ["checkpoint-3"] and (cfg_out / "checkpoint-3" / "COMPLETE").exists()


def test_ctrl_c_saves_a_resumable_checkpoint(run_config, monkeypatch, tmp_path):
    import lorakit.train as train_module

    cfg = run_config(train={"epochs": 1, "save_steps": 0}, eval={"steps": 0}, lora={"lora_dropout": 0.0})
    reference = train({**cfg, "output_dir": str(tmp_path / "ref")}, progress=False)
    real, calls = train_module.causal_lm_loss, {"n": 0}

    def interrupt(model, batch, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(model, batch, **kwargs)

    monkeypatch.setattr(train_module, "causal_lm_loss", interrupt)
    result = train(cfg, progress=False)
    assert result.interrupted and result.steps == 3 and result.resumed_from == 0
    assert [p.name for p in complete_checkpoints(result.output_dir / "checkpoints")] == ["checkpoint-3"]
    monkeypatch.setattr(train_module, "causal_lm_loss", real)
    resumed = train(cfg, progress=False)
    assert resumed.steps == 6 and resumed.resumed_from == 3
    assert_identical(adapter_tensors(resumed.output_dir), adapter_tensors(reference.output_dir))


def test_resume_with_another_config_is_refused(run_config):
    cfg = run_config(train={"epochs": 1, "save_steps": 2})
    train(cfg, progress=False)
    cfg["train"]["lr"] = 5e-3
    with pytest.raises(ConfigError, match="different config"):
        train(cfg, progress=False)


def test_full_fine_tuning_saves_a_plain_model(run_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    result = train(run_config(method="full", train={"epochs": 1, "lr": 1e-3}), progress=False)
    assert result.trainable_params == result.total_params
    tuned = AutoModelForCausalLM.from_pretrained(result.output_dir / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def continuing(cfg: dict, adapter, **lora) -> dict:
    """``cfg`` starting from the saved ``adapter`` (model.adapter), with only the ``lora`` keys given."""
    cfg = copy.deepcopy(cfg)
    cfg["model"]["adapter"] = str(adapter)
    cfg["lora"] = lora
    return cfg


def test_a_run_trains_a_saved_adapter_further(run_config, tmp_path):
    """``model.adapter``: the run starts from the saved adapter exactly (its tensors, its r and
    alpha from adapter_config.json, its eval loss), takes a new dropout, and trains it on."""
    first = train(run_config(train={"epochs": 1}), progress=False)
    cfg = continuing(run_config(output_dir=str(tmp_path / "more"), train={"epochs": 1}), first.output_dir,
                     lora_dropout=0.0)
    trainer = Trainer(build_config(cfg), progress=False)
    params, _ = adapter_state_dict(trainer.model)
    assert_identical({k: p.detach() for k, p in params.items()}, adapter_tensors(first.output_dir))
    assert (trainer.lora.r, trainer.lora.lora_alpha, trainer.lora.lora_dropout) == (4, 8, 0.0)
    assert all(p.requires_grad for p in params.values())
    assert trainer.evaluate()["eval_loss"] == pytest.approx(first.metrics["eval_loss"], rel=1e-6)

    more = train(cfg, progress=False)
    assert more.metrics["eval_loss"] < first.metrics["eval_loss"]
    saved = json.loads((more.output_dir / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"]) == (4, 8, 0.0)
    assert adapter_tensors(more.output_dir).keys() == adapter_tensors(first.output_dir).keys()


def test_full_fine_tuning_from_an_adapter_starts_from_the_merged_weights(run_config, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    first = train(run_config(train={"epochs": 1}), progress=False)
    cfg = continuing(run_config(method="full", output_dir=str(tmp_path / "full")), first.output_dir)
    trainer = Trainer(build_config(cfg), progress=False)
    merged = lorakit.merge_and_unload(lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                                           first.output_dir))
    assert_identical(trainer.model.state_dict(), merged.state_dict())
    assert trainer.evaluate()["eval_loss"] == pytest.approx(first.metrics["eval_loss"], rel=1e-5)


def test_model_adapter_errors_name_the_problem(run_config, tmp_path):
    first = train(run_config(train={"max_steps": 1}), progress=False)
    with pytest.raises(ConfigError, match=r"adapter_config.json sets the LoRA; remove lora.lora_alpha, lora.r "
                                          r"\(only lora.lora_dropout may change\)"):
        build_config(continuing(run_config(), first.output_dir, r=8, lora_alpha=8))
    with pytest.raises(ConfigError, match="model.adapter: adapter directory .*nowhere does not exist"):
        build_config(continuing(run_config(), tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="method router takes its adapters from router.adapters"):
        build_config(continuing(run_config(method="router", router={"adapters": {"a": "x", "b": "y"}}),
                                first.output_dir))
    residual = tmp_path / "pissa"  # as PEFT saves a PiSSA adapter unconverted, or lorakit a checkpoint
    residual.mkdir()
    config = json.loads((first.output_dir / "adapter_config.json").read_text())
    (residual / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    with pytest.raises(ConfigError, match="needs the residual base it was trained on"):
        build_config(continuing(run_config(), residual))


def test_unknown_key_names_the_nearest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr' \(did you mean 'train\.lr'\?\)"):
        build_config({"train": {"lrr": 1}})
    with pytest.raises(ConfigError, match=r"'lora\.rank'.*'lora\.r'"):
        build_config({"lora": {"rank": 4}})
    (tmp_path / "c.yaml").write_text("data: {train: x.jsonl}\n")
    cfg = load_config(tmp_path / "c.yaml", ["lora.r=32", "train.lr=1e-4", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.lora["r"] == 32 and cfg.train.lr == 1e-4 and cfg.lora["target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match=r"LoraConfig\.r"):
        load_config(tmp_path / "c.yaml", ["lora.r=0"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(tmp_path / "c.yaml", ["lora.r"])


def test_cli_print_config_show_example_and_errors(run_config, tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(run_config()))
    printed = subprocess.run([sys.executable, "-m", "lorakit", "train", str(tmp_path / "c.yaml"), "lora.r=16",
                              "--print-config"], capture_output=True, text=True, check=True).stdout
    assert yaml.safe_load(printed)["lora"]["r"] == 16
    shown = subprocess.run([sys.executable, "-m", "lorakit", "train", str(tmp_path / "c.yaml"), "--show-example", "1"],
                           capture_output=True, text=True, check=True).stdout
    assert "trained ([trained] ·masked·)" in shown and "[<|im_end|>]" in shown
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", str(tmp_path / "c.yaml"), f"data.train={bad}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and f"lorakit: error: {bad}:2: invalid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_trainer_builds_warmup_and_schedules(run_config):
    trainer = Trainer(build_config(run_config(train={"epochs": 1, "warmup_steps": 2, "schedule": "linear"})),
                      progress=False)
    lrs = []
    for _ in range(6):
        lrs.append(trainer.scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
    peak = 1e-2
    assert lrs[0] == pytest.approx(peak / 3) and lrs[1] == pytest.approx(2 * peak / 3)
    assert lrs[2] == pytest.approx(peak) and lrs[5] == pytest.approx(peak * 1 / 4)


def test_loraplus_gives_b_its_ratio_through_the_schedule(run_config, tmp_path):
    """``train.loraplus_lr_ratio``: each B matrix (and 1-D parameter) at λ·lr and A at lr at every
    step of the schedule; the run logs A's lr, the same as a run without LoRA+; the adapter it ends
    with differs (B moved further). Refused for full fine-tuning."""
    common = {"epochs": 1, "warmup_steps": 2, "save_steps": 0}
    trainer = Trainer(build_config(run_config(train={**common, "loraplus_lr_ratio": 16}, eval={"steps": 0},
                                              output_dir=str(tmp_path / "plus"))), progress=False)
    for _ in range(4):
        lr = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
        base = trainer.scheduler.get_last_lr()[0]
        for name, p in trainer.params:
            assert lr[id(p)] == pytest.approx(base * (16 if "lora_B" in name or p.ndim == 1 else 1)), name
        trainer.optimizer.step()
        trainer.scheduler.step()
    plus = train(run_config(train={**common, "loraplus_lr_ratio": 16}, eval={"steps": 0},
                            output_dir=str(tmp_path / "plus-run")), progress=False)
    plain = train(run_config(train=common, eval={"steps": 0}, output_dir=str(tmp_path / "plain")), progress=False)

    def logged(result):
        return [json.loads(line)["lr"] for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()
                if "lr" in line]

    assert logged(plus) == logged(plain)
    a, b = adapter_tensors(plus.output_dir), adapter_tensors(plain.output_dir)
    assert all(not torch.equal(a[k], b[k]) for k in a if "lora_B" in k)
    with pytest.raises(ConfigError, match="loraplus_lr_ratio applies to method: lora"):
        build_config(run_config(method="full", train={"loraplus_lr_ratio": 16}))


def test_fused_adamw_steps_like_the_per_tensor_loop(run_config):
    trainer = Trainer(build_config(run_config(train={"weight_decay": 0.1})), progress=False)
    assert trainer.optimizer.defaults["fused"] is True  # plain CPU tensors: the fused kernel
    params = [p for _, p in trainer.params]
    torch.manual_seed(0)
    for p in params:
        p.data.normal_()
    reference = [p.detach().clone().requires_grad_() for p in params]
    twin = {id(p): r for p, r in zip(params, reference, strict=True)}
    # the trainer's own groups (decay split, warmup lr), over the copies, stepped by the per-tensor loop
    plain = torch.optim.AdamW([{"params": [twin[id(p)] for p in g["params"]],
                                **{k: g[k] for k in ("lr", "betas", "eps", "weight_decay")}}
                               for g in trainer.optimizer.param_groups], foreach=False)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, r, g in zip(params, reference, grads, strict=True):
            p.grad, r.grad = g.clone(), g.clone()
        trainer.optimizer.step()
        plain.step()
    for p, r in zip(params, reference, strict=True):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)


def test_cli_eval_scores_base_and_adapter(run_config, tiny_model_dir, tmp_path):
    out = train(run_config(train={"epochs": 1}), progress=False).output_dir
    args = [sys.executable, "-m", "lorakit", "eval", "--model", str(tiny_model_dir), "--data",
            str(tmp_path / "eval.jsonl"), "--max-new-tokens", "4"]
    base = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    tuned = subprocess.run([*args, "--adapter", str(out)], capture_output=True, text=True, check=True).stdout
    values = [dict(line.split(": ") for line in text.strip().splitlines()) for text in (base, tuned)]
    assert all({"eval_loss", "eval_ppl", "exact_match", "examples"} <= v.keys() for v in values)
    assert values[0]["examples"] == "6" and float(values[1]["eval_loss"]) < float(values[0]["eval_loss"])


def test_gradient_checkpointing_trains_identically(run_config, tmp_path):
    common = {"lora": {"lora_dropout": 0.0}, "eval": {"steps": 0}}
    plain = train(run_config(**common, train={"epochs": 1, "save_steps": 0}, output_dir=str(tmp_path / "a")),
                  progress=False)
    ckpt = train(run_config(**common, train={"epochs": 1, "save_steps": 0, "gradient_checkpointing": True},
                            output_dir=str(tmp_path / "b")), progress=False)
    a, b = adapter_tensors(plain.output_dir), adapter_tensors(ckpt.output_dir)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert plain.metrics["peak_memory_bytes"] > 0


def test_qlora_run_reports_base_memory_and_saves_a_peft_adapter(run_config, tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    plain = train(run_config(train={"epochs": 1}, output_dir=str(__import__("pathlib").Path(
        run_config()["output_dir"]).parent / "plain")), progress=False)
    q = train(run_config(model={"quantize": "nf4"}, train={"epochs": 1}), progress=False)
    assert q.metrics["base_weight_bytes"] < plain.metrics["base_weight_bytes"]
    assert q.train_loss < 12 and set(adapter_tensors(q.output_dir)) == set(adapter_tensors(plain.output_dir))
    with pytest.raises(ConfigError, match="needs method: lora"):
        build_config(run_config(model={"quantize": "nf4"}, method="full"))


@pytest.mark.skipif(gemm._linear_op() is None, reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("dora", [False, True])
def test_qlora_on_onednn_trains_the_adapter_the_bitsandbytes_path_trains(run_config, tmp_path, monkeypatch, dora):
    """A QLoRA run (all linear layers, no dropout: the fused paths apply) with the 4-bit base
    dequantized into lorakit's fused nodes on oneDNN ends with the adapter of the same run on
    bitsandbytes' own forward and torch's BLAS, to fp32 rounding carried through 6 AdamW steps;
    also with DoRA (QDoRA: the fused DoRA node against bitsandbytes' forward + the DoRA term)."""
    pytest.importorskip("bitsandbytes")
    import lorakit.kernels.dequant as dequant

    calls = []
    real = dequant.dequantize
    monkeypatch.setattr(dequant, "dequantize", lambda w, dtype: calls.append(1) or real(w, dtype))
    common = {"model": {"quantize": "nf4"}, "lora": {"lora_dropout": 0.0, "use_dora": dora},
              "train": {"epochs": 1, "save_steps": 0}, "eval": {"steps": 0}}
    monkeypatch.setattr(gemm, "CPU_GEMM", "blas")
    a = train(run_config(**common, output_dir=str(tmp_path / "blas")), progress=False)
    assert dora or not calls  # (DoRA's row norms dequantize W on either path)
    calls.clear()
    monkeypatch.setattr(gemm, "CPU_GEMM", "onednn")
    b = train(run_config(**common, output_dir=str(tmp_path / "onednn")), progress=False)
    assert len(calls) > 6 * 2 * 7  # each step: every projection's fused node forward, and backward
    assert abs(a.train_loss - b.train_loss) < 1e-4 * abs(a.train_loss)
    x, y = adapter_tensors(a.output_dir), adapter_tensors(b.output_dir)
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(y[k], x[k], atol=1e-4 * float(x[k].abs().max()), rtol=0)


def test_bf16_auto_is_gpu_only_and_native_bf16_cpus_get_a_hint(monkeypatch, tmp_path, run_config):
    import lorakit.train as T

    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(T, "CPUINFO", str(cpuinfo))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert T.resolve_bf16("auto", cuda) and not T.resolve_bf16("auto", cpu)
    assert T.resolve_bf16(True, cpu) and not T.resolve_bf16(False, cuda)
    for flags, native in (("fpu sse2 avx2 fma", False), ("avx512f avx512_bf16 avx512vl", True), ("avx2 amx_bf16", True)):
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert T.cpu_native_bf16() is native
        lines: list[str] = []
        cfg = build_config(run_config(train={"max_steps": 1, "save_steps": 0}, eval={"steps": 0},
                                      output_dir=str(tmp_path / flags.split()[1])))
        Trainer(cfg, progress=False, log=lines.append).run()
        assert any("train.bf16=true trains about 1.4x faster" in x for x in lines) is native
    cpuinfo.unlink()
    assert T.cpu_native_bf16() is False  # no /proc/cpuinfo: no hint
    with pytest.raises(ConfigError, match="train.bf16 must be auto, true or false"):
        build_config(run_config(train={"bf16": "maybe"}))


def test_the_allocator_policy_ends_and_the_heap_is_trimmed_after_training(run_config, monkeypatch):
    """Once the steps are over, the memory kept for their reuse goes back to the OS (malloc_trim(0))
    and glibc maps blocks of 32 MiB and more and trims the heap top past 64 MiB free again, before
    the closing evaluation; not where the allocator was left alone."""
    import lorakit.train as T
    from lorakit import memory

    calls: list[tuple] = []

    class Libc:
        def malloc_trim(self, pad: int) -> int:
            calls.append(("trim", pad))
            return 1

        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    assert memory.return_freed_memory(Libc()) is True and calls == [("trim", 0)]
    assert memory.return_freed_memory(object()) is False  # no malloc_trim (not glibc)
    calls.clear()
    assert memory.stop_keeping_freed_memory(Libc()) is True
    assert calls == [(-3, 32 * 2**20), (-1, 64 * 2**20), ("trim", 0)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    assert memory.stop_keeping_freed_memory(object()) is False
    events: list[str] = []
    monkeypatch.setattr(T, "keep_freed_memory", lambda: events.append("keep") or True)
    monkeypatch.setattr(T, "stop_keeping_freed_memory", lambda: events.append("trim") or True)
    evaluate = T.Trainer.evaluate
    monkeypatch.setattr(T.Trainer, "evaluate", lambda self: events.append("eval") or evaluate(self))
    cfg = build_config(run_config(train={"epochs": 1, "save_steps": 0}, eval={"steps": 0, "generate": False}))
    T.Trainer(cfg, progress=False, log=lambda _: None).run()
    assert events == ["keep", "trim", "eval"]
    events.clear()
    monkeypatch.setattr(T, "keep_freed_memory", lambda: events.append("keep") and False)
    T.Trainer(build_config(run_config(train={"epochs": 1, "save_steps": 0}, eval={"steps": 0, "generate": False},
                                      output_dir=str(cfg.output_dir) + "-2")), progress=False, log=lambda _: None).run()
    assert events == ["keep", "eval"]


def test_heap_guard_trims_between_steps_without_changing_the_run(run_config, tmp_path, monkeypatch):
    """Where the allocator keeps freed memory, the trainer consults a HeapGuard after every step; one
    that gives the heap back after every step past the warm-up (slack 0, real malloc_trim) leaves
    the run identical to one with the allocator left alone."""
    import lorakit.train as T
    from lorakit import memory

    guards: list[memory.HeapGuard] = []

    class Eager(memory.HeapGuard):
        def __init__(self) -> None:
            super().__init__(slack=0, resident=lambda: 1 + self.steps)  # always above the warm-up level
            guards.append(self)

    monkeypatch.setattr(T, "HeapGuard", Eager)
    monkeypatch.setattr(T, "keep_freed_memory", lambda: True)
    trimmed = train(run_config(output_dir=str(tmp_path / "trimmed"), eval={"steps": 0, "generate": False}),
                    progress=False)
    monkeypatch.setattr(T, "keep_freed_memory", lambda: False)
    plain = train(run_config(output_dir=str(tmp_path / "plain"), eval={"steps": 0, "generate": False}),
                  progress=False)
    assert len(guards) == 1 and guards[0].steps == trimmed.steps == 12 and guards[0].trims == 10
    assert trimmed.train_loss == plain.train_loss
    assert_identical(adapter_tensors(trimmed.output_dir), adapter_tensors(plain.output_dir))


@pytest.mark.parametrize("padding_free", ["auto", False])
def test_cpu_bf16_run_tracks_the_fp32_run(run_config, tmp_path, padding_free, monkeypatch):
    """train.bf16 on the CPU: every matmul under bf16 autocast, adapters kept in fp32; each step's
    loss differs from the fp32 run's by bf16 rounding only, and so does the eval loss. Both with
    padding-free batches and with padded ones (lorakit's attention runs those rows as segments)."""
    import lorakit.attention

    calls = []
    forward = lorakit.attention._MathSegments.forward
    monkeypatch.setattr(lorakit.attention._MathSegments, "forward", staticmethod(
        lambda *a: calls.append(torch.is_autocast_enabled("cpu")) or forward(*a)))
    def run(bf16: bool, out: str):
        lines: list[str] = []
        cfg = build_config(run_config(train={"epochs": 1, "bf16": bf16, "save_steps": 0}, eval={"steps": 0},
                                      lora={"lora_dropout": 0.0}, output_dir=str(tmp_path / out),
                                      data={"padding_free": padding_free}))
        result = Trainer(cfg, progress=False, log=lines.append).run()
        records = [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r], result, lines

    exact, exact_result, exact_log = run(False, "fp32")
    rounded, result, log = run(True, "bf16")
    assert "bf16 autocast" in log[0] and "bf16 autocast" not in exact_log[0]
    assert calls and all(calls)  # the bf16 run's attention went through the math node, the fp32 one's did not
    assert rounded[0] != exact[0]  # autocast did round
    # step by step within bf16 rounding of the fp32 run (measured ≤ 4e-5 relative), learning as it does
    assert all(abs(a - b) < 1e-3 * b for a, b in zip(rounded, exact, strict=True))
    assert rounded[-1] < rounded[0] and exact[-1] < exact[0]
    assert {t.dtype for t in adapter_tensors(result.output_dir).values()} == {torch.float32}
    assert abs(result.metrics["eval_loss"] - exact_result.metrics["eval_loss"]) < 0.05 * exact_result.metrics["eval_loss"]


def test_cpu_bf16_run_pages_out_the_mapped_fp32_weights_and_trains_the_same(run_config, tmp_path, monkeypatch):
    """Under CPU bf16 each frozen weight's bf16 copy serves the whole run, so its fp32 original, a
    view of the memory-mapped checkpoint, is paged out after the copy is made; the run is bit for
    bit the one that keeps the originals resident."""
    import lorakit.kernels.cast
    import lorakit.memory
    from lorakit.layers import lora_layers
    from lorakit.memory import file_backed

    advised: list[tuple[torch.Tensor, int]] = []
    monkeypatch.setattr(lorakit.memory, "MIN_BYTES", 0)
    monkeypatch.setattr(lorakit.kernels.cast, "page_out",
                        lambda t, maps: advised.append((t, lorakit.memory.page_out(t, maps))) or advised[-1][1])

    def run(release: bool, out: str) -> tuple[dict, Trainer]:
        cfg = build_config(run_config(train={"epochs": 1, "bf16": True, "save_steps": 0}, eval={"steps": 0},
                                      lora={"lora_dropout": 0.0}, output_dir=str(tmp_path / out)))
        trainer = Trainer(cfg, progress=False, log=lambda _: None)
        if not release:  # every weight below page_out's threshold: nothing is paged out
            monkeypatch.setattr(lorakit.memory, "MIN_BYTES", 1 << 62)
        result = trainer.run()
        return adapter_tensors(result.output_dir), trainer

    released, trainer = run(True, "released")
    frozen = [m.weight for _, m in lora_layers(trainer.model)]
    assert len(frozen) == 14 and all(file_backed(w) for w in frozen)  # from_pretrained maps the checkpoint
    embedding = trainer.model.get_input_embeddings().weight
    pages = {t.data_ptr(): n for t, n in advised}
    assert all(w.data_ptr() in pages for w in frozen)  # each projection weight was handed to page_out
    assert pages[embedding.data_ptr()] > 0  # the tied head's fp32 weight was paged out (6 MiB)
    n_before = len(advised)
    kept, _ = run(False, "kept")
    assert all(n == 0 for _, n in advised[n_before:])
    assert_identical(released, kept)


def test_cli_train_reports_what_ran_also_when_the_run_was_already_finished(run_config, tmp_path, capsys):
    from lorakit.cli import main

    cfg = run_config(train={"epochs": 1, "save_steps": 3}, eval={"steps": 0})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    first = capsys.readouterr().out
    assert "trained 6 steps in " in first and "final train loss " in first
    assert main(["train", str(tmp_path / "run.yaml")]) == 0  # resumes at its end: nothing to train
    again = capsys.readouterr().out
    assert "already held the finished run (6 steps): evaluated it again" in again and "trained" not in again
    assert main(["train", str(tmp_path / "run.yaml"), "train.epochs=2"]) == 0  # extended: the second epoch trains
    assert "trained 6 steps (resumed at step 6) in " in capsys.readouterr().out
    # on the 12-step schedule from step 6 on: its first step does not train at the 6-step schedule's final lr of 0
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    schedule = lorakit.optim.lr_lambda("cosine", round(0.05 * 12), 12)
    assert lrs[6] == pytest.approx(1e-2 * lorakit.optim.lr_lambda("cosine", round(0.05 * 6), 6)(5))
    assert [lrs[k] for k in range(7, 13)] == pytest.approx([1e-2 * schedule(k - 1) for k in range(7, 13)])


@pytest.mark.skipif(gemm._linear_op() is None, reason="this torch build has no oneDNN linear")
def test_training_with_onednn_products_equals_the_blas_run(run_config, monkeypatch, tmp_path):
    """The same run with the fused nodes' fp32 products on oneDNN (token counts rounded up to a
    multiple of 32, which trains nothing) and on torch's BLAS: the same losses and adapter to fp32
    rounding, and oneDNN did run."""
    real = gemm._linear_op()
    calls: list[int] = []

    class Counting:
        def __call__(self, *args):
            calls.append(1)
            return real(*args)

        def binary(self, *args):
            calls.append(1)
            return real.binary(*args)

    monkeypatch.setattr(gemm, "_linear_op", lambda: Counting())
    runs = {}
    for backend in ("blas", "onednn"):
        monkeypatch.setattr(gemm, "CPU_GEMM", backend)
        cfg = build_config(run_config(lora={"lora_dropout": 0.0}, train={"epochs": 1, "save_steps": 0},
                                      eval={"steps": 0, "generate": False}, output_dir=str(tmp_path / backend)))
        trainer = Trainer(cfg, progress=False, log=lambda _: None)
        assert trainer.flat_multiple == (32 if backend == "onednn" else 1)
        runs[backend] = trainer.run()
        assert bool(calls) is (backend == "onednn")
    blas, onednn = runs["blas"], runs["onednn"]
    assert onednn.train_loss == pytest.approx(blas.train_loss, rel=1e-5)
    assert onednn.metrics["eval_loss"] == pytest.approx(blas.metrics["eval_loss"], rel=1e-5)
    ours, theirs = adapter_tensors(onednn.output_dir), adapter_tensors(blas.output_dir)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, atol=1e-5 * float(value.abs().max()), rtol=1e-4)
