"""Held-out evaluation: the training loss, token-level cross-entropy, the loss's metrics
and exact-match accuracy by greedy generation."""
from __future__ import annotations

import contextlib

import torch

from minorsft.train import data as D
from minorsft.train import reference as R
from minorsft.train.step import LossSetup, compute_loss


class _Sums:
    """Running float64 sums on the device (one host read at the end)."""

    def __init__(self, device):
        self.device, self.values, self.counts = device, {}, {}

    def add(self, key, value, count):
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        self.values[key] = self.values.get(key, zero) + value.double() * count
        self.counts[key] = self.counts.get(key, 0) + count

    def means(self) -> dict:
        return {k: float(v / max(1, self.counts[k])) for k, v in self.values.items()}


@torch.no_grad()
def evaluate(setup: LossSetup, model, dataset, *, batch_size: int, pad_id: int, device,
             ref_model=None, ref_table=None, tokenizer=None, generate: bool = False,
             autocast=contextlib.nullcontext) -> dict:
    """Held-out ``loss`` (the training loss, per token for ``sft`` and per sequence / pair
    otherwise), ``ce`` (token-level cross-entropy, SFT data), the loss's metrics
    (deviation, DPO rewards) and, with ``generate``, ``accuracy`` (exact match by greedy
    generation). ``autocast``: a context factory for the forward passes."""
    was = model.training
    model.eval()
    sums = _Sums(device)
    inner = getattr(model, "module", model)
    try:
        for start in range(0, len(dataset), batch_size):
            exs = dataset.examples[start: start + batch_size]
            b = D.collate(exs, pad_id, dataset.kind)
            idx = b.pop("index")
            scored = b["labels"][:, 1:] != D.IGNORE_INDEX          # counted on the host
            n_tok, n_seq = int(scored.sum()), int(scored.any(-1).sum())
            b = {k: v.to(device) for k, v in b.items()}
            ref = R.lookup(ref_table, idx, dataset.kind).to(device) if ref_table is not None else None
            with autocast():
                loss, m = compute_loss(setup, model, b, ref_model=ref_model, ref_logps=ref,
                                       num_items=n_tok, unwrapped=inner)
            if setup.spec.token_level:   # a token mean: weigh it by its tokens
                sums.add("loss", loss, n_tok)
            else:                     # a sum over sequences / pairs
                sums.add("loss", loss / len(exs), len(exs))
            if dataset.kind == "sft":  # token-level cross-entropy, comparable across losses:
                # sft's loss itself, or from minor_sft's mean sequence log-prob (the mean over
                # the n_seq sequences with a label): the same sums, no second forward
                ce = loss if setup.spec.token_level else -m["logps"] * n_seq / max(n_tok, 1)
                sums.add("ce", ce, n_tok)
            for k, v in m.items():
                sums.add(k, v, len(exs))
        out = sums.means()
        if generate and tokenizer is not None:
            out["accuracy"] = exact_match(model, dataset, tokenizer, device=device, batch_size=batch_size)
    finally:
        model.train(was)
    return out


def left_padded(prompts, pad: int):
    """``(ids, mask)`` ``[B, L]`` with each prompt right-aligned (batched generation)."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    return ids, mask


@torch.no_grad()
def exact_match(model, dataset, tokenizer, *, device, batch_size: int = 32) -> float:
    """Fraction (a float in [0, 1]; NaN with no example to score) of ``dataset``'s examples
    whose greedy continuation of the prompt equals the answer (whitespace-stripped),
    generated ``batch_size`` prompts at a time on ``device``. Examples without ``answer`` /
    ``prompt_ids`` are skipped."""
    exs = [e for e in dataset.examples if e.answer is not None and e.prompt_ids]
    if not exs:
        return float("nan")
    inner = getattr(model, "module", model)
    pad = D.pad_token_id(tokenizer)
    correct = 0
    for start in range(0, len(exs), batch_size):
        chunk = exs[start: start + batch_size]
        ids, mask = left_padded([e.prompt_ids for e in chunk], pad)
        new = max(len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in chunk) + 1
        out = inner.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=new, do_sample=False, pad_token_id=pad, use_cache=True,
                             eos_token_id=tokenizer.eos_token_id)
        for i, e in enumerate(chunk):
            text = tokenizer.decode(out[i, ids.shape[1]:], skip_special_tokens=True)
            correct += int(text.strip() == e.answer.strip())
    return correct / len(exs)
