"""Datasets for the training loop: loading, tokenising with assistant-only labels, collation.

Row formats (one JSON object per line, or a ``datasets`` dataset saved with
``save_to_disk``):

- ``{"prompt": str, "response": str}``: SFT. Tokens are ``tok(prompt + response)``
  (the joined string, tokenised once, with the tokenizer's leading special tokens, e.g.
  BOS) + EOS; labels only on the response and EOS. Tokenising the joined string is what
  the model sees at inference: tokenising prompt and response separately would give
  SentencePiece/Metaspace tokenizers (Llama-2, Mistral, Gemma) a spurious leading ``▁``
  on the response and lose BPE merges across the boundary. The boundary comes from the
  tokens' character offsets (fast tokenizers): a token is a response token when its span
  starts at or after ``len(prompt)`` or straddles it; without offsets the prompt's own
  tokens must be a prefix of the joined tokens.
- ``{"messages": [{"role", "content"}, ...]}``: chat, rendered with the tokenizer's chat
  template and tokenised once; labels on every assistant turn (its character span is
  found by rendering the conversation prefix by prefix, then mapped to tokens by offsets).
- ``{"prompt": str, "chosen": str, "rejected": str}``: preference pairs (DPO family),
  each of ``prompt + chosen`` and ``prompt + rejected`` tokenised as above.

Labels use Hugging Face's convention: ``labels[t] = input_ids[t]`` on trained tokens,
``-100`` elsewhere; the losses shift them (``shift=True``: position ``t`` predicts label ``t + 1``).
Responses longer than ``max_length`` are truncated from the right; a prompt that leaves
no room for a response token is a bad row, and so is a row whose first response token
would sit at position 0 (empty prompt, no BOS: no logit predicts it). A bad row raises :class:`DataError` naming
file, line and field, or is skipped and counted with ``skip_bad_rows=True``.
"""
from __future__ import annotations

import functools
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
    ``prompt`` / ``answer`` are kept for exact-match evaluation when the row has them.
    ``line``: the row's line in its JSONL file (its row number in a ``datasets`` folder)."""

    index: int
    input_ids: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    rejected_input_ids: list | None = None
    rejected_labels: list | None = None
    prompt_ids: list | None = None
    answer: str | None = None
    line: int | None = None


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

    @functools.cached_property
    def fingerprint(self) -> str:
        """Computed once: the examples never change after loading (it is read at every save)."""
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


def write_jsonl(path: str, rows) -> str:
    """Write ``rows`` (an iterable of JSON-serialisable dicts) to ``path`` as UTF-8 JSON
    lines (strict JSON: a non-finite float is an error), creating its folder, with
    :func:`~minorsft.train.checkpoint.atomic_write` (readers see the old file or the whole
    new one). The writing side of :func:`iter_rows`. Returns ``path``."""
    from minorsft.train.checkpoint import atomic_write
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows))
    return path


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


def _encode_plain(tokenizer, text):
    """``(ids, offsets)`` of ``text`` without special tokens; ``offsets`` (one
    ``(start, end)`` character span per token) is ``None`` when the tokenizer cannot give
    them (slow tokenizers)."""
    if getattr(tokenizer, "is_fast", False):
        try:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, ValueError, TypeError, KeyError):
            pass
        else:
            offsets = enc.get("offset_mapping")
            ids = list(enc["input_ids"])
            if offsets is not None and len(offsets) == len(ids):
                return ids, [(int(s), int(e)) for s, e in offsets]
    return _ids(tokenizer, text, special=False), None


def _leading_specials(tokenizer, text, plain, where, field_name):
    """The special tokens the tokenizer puts before ``text`` (e.g. BOS): ``tok(text)`` is
    ``lead + plain + trail``. ``trail`` (an EOS some tokenizers append) is dropped: the
    loader appends EOS itself after the response."""
    full = _ids(tokenizer, text, special=True)
    n = len(plain)
    for k in range(len(full) - n + 1):
        if full[k: k + n] == plain:
            return full[:k]
    raise DataError(f"{where}: field '{field_name}': the tokenizer's special tokens change the tokens "
                    f"of the text (cannot find tok(text, add_special_tokens=False) inside tok(text))")


