"""Preference pairs and DPO: rows → pairs, per-example log-probabilities, the losses against their
float64 formulas, a trainer step's gradient against a plain-PyTorch DPO, and whole runs."""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil

import pytest
import torch

from conftest import randomize_adapters, run_configs, write_jsonl
from lorakit.attention import padding_free
from lorakit.checkpoint import complete_checkpoints
from lorakit.collate import collate, collate_flat
from lorakit.data import IGNORE, DataError, DataOptions, Row, load_examples
from lorakit.loss import sequence_logprobs
from lorakit.models import load_model
from lorakit.preference import (
    REFERENCE_FILE,
    build_kto_items,
    build_pairs,
    dpo_loss,
    kto_loss,
    load_pairs,
    orpo_loss,
    simpo_loss,
)
from lorakit.train import Trainer, train
from lorakit.train_config import ConfigError, build_config


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    """The preferred answer ends with a full stop, the other with a question mark (learnable at once)."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = r.randint(1, 99), r.randint(1, 99)
        out.append({"prompt": f"{a}+{b}", "chosen": f"{a + b}.", "rejected": f"{a + b - r.randint(1, 9)}?"})
    return out


# the small preference runs' settings, beside the objective and its data
SMALL_RUN = dict(lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}, data={"max_seq_len": 96},
                 train={"epochs": 2, "batch_size": 4, "lr": 2e-2, "save_steps": 3, "warmup_ratio": 0.0},
                 eval={"steps": 0, "batch_size": 4}, seed=1)


@pytest.fixture
def dpo_config(tiny_model_dir, tmp_path):
    return run_configs(tmp_path, tiny_model_dir, pair_rows(16), pair_rows(6, seed=1),
                       objective="dpo", dpo={"beta": 0.5}, **SMALL_RUN)


# -- rows ------------------------------------------------------------------------------------------


def test_string_conversational_and_implicit_rows_give_the_same_pair(tokenizer):
    """The three row forms of one pair tokenize alike; only the answers' tokens train; an assistant
    turn inside the prompt is context."""
    opts = DataOptions(max_seq_len=256)
    strings = {"prompt": "2+2", "chosen": "4", "rejected": "5"}
    chat = {"prompt": [{"role": "user", "content": "2+2"}], "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}]}
    implicit = {"chosen": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}],
                "rejected": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "5"}]}
    pairs = build_pairs([Row(r, f"f:{i}") for i, r in enumerate((strings, chat, implicit))], tokenizer, opts)
    assert [p.index for p in pairs] == [0, 1, 2]
    for p in pairs[1:]:
        assert [e.input_ids for e in p] == [e.input_ids for e in pairs[0]]
        assert [e.labels for e in p] == [e.labels for e in pairs[0]]
    chosen, rejected = pairs[0]
    sft = load_examples_from([{"prompt": "2+2", "completion": "4"}], tokenizer, opts)[0]
    assert (chosen.input_ids, chosen.labels) == (sft.input_ids, sft.labels)
    trained = [t for t in chosen.labels if t != IGNORE]
    assert tokenizer.decode(trained).startswith("4") and 1 <= len(trained) <= 3  # the answer and end of turn
    shared = next(i for i, (a, b) in enumerate(zip(chosen.input_ids, rejected.input_ids)) if a != b)
    assert all(t == IGNORE for t in chosen.labels[:shared] + rejected.labels[:shared])

    multi = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "2+2"}], "chosen": "4", "rejected": "5"}
    (c, _), = build_pairs([Row(multi, "f:9")], tokenizer, opts)
    assert tokenizer.decode([t for t in c.labels if t != IGNORE]).startswith("4")


def load_examples_from(rows, tokenizer, opts):
    from lorakit.data import build_examples

    return build_examples([Row(r, f"s:{i}") for i, r in enumerate(rows)], tokenizer, opts)


def test_bad_rows_name_the_file_and_line(tokenizer, tmp_path):
    opts = DataOptions(max_seq_len=256)
    bad = write_jsonl(tmp_path / "bad.jsonl", [pair_rows(1)[0], {"prompt": "x", "completion": "y"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: a preference row needs 'chosen' and 'rejected'"):
        load_pairs(bad, tokenizer, opts)
    sft = write_jsonl(tmp_path / "sft.jsonl", pair_rows(1))
    with pytest.raises(DataError, match=r"sft.jsonl:1: a preference row .*objective: dpo"):
        load_examples(sft, tokenizer, opts)
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "x", "chosen": 3, "rejected": "y"}])
    with pytest.raises(DataError, match=r"odd.jsonl:1: 'chosen' must be a string or a list"):
        load_pairs(odd, tokenizer, opts)
    apart = write_jsonl(tmp_path / "apart.jsonl", [{"chosen": [{"role": "assistant", "content": "a"}],
                                                    "rejected": [{"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match=r"apart.jsonl:1: no 'prompt' and .* share no leading turn"):
        load_pairs(apart, tokenizer, opts)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x " * 300, "chosen": "a", "rejected": "b"},
                                                 *pair_rows(2)])
    kept = DataOptions(max_seq_len=64, overlong="drop")
    assert len(load_pairs(long, tokenizer, kept)) == 2 and kept.stats["dropped"] == 1


# -- the maths -------------------------------------------------------------------------------------


def test_dpo_losses_equal_their_float64_formulas():
    g = torch.Generator().manual_seed(0)
    policy, reference = torch.randn(5, 2, generator=g) * 4 - 30, torch.randn(5, 2, generator=g) * 4 - 30
    lengths = torch.randint(1, 20, (5, 2), generator=g).double()
    beta, eps = 0.3, 0.1
    for i in range(5):
        (pc, pr), (rc, rr), (nc, nr) = policy[i].tolist(), reference[i].tolist(), lengths[i].tolist()
        u = (pc - rc) - (pr - rr)
        sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        want = {"sigmoid": -(1 - eps) * math.log(sig(beta * u)) - eps * math.log(sig(-beta * u)),
                "ipo": ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2}
        for loss_type, value in want.items():
            losses, rewards = dpo_loss(policy[i:i + 1].double(), reference[i:i + 1].double(), beta, loss_type,
                                       eps if loss_type == "sigmoid" else 0.0, lengths[i:i + 1])
            assert abs(float(losses[0]) - value) < 1e-12, loss_type
            with_nll, _ = dpo_loss(policy[i:i + 1].double(), reference[i:i + 1].double(), beta, loss_type,
                                   eps if loss_type == "sigmoid" else 0.0, lengths[i:i + 1], rpo_alpha=0.7)
            assert abs(float(with_nll[0]) - (value + 0.7 * -pc / nc)) < 1e-12, loss_type
            assert torch.allclose(rewards[0], beta * (policy[i] - reference[i]).double(), atol=1e-12)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(policy, reference, beta, "hinge")
    losses, rewards = orpo_loss(policy.double(), lengths, beta)
    for i in range(5):
        (pc, pr), (nc, nr) = policy[i].tolist(), lengths[i].tolist()
        odds = [math.log(math.exp(x) / (1 - math.exp(x))) for x in (pc / nc, pr / nr)]
        want = -pc / nc + beta * math.log(1 + math.exp(-(odds[0] - odds[1])))
        assert abs(float(losses[i]) - want) < 1e-12
        assert rewards[i].tolist() == pytest.approx([beta * pc / nc, beta * pr / nr], abs=1e-15)
    gamma = 0.4
    losses, rewards = simpo_loss(policy.double(), lengths, beta, gamma, eps, cpo_alpha=0.7)
    for i in range(5):
        (pc, pr), (nc, nr) = policy[i].tolist(), lengths[i].tolist()
        u = beta * (pc / nc - pr / nr) - gamma
        want = -(1 - eps) * math.log(1 / (1 + math.exp(-u))) - eps * math.log(1 / (1 + math.exp(u))) - 0.7 * pc / nc
        assert abs(float(losses[i]) - want) < 1e-12
        assert rewards[i].tolist() == pytest.approx([beta * pc / nc, beta * pr / nr], abs=1e-15)
    near_one, _ = orpo_loss(torch.tensor([[-1e-9, -3.0]], dtype=torch.float64), torch.ones(1, 2), beta)
    assert torch.isfinite(near_one).all()  # log(1 − p) as p → 1
    with pytest.raises(ValueError, match="pass lengths"):
        dpo_loss(policy, reference, beta, rpo_alpha=1.0)


@pytest.mark.parametrize("flat", [False, True])
def test_sequence_logprobs_equal_each_examples_own_float64_sum(tiny_model_dir, tokenizer, flat):
    """Padded or padding-free (shared prefix, trimmed last tokens), each example's log-probability
    equals Σ log_softmax of the model's own logits over its answer, run alone."""
    model, _ = load_model(str(tiny_model_dir))
    pairs = build_pairs([Row(r, f"f:{i}") for i, r in enumerate(pair_rows(3))], tokenizer, DataOptions())
    examples = [e for p in pairs for e in p]
    rows = [[e] for e in examples]
    batch = collate_flat(rows) if flat else collate(rows, tokenizer.pad_token_id)
    assert ("shared_prefix" in batch) == flat
    with torch.no_grad(), padding_free(model) if flat else contextlib.nullcontext():
        got = sequence_logprobs(model, batch, len(examples))
    for k, e in enumerate(examples):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1].double()
        labels = torch.tensor(e.labels[1:])
        keep = labels != IGNORE
        want = logits.log_softmax(-1)[keep].gather(1, labels[keep, None]).sum()
        assert abs(float(got[k]) - float(want)) < 2e-4 * abs(float(want)), k


