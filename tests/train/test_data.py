"""Data loading: formats, assistant-only labels, truncation, padding, pair layout, bad rows."""
import json

import pytest
import torch

from minorsft.train import data as D
from minorsft.train import tiny


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


# ------------------------------------------------ joint tokenisation (SentencePiece-style)

def metaspace_tokenizer(model="unigram", *, scheme="first", bos=True, chat=False):
    """A small Metaspace tokenizer (Llama-2 / Mistral / Gemma style), trained locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    corpus = ["Question: what is it? Answer: hello world", "hello there", "the answer is hello",
              "world peace", "rev ab= ba", "1+1= 2"] * 20
    if model == "unigram":
        t = Tokenizer(models.Unigram())
        tr = trainers.UnigramTrainer(vocab_size=120, special_tokens=specials, unk_token="<unk>")
    else:
        t = Tokenizer(models.BPE(unk_token="<unk>"))
        tr = trainers.BpeTrainer(vocab_size=200, special_tokens=specials)
    t.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme)
    t.decoder = decoders.Metaspace(prepend_scheme=scheme)
    t.train_from_iterator(corpus, tr)
    if bos:
        t.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", t.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=specials[3:])
    if chat:
        fast.chat_template = tiny.CHAT_TEMPLATE
    return fast


def merge_bpe_tokenizer():
    """A hand-built Metaspace BPE whose merge ``a b -> ab`` can cross a prompt/response boundary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "▁", "a", "b", "c", "x", "ab", "▁x"])}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("▁", "x")], unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    t.decoder = decoders.Metaspace(prepend_scheme="first")
    t.add_special_tokens(["<unk>", "<s>", "</s>"])
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def trained_span(tokenizer, ex):
    """Index of the first trained token; the trained tokens must be one suffix of the row."""
    lab = [i for i, l in enumerate(ex.labels) if l != -100]
    assert lab == list(range(lab[0], len(ex.labels))), "labels must be one suffix"
    return lab[0]


@pytest.mark.parametrize("model", ["unigram", "bpe"])
@pytest.mark.parametrize("prompt, response", [
    ("Question: what is it? Answer:", " hello world"),   # the space belongs to the response
    ("Question: what is it? Answer: ", "hello world"),   # ... to the prompt: "▁hello" straddles
    ("Answer:", "hello"),                                 # no space: tok("hello") alone adds "▁"
])
def test_metaspace_tokenises_joined_text(tmp_path, model, prompt, response):
    tok = metaspace_tokenizer(model)
    ds = D.load_dataset(write(tmp_path / "d.jsonl", [{"prompt": prompt, "response": response}]), tok,
                        max_length=128)
    ex = ds.examples[0]
    enc = tok(prompt + response, return_offsets_mapping=True)
    assert ex.input_ids == enc["input_ids"] + [tok.eos_token_id]
    first = trained_span(tok, ex)
    assert ex.labels[first:] == ex.input_ids[first:]
    # the trained tokens are exactly those holding a response character (a straddler counts)
    offsets = enc["offset_mapping"]
    holds_response = [i for i, (s, e) in enumerate(offsets) if e > len(prompt) and i > 0]
    assert first == holds_response[0] and holds_response == list(range(first, len(offsets)))
    assert ex.prompt_ids == tok(prompt)["input_ids"]
    # the defect this guards against: the separately tokenised response is not what the model sees
    separate = tok(prompt)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if response == "hello":
        assert tok.convert_ids_to_tokens(tok(response, add_special_tokens=False)["input_ids"])[0].startswith("▁")
        assert not tok.convert_ids_to_tokens(ex.input_ids[first:])[0].startswith("▁")
        assert separate != ex.input_ids
    if separate != ex.input_ids:  # the fingerprint follows the tokens
        old = D.TokenizedDataset(examples=[D.Example(index=0, input_ids=separate, labels=separate)],
                                 kind="sft", source="x")
        assert old.fingerprint != ds.fingerprint


def test_bpe_merge_across_the_boundary(tmp_path):
    tok = merge_bpe_tokenizer()
    rows = [{"prompt": "xa", "response": "bc"}, {"prompt": "xa", "chosen": "bc", "rejected": "c"}]
    ex = D.load_dataset(write(tmp_path / "d.jsonl", rows[:1]), tok, max_length=16).examples[0]
    assert tok.convert_ids_to_tokens(ex.input_ids) == ["<s>", "▁x", "ab", "c", "</s>"]
    assert ex.input_ids == tok("xabc")["input_ids"] + [tok.eos_token_id]
    # "ab" holds the prompt's last character and the response's first: it is trained
    assert ex.labels == [-100, -100] + ex.input_ids[2:]
    pair = D.load_dataset(write(tmp_path / "p.jsonl", rows[1:]), tok, max_length=16).examples[0]
    assert pair.input_ids == ex.input_ids and pair.labels == ex.labels
    assert tok.convert_ids_to_tokens(pair.rejected_input_ids) == ["<s>", "▁x", "a", "c", "</s>"]
    assert pair.rejected_labels == [-100, -100, -100] + pair.rejected_input_ids[3:]