def _response_start(tokenizer, prompt, plain, offsets):
    """Index of the first response token in ``plain`` (the tokens of ``prompt + response``),
    or ``None`` when it cannot be found. With offsets: the first token whose span starts at
    or after ``len(prompt)`` or straddles it, all later tokens being response tokens too.
    Without: ``len(tok(prompt))`` when the prompt's tokens are a prefix of ``plain``."""
    n = len(prompt)
    if offsets is not None:
        is_resp = [s >= n or e > n for s, e in offsets]
        b = is_resp.index(True) if True in is_resp else len(plain)
        if all(is_resp[b:]):
            return b
    p = _ids(tokenizer, prompt, special=False)
    if plain[: len(p)] == p:
        return len(p)
    return None


def _check_first_label(first, total, max_length, where, field_name, *, prompt_field="prompt"):
    """``first``: position of the first trained token in the untruncated sequence of
    length ``total``. Bad rows: nothing to train, the first trained token at position 0
    (no logit predicts it: empty prompt and no BOS), or a prompt filling ``max_length``."""
    if first >= total:
        raise DataError(f"{where}: field '{field_name}' tokenises to nothing")
    if first == 0:
        raise DataError(f"{where}: field '{field_name}': its first token would be at position 0 (empty "
                        f"prompt and the tokenizer adds no BOS), so no logit predicts it")
    if first >= max_length:
        raise DataError(
            f"{where}: field '{prompt_field}' is {first} tokens, no room for the {field_name} "
            f"within --max-length {max_length}")


def _prompt_response(tokenizer, prompt, response, max_length, where, field_name):
    """Tokenise ``prompt + response`` once -> ``(input_ids, labels)``, labels on the response
    tokens and EOS, truncated to ``max_length`` from the right."""
    text = prompt + response
    plain, offsets = _encode_plain(tokenizer, text)
    b = _response_start(tokenizer, prompt, plain, offsets)
    if b is None:
        raise DataError(
            f"{where}: field '{field_name}': cannot find where the prompt ends in the tokens of "
            f"prompt + {field_name} (the tokenizer gives no character offsets and the prompt's "
            f"tokens are not a prefix of the joined tokens)")
    lead = _leading_specials(tokenizer, text, plain, where, field_name)
    ids = lead + plain + _eos(tokenizer)
    b += len(lead)
    _check_first_label(b, len(ids), max_length, where, field_name)
    ids = ids[:max_length]
    labels = [IGNORE_INDEX] * b + ids[b:]
    return ids, labels


def encode_sft_row(row, tokenizer, max_length, where):
    """Tokenise a prompt/response row -> ``(input_ids, labels, prompt_ids)``.
    ``prompt_ids`` is ``tok(prompt)`` on its own (with special tokens), the input for
    generation at evaluation."""
    prompt = _text_field(row, "prompt", where, allow_empty=True)
    response = _text_field(row, "response", where)
    ids, labels = _prompt_response(tokenizer, prompt, response, max_length, where, "response")
    return ids, labels, _ids(tokenizer, prompt, special=True)


def _span_tokens(offsets, lo, hi):
    """Token indices ``[i, j)`` covering the characters ``[lo, hi)``: tokens whose span starts
    at or after ``lo`` or straddles it, and starts before ``hi``; ``None`` if not contiguous."""
    hit = [(s >= lo or e > lo) and s < hi for s, e in offsets]
    idx = [i for i, h in enumerate(hit) if h]
    if not idx:
        return None
    i, j = idx[0], idx[-1] + 1
    return (i, j) if j - i == len(idx) else None