def step_through_trainer(cfg, groups):
    """A trainer on ``cfg`` with its reference computed and random adapters (the policy moved away from
    the reference), after one accumulated step over micro-batches of train units ``groups`` (indices)
    through its fast paths: (trainer, micro-batches, the step's gradients by name and its ``loss``);
    the parameters' own gradients are cleared for the written-out reference."""
    trainer = Trainer(cfg, progress=False, log=lambda _: None)
    trainer._compute_reference(resumed=False)
    randomize_adapters(trainer.model, std=0.2)
    params = dict(trainer.params)
    got = {}

    def capture(loss):
        got.update({n: p.grad.clone() for n, p in params.items()})
        got["loss"] = loss
        return loss, 0.0

    trainer._update = capture
    group = [[trainer.train_examples[i] for i in micro] for micro in groups]
    trainer.model.train()
    with trainer.fast_paths():
        trainer.step(group)
    for p in params.values():
        p.grad = None
    return trainer, group, got


def assert_same_step(trainer, got, total):
    """``total`` (the written-out loss) has the step's loss, and its gradient the step's gradients."""
    total.backward()
    value = float(total.detach())
    assert abs(got["loss"] - value) < 1e-5 * max(1.0, value)
    params = dict(trainer.params)
    assert len(params) > 0
    for n, p in params.items():
        assert float((got[n] - p.grad).norm() / p.grad.norm()) < 1e-4, n  # fp32 rounding only


