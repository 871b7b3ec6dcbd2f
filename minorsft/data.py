"""Datasets for the training loop: loading, tokenising with assistant-only labels, collation.

Row formats (one JSON object per line, or a ``datasets`` dataset saved with
``save_to_disk``):

- ``{"prompt": str, "response": str}``: SFT. Tokens are ``tok(prompt)`` (with the
  tokenizer's special tokens, e.g. BOS) + ``tok(response)`` + EOS; labels only on the
  response and EOS.
- ``{"messages": [{"role", "content"}, ...]}``: chat, rendered with the tokenizer's chat
  template; labels on every assistant turn (found by rendering the conversation
  prefix by prefix).
- ``{"prompt": str, "chosen": str, "rejected": str}``: preference pairs (DPO family).

Labels use Hugging Face's convention: ``labels[t] = input_ids[t]`` on trained tokens,
``-100`` elsewhere; the trainer shifts them (``logits[:, :-1]`` against ``labels[:, 1:]``).
Responses longer than ``max_length`` are truncated from the right; a prompt that leaves
no room for a response token is a bad row. A bad row raises :class:`DataError` naming
file, line and field, or is skipped and counted with ``skip_bad_rows=True``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100


class DataError(ValueError):
    """A dataset row that cannot be used; the message names the file, line and field."""


@dataclass
class Example:
    """One tokenised example. ``input_ids`` / ``labels``: lists of ints (one sequence for
    SFT; for pairs ``chosen_*`` and ``rejected_*``). ``index`` is the position in the dataset;
    ``prompt`` / ``answer`` are kept for exact-match evaluation when the row has them."""

    index: int
    input_ids: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    rejected_input_ids: list | None = None
    rejected_labels: list | None = None
    prompt_ids: list | None = None
    answer: str | None = None


@dataclass
class TokenizedDataset:
    """A list of :class:`Example` plus what the loader learned: ``kind`` ("sft" or "pairs"),
    ``skipped`` (bad rows skipped, with reasons) and ``fingerprint`` (sha256 of the tokens)."""

    examples: list
    kind: str
    source: str
    skipped: list = field(default_factory=list)

    def __len__(self):
        return len(self.examples)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.kind.encode())
        for ex in self.examples:
            for seq in (ex.input_ids, ex.labels, ex.rejected_input_ids or [], ex.rejected_labels or []):
                h.update(torch.tensor(seq, dtype=torch.int64).numpy().tobytes())
                h.update(b"|")
        return h.hexdigest()


# ------------------------------------------------------------------ raw rows

def iter_rows(path: str):
    """Yield ``(line_number, row_or_exception)`` for a JSONL file or a dataset on disk.

    Line numbers are 1-based file lines for JSONL (blank lines skipped) and 1-based
    row numbers for a ``datasets`` directory. Undecodable or non-object lines are
    yielded as ``DataError`` so the caller can raise or skip them.
    """
    if os.path.isdir(path):
        try:
            from datasets import DatasetDict, load_from_disk
        except ImportError as e:  # pragma: no cover - datasets is a test/hf extra
            raise DataError(f"{path}: reading a dataset directory needs the `datasets` package") from e
        ds = load_from_disk(path)
        if isinstance(ds, DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: a DatasetDict needs a 'train' split, found {list(ds.keys())}")
            ds = ds["train"]
        for i, row in enumerate(ds):
            yield i + 1, dict(row)
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data: no such file or directory: {path}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, DataError(f"{path}:{lineno}: invalid JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                yield lineno, DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                continue
            yield lineno, row


def row_kind(row: dict, want: str | None = None) -> str:
    """``"pairs"`` (prompt/chosen/rejected), ``"messages"`` (chat) or ``"sft"`` (prompt/response).

    A row carrying several formats is read as the one ``want`` ("sft" or "pairs") asks for.
    """
    if want == "sft" and "response" in row:
        return "sft"
    if want == "sft" and "messages" in row:
        return "messages"
    if want == "pairs" and ("chosen" in row or "rejected" in row):
        return "pairs"
    if "chosen" in row or "rejected" in row:
        return "pairs"
    if "messages" in row:
        return "messages"
    return "sft"


# ------------------------------------------------------------------ tokenising

def _text_field(row, name, where, *, allow_empty=False):
    if name not in row or row[name] is None:
        raise DataError(f"{where}: field '{name}' is missing")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def _ids(tokenizer, text, *, special):
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos(tokenizer):
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _prompt_response(tokenizer, prompt_ids, response_ids, max_length, where, field_name):
    if not response_ids:
        raise DataError(f"{where}: field '{field_name}' tokenises to nothing")
    if len(prompt_ids) >= max_length:
        raise DataError(
            f"{where}: field 'prompt' is {len(prompt_ids)} tokens, no room for the response "
            f"within --max-length {max_length}")
    ids = (prompt_ids + response_ids)[:max_length]
    labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids):]
    return ids, labels


def encode_sft_row(row, tokenizer, max_length, where):
    """Tokenise a prompt/response row -> ``(input_ids, labels, prompt_ids)``."""
    prompt = _text_field(row, "prompt", where, allow_empty=True)
    response = _text_field(row, "response", where)
    p = _ids(tokenizer, prompt, special=True)
    r = _ids(tokenizer, response, special=False) + _eos(tokenizer)
    ids, labels = _prompt_response(tokenizer, p, r, max_length, where, "response")
    return ids, labels, p


def encode_messages_row(row, tokenizer, max_length, where):
    """Tokenise a chat row with the chat template; labels on assistant turns only.
    Returns ``(input_ids, labels, prompt_ids, answer)`` (the last assistant turn and the
    tokens before it, with the generation prompt).

    Each assistant turn's tokens are those between the rendering of the conversation
    before it (with the generation prompt) and the rendering that includes it; the
    template must render prefixes as prefixes (all common templates do).
    """
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: field 'messages' needs a tokenizer with a chat template")
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field 'messages[{k}]' must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise DataError(f"{where}: field 'messages' has no non-empty assistant turn")

    def render(conv, gen):
        text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        return _ids(tokenizer, text, special=False)

    ids = render(msgs, False)
    labels = [IGNORE_INDEX] * len(ids)
    prompt_ids = answer = None
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = render(msgs[:k], True)
        upto = render(msgs[: k + 1], False)
        if ids[: len(upto)] != upto or upto[: len(before)] != before:
            raise DataError(f"{where}: field 'messages': the chat template does not render prefixes as prefixes")
        prompt_ids, answer = before, m["content"]  # the last assistant turn, for exact match
        labels[len(before): len(upto)] = upto[len(before):]
    first = next(i for i, l in enumerate(labels) if l != IGNORE_INDEX) if any(
        l != IGNORE_INDEX for l in labels) else len(labels)
    if first >= max_length:
        raise DataError(f"{where}: field 'messages': the first assistant turn starts at token {first}, "
                        f"beyond --max-length {max_length}")
    return ids[:max_length], labels[:max_length], prompt_ids, answer


def encode_pair_row(row, tokenizer, max_length, where):
    """Tokenise a prompt/chosen/rejected row ->
    ``(chosen_ids, chosen_labels, rejected_ids, rejected_labels, prompt_ids)``."""
    prompt = _text_field(row, "prompt", where, allow_empty=True)
    chosen = _text_field(row, "chosen", where)
    rejected = _text_field(row, "rejected", where)
    p = _ids(tokenizer, prompt, special=True)
    c = _ids(tokenizer, chosen, special=False) + _eos(tokenizer)
    r = _ids(tokenizer, rejected, special=False) + _eos(tokenizer)
    ci, cl = _prompt_response(tokenizer, p, c, max_length, where, "chosen")
    ri, rl = _prompt_response(tokenizer, p, r, max_length, where, "rejected")
    return ci, cl, ri, rl, p


def load_dataset(path: str, tokenizer, *, max_length: int, kind: str | None = None,
                 skip_bad_rows: bool = False, limit: int | None = None) -> TokenizedDataset:
    """Read and tokenise ``path``; returns a :class:`TokenizedDataset`.

    ``kind``: ``"sft"`` (prompt/response or messages rows) or ``"pairs"``
    (prompt/chosen/rejected); ``None`` infers it from the first good row. Rows of the
    other kind are bad rows. ``limit`` keeps the first ``limit`` good rows.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if kind not in (None, "sft", "pairs"):
        raise ValueError(f"kind must be None, 'sft' or 'pairs', got {kind!r}")
    examples, skipped = [], []
    for lineno, row in iter_rows(path):
        where = f"{path}:{lineno}"
        try:
            if isinstance(row, Exception):
                raise row
            rk = row_kind(row, kind)
            this = "pairs" if rk == "pairs" else "sft"
            if kind is None:
                kind = this
            if this != kind:
                what = "is missing" if kind == "pairs" else "is not expected"
                raise DataError(f"{where}: field 'chosen' {what}: a {this} row in a {kind} dataset "
                                f"(fields {sorted(row)})")
            ex = Example(index=len(examples))
            if rk == "pairs":
                ex.input_ids, ex.labels, ex.rejected_input_ids, ex.rejected_labels, ex.prompt_ids = \
                    encode_pair_row(row, tokenizer, max_length, where)
                ex.answer = row["chosen"]
            elif rk == "messages":
                ex.input_ids, ex.labels, ex.prompt_ids, ex.answer = encode_messages_row(
                    row, tokenizer, max_length, where)
            else:
                ex.input_ids, ex.labels, ex.prompt_ids = encode_sft_row(row, tokenizer, max_length, where)
                ex.answer = row["response"]
        except DataError as e:
            if not skip_bad_rows:
                raise
            skipped.append(str(e))
            continue
        examples.append(ex)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{path}: no usable rows ({len(skipped)} bad rows skipped)")
    return TokenizedDataset(examples=examples, kind=kind or "sft", source=path, skipped=skipped)


