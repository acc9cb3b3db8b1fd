"""Examples → batches: packing, padded and padding-free collation (``lorakit.collate``)."""

from __future__ import annotations

import torch

from lorakit.collate import collate, collate_flat, pack
from lorakit.data import IGNORE, DataOptions, tokenize_row
from lorakit.data import Row as R
from lorakit.loss import causal_lm_loss
from lorakit.models import load_model

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
                     {"role": "assistant", "content": "six"}]}


def test_packing_gives_the_same_loss_as_separate_examples(tiny_model_dir, tokenizer):
    model, _ = load_model(str(tiny_model_dir))
    rows = [CHAT, {"prompt": "Name a colour.", "completion": "Blue."}, {"text": "plain text row"},
            {"instruction": "Add", "input": "2 and 3", "output": "5"}, {"prompt": "x " * 20, "completion": "y"}]
    examples = [tokenize_row(R(r, f"r:{i}"), tokenizer, DataOptions()) for i, r in enumerate(rows)]
    packed_rows = pack(examples, max_len=128)
    assert len(packed_rows) < len(examples)
    with torch.no_grad():
        sep_sum, sep_n = causal_lm_loss(model, collate([[e] for e in examples], tokenizer.pad_token_id))
        one_by_one = sum(float(causal_lm_loss(model, collate([[e]], 2))[0]) for e in examples)
        packed_sum, packed_n = causal_lm_loss(model, collate(packed_rows, tokenizer.pad_token_id))
    assert sep_n == packed_n == sum(e.n_supervised for e in examples)
    assert abs(float(packed_sum) / packed_n - float(sep_sum) / sep_n) <= 1e-5
    assert abs(one_by_one / sep_n - float(sep_sum) / sep_n) <= 1e-5
    batch = collate(packed_rows, 2)
    assert batch["attention_mask"].shape[1] == 1 and batch["attention_mask"].dim() == 4
    assert batch["position_ids"][0, len(packed_rows[0][0].input_ids)] == 0  # positions restart per example
    # rounded to a token count that is a multiple of 32: the same loss over the same tokens
    for rows in ([[e] for e in examples], packed_rows):
        plain, wide = collate(rows, 2), collate(rows, 2, multiple=32)
        assert wide["input_ids"].numel() % 32 == 0 and 0 <= wide["input_ids"].shape[1] - plain["input_ids"].shape[1] < 32
        with torch.no_grad():
            (a, na), (b, nb) = causal_lm_loss(model, plain), causal_lm_loss(model, wide)
        assert na == nb and abs(float(a) - float(b)) <= 1e-5 * abs(float(a))


def test_collate_flat_marks_segments_and_blocks_cross_targets(tokenizer):
    a = tokenize_row(R({"prompt": "Hi", "completion": "Yo"}, "a"), tokenizer, DataOptions())
    b = tokenize_row(R({"text": "plain"}, "b"), tokenizer, DataOptions())
    batch = collate_flat([[a], [b]], trim=False)
    na, nb = len(a.input_ids), len(b.input_ids)
    assert batch["input_ids"].shape == (1, na + nb)
    assert batch["cu_seq_lens_q"].tolist() == [0, na, na + nb] and batch["max_length_q"] == max(na, nb)
    assert batch["position_ids"][0].tolist() == list(range(na)) + list(range(nb))
    assert batch["labels"][0, na] == IGNORE  # a's last position does not learn to predict b's first token
    # trimmed: a's last token (it predicts nothing) is left out, its label moves to b's first slot, so
    # a's second-to-last position still learns it; b, the last segment, keeps all its tokens
    cut = collate_flat([[a], [b]])
    assert cut["input_ids"][0].tolist() == a.input_ids[:-1] + b.input_ids
    assert cut["cu_seq_lens_q"].tolist() == [0, na - 1, na - 1 + nb] and cut["max_length_q"] == max(na - 1, nb)
    assert cut["position_ids"][0].tolist() == list(range(na - 1)) + list(range(nb))
    assert cut["labels"][0].tolist() == [*a.labels[:-1], a.labels[-1], *b.labels[1:]]
    assert a.labels[-1] != IGNORE  # the moved label is a trained one
    # with a filler after it, the last example is trimmed too (its label moves into the filler)
    filled = collate_flat([[a], [b]], multiple=8, pad_id=0)
    n = filled["input_ids"].shape[1]
    assert n % 8 == 0 and filled["input_ids"][0, :na + nb - 2].tolist() == a.input_ids[:-1] + b.input_ids[:-1]
    assert filled["labels"][0, na + nb - 2] == b.labels[-1] and (filled["labels"][0, na + nb - 1:] == IGNORE).all()