def _answer_logprob(model, example):
    """Σ log π(answer | prompt) of one example run alone, in float64."""
    logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1].double()
    labels = torch.tensor(example.labels[1:])
    keep = labels != IGNORE
    return logits.log_softmax(-1)[keep].gather(1, labels[keep, None]).sum()


@pytest.mark.parametrize(("padding_free", "loss_type", "rpo_alpha"),
                         [(True, "sigmoid", 0.0), (False, "sigmoid", 0.5), (True, "ipo", 0.5), (True, "orpo", 0.0),
                          (False, "simpo", 0.5)])
def test_a_trainer_step_has_the_gradient_of_plain_dpo(dpo_config, padding_free, loss_type, rpo_alpha):
    """Two micro-batches of an accumulated step through the trainer's fast paths: the gradient of every
    adapter parameter equals that of DPO written out plainly (each answer run alone, float64 sums)."""
    orpo, simpo = loss_type == "orpo", loss_type == "simpo"  # no reference; ORPO: β the odds ratio's weight
    dpo = {"beta": 0.7, "loss_type": "sigmoid" if orpo or simpo else loss_type,
           "label_smoothing": 0.1 if loss_type == "sigmoid" else 0.0, "rpo_alpha": rpo_alpha}
    objective = loss_type if orpo or simpo else "dpo"
    cfg = build_config(dpo_config(dpo=dpo, data={"padding_free": padding_free}, train={"grad_accum": 2},
                                  objective=objective, orpo={"beta": 0.7},
                                  simpo={"beta": 2.5, "gamma": 0.3, "label_smoothing": 0.1, "cpo_alpha": rpo_alpha}))
    trainer, (first, second), got = step_through_trainer(cfg, [[0, 1], [2]])
    model = trainer.model
    total = 0.0
    for pair in first + second:
        logps = [_answer_logprob(model, e) for e in pair]
        counts = [sum(t != IGNORE for t in e.labels[1:]) for e in pair]
        ref = trainer.reference["train"][pair.index]
        rc, rr = logps[0] - ref[0], logps[1] - ref[1]
        beta = dpo["beta"]
        if simpo:
            u = 2.5 * (logps[0] / counts[0] - logps[1] / counts[1]) - 0.3
            loss = -0.9 * torch.log(torch.sigmoid(u)) - 0.1 * torch.log(torch.sigmoid(-u))
        elif orpo:
            mc, mr = logps[0] / counts[0], logps[1] / counts[1]
            odds = (mc - torch.log(1 - torch.exp(mc))) - (mr - torch.log(1 - torch.exp(mr)))
            loss = -mc - beta * torch.log(torch.sigmoid(odds))
        elif loss_type == "ipo":
            loss = (rc / counts[0] - rr / counts[1] - 1 / (2 * beta)) ** 2
        else:
            u = beta * (rc - rr)
            loss = -0.9 * torch.log(torch.sigmoid(u)) - 0.1 * torch.log(torch.sigmoid(-u))
        loss = loss - rpo_alpha * logps[0] / counts[0]
        total = total + loss / 3
    assert_same_step(trainer, got, total)


