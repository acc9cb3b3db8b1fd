"""Data files → masked examples → (packed) batches; errors name the file and line."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from lorakit.data import (
    IGNORE,
    DataError,
    DataOptions,
    load_examples,
    read_rows,
    show_example,
    tokenize_row,
)
from lorakit.data import Row as R

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
                     {"role": "assistant", "content": "six"}]}


def trained_text(ex, tokenizer):
    return tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


def test_messages_train_only_assistant_turns_with_end_of_turn(tokenizer):
    ex = tokenize_row(R(CHAT, "x:1"), tokenizer, DataOptions())
    # the example ends at the last end-of-turn marker: the template's trailing newline is not kept
    assert trained_text(ex, tokenizer) == "4<|im_end|>\nsix<|im_end|>"
    assert ex.reference == "six" and ex.prompt.endswith("<|im_start|>assistant\n")
    full = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert full.endswith("<|im_end|>\n") and tokenizer.decode(ex.input_ids) == full[:-1]


def test_sharegpt_conversations_equal_the_same_messages(tokenizer):
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in CHAT["messages"]]}
    a = tokenize_row(R(CHAT, "x:1"), tokenizer, DataOptions())
    b = tokenize_row(R(sharegpt, "x:2"), tokenizer, DataOptions())
    assert (a.input_ids, a.labels, a.prompt, a.reference) == (b.input_ids, b.labels, b.prompt, b.reference)


def test_turn_weight_zero_is_context_not_trained(tokenizer):
    weighted = {"messages": [dict(m) for m in CHAT["messages"]]}
    weighted["messages"][2]["weight"] = 0  # the first answer, "4"
    ex = tokenize_row(R(weighted, "x:1"), tokenizer, DataOptions())
    assert trained_text(ex, tokenizer) == "six<|im_end|>"
    assert ex.input_ids == tokenize_row(R(CHAT, "x:2"), tokenizer, DataOptions()).input_ids
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo", "weight": 0}]}
    with pytest.raises(DataError, match=r"x:3: 'conversations' has no assistant turn to train on"):
        tokenize_row(R(sharegpt, "x:3"), tokenizer, DataOptions())
    sharegpt["conversations"][1]["weight"] = 0.5
    with pytest.raises(DataError, match=r"x:4: 'conversations'\[1\] has weight 0.5; use 0"):
        tokenize_row(R(sharegpt, "x:4"), tokenizer, DataOptions())


def test_prompt_completion_and_alpaca_render_as_chat(tokenizer):
    a = tokenize_row(R({"prompt": "Capital of France?", "completion": "Paris"}, "x:1"), tokenizer, DataOptions())
    b = tokenize_row(R({"instruction": "Capital of", "input": "France", "output": "Paris"}, "x:2"), tokenizer,
                     DataOptions())
    assert trained_text(a, tokenizer) == trained_text(b, tokenizer) == "Paris<|im_end|>"
    assert "Capital of\n\nFrance" in tokenizer.decode(b.input_ids)


def test_plain_text_formats_append_a_trained_eos(tokenizer):
    opts = DataOptions(chat_template=False)
    a = tokenize_row(R({"prompt": "Q: 2+2\nA:", "completion": " 4"}, "x:1"), tokenizer, opts)
    assert trained_text(a, tokenizer) == " 4<|im_end|>"
    assert a.labels[-1] == tokenizer.eos_token_id
    t = tokenize_row(R({"text": "hello world"}, "x:2"), tokenizer, opts)
    assert all(lab != IGNORE for lab in t.labels) and t.input_ids[-1] == tokenizer.eos_token_id


def test_train_on_inputs_trains_everything(tokenizer):
    ex = tokenize_row(R(CHAT, "x:1"), tokenizer, DataOptions(train_on_inputs=True))
    assert ex.labels == ex.input_ids


def test_answer_field_overrides_reference(tokenizer):
    ex = tokenize_row(R({"prompt": "p", "completion": "The answer is 4.", "answer": "4"}, "x:1"), tokenizer,
                      DataOptions())
    assert ex.reference == "4"


def test_file_types_and_directory(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.csv").write_text("prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(3)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    all_rows = read_rows(tmp_path)
    assert [r.data for r in all_rows] == rows * 4
    assert all_rows[4].source.endswith("b.json:row 2") and all_rows[7].source.endswith("c.csv:3")


def test_malformed_json_line_names_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON \(Unterminated string .* at column 10\)"):
        load_examples(path, tokenizer, DataOptions())
    path.write_text('{"prompt": "a", "completion": \r\n')  # cut off: the column is where the value is missing
    with pytest.raises(DataError, match=r"bad\.jsonl:1: invalid JSON \(Expecting value at column 31\)"):
        load_examples(path, tokenizer, DataOptions())


def test_row_matching_no_format_lists_the_formats(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "fine"}, {"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"rows\.jsonl:2: row matches no format \(keys: answer, question\); "
                                        r"accepted: text \| prompt\+completion \| messages"):
        load_examples(path, tokenizer, DataOptions())


def test_bad_messages_and_empty_dataset(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"m\.jsonl:1: 'messages' has no assistant turn"):
        load_examples(path, tokenizer, DataOptions())
    path = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "bot", "content": "hi"}]}])
    with pytest.raises(DataError, match="unknown role"):
        load_examples(path, tokenizer, DataOptions())
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "bot", "value": "hi"}]}])
    with pytest.raises(DataError, match=r"s\.jsonl:1: unknown from value\(s\) \['bot'\] in 'conversations'; use system, human"):
        load_examples(path, tokenizer, DataOptions())
    path = write_jsonl(tmp_path / "v.jsonl", [{"conversations": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"'conversations' must be a list of \{'from', 'value'\} objects"):
        load_examples(path, tokenizer, DataOptions())
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_examples(tmp_path / "empty.jsonl", tokenizer, DataOptions())
    with pytest.raises(DataError, match="no such data file"):
        load_examples(tmp_path / "missing.jsonl", tokenizer, DataOptions())


def test_overlong_examples_truncated_or_dropped(tmp_path, tokenizer):
    rows = [{"prompt": "short", "completion": "yes"}, {"prompt": "word " * 80, "completion": "long answer"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    opts = DataOptions(max_seq_len=40)
    kept = load_examples(path, tokenizer, opts)
    assert opts.stats == {"truncated": 0, "dropped": 1, "kept": 1} and len(kept) == 1  # truncation left no answer
    opts = DataOptions(max_seq_len=40, train_on_inputs=True)
    kept = load_examples(path, tokenizer, opts)
    assert opts.stats["truncated"] == 1 and len(kept[1].input_ids) == 40
    opts = DataOptions(max_seq_len=40, overlong="drop", train_on_inputs=True)
    assert len(load_examples(path, tokenizer, opts)) == 1 and opts.stats["dropped"] == 1


def test_show_example_marks_trained_tokens(tokenizer):
    ex = tokenize_row(R({"prompt": "Hi", "completion": "Yo"}, "f.jsonl:1"), tokenizer, DataOptions())
    text = show_example(ex, tokenizer)
    assert text.startswith("f.jsonl:1:") and text.endswith("[Y][o][<|im_end|>]") and "·Hi·" in text


def test_prompt_of_any_row_for_generation():
    Row = R
    from lorakit.data import prompt_of

    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert prompt_of(Row({"prompt": "P", "completion": "C"}, "f:1")) == "P"
    assert prompt_of(Row({"messages": [*chat, {"role": "assistant", "content": "A"}]}, "f:2")) == chat
    sharegpt = [{"from": "system", "value": "S"}, {"from": "human", "value": "U"}, {"from": "gpt", "value": "A"}]
    assert prompt_of(Row({"conversations": sharegpt}, "f:3")) == chat
    with pytest.raises(DataError, match="f:4: a prompt row needs 'prompt', 'messages' or 'conversations'"):
        prompt_of(Row({"text": "T"}, "f:4"))
    with pytest.raises(DataError, match="f:5: 'messages' has no turn before"):
        prompt_of(Row({"messages": [{"role": "assistant", "content": "A"}]}, "f:5"))