def encode_messages_row(row, tokenizer, max_length, where):
    """Tokenise a chat row with the chat template; labels on assistant turns only.
    Returns ``(input_ids, labels, prompt_ids, answer)`` (the last assistant turn and the
    tokens before it, with the generation prompt).

    The whole conversation is rendered and tokenised once. Each assistant turn's text is
    the characters between the rendering of the conversation before it (with the
    generation prompt) and the rendering that includes it (the template must render
    prefixes as string prefixes; all common templates do); its tokens are those whose
    character span meets that text (by offsets). Without offsets the renderings'
    tokens must be prefixes of the whole conversation's tokens.
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
        return tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)

    text = render(msgs, False)
    ids, offsets = _encode_plain(tokenizer, text)
    labels = [IGNORE_INDEX] * len(ids)
    prompt_ids = answer = None
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before, upto = render(msgs[:k], True), render(msgs[: k + 1], False)
        span = None
        if offsets is not None and text.startswith(upto) and upto.startswith(before):
            span = _span_tokens(offsets, len(before), len(upto))
        if span is None:  # no offsets, or not string prefixes: token prefixes
            b_ids = _ids(tokenizer, before, special=False)
            u_ids = _ids(tokenizer, upto, special=False)
            if ids[: len(u_ids)] != u_ids or u_ids[: len(b_ids)] != b_ids:
                raise DataError(f"{where}: field 'messages': the chat template does not render "
                                f"prefixes as prefixes")
            span = (len(b_ids), len(u_ids))
        prompt_ids, answer = _ids(tokenizer, before, special=False), m["content"]  # last turn, for exact match
        labels[span[0]: span[1]] = ids[span[0]: span[1]]
    trained = [i for i, l in enumerate(labels) if l != IGNORE_INDEX]
    first = trained[0] if trained else len(labels)
    if first >= len(labels):
        raise DataError(f"{where}: field 'messages': the assistant turns tokenise to nothing")
    if first == 0:
        raise DataError(f"{where}: field 'messages': the first assistant token would be at position 0, "
                        f"so no logit predicts it (the template renders nothing before it)")
    if first >= max_length:
        raise DataError(f"{where}: field 'messages': the first assistant turn starts at token {first}, "
                        f"beyond --max-length {max_length}")
    return ids[:max_length], labels[:max_length], prompt_ids, answer


def encode_pair_row(row, tokenizer, max_length, where):
    """Tokenise a prompt/chosen/rejected row ->
    ``(chosen_ids, chosen_labels, rejected_ids, rejected_labels, prompt_ids)``; each of
    ``prompt + chosen`` and ``prompt + rejected`` is tokenised once, as for SFT rows."""
    prompt = _text_field(row, "prompt", where, allow_empty=True)
    chosen = _text_field(row, "chosen", where)
    rejected = _text_field(row, "rejected", where)
    ci, cl = _prompt_response(tokenizer, prompt, chosen, max_length, where, "chosen")
    ri, rl = _prompt_response(tokenizer, prompt, rejected, max_length, where, "rejected")
    return ci, cl, ri, rl, _ids(tokenizer, prompt, special=True)


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
            ex = Example(index=len(examples), line=lineno)
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


# ------------------------------------------------------------------ order

class Sampler:
    """Deterministic data order: position ``p`` of an endless stream is example
    ``perm_e[p % N]`` with ``e = p // N`` and ``perm_e`` a permutation seeded by ``(seed, e)``."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def indices(self, start: int, count: int) -> list:
        """The dataset indices at stream positions ``[start, start + count)``."""
        out = []
        for p in range(start, start + count):
            e = p // self.n
            if e not in self._perms:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
                self._perms = {e: torch.randperm(self.n, generator=g).tolist()}
            out.append(self._perms[e][p % self.n])
        return out


def max_token_id(ds: TokenizedDataset) -> int:
    """The largest token id of a dataset (chosen and rejected sequences)."""
    return max(max(e.input_ids + (e.rejected_input_ids or [])) for e in ds.examples)