# -- runs ------------------------------------------------------------------------------------------


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_run_learns_the_preference_resumes_exactly_and_saves_a_peft_adapter(dpo_config, tiny_model_dir):
    """The first step's loss is log 2 (policy = reference); after training the eval pairs' chosen
    answers win; a run resumed from a checkpoint ends bit-identical (the saved reference is read
    back, not recomputed from the trained model); without that file a resume is refused."""
    import copy

    import peft
    from transformers import AutoModelForCausalLM

    import lorakit

    cfg = dpo_config(eval={"steps": 4})
    whole = train(cfg, progress=False)
    records = metrics(whole.output_dir)
    steps = [r for r in records if "loss" in r]
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-6 and steps[0]["rewards/margins"] == 0.0
    final = whole.metrics
    assert final["eval_rewards/accuracies"] == 1.0 and final["eval_loss"] < 0.6 < math.log(2)
    assert final["eval_rewards/margins"] > 0 and final["eval_rewards/chosen"] > final["eval_rewards/rejected"]
    assert (whole.output_dir / REFERENCE_FILE).exists()

    adapter = (whole.output_dir / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(complete_checkpoints(whole.output_dir / "checkpoints")[-1])
    resumed = train(cfg, progress=False)
    assert resumed.steps == whole.steps == 8 and resumed.resumed_from == 6
    assert (resumed.output_dir / "adapter_model.safetensors").read_bytes() == adapter
    assert [r["loss"] for r in metrics(resumed.output_dir) if "loss" in r] == [r["loss"] for r in steps]

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        ours = lorakit.load_adapter(copy.deepcopy(base), whole.output_dir)(ids).logits
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), whole.output_dir).eval()(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)

    shutil.rmtree(complete_checkpoints(whole.output_dir / "checkpoints")[-1])
    (whole.output_dir / REFERENCE_FILE).unlink()
    with pytest.raises(DataError, match=f"{REFERENCE_FILE} is missing: a resumed DPO or KTO run"):
        train(cfg, progress=False)


