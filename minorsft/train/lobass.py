"""LoBaSS data selection (Zhou et al. 2023): keep the SFT rows a fine-tune learns most from.

The learnability of row i is ``(L0_i - L1_i) / L0_i``, ``L`` the token-mean
cross-entropy of the row's response tokens (the labels ``minorsft train`` builds,
:func:`minorsft.train.data.load_dataset`) under the base model (0) and a fine-tuned model
(1). A row whose loss the fine-tune cut the most, relative to where it started, scores
highest; the top ``keep`` fraction of the rows is kept, ties broken by row order, and
written verbatim (the original JSON lines, byte for byte) in their original order.

The fine-tuned model is given (``finetuned``) or made first (``probe_steps``: SFT of a
copy of the base model on the same rows, in ``work_dir``, as the paper does; a finished
one is reused, an interrupted one resumes). Each model scores every row in one no-grad,
batched pass with the fused log-prob kernel (``ms.token_logprobs(..., shift=True)`` via
:func:`~minorsft.train.reference.sequence_logprobs`: no ``[N, V]`` log-softmax), one model
in memory at a time. Bad rows are handled as ``minorsft train`` handles them: an error
naming ``file:line`` before any work, or with ``skip_bad_rows`` skipped, counted and
listed in the scores file.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

import minorsft as ms
from minorsft.train import data as D
from minorsft.train import reference as R
from minorsft.train.checkpoint import atomic_write
from minorsft.train.config import (ConfigError, TrainConfig, check_fields, model_path, option,
                                   positive_int, same_as, unit_interval, validate_config)
from minorsft.train.distributed import Dist, select_device
from minorsft.train.loop import load_model, load_tokenizer
from minorsft.train.outdir import check_creatable
from minorsft.train.stages import RUN, train_to_model


@dataclass
class SelectConfig:
    """Everything :func:`select` needs; one ``minorsft select`` flag per field (the ones
    shared with ``minorsft train`` are :class:`TrainConfig`'s own fields)."""

    # models
    model: Optional[str] = same_as(TrainConfig, "model", group="models")
    tiny_seed: int = same_as(TrainConfig, "tiny_seed", group="models")
    finetuned: Optional[str] = option(None, "the fine-tuned model: a local Hugging Face model folder",
                                      group="models", check=model_path, type=str)
    # data
    data: Optional[str] = option(None, "the rows to select from: a JSONL file of prompt/response "
                                 "(or chat messages) rows", group="data", required=True, type=str)
    keep: Optional[float] = option(None, "fraction of the rows to keep, in (0, 1]: the "
                                   "ceil(FRACTION x rows) with the highest learnability",
                                   group="data", check=unit_interval, required=True, type=float)
    out: Optional[str] = option(None, "where the kept rows go (verbatim, in their original order)",
                                group="data", required=True, type=str)
    scores: Optional[str] = option(None, "also write one JSON line per input row: line, "
                                   "learnability, loss_base, loss_finetuned, tokens, kept",
                                   group="data", type=str)
    max_length: int = same_as(TrainConfig, "max_length", group="data")
    skip_bad_rows: bool = same_as(TrainConfig, "skip_bad_rows", group="data")
    # the probe fine-tune
    probe_steps: Optional[int] = option(None, "without --finetuned: first fine-tune a copy of "
                                        "--model with SFT on --data for N optimiser steps (in "
                                        "--work-dir), and score with it", group="probe fine-tune",
                                        check=positive_int, type=int)
    work_dir: Optional[str] = option(None, "folder of the --probe-steps fine-tune (None: OUT "
                                     "without its extension + '.probe'); a finished one is reused, "
                                     "an interrupted one resumes", group="probe fine-tune", type=str)
    lr: float = same_as(TrainConfig, "lr", group="probe fine-tune")
    seed: int = same_as(TrainConfig, "seed", group="probe fine-tune")
    # compute
    batch_size: int = same_as(TrainConfig, "batch_size", group="compute")
    bf16: bool = same_as(TrainConfig, "bf16", group="compute")
    backend: Optional[str] = same_as(TrainConfig, "backend", group="compute")
    device: Optional[str] = same_as(TrainConfig, "device", group="compute")
    progress: bool = same_as(TrainConfig, "progress", group="compute")

    def probe_dir(self) -> str:
        """The folder of the probe fine-tune."""
        return self.work_dir or os.path.splitext(self.out)[0] + ".probe"

    def probe_config(self) -> TrainConfig:
        """The :class:`TrainConfig` of the probe fine-tune (SFT of the base model on the rows)."""
        return TrainConfig(loss="sft", model=self.model, tiny_seed=self.tiny_seed, data=self.data,
                           max_length=self.max_length, skip_bad_rows=self.skip_bad_rows,
                           batch_size=self.batch_size, lr=self.lr, max_steps=self.probe_steps,
                           seed=self.seed, bf16=self.bf16, backend=self.backend, device=self.device,
                           progress=self.progress, run_name="probe",
                           out_dir=os.path.join(self.probe_dir(), RUN))


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _check_output_file(name: str, path: str) -> None:
    """``path`` can be written as a file: not a folder, its folder a folder and writable."""
    if os.path.isdir(path):
        raise ConfigError(name, f"{path} is a folder; expected a file to write")
    check_creatable(os.path.dirname(os.path.abspath(path)), name)


def validate_select(cfg: SelectConfig, pending=()) -> None:
    """Refuse a bad :class:`SelectConfig` before any work (:class:`ConfigError`).
    ``pending``: fields another step produces first (a recipe's earlier stage)."""
    check_fields(cfg, pending)
    if cfg.finetuned is not None and cfg.probe_steps is not None:
        raise ConfigError("probe_steps", "give --finetuned (a fine-tuned model) or --probe-steps "
                                         "(make one first), not both")
    if cfg.finetuned is None and cfg.probe_steps is None:
        raise ConfigError("finetuned", "a fine-tuned model is needed: --finetuned FT, or "
                                       "--probe-steps N to fine-tune a copy of --model first")
    if "data" not in pending:
        if not os.path.exists(cfg.data):
            raise ConfigError("data", f"no such file: {cfg.data}")
        if os.path.isdir(cfg.data):
            raise ConfigError("data", f"{cfg.data} is a folder; select reads a JSONL file (the kept "
                                      f"rows are copied byte for byte): write it with to_json first")
    for name in ("out", "scores"):
        path = getattr(cfg, name)
        if path is None:
            continue
        _check_output_file(name, path)
        if "data" not in pending and _same_file(path, cfg.data):
            raise ConfigError(name, f"{path} is the input --data; choose another file")
    if cfg.scores is not None and _same_file(cfg.scores, cfg.out):
        raise ConfigError("scores", f"{cfg.scores} is also --out; choose another file")
    if cfg.probe_steps is not None:
        validate_config(cfg.probe_config(), pending=tuple(p for p in pending if p in ("model", "data")))


def _row_lines(raw_lines) -> list:
    """The line numbers ``data.iter_rows`` yields for a JSONL file's raw lines (it skips
    blank lines, and yields undecodable ones as errors)."""
    out = []
    for i, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            out.append(i)
            continue
        if text.strip():
            out.append(i)
    return out


@torch.no_grad()
def response_losses(model, examples, *, pad_id: int, batch_size: int, device, backend=None,
                    autocast_dtype=None, desc: str = "scoring", progress: bool = True):
    """The token-mean cross-entropy of each example's labelled tokens under ``model``
    (``[N]`` float64 on the CPU; 0 for an example with no labelled token) and the counts
    of those tokens (``[N]``): one no-grad pass over batches of ``batch_size`` with the
    fused log-prob kernel, under a progress bar."""
    from tqdm.auto import tqdm
    was = model.training
    model.eval()
    losses, counts = [], []
    try:
        with tqdm(total=len(examples), desc=desc, unit="row", disable=not progress,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            for start in range(0, len(examples), batch_size):
                exs = examples[start: start + batch_size]
                b = {k: v.to(device) for k, v in D.collate_sft(exs, pad_id).items() if k != "index"}
                s = R.sequence_logprobs(model, b, backend=backend, autocast_dtype=autocast_dtype)
                n = (b["labels"][:, 1:] != D.IGNORE_INDEX).sum(-1)
                losses.append((-s.double() / n.clamp(min=1)).cpu())
                counts.append(n.cpu())
                bar.update(len(exs))
    finally:
        model.train(was)
    return torch.cat(losses), torch.cat(counts)


def top_rows(learnability: list, keep: float) -> list:
    """The positions of the ``ceil(keep x N)`` (at least one) highest values of
    ``learnability``, ties broken by position, in ascending position order."""
    n = len(learnability)
    k = max(1, math.ceil(round(keep * n, 9)))   # round: 0.3 x 10 is 3.0000000000000004
    order = sorted(range(n), key=lambda i: (-learnability[i], i))
    return sorted(order[:k])


def _score(cfg: SelectConfig, path, ds, pad_id: int, device, field_name: str, vocab=None):
    """``(token-mean losses, token counts, vocabulary)`` of ``ds`` under the model at
    ``path``; a vocabulary that cannot hold the tokens (or differs from ``vocab``) is a
    :class:`ConfigError` naming ``field_name``."""
    model = load_model(path, tiny_seed=cfg.tiny_seed)
    model.to(device)
    v = model.get_output_embeddings().weight.shape[0]
    if vocab is not None and v != vocab:
        raise ConfigError(field_name, f"its vocabulary ({v}) differs from the base model's ({vocab})")
    if D.max_token_id(ds) >= v:
        raise ConfigError(field_name, f"token id {D.max_token_id(ds)} >= the model's vocabulary {v} "
                                      f"(tokenizer/model mismatch)")
    autocast_dtype = torch.bfloat16 if cfg.bf16 and device.type == "cuda" else None
    name = "base" if field_name == "model" else "fine-tuned"
    losses, counts = response_losses(model, ds.examples, pad_id=pad_id,
                                     batch_size=cfg.batch_size, device=device, backend=cfg.backend,
                                     autocast_dtype=autocast_dtype, desc=f"scoring ({name} model)",
                                     progress=cfg.progress)
    ms.check_label_errors(device, f"scoring with the {name} model", v)
    return losses, counts, v


def _with_newline(raw: bytes) -> bytes:
    return raw if raw.endswith(b"\n") else raw + b"\n"


def _score_records(ds, raw_lines, learn, l0, l1, counts, kept: set) -> list:
    """One record per input row, in line order: the scored rows' values, and for each bad
    row skipped (``skip_bad_rows``) nulls, ``kept: false`` and its ``error``."""
    records = {}
    for i, ex in enumerate(ds.examples):
        records[ex.line] = {"line": ex.line, "learnability": learn[i], "loss_base": float(l0[i]),
                            "loss_finetuned": float(l1[i]), "tokens": int(counts[i]), "kept": i in kept}
    bad = [line for line in _row_lines(raw_lines) if line not in records]
    if len(bad) == len(ds.skipped):   # iter_rows' order: the k-th bad line is the k-th skipped row
        for line, error in zip(bad, ds.skipped):
            records[line] = {"line": line, "learnability": None, "loss_base": None,
                             "loss_finetuned": None, "tokens": None, "kept": False, "error": error}
    return [records[line] for line in sorted(records)]


def _check_finite(cfg: SelectConfig, ds, learn, l0, l1) -> None:
    for i, v in enumerate(learn):
        if not math.isfinite(v):
            raise ValueError(f"{cfg.data}:{ds.examples[i].line}: the learnability is not finite (loss "
                             f"under the base model {float(l0[i])}, under the fine-tuned one "
                             f"{float(l1[i])}): a model's logits are not finite")


def _report(cfg: SelectConfig, res: dict, log) -> None:
    learn = res["learnability"]
    kept = [learn[i] for i in res["kept_rows"]]
    log(f"select: scored {res['rows']} rows of {cfg.data} (base model: {cfg.model or 'tiny'}, "
        f"fine-tuned: {res['finetuned']})")
    log(f"learnability: mean {sum(learn) / len(learn):.4f}, min {min(learn):.4f}, max {max(learn):.4f}")
    if res["no_response_lines"]:
        lines = res["no_response_lines"]
        log(f"{len(lines)} rows have no response token (learnability 0): lines "
            f"{', '.join(map(str, lines[:20]))}{' ...' if len(lines) > 20 else ''}")
    if res["skipped"]:
        log(f"skipped {len(res['skipped'])} bad rows (first: {res['skipped'][0]})")
    log(f"kept {len(kept)} of {res['rows']} rows (keep {cfg.keep}; learnability >= {min(kept):.4f}) "
        f"-> {cfg.out}" + (f"; scores -> {cfg.scores}" if cfg.scores else ""))


def select(cfg: SelectConfig, log=print) -> dict:
    """LoBaSS selection as configured: score every row of ``cfg.data`` by learnability,
    write the top ``cfg.keep`` fraction to ``cfg.out`` (verbatim, original order) and, with
    ``cfg.scores``, one JSON line per input row. ``log(message)`` reports progress.

    Returns ``{"rows", "kept", "out", "scores", "finetuned", "lines", "learnability",
    "loss_base", "loss_finetuned", "tokens", "kept_rows", "kept_lines",
    "no_response_lines", "skipped"}`` (per scored row, in row order: its line, its values;
    ``kept_rows``: positions among the scored rows). A bad configuration is a
    :class:`ConfigError` and a bad row a ``DataError`` (without ``skip_bad_rows``), both
    before the probe fine-tune and any scoring."""
    validate_select(cfg)
    if cfg.model is None:
        log("no --model: scoring with the built-in tiny model")
    tokenizer = load_tokenizer(cfg.model)
    ds = D.load_dataset(cfg.data, tokenizer, max_length=cfg.max_length, kind="sft",
                        skip_bad_rows=cfg.skip_bad_rows)
    with open(cfg.data, "rb") as f:
        raw_lines = f.readlines()
    finetuned = cfg.finetuned
    if finetuned is None:
        finetuned = train_to_model(cfg.probe_config(), cfg.probe_dir(), log=log, field_name="work_dir",
                                   info={"probe_for": dataclasses.asdict(cfg)})["model"]
    device = select_device(cfg.device, Dist())
    pad_id = D.pad_token_id(tokenizer)
    l0, counts, vocab = _score(cfg, cfg.model, ds, pad_id, device, "model")
    l1, _, _ = _score(cfg, finetuned, ds, pad_id, device, "finetuned", vocab)
    learn = ms.losses.learnability(l0, l1).tolist()
    _check_finite(cfg, ds, learn, l0, l1)
    kept = top_rows(learn, cfg.keep)
    atomic_write(cfg.out, b"".join(_with_newline(raw_lines[ds.examples[i].line - 1]) for i in kept))
    if cfg.scores:
        records = _score_records(ds, raw_lines, learn, l0, l1, counts, set(kept))
        D.write_jsonl(cfg.scores, records)
    res = {"rows": len(ds), "kept": len(kept), "out": cfg.out, "scores": cfg.scores,
           "finetuned": finetuned, "lines": [e.line for e in ds.examples], "learnability": learn,
           "loss_base": l0.tolist(), "loss_finetuned": l1.tolist(), "tokens": counts.tolist(),
           "kept_rows": kept, "kept_lines": [ds.examples[i].line for i in kept],
           "no_response_lines": [e.line for e, n in zip(ds.examples, counts.tolist()) if n == 0],
           "skipped": list(ds.skipped)}
    _report(cfg, res, log)
    return res
