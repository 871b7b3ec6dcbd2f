"""Data loading: formats, assistant-only labels, truncation, padding, pair layout, bad rows."""
import json

import pytest
import torch

from minorsft import data as D
from minorsft import tiny


# The loop, not the kernels: only the plain (PyTorch backend) pass of `make test`.
pytestmark = pytest.mark.no_interpreter


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


def write(path, rows):
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
    return str(path)


def test_prompt_response_labels_only_on_response(tmp_path, tok):
    p = write(tmp_path / "d.jsonl", [{"prompt": "12+3=", "response": "15"}])
    ds = D.load_dataset(p, tok, max_length=64)
    ex = ds.examples[0]
    prompt_ids = tok("12+3=")["input_ids"]
    resp_ids = tok("15", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids == prompt_ids + resp_ids
    assert ex.labels == [-100] * len(prompt_ids) + resp_ids
    assert ds.kind == "sft" and ex.answer == "15"


def test_messages_assistant_only_labels_multi_turn(tmp_path, tok):
    msgs = [{"role": "system", "content": "be exact"}, {"role": "user", "content": "1+1="},
            {"role": "assistant", "content": "2"}, {"role": "user", "content": "rev ab="},
            {"role": "assistant", "content": "ba"}]
    p = write(tmp_path / "chat.jsonl", [{"messages": msgs}])
    ex = D.load_dataset(p, tok, max_length=128).examples[0]
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert ex.input_ids == tok(full, add_special_tokens=False)["input_ids"]
    trained = tok.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != -100])
    # exactly the two assistant contents, each with its end-of-turn token
    assert trained == "2</s>ba</s>"
    assert all(l in (-100, t) for t, l in zip(ex.input_ids, ex.labels))


def test_pairs_collate_layout_and_padding(tmp_path, tok):
    rows = [{"prompt": "1+2=", "chosen": "3", "rejected": "4"},
            {"prompt": "rev abcd=", "chosen": "dcba", "rejected": "abcd"}]
    ds = D.load_dataset(write(tmp_path / "p.jsonl", rows), tok, max_length=64)
    assert ds.kind == "pairs"
    b = D.collate_pairs(ds.examples, tok.pad_token_id)
    B = len(rows)
    assert b["input_ids"].shape[0] == 2 * B
    for i, ex in enumerate(ds.examples):
        for row, ids, labels in ((i, ex.input_ids, ex.labels), (B + i, ex.rejected_input_ids, ex.rejected_labels)):
            n = len(ids)
            assert b["input_ids"][row, :n].tolist() == ids
            assert b["labels"][row, :n].tolist() == labels
            assert b["attention_mask"][row].tolist() == [1] * n + [0] * (b["input_ids"].shape[1] - n)
            assert (b["labels"][row, n:] == -100).all() and (b["input_ids"][row, n:] == tok.pad_token_id).all()
    chosen_text = tok.decode([t for t in b["labels"][1].tolist() if t != -100])
    rejected_text = tok.decode([t for t in b["labels"][B + 1].tolist() if t != -100])
    assert chosen_text == "dcba</s>" and rejected_text == "abcd</s>"
    assert b["index"].tolist() == [0, 1]


def test_truncation_keeps_prompt_and_cuts_response(tmp_path, tok):
    p = write(tmp_path / "d.jsonl", [{"prompt": "up abc=", "response": "ABCDEFGHIJ"}])
    ex = D.load_dataset(p, tok, max_length=10).examples[0]
    assert len(ex.input_ids) == 10 == len(ex.labels)
    n_prompt = len(tok("up abc=")["input_ids"])
    assert sum(l != -100 for l in ex.labels) == 10 - n_prompt


def test_sft_kind_reads_response_of_rows_with_all_fields(tmp_path, tok):
    p = write(tmp_path / "d.jsonl", tiny.synthetic_rows(6, seed=1))
    assert D.load_dataset(p, tok, max_length=64, kind="sft").kind == "sft"
    assert D.load_dataset(p, tok, max_length=64, kind="pairs").kind == "pairs"