def test_cli_eval_scores_pairs_as_the_runs_own_evaluation(dpo_config, tiny_model_dir, tmp_path):
    """``lorakit eval`` on preference rows: with the base as reference, DPO's rewards, accuracy and
    loss equal the trained run's final evaluation (whose reference was the same base); the ranking
    accuracies follow the mean log-probabilities of the reference file and the run's policy."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    cfg = dpo_config(train={"epochs": 1}, dpo={"beta": 0.5})
    result = train(cfg, progress=False)
    proc = subprocess.run([sys.executable, "-m", "lorakit", "eval", "--model", str(tiny_model_dir), "--adapter",
                           str(result.output_dir), "--data", cfg["data"]["eval"], "--beta", "0.5",
                           "--batch-size", "4"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = {k: float(v) for k, v in (line.split(": ") for line in proc.stdout.strip().splitlines())}
    final = result.metrics
    assert got["pairs"] == 6
    for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected"):
        assert got[key] == pytest.approx(final[f"eval_{key}"], abs=2e-4), key  # printed to 4 places
    base = load_file(result.output_dir / REFERENCE_FILE)["eval"]
    tokenizer = load_model(str(tiny_model_dir))[1]
    lengths = torch.tensor([[sum(t != IGNORE for t in e.labels) for e in p]
                            for p in load_pairs(cfg["data"]["eval"], tokenizer, DataOptions(max_seq_len=96))])
    mean = base / lengths
    assert got["base_accuracy"] == pytest.approx(float((mean[:, 0] > mean[:, 1]).double().mean()), abs=1e-4)  # printed to 4 places
    assert got["accuracy"] == 1.0 > got["base_accuracy"]


def test_full_fine_tuning_with_dpo_uses_the_starting_model_as_reference(dpo_config, tmp_path):
    """``method: full`` has no adapter to switch off: the precomputed reference is the only one."""
    result = train(dpo_config(method="full", train={"epochs": 1, "lr": 1e-3}, output_dir=str(tmp_path / "full")),
                   progress=False)
    steps = [r for r in metrics(result.output_dir) if "loss" in r]
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-6 and steps[-1]["rewards/margins"] > 0
    assert (result.output_dir / "model" / "config.json").exists()


def test_dpo_from_a_saved_adapter_takes_that_model_as_its_reference(dpo_config, tiny_model_dir, tmp_path):
    """DPO after SFT (``model.adapter``): the reference is base + SFT adapter, the same as for a run
    on that adapter merged into a new base (LoRA or full), and unlike the plain base's."""
    from safetensors.torch import load_file

    from conftest import randomize_adapters
    from lorakit import LoraConfig, get_lora_model, save_adapter
    from lorakit.export import export_merged

    model, _ = load_model(str(tiny_model_dir))
    get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(model, std=0.05)
    sft = save_adapter(model, tmp_path / "sft")
    export_merged(str(tiny_model_dir), [(str(sft), 1.0)], tmp_path / "merged")

    def reference(name: str, adapter: bool = False, **sections) -> dict:
        cfg = dpo_config(train={"max_steps": 1}, output_dir=str(tmp_path / name), **sections)
        if adapter:
            cfg["model"]["adapter"], cfg["lora"] = str(sft), {}
        result = train(cfg, progress=False)
        assert abs(metrics(result.output_dir)[0]["loss"] - math.log(2)) < 1e-6  # the policy starts as the reference
        return load_file(result.output_dir / REFERENCE_FILE)

    ours = reference("continued", adapter=True)
    merged = reference("merged", model={"name": str(tmp_path / "merged")})
    full = reference("full", adapter=True, method="full")
    base = reference("base")
    for key in ours:
        torch.testing.assert_close(ours[key], merged[key], atol=1e-5, rtol=0)
        torch.testing.assert_close(full[key], merged[key], atol=1e-5, rtol=0)
        assert (ours[key] - base[key]).abs().max() > 0.01  # 1000× the tolerance above


