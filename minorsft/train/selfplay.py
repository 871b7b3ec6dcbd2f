"""SPIN (Chen et al. 2024): self-play fine-tuning rounds on SFT data.

Round k (1..K): the model of round k-1 (round 0: the SFT model) writes one response to
every prompt of the SFT rows (batched ``generate``, left padding; temperature 0 is
greedy); ``DIR/round-k/pairs.jsonl`` gets ``{"prompt", "chosen": the row's response,
"rejected": the generated one}``; a DPO-family loss then prefers the human response
over the model's own, with the model of round k-1 as the frozen reference: it is the
starting model of the round's :func:`~minorsft.train.loop.train`, whose reference is its
initial policy (a frozen copy, or with ``precompute_ref`` its cached log-probs). The
round's model goes to ``DIR/round-k/model`` (Hugging Face format, with the tokenizer, the
run's metrics and ``info.json``), published complete
(:func:`~minorsft.train.stages.train_to_model`).

Running the command again skips finished rounds (their model folder verifies) and resumes
an interrupted one: its pairs are kept (never generated again) and its training continues
from the newest checkpoint in ``DIR/round-k/train``. One spin run owns ``DIR`` (its lock).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from minorsft.train import data as D
from minorsft.train.config import (ConfigError, TrainConfig, check_fields, existing_path, nonneg_float,
                                   option, positive_int, unit_interval, validate_config)
from minorsft.train.distributed import Dist, select_device
from minorsft.train.evaluate import left_padded
from minorsft.train.loop import load_model, load_tokenizer
from minorsft.train.outdir import OutDirLock, check_out_dir
from minorsft.train.stages import finished_model, train_to_model

SPIN_LOSSES = ("dpo", "minor_dpo")
PAIRS = "pairs.jsonl"


@dataclass
class SpinConfig(TrainConfig):
    """Everything :func:`spin` needs: :class:`TrainConfig`'s fields are each round's
    training options (``max_steps`` / ``epochs`` per round, ``beta``, ``lr``, ...), and
    ``seed`` also seeds the sampling; the fields below are SPIN's own, or mean something
    else here (``temperature`` is the sampling temperature: the loss uses 1)."""

    loss: str = option("dpo", "the DPO-family loss of each round (SPIN's is dpo, sigmoid)",
                       group="loss", choices=SPIN_LOSSES, resume=True)
    data: Optional[str] = option(None, "SFT rows (prompt/response; JSONL or a datasets folder): "
                                 "each round answers every prompt, and the row's response is the "
                                 "chosen one", group="model and data", check=existing_path,
                                 required=True, type=str)
    out_dir: str = option("runs/spin", "output folder: DIR/round-k/{pairs.jsonl, train/, model/}",
                          group="logging, eval, checkpoints")
    temperature: float = option(1.0, "sampling temperature of the generated responses (0: greedy)",
                                group="generation", check=nonneg_float)
    rounds: Optional[int] = option(None, "self-play rounds K", group="generation",
                                   check=positive_int, required=True, type=int)
    max_new_tokens: int = option(64, "longest generated response, in tokens", group="generation",
                                 check=positive_int)
    top_p: float = option(1.0, "nucleus sampling: sample from the smallest set of tokens whose "
                          "probability reaches P (1: off)", group="generation", check=unit_interval)
    # Set by spin for each round: no flags.
    resume: Optional[str] = option(None, "set by spin for each round", group="internal", type=str,
                                   cli=False)
    overwrite: bool = option(False, "set by spin for each round", group="internal", cli=False)
    run_name: Optional[str] = option(None, "set by spin for each round", group="internal", type=str,
                                     cli=False)

    def round_dir(self, k: int) -> str:
        """``DIR/round-k``."""
        return os.path.join(self.out_dir, f"round-{k}")

    def round_config(self, k: int, model) -> TrainConfig:
        """The :class:`TrainConfig` of round ``k``: these training options, starting from
        ``model`` (round k-1's), on ``DIR/round-k/pairs.jsonl``, the loss at temperature 1."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)}
        values.update(model=model, data=os.path.join(self.round_dir(k), PAIRS), temperature=1.0,
                      run_name=f"round-{k}", out_dir=os.path.join(self.round_dir(k), "train"))
        return TrainConfig(**values)


def validate_spin(cfg: SpinConfig, pending=()) -> None:
    """Refuse a bad :class:`SpinConfig` before any work (:class:`ConfigError`): its own
    fields, the fields spin sets itself, one process only, the output folder, and each
    round's training configuration (checked on round 1's). ``pending``: fields another
    step produces first (a recipe's earlier stage)."""
    check_fields(cfg, pending)
    for name in ("resume", "overwrite", "run_name"):
        f = SpinConfig.__dataclass_fields__[name]
        if getattr(cfg, name) != f.default:
            raise ConfigError(name, "spin sets it for each round (a finished round is skipped, an "
                                    "interrupted one resumes from its last checkpoint)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.fsdp:
        raise ConfigError("fsdp" if cfg.fsdp else "out_dir", "spin runs in one process (its "
                          "generation is not distributed); run it without torchrun")
    check_out_dir(cfg.out_dir, resume=None, overwrite=False)
    # Round 1's pairs do not exist yet; later rounds differ only in model and data.
    validate_config(cfg.round_config(1, cfg.model), pending=("data", *pending))


@torch.no_grad()
def generate_responses(model, tokenizer, prompts, *, max_new_tokens: int, temperature: float,
                       top_p: float = 1.0, batch_size: int = 8, seed: int = 0, device=None,
                       progress: bool = True, desc: str = "generating") -> list:
    """One response (text) to each prompt (a list of token ids, special tokens included),
    by batched ``generate`` with left padding: greedy for ``temperature == 0``, else
    sampled (``temperature``, ``top_p``, no top-k) from a generator seeded with ``seed``
    (the global RNG is left as it was). The text is what the model wrote before its EOS,
    special tokens removed."""
    from tqdm.auto import tqdm
    device = device if device is not None else next(model.parameters()).device
    pad, eos = D.pad_token_id(tokenizer), tokenizer.eos_token_id
    kw = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos, use_cache=True)
    kw.update(dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0
              else dict(do_sample=False))
    was = model.training
    model.eval()
    out = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress,
                     file=sys.stderr, dynamic_ncols=True) as bar:
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                ids, mask = left_padded(prompts[start: start + batch_size], pad)
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)
                for row in gen[:, ids.shape[1]:].tolist():
                    row = row[: row.index(eos)] if eos in row else row
                    out.append(tokenizer.decode(row, skip_special_tokens=True))
                bar.update(len(ids))
    finally:
        model.train(was)
    return out