@pytest.mark.parametrize("row, field", [
    ({"prompt": "1+1="}, "response"),
    ({"prompt": "1+1=", "response": ""}, "response"),
    ({"prompt": "1+1=", "response": "   "}, "response"),
    ({"prompt": 5, "response": "2"}, "prompt"),
    ({"prompt": "x" * 40, "response": "2"}, "prompt"),
    ({"prompt": "a", "chosen": "b"}, "rejected"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
])
def test_bad_row_error_names_file_line_field(tmp_path, tok, row, field):
    kind = "pairs" if "chosen" in row else None
    good = {"prompt": "a", "chosen": "b", "rejected": "c"} if kind else {"prompt": "1+1=", "response": "2"}
    p = write(tmp_path / "bad.jsonl", [good, b"\n", row])
    with pytest.raises(D.DataError) as e:
        D.load_dataset(p, tok, max_length=16, kind=kind)
    msg = str(e.value)
    assert f"{p}:3" in msg and f"'{field}'" in msg, msg


def test_non_utf8_and_invalid_json_lines(tmp_path, tok):
    good = {"prompt": "1+1=", "response": "2"}
    p = write(tmp_path / "bad.jsonl", [good, b'{"prompt": "\xff\xfe", "response": "2"}\n', b"{not json\n", good])
    with pytest.raises(D.DataError, match=rf"{p}:2: not valid UTF-8"):
        D.load_dataset(p, tok, max_length=16)
    ds = D.load_dataset(p, tok, max_length=16, skip_bad_rows=True)
    assert len(ds) == 2 and len(ds.skipped) == 2
    assert f"{p}:3: invalid JSON" in ds.skipped[1]
    assert [e.index for e in ds.examples] == [0, 1]


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path, tok):
    p = write(tmp_path / "bad.jsonl", [{"prompt": "1"}])
    with pytest.raises(D.DataError, match="no usable rows"):
        D.load_dataset(p, tok, max_length=16, skip_bad_rows=True)


def test_dataset_on_disk(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    rows = tiny.synthetic_rows(5, seed=3)
    path = str(tmp_path / "ds")
    datasets.Dataset.from_list(rows).save_to_disk(path)
    ds = D.load_dataset(path, tok, max_length=64, kind="sft")
    jl = D.load_dataset(write(tmp_path / "d.jsonl", rows), tok, max_length=64, kind="sft")
    assert [e.input_ids for e in ds.examples] == [e.input_ids for e in jl.examples]
    assert ds.fingerprint == jl.fingerprint
    datasets.Dataset.from_list([{"prompt": "1"}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(D.DataError, match=r"bad:1: field 'response'"):
        D.load_dataset(str(tmp_path / "bad"), tok, max_length=64)


def test_collate_sft_masks_match_lengths(tok, tmp_path):
    p = write(tmp_path / "d.jsonl", tiny.synthetic_rows(7, seed=2))
    ds = D.load_dataset(p, tok, max_length=64, kind="sft")
    b = D.collate_sft(ds.examples, tok.pad_token_id)
    lengths = torch.tensor([len(e.input_ids) for e in ds.examples])
    assert b["attention_mask"].sum(1).tolist() == lengths.tolist()
    assert b["input_ids"].shape == b["labels"].shape == (7, int(lengths.max()))
    assert ((b["labels"] != -100) <= (b["attention_mask"] == 1)).all()


def test_synthetic_dataset_is_deterministic_and_disjoint(tmp_path):
    a = tiny.write_synthetic_dataset(str(tmp_path / "a"), n_train=50, n_eval=10, seed=4)
    b = tiny.write_synthetic_dataset(str(tmp_path / "b"), n_train=50, n_eval=10, seed=4)
    read = lambda p: [json.loads(l) for l in open(p)]  # noqa: E731
    assert read(a["train"]) == read(b["train"]) and read(a["eval"]) == read(b["eval"])
    train_prompts = {r["prompt"] for r in read(a["train"])}
    assert not train_prompts & {r["prompt"] for r in read(a["eval"])}
    for r in read(a["train"]):
        assert r["chosen"] == r["response"] != r["rejected"]
        if r["task"] == "add":
            x, y = r["prompt"][:-1].split("+")
            assert int(r["response"]) == int(x) + int(y)