def test_dpo_config_errors_name_the_key(dpo_config):
    for change, message in [({"objective": "rlhf"}, "objective must be 'sft', 'dpo', 'orpo', 'simpo' or 'kto'"),
                            ({"objective": "kto", "kto": {"beta": 0}}, "kto.beta must be > 0"),
                            ({"objective": "kto", "kto": {"undesirable_weight": 0}}, "kto.desirable_weight and kto"),
                            ({"objective": "kto", "data": {"packing": True}}, "data.packing: objective kto"),
                            ({"dpo": {"beta": 0}}, "dpo.beta must be > 0"),
                            ({"dpo": {"loss_type": "hinge"}}, "dpo.loss_type must be sigmoid or ipo"),
                            ({"dpo": {"loss_type": "ipo", "label_smoothing": 0.1}}, "label_smoothing applies to"),
                            ({"dpo": {"rpo_alpha": -1}}, "dpo.rpo_alpha must be >= 0"),
                            ({"objective": "orpo", "orpo": {"beta": -0.1}}, "orpo.beta must be > 0"),
                            ({"objective": "orpo", "data": {"packing": True}}, "data.packing: objective orpo"),
                            ({"objective": "simpo", "simpo": {"gamma": -1}}, "simpo.gamma must be >= 0"),
                            ({"objective": "simpo", "simpo": {"cpo_alpha": -1}}, "simpo.cpo_alpha must be >= 0"),
                            ({"data": {"packing": True}}, "data.packing: objective dpo"),
                            ({"data": {"train_on_inputs": True}}, "data.train_on_inputs: dpo compares")]:
        with pytest.raises(ConfigError, match=message):
            build_config(dpo_config(**change))
    with pytest.raises(ConfigError, match="did you mean 'dpo.beta'"):
        build_config(dpo_config(dpo={"betta": 0.1}))


def test_held_out_pairs_are_reindexed_for_their_reference(tokenizer):
    from lorakit.preference import split_pairs

    pairs = build_pairs([Row(r, f"f:{i}") for i, r in enumerate(pair_rows(10))], tokenizer, DataOptions())
    train_part, eval_part = split_pairs(pairs, 0.3, seed=0)
    assert (len(train_part), len(eval_part)) == (7, 3)
    assert [p.index for p in train_part] == list(range(7)) and [p.index for p in eval_part] == list(range(3))
    assert sorted(p[0].input_ids for p in train_part + eval_part) == sorted(p[0].input_ids for p in pairs)


