"""NEFTune (lorakit.neftune): noise of scale α/√(L·d) on the input embeddings, L each token's own
example length in padded, packed and padding-free batches; none in eval mode or on padding."""

from __future__ import annotations

import torch

from conftest import tiny_llama
from lorakit.collate import collate, collate_flat
from lorakit.data import IGNORE, Example
from lorakit.neftune import noisy_embeddings

ALPHA = 5.0


def _examples() -> list[Example]:
    g = torch.Generator().manual_seed(0)
    prefix = [7, 8, 9]  # trains nothing and starts every example: stored once in padding-free batches
    out = []
    for n in (6, 11, 17):
        ids = prefix + torch.randint(10, 128, (n - 3,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * 4 + ids[4:], f"x:{n}"))
    return out


def _noise(model, batch, training=True):
    embed = model.get_input_embeddings()
    with torch.no_grad():
        plain = embed(batch["input_ids"])
        model.train(training)
        with noisy_embeddings(model, ALPHA) as hook:
            hook.lengths = batch["example_lengths"]
            noisy = embed(batch["input_ids"])
        model.eval()
        assert embed(batch["input_ids"]).equal(plain)  # the hook is gone after the block
    return noisy - plain  # (B, T, d)


def _check(noise: torch.Tensor, lengths: torch.Tensor, width: int) -> None:
    """Every token's noise lies within ±α/√(L·d) of its example's L and reaches near that bound."""
    for length in lengths.unique().tolist():
        picked = noise[lengths == length]  # (tokens, d)
        if length == 0:
            assert not picked.any()
            continue
        bound = ALPHA / (length * width) ** 0.5
        assert picked.abs().max() <= bound * (1 + 1e-6)
        assert picked.abs().max() >= 0.9 * bound  # uniform on [-bound, bound]: ≥ 6·32 draws


def test_noise_scale_follows_each_examples_own_length_in_every_layout():
    torch.manual_seed(0)
    model, examples = tiny_llama(), _examples()
    width = model.config.hidden_size
    padded = collate([[e] for e in examples], pad_id=0)
    assert padded["example_lengths"].tolist()[0] == [6] * 6 + [0] * 11
    packed = collate([examples[:2], examples[2:]], pad_id=0)
    flat = collate_flat([[e] for e in examples], multiple=16)
    # padding-free: the shared prefix (3 tokens, their mean length 11), then each example's own
    # tokens (the last token cut: another segment follows each), then filler up to a multiple of 16
    assert flat["example_lengths"][0].tolist() == [11] * 3 + [6] * 2 + [11] * 7 + [17] * 13 + [0] * 7
    for batch in (padded, packed, flat):
        _check(_noise(model, batch), batch["example_lengths"], width)
    assert not _noise(model, flat, training=False).any()  # evaluation and generation see no noise


def test_every_forward_draws_new_noise():
    torch.manual_seed(0)
    model, batch = tiny_llama(), collate_flat([[e] for e in _examples()])
    assert not torch.equal(_noise(model, batch), _noise(model, batch))