def test_without_offsets_prompt_prefix_or_error(tmp_path, tok, monkeypatch):
    """Slow tokenizers give no offsets: the prompt's tokens must be a prefix of the joined ones."""
    monkeypatch.setattr(D, "_encode_plain", lambda t, text: (D._ids(t, text, special=False), None))
    ex = D.load_dataset(write(tmp_path / "d.jsonl", [{"prompt": "12+3=", "response": "15"}]), tok,
                        max_length=64).examples[0]
    assert ex.input_ids == tok("12+3=15")["input_ids"] + [tok.eos_token_id]
    assert ex.labels == [-100] * 6 + ex.input_ids[6:]
    p = write(tmp_path / "m.jsonl", [{"prompt": "xa", "response": "bc"}])
    with pytest.raises(D.DataError) as e:
        D.load_dataset(p, merge_bpe_tokenizer(), max_length=16)
    assert f"{p}:1" in str(e.value) and "'response'" in str(e.value) and "prefix" in str(e.value)


def test_char_tokenizer_unchanged(tmp_path, tok):
    """For the built-in char-level tokenizer joint tokenisation equals the old concatenation,
    so the demo's data (and its fingerprint, the reference-cache key) do not move."""
    rows = tiny.synthetic_rows(30, seed=5)
    for kind in ("sft", "pairs"):
        ds = D.load_dataset(write(tmp_path / f"{kind}.jsonl", rows), tok, max_length=48, kind=kind)
        for ex, r in zip(ds.examples, rows):
            p = tok(r["prompt"])["input_ids"]
            for ids, labels, resp in ((ex.input_ids, ex.labels, r["chosen"]),
                                      (ex.rejected_input_ids, ex.rejected_labels, r["rejected"])):
                if ids is None:
                    continue
                want = tok(resp, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                assert ids == p + want and labels == [-100] * len(p) + want
            assert ex.prompt_ids == p


def test_first_response_token_at_position_0_is_a_bad_row(tmp_path):
    no_bos = metaspace_tokenizer(bos=False)
    p = write(tmp_path / "d.jsonl", [{"prompt": "Answer:", "response": "hello"}, {"prompt": "", "response": "hello"}])
    with pytest.raises(D.DataError) as e:
        D.load_dataset(p, no_bos, max_length=32)
    assert f"{p}:2" in str(e.value) and "'response'" in str(e.value) and "position 0" in str(e.value)
    ds = D.load_dataset(p, no_bos, max_length=32, skip_bad_rows=True)
    assert len(ds) == 1 and len(ds.skipped) == 1
    pp = write(tmp_path / "p.jsonl", [{"prompt": "", "chosen": "hello", "rejected": "world"}])
    with pytest.raises(D.DataError, match=rf"{pp}:1: field 'chosen'"):
        D.load_dataset(pp, no_bos, max_length=32)
    # with a BOS an empty prompt is fine: BOS predicts the first response token
    ex = D.load_dataset(p, metaspace_tokenizer(), max_length=32).examples[1]
    assert ex.input_ids[0] == 1 and ex.labels[0] == -100 and all(l != -100 for l in ex.labels[1:])
    assert ex.input_ids == metaspace_tokenizer()("hello")["input_ids"] + [2]


def test_prompt_filling_max_length_is_a_bad_row(tmp_path, tok):
    # BOS + 15 prompt chars = 16 tokens: no response token fits in max_length 16
    p = write(tmp_path / "d.jsonl", [{"prompt": "a" * 14, "response": "xyz"}, {"prompt": "a" * 15, "response": "x"}])
    with pytest.raises(D.DataError) as e:
        D.load_dataset(p, tok, max_length=16)
    assert f"{p}:2" in str(e.value) and "'prompt'" in str(e.value)
    ds = D.load_dataset(p, tok, max_length=16, skip_bad_rows=True)
    (ex,) = ds.examples
    assert len(ex.input_ids) == 16 and sum(l != -100 for l in ex.labels) == 1  # one response token kept


def test_messages_with_metaspace_tokenizer(tmp_path):
    tok = metaspace_tokenizer(chat=True)
    msgs = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"},
            {"role": "user", "content": "rev ab="}, {"role": "assistant", "content": "ba hello"}]
    ex = D.load_dataset(write(tmp_path / "c.jsonl", [{"messages": msgs}]), tok, max_length=128).examples[0]
    full = tok.apply_chat_template(msgs, tokenize=False)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    assert ex.input_ids == enc["input_ids"]
    trained = [(i, enc["offset_mapping"][i]) for i, l in enumerate(ex.labels) if l != -100]
    text = "".join(full[s:e] for _, (s, e) in trained)
    assert text == "2</s>ba hello</s>"
    assert all(l in (-100, t) for t, l in zip(ex.input_ids, ex.labels))
    gen = tok.apply_chat_template(msgs[:3], tokenize=False, add_generation_prompt=True)
    assert ex.prompt_ids == tok(gen, add_special_tokens=False)["input_ids"] and ex.answer == "ba hello"