def sft_rows(cfg: SpinConfig, tokenizer) -> list:
    """``(example, row)`` for each SFT row of ``cfg.data``, tokenised as ``minorsft train``
    does (bad rows: a ``DataError`` naming ``file:line``, or skipped with
    ``skip_bad_rows``); a chat row is a ``DataError`` (its prompt is no plain text)."""
    ds = D.load_dataset(cfg.data, tokenizer, max_length=cfg.max_length, kind="sft",
                        skip_bad_rows=cfg.skip_bad_rows)
    rows = {line: row for line, row in D.iter_rows(cfg.data) if isinstance(row, dict)}
    out = []
    for ex in ds.examples:
        row = rows[ex.line]
        if D.row_kind(row, "sft") != "sft":
            raise D.DataError(f"{cfg.data}:{ex.line}: field 'messages': spin needs prompt/response "
                              f"rows (chat rows are not supported)")
        out.append((ex, row))
    return out


def write_pairs(cfg: SpinConfig, k: int, model, rows, tokenizer, device, log) -> str:
    """``DIR/round-k/pairs.jsonl``: ``model`` (round k-1's) answers each prompt of ``rows``;
    kept as it is when an earlier attempt wrote it (written atomically: complete or absent).
    A prompt answered with nothing (EOS first) is left out, and said."""
    path = os.path.join(cfg.round_dir(k), PAIRS)
    if os.path.isfile(path):
        log(f"round {k}: {path} was written by an earlier attempt: kept")
        return path
    policy = load_model(model, tiny_seed=cfg.tiny_seed)
    policy.to(device)
    texts = generate_responses(policy, tokenizer, [ex.prompt_ids for ex, _ in rows],
                               max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                               top_p=cfg.top_p, batch_size=cfg.eval_batch_size or cfg.batch_size,
                               seed=cfg.seed * 1_000_003 + k, device=device, progress=cfg.progress,
                               desc=f"round {k}: generating")
    del policy
    pairs, empty = [], []
    for (ex, row), text in zip(rows, texts):
        if text.strip():
            pairs.append({"prompt": row["prompt"], "chosen": row["response"], "rejected": text})
        else:
            empty.append(ex.line)
    if empty:
        log(f"round {k}: {len(empty)} prompts got an empty response, left out (lines "
            f"{', '.join(map(str, empty[:10]))}{' ...' if len(empty) > 10 else ''})")
    if not pairs:
        raise ValueError(f"round {k}: every generated response is empty: no pairs to train on")
    D.write_jsonl(path, pairs)
    same = sum(p["chosen"] == p["rejected"] for p in pairs)
    log(f"round {k}: {len(pairs)} pairs -> {path} ({same} generated responses equal the chosen one)")
    return path