# ------------------------------------------------------------------ collation

def _pad(seqs, value, length):
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def _batch(ids_list, labels_list, pad_id):
    length = max(len(s) for s in ids_list)
    input_ids = _pad(ids_list, pad_id, length)
    labels = _pad(labels_list, IGNORE_INDEX, length)
    mask = _pad([[1] * len(s) for s in ids_list], 0, length)
    return input_ids, mask, labels


def collate_sft(examples, pad_id: int) -> dict:
    """Right-pad SFT examples -> ``{"input_ids", "attention_mask", "labels"}`` ``[B, T]`` int64
    and ``"index"`` ``[B]`` (dataset positions). Labels are ``-100`` on prompt and padding."""
    ids, mask, labels = _batch([e.input_ids for e in examples], [e.labels for e in examples], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "index": torch.tensor([e.index for e in examples], dtype=torch.long)}


def collate_pairs(examples, pad_id: int) -> dict:
    """Right-pad preference pairs into the ``[chosen..., rejected...]`` layout: rows
    ``[0, B)`` chosen, ``[B, 2B)`` rejected, one common length. Keys as :func:`collate_sft`
    (tensors ``[2B, T]``), ``"index"`` ``[B]``."""
    ids = [e.input_ids for e in examples] + [e.rejected_input_ids for e in examples]
    lab = [e.labels for e in examples] + [e.rejected_labels for e in examples]
    input_ids, mask, labels = _batch(ids, lab, pad_id)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
            "index": torch.tensor([e.index for e in examples], dtype=torch.long)}


def collate(examples, pad_id: int, kind: str) -> dict:
    """:func:`collate_pairs` for ``kind == "pairs"``, else :func:`collate_sft`."""
    return collate_pairs(examples, pad_id) if kind == "pairs" else collate_sft(examples, pad_id)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is masked out anyway)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
