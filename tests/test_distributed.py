"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 train exactly like one process on the same global batch."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import write_jsonl
from test_train import rows

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def make_config(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", rows(30))

    def make(name: str, **train) -> Path:
        cfg = {"model": {"name": str(tiny_model_dir)},
               "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
               "data": {"train": str(tmp_path / "train.jsonl"), "max_seq_len": 96},
               "train": {"epochs": 1, "batch_size": 2, "lr": 1e-2, "logging_steps": 1, **train},
               "output_dir": str(tmp_path / name), "seed": 5}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path
    return make


def torchrun(config: Path, *overrides: str, nproc: int = 2, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "lorakit", "train", str(config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **popen)


def single(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit", "train", str(config), *overrides], capture_output=True,
                          text=True, timeout=600)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def compare(a: Path, b: Path, tol: float) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) > 3
    assert max(abs(x - y) for x, y in zip(la, lb)) <= tol
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], atol=tol, rtol=0, msg=k)


@pytest.mark.parametrize("mode, tol, extra", [("ddp", 1e-5, []), ("ddp", 1e-5, ["train.gradient_checkpointing=true"]),
                                              ("fsdp", 1e-4, [])])
def test_two_processes_train_like_one_with_the_same_global_batch(make_config, tiny_model_dir, mode, tol, extra):
    # one process, 4 rows per step = two processes × 2 rows; 30 rows → the last step has 2 rows (rank 1
    # runs a zero-weight row there)
    one = single(make_config("one", batch_size=4), "train.distributed=none")
    assert one.returncode == 0, one.stderr
    cfg = make_config(mode)
    proc = torchrun(cfg, f"train.distributed={mode}", *extra)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert f"× 2 processes ({mode}) = 4 rows per step" in out
    run_dir = cfg.parent / mode
    compare(cfg.parent / "one", run_dir, tol)
    if mode == "fsdp":  # built on meta, each rank read about half of the weights; the adapter loads in PEFT
        read, total = map(float, re.search(r"shards only \(([\d.]+) of ([\d.]+) MiB", out).groups())
        assert total > 0 and abs(read / total - 0.5) < 0.02, out
        import peft
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model = peft.PeftModel.from_pretrained(base, run_dir)
        assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


def test_a_killed_rank_ends_the_job_with_an_error_and_resume_completes(make_config):
    # with dropout the ranks' RNG streams differ; each rank's is checkpointed, so the resumed run is the
    # uninterrupted one exactly
    whole = make_config("whole", epochs=3)
    run = torchrun(whole, "train.distributed=ddp", "lora.lora_dropout=0.1")
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out
    cfg = make_config("killed", save_steps=2, epochs=3)
    proc = torchrun(cfg, "train.distributed=ddp", "lora.lora_dropout=0.1", start_new_session=True)
    ckpts = cfg.parent / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts.exists() and any(p.name.startswith("checkpoint-") for p in
                                                                   ckpts.iterdir())):
        time.sleep(0.2)
    workers = _children_running_lorakit(proc.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    try:
        out, _ = proc.communicate(timeout=120)  # no hang: torchrun stops the other rank
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "SIGKILL" in out or "Signal 9" in out or "exitcode" in out
    # `lorakit train --nproc 2` starts torchrun itself (train.distributed=ddp by default)
    resumed = subprocess.Popen([sys.executable, "-m", "lorakit", "train", str(cfg), "lora.lora_dropout=0.1",
                                "--nproc", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    a, b = adapter(cfg.parent / "whole"), adapter(cfg.parent / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # another world size is refused with a clear message
    again = single(cfg, "train.distributed=none", "lora.lora_dropout=0.1", "train.epochs=4")
    assert again.returncode == 2 and "2 process(es), this one has 1" in again.stderr


def _children_running_lorakit(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and "lorakit" in cmd:
            found.append(int(entry.name))
    return sorted(found)


def one_and_two(make_config, name: str, mode: str, *overrides: str) -> tuple[Path, Path, str]:
    """The run ``name`` with ``overrides`` in one process (4 rows a step) and in two (2 rows each,
    ``mode``): the one's output directory, the two's config file, and what the two printed."""
    one = single(make_config(f"{name}-one", batch_size=4), "train.distributed=none", *overrides)
    assert one.returncode == 0, one.stderr
    cfg = make_config(name)
    proc = torchrun(cfg, f"train.distributed={mode}", *overrides)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return cfg.parent / f"{name}-one", cfg, out


def test_qlora_with_ddp_trains_like_one_process(make_config):
    one, cfg, _ = one_and_two(make_config, "ddp-nf4", "ddp", "model.quantize=nf4")
    compare(one, cfg.parent / "ddp-nf4", 1e-4)
    fsdp = torchrun(cfg, "train.distributed=fsdp", "model.quantize=nf4", "output_dir=" + str(cfg.parent / "f"))
    out, _ = fsdp.communicate(timeout=600)
    assert fsdp.returncode != 0 and "does not shard a 4-bit / 8-bit base; use ddp for QLoRA" in out


def test_fsdp_full_fine_tuning_from_a_meta_built_base_matches_one_process(make_config):
    # every weight comes from each rank's own shards; the tied embedding / head is saved once, as one process does
    a, cfg, _ = one_and_two(make_config, "full-fsdp", "fsdp", "method=full", "train.lr=1e-3")
    b = cfg.parent / "full-fsdp"
    assert max(abs(x - y) for x, y in zip(losses(a), losses(b))) <= 1e-4
    ta, tb = load_file(str(a / "model/model.safetensors")), load_file(str(b / "model/model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], atol=1e-4, rtol=0, msg=k)


def test_dora_under_fsdp_trains_like_one_process(make_config):
    """DoRA's magnitudes start at the base weights' row norms, so an FSDP run loads the base whole
    (not built on meta) and then shards it: the same losses and adapter (magnitudes included) as
    one process."""
    one, cfg, out = one_and_two(make_config, "fsdp-dora", "fsdp", "lora.use_dora=true")
    assert "built on the meta device" not in out
    compare(one, cfg.parent / "fsdp-dora", 1e-4)
    assert any(k.endswith("lora_magnitude_vector") for k in adapter(cfg.parent / "fsdp-dora"))


@pytest.mark.parametrize("mode, objective, tol", [("ddp", "dpo", 1e-5), ("fsdp", "dpo", 1e-4), ("ddp", "kto", 1e-5)])
def test_preference_on_two_processes_trains_like_one(make_config, mode, objective, tol):
    """``objective: dpo``: every rank computes every pair's reference (an FSDP forward is collective),
    rank 0 saves it, and the run's losses and adapter equal one process's on the same global batch
    (18 pairs, 4 a step: the last step's 2 split one per rank). ``kto`` (18 judged answers): its KL
    estimate z is the whole micro-batch's, summed over ranks, as one process computes it."""
    from test_preference import judged_rows, pair_rows

    rows = pair_rows(18) if objective == "dpo" else judged_rows(9)
    data = write_jsonl(make_config("probe").parent / f"{objective}.jsonl", rows)
    name = f"{mode}-{objective}"
    one, cfg, _ = one_and_two(make_config, name, mode, f"objective={objective}", f"data.train={data}")
    compare(one, cfg.parent / name, tol)
    assert (cfg.parent / name / "reference_logps.safetensors").exists()