def _round(cfg: SpinConfig, k: int, model, rows, tokenizer, device, log) -> dict:
    """Round ``k`` from ``model`` (round k-1's): pairs, training, the published model."""
    log(f"spin round {k}/{cfg.rounds}: from {model or 'tiny'} (also the round's reference)")
    pairs = os.path.join(cfg.round_dir(k), PAIRS)
    if finished_model(cfg.round_dir(k)) is None:
        pairs = write_pairs(cfg, k, model, rows, tokenizer, device, log)
    out = train_to_model(cfg.round_config(k, model), cfg.round_dir(k), log=log,
                         info={"round": k, "reference": model or "tiny", "pairs": os.path.abspath(pairs)})
    last = out["result"]["history"][-1] if out["result"] and out["result"]["history"] else {}
    summary = {k2: last[k2] for k2 in ("step", "loss", "rewards/accuracies", "rewards/margins") if k2 in last}
    if summary:
        log(f"round {k}: " + "  ".join(f"{k2}={v:.4f}" if isinstance(v, float) else f"{k2}={v}"
                                       for k2, v in summary.items()))
    return {"round": k, "model": out["model"], "pairs": pairs, "reference": model or "tiny",
            "skipped": out["skipped"], "last_step": summary,
            "final_eval": out["result"]["final_eval"] if out["result"] else None}


def spin(cfg: SpinConfig, log=print) -> dict:
    """SPIN as configured: ``cfg.rounds`` rounds from ``cfg.model`` on the SFT rows of
    ``cfg.data`` into ``cfg.out_dir`` (see the module docstring). ``log(message)`` reports
    progress. Returns ``{"rounds": [{"round", "model", "pairs", "reference", "skipped",
    "last_step", "final_eval"}, ...], "model"}`` (``model``: the last round's).

    A bad configuration is a :class:`ConfigError` and a bad row a ``DataError``, before
    any work; another spin run holding ``cfg.out_dir`` is a :class:`ConfigError`. A stop
    signal during a round's training raises
    :class:`~minorsft.train.preempt.Preempted` after its checkpoint is written: running
    the command again resumes it."""
    validate_spin(cfg)
    if cfg.model is None:
        log("no --model: self-play with the built-in tiny model")
    tokenizer = load_tokenizer(cfg.model)
    rows = sft_rows(cfg, tokenizer)
    device = select_device(cfg.device, Dist())
    lock = OutDirLock(cfg.out_dir)
    lock.acquire()
    try:
        model, rounds = cfg.model, []
        for k in range(1, cfg.rounds + 1):
            rounds.append(_round(cfg, k, model, rows, tokenizer, device, log))
            model = rounds[-1]["model"]
    finally:
        lock.release()
    return {"rounds": rounds, "model": model}