def test_cli_shows_both_sides_of_a_pair(dpo_config, tmp_path, capsys):
    import yaml

    from lorakit.cli import main

    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(dpo_config()))
    assert main(["train", str(path), "--show-example", "0"]) == 0
    shown = capsys.readouterr().out
    row = pair_rows(1)[0]
    chosen, rejected = shown.split("[rejected]")
    assert chosen.startswith("[chosen]") and "5 trained" in chosen

    def trained_text(side):  # the [bracketed] tokens, which train
        return "".join(t for t in side.split("]") if "[" in t for t in [t.rsplit("[", 1)[1]]).replace("<|im_end|>", "")

    assert trained_text(chosen.split("\n", 2)[2]) == row["chosen"]
    assert trained_text(rejected.split("\n", 2)[2]) == row["rejected"]


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_reference_free_runs_learn_the_preference(dpo_config, tmp_path, objective):
    out = tmp_path / objective
    cfg = dpo_config(objective=objective, orpo={"beta": 1.0}, simpo={"cpo_alpha": 1.0}, output_dir=str(out))
    trainer = Trainer(build_config(cfg), progress=False, log=lambda _: None)
    before = trainer.evaluate()
    final = trainer.run().metrics
    assert not (out / REFERENCE_FILE).exists()
    steps = [r for r in metrics(out) if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"] and final["eval_loss"] < before["eval_loss"]
    assert before["eval_rewards/accuracies"] < 1.0 == final["eval_rewards/accuracies"]
    assert final["eval_rewards/margins"] > before["eval_rewards/margins"]
    assert final["eval_logps/chosen"] > before["eval_logps/chosen"]  # the likelihood term raised the chosen answers


# -- KTO -------------------------------------------------------------------------------------------


def judged_rows(n: int, seed: int = 0) -> list[dict]:
    """``pair_rows`` as TRL's unpaired rows: each pair's chosen answer desirable, its rejected one not."""
    return [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in pair_rows(n, seed) for side in ("chosen", "rejected")]


def test_kto_loss_equals_its_float64_formula():
    g = torch.Generator().manual_seed(0)
    policy, reference = torch.randn(6, 2, generator=g) * 4 - 30, torch.randn(6, 2, generator=g) * 4 - 30
    desirable = torch.tensor([True, False, True, True, False, False])
    beta, wd, wu = 0.3, 1.5, 0.8
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for shift in (0.0, 5.0, -5.0):  # the mismatched answers' log-ratio mean: around 0, above, below (z clamps at 0)
        pol = policy.double() + torch.tensor([0.0, shift], dtype=torch.float64)
        losses, rewards = kto_loss(pol, reference.double(), desirable, beta, wd, wu)
        z = max(0.0, sum(pol[i, 1].item() - reference[i, 1].item() for i in range(6)) / 6)
        assert shift == 0 or (z > 0) == (shift > 0)
        for i in range(6):
            r = pol[i, 0].item() - reference[i, 0].item()
            want = wd * (1 - sig(beta * (r - z))) if desirable[i] else wu * (1 - sig(beta * (z - r)))
            assert abs(float(losses[i]) - want) < 1e-12
            assert rewards[i].tolist() == pytest.approx([beta * r, pol[i, 1].item() - reference[i, 1].item()],
                                                        abs=1e-12)
    z_grad = policy.double().requires_grad_()
    kto_loss(z_grad, reference.double(), desirable, beta)[0].sum().backward()
    assert bool((z_grad.grad[:, 1] == 0).all()) and bool((z_grad.grad[:, 0] != 0).all())  # z is a baseline


def test_kto_rows_give_judged_answers_each_with_another_rows_answer(tokenizer, tmp_path):
    """Unpaired rows (strings or messages) and pair rows (one desirable, one undesirable answer) give
    items whose first example is the row as SFT would train it, and whose second is the same prompt
    with another row's answer: every answer is some other item's mismatch exactly once."""
    opts = DataOptions(max_seq_len=256)
    rows = [{"prompt": "2+2", "completion": "4", "label": True},
            {"prompt": [{"role": "user", "content": "3+3"}], "completion": [{"role": "assistant", "content": "7"}],
             "label": False},
            {"prompt": "5+5", "chosen": "10", "rejected": "11"}]
    items = build_kto_items([Row(r, f"f:{i}") for i, r in enumerate(rows)], tokenizer, opts)
    assert [it.desirable for it in items] == [True, False, True, False] and [it.index for it in items] == [0, 1, 2, 3]
    prompts = ["2+2", "3+3", "5+5", "5+5"]
    answers = ["4", "7", "10", "11"]
    sft = load_examples_from([{"prompt": p, "completion": a} for p, a in zip(prompts, answers)], tokenizer, opts)
    mismatched = []
    for it, p, want in zip(items, prompts, sft):
        assert (it[0].input_ids, it[0].labels) == (want.input_ids, want.labels)
        trained = tokenizer.decode([t for t in it[1].labels if t != IGNORE])
        other = next(a for a in answers if trained.startswith(a) and trained[len(a):len(a) + 1] in ("<", ""))
        mismatched.append(other)
        assert p in tokenizer.decode(it[1].input_ids) and all(t == IGNORE for t in it[1].labels[:3])
    assert sorted(mismatched) == sorted(answers) and all(m != a for m, a in zip(mismatched, answers))

    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"prompt": "x", "completion": "y", "label": "yes"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: 'label' must be true .* or false, got 'yes'"):
        load_pairs(bad, tokenizer, opts, objective="kto")
    neither = write_jsonl(tmp_path / "neither.jsonl", [rows[0], {"prompt": "x", "completion": "y"}])
    with pytest.raises(DataError, match=r"neither.jsonl:2: a KTO row needs 'prompt', 'completion' and 'label'"):
        load_pairs(neither, tokenizer, opts, objective="kto")
    with pytest.raises(DataError, match=r"bad.jsonl:1: a judged answer .* objective: kto"):
        load_examples(bad, tokenizer, opts)  # SFT on judged answers would learn the undesirable ones


@pytest.fixture
def kto_config(tiny_model_dir, tmp_path):
    return run_configs(tmp_path, tiny_model_dir, judged_rows(8), judged_rows(3, seed=1),
                       objective="kto", kto={"beta": 0.5}, **SMALL_RUN)


@pytest.mark.parametrize("padding_free", [True, False])
def test_a_kto_trainer_step_has_the_gradient_of_plain_kto(kto_config, padding_free):
    """An accumulated step of two micro-batches: the gradient equals that of KTO written out, each
    answer run alone in float64 sums, z the micro-batch's mean mismatched log-ratio (clamped, no gradient)."""
    cfg = build_config(kto_config(kto={"beta": 0.7, "desirable_weight": 1.3, "undesirable_weight": 0.6},
                                  data={"padding_free": padding_free}, train={"grad_accum": 2}))
    trainer, group, got = step_through_trainer(cfg, [[0, 1, 2], [3, 4]])
    assert {it.desirable for it in group[0] + group[1]} == {True, False}
    model = trainer.model
    total, zs = 0.0, []
    for micro in group:
        ref = trainer.reference["train"][[it.index for it in micro]]
        mismatched = torch.stack([_answer_logprob(model, it[1]) for it in micro]).detach() - ref[:, 1]
        z = mismatched.mean().clamp(min=0)
        zs.append(float(z))
        for it, (r0, _) in zip(micro, ref):
            r = _answer_logprob(model, it[0]) - r0
            loss = 1.3 * (1 - torch.sigmoid(0.7 * (r - z))) if it.desirable else 0.6 * (1 - torch.sigmoid(0.7 * (z - r)))
            total = total + loss / 5
    assert max(zs) > 0  # the KL baseline is live in this step
    assert_same_step(trainer, got, total)


def test_kto_run_learns_the_judgements_resumes_exactly_and_lorakit_eval_agrees(kto_config, tiny_model_dir, tmp_path):
    """From the reference (first loss: 1 − σ(0) = 0.5 whatever the labels), the desirable answers'
    rewards rise above the undesirable ones' on held-out rows; a resumed run ends bit-identical;
    ``lorakit eval`` on the judged rows (the base as reference, as the run's) gives its final evaluation."""
    import subprocess
    import sys

    trainer = Trainer(build_config(kto_config(eval={"steps": 4})), progress=False, log=lambda _: None)
    trainer._compute_reference(resumed=False)
    before = trainer.evaluate()
    final = trainer.run().metrics
    out = tmp_path / "out"
    steps = [r for r in metrics(out) if "loss" in r]
    assert abs(steps[0]["loss"] - 0.5) < 1e-6 and steps[0]["kl"] == 0.0 and steps[0]["rewards/margins"] == 0.0
    assert before["eval_rewards/margins"] == 0.0 < final["eval_rewards/margins"]
    assert final["eval_loss"] < before["eval_loss"] and final["eval_rewards/chosen"] > 0 > final["eval_rewards/rejected"]
    assert (out / REFERENCE_FILE).exists()

    adapter = (out / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(complete_checkpoints(out / "checkpoints")[-1])
    resumed = train(kto_config(eval={"steps": 4}), progress=False)
    assert resumed.resumed_from is not None and resumed.steps == len(steps)
    assert (out / "adapter_model.safetensors").read_bytes() == adapter
    assert [r["loss"] for r in metrics(out) if "loss" in r] == [r["loss"] for r in steps]

    proc = subprocess.run([sys.executable, "-m", "lorakit", "eval", "--model", str(tiny_model_dir), "--adapter",
                           str(out), "--data", str(tmp_path / "eval.jsonl"), "--beta", "0.5", "--batch-size", "4"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = {k: float(v) for k, v in (line.split(": ") for line in proc.stdout.strip().splitlines())}
    assert got["answers"] == 6
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
        assert got[key] == pytest.approx(final[f"eval_{key}"], abs=2e-4), key  # printed to 4 places
    assert got["accuracy"] > 0.8  # at least 5 of the 6 rewards have the sign of their label
