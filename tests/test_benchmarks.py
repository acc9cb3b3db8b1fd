"""The benchmark scripts do the same work on both sides (timings themselves are never asserted)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))


@pytest.mark.parametrize("bf16", [False, True])
def test_padded_variant_gives_both_sides_identical_work(tiny_model_dir, bf16):
    """``train_vs_peft.py --padded``: lorakit's kernels and PEFT's layers, fed the same padded batches
    from the same LoRA initialisation, count the same supervised tokens and reach the same loss
    (three steps at this rate move it by ≈ 0.03; the sides agree to 1e-5 in fp32, 3e-5 in bf16)."""
    import train_vs_peft

    args = argparse.Namespace(steps=3, batch=4, lr=1e-3, bf16=bf16)
    ours = train_vs_peft.run_padded(args, str(tiny_model_dir), "lorakit")
    peft = train_vs_peft.run_padded(args, str(tiny_model_dir), "peft")
    assert ours["supervised_tokens"] == peft["supervised_tokens"] > 0
    assert ours["final_loss"] == pytest.approx(peft["final_loss"], abs=1e-3 if bf16 else 1e-5)
