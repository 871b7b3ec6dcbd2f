"""The thin training loop: data -> model -> fused loss -> AdamW, with checkpoints.

Callable from Python (:func:`train` with a :class:`TrainConfig`) and from the CLI
(``minorsft train``). One optimiser step consumes a *global batch* of
``batch_size * grad_accum * world_size`` examples (pairs for the DPO family), drawn
from a seeded per-epoch permutation; rank ``r`` takes its slice of each micro-batch,
so a 2-rank run and a 1-rank run with twice the batch size see the same data.

Normalisation: the loss of each micro-batch is divided by the *global* count of the
step (label tokens for ``sft`` through ``num_items_in_batch``; sequences or pairs for
the others), counted on the host from the token lists, so gradient accumulation and
data parallelism give the same gradient as one big batch and nothing syncs.

Checkpoints (``out_dir/checkpoint-{step}``): the model in Hugging Face format
(safetensors) + tokenizer, ``optimizer.pt`` / ``scheduler.pt`` / ``rng.pt`` (loaded
with ``torch.load(weights_only=True)``) and ``trainer_state.json``, written into a
temporary directory, fsynced and renamed; ``out_dir/latest`` names the newest complete
one (:mod:`minorsft.checkpoint`). The process group, device and DDP / FSDP2 wrapping
live in :mod:`minorsft.distributed`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from minorsft.train import data as D
from minorsft.train import reference as R
from minorsft.train.checkpoint import RESUME_FIELDS  # noqa: F401  (re-exported)
from minorsft.train.checkpoint import (atomic_write, check_resume_config, check_resume_data, load_training_state,
                                 read_trainer_state, repair_checkpoint_debris, resolve_resume,
                                 save_checkpoint)
from minorsft.train.distributed import Dist, init_distributed, select_device, wrap_model

LOSSES = ("sft", "minor_sft", "dpo", "minor_dpo")
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
LENGTH_NORMS = ("outside", "inside", "none")
SCHEDULES = ("cosine", "linear", "constant")

@dataclass
class TrainConfig:
    """Everything :func:`train` needs; the CLI flags map one to one (``--grad-accum`` ...)."""

    loss: str = "minor_sft"
    loss_type: str = "sigmoid"          # dpo only
    beta: float = 0.1
    length_norm: str = "outside"        # minor_sft only
    label_smoothing: float = 0.0        # dpo sigmoid / robust
    temperature: float = 1.0
    model: Optional[str] = None         # HF directory; None or "tiny": the built-in tiny model
    tiny_seed: int = 0
    data: Optional[str] = None          # JSONL or datasets dir; None: the synthetic task set
    eval_data: Optional[str] = None
    out_dir: str = "runs/minorsft"
    max_length: int = 512
    batch_size: int = 8                 # per rank, per micro-batch (pairs for DPO)
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    max_steps: Optional[int] = None     # default: epochs over the data
    epochs: float = 1.0
    clip_grad: Optional[float] = 1.0    # None or 0: no clipping
    bf16: bool = True                   # autocast to bf16 on CUDA (ignored on CPU)
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0                 # 0: eval at the end only (when eval data exists)
    save_every: int = 0                 # 0: save at the end only
    eval_batch_size: Optional[int] = None
    eval_generate: bool = False         # exact-match accuracy by greedy generation
    eval_limit: Optional[int] = None
    resume: Optional[str] = None        # a checkpoint dir, or "latest" (out_dir/latest)
    precompute_ref: bool = False
    ref_cache_dir: Optional[str] = None  # default out_dir/ref-cache
    ref_dtype: Optional[str] = None     # "float32" | "bfloat16" | "float16"
    ref_device: Optional[str] = None
    track_deviation: bool = False       # sft: keep a reference to report the deviation metric
    skip_bad_rows: bool = False
    fsdp: bool = False
    backend: Optional[str] = None       # loss backend: None/"auto", "triton", "torch"
    fused_linear: bool = False          # loss from hidden states + lm_head (minorsft.linear)
    device: Optional[str] = None
    progress: bool = True
    print_steps: bool = False           # print a line per logged step (the demo)
    run_name: Optional[str] = None
    dump_grads: Optional[str] = None    # debug: save the first step's full gradients (safetensors)

    def uses_reference(self) -> bool:
        return self.loss != "sft" or self.track_deviation


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def validate_config(cfg: TrainConfig) -> None:
    """Refuse a bad configuration before any work starts (``ValueError`` naming the flag)."""
    def choice(name, value, options):
        if value not in options:
            raise ValueError(f"--{name.replace('_', '-')}: {value!r} is not one of {list(options)}")

    def positive(name, value, allow_zero=False, kind=int):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int:
            ok = ok and float(value).is_integer()
        if not ok or not (value >= 0 if allow_zero else value > 0) or not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')}: must be a {'non-negative' if allow_zero else 'positive'} "
                             f"{'integer' if kind is int else 'number'}, got {value!r}")

    choice("loss", cfg.loss, LOSSES)
    choice("loss_type", cfg.loss_type, LOSS_TYPES)
    choice("length_norm", cfg.length_norm, LENGTH_NORMS)
    choice("schedule", cfg.schedule, SCHEDULES)
    choice("backend", cfg.backend, (None, "auto", "triton", "torch"))
    if cfg.ref_dtype is not None:
        choice("ref_dtype", cfg.ref_dtype, tuple(_DTYPES))
    positive("beta", cfg.beta, kind=float)
    positive("temperature", cfg.temperature, kind=float)
    positive("lr", cfg.lr, kind=float)
    positive("max_length", cfg.max_length)
    if cfg.max_length < 2:
        raise ValueError(f"--max-length: must be >= 2, got {cfg.max_length}")
    positive("batch_size", cfg.batch_size)
    positive("grad_accum", cfg.grad_accum)
    positive("weight_decay", cfg.weight_decay, allow_zero=True, kind=float)
    positive("warmup_steps", cfg.warmup_steps, allow_zero=True)
    positive("epochs", cfg.epochs, kind=float)
    positive("log_every", cfg.log_every)
    positive("eval_every", cfg.eval_every, allow_zero=True)
    positive("save_every", cfg.save_every, allow_zero=True)
    if cfg.max_steps is not None:
        positive("max_steps", cfg.max_steps)
    if cfg.clip_grad is not None:
        positive("clip_grad", cfg.clip_grad, allow_zero=True, kind=float)
    if cfg.eval_batch_size is not None:
        positive("eval_batch_size", cfg.eval_batch_size)
    if cfg.eval_limit is not None:
        positive("eval_limit", cfg.eval_limit)
    if not (0.0 <= cfg.label_smoothing < 0.5):
        raise ValueError(f"--label-smoothing: must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.label_smoothing and (cfg.loss != "dpo" or cfg.loss_type not in ("sigmoid", "robust")):
        raise ValueError("--label-smoothing: only for --loss dpo with --loss-type sigmoid or robust")
    if cfg.loss_type != "sigmoid" and cfg.loss != "dpo":
        raise ValueError(f"--loss-type {cfg.loss_type}: only for --loss dpo")
    if cfg.length_norm != "outside" and cfg.loss != "minor_sft":
        raise ValueError(f"--length-norm {cfg.length_norm}: only for --loss minor_sft")
    if cfg.precompute_ref and not cfg.uses_reference():
        raise ValueError("--precompute-ref: --loss sft uses no reference (add --track-deviation)")
    for name in ("model", "data", "eval_data"):
        path = getattr(cfg, name)
        if path is not None and not (name == "model" and path == "tiny") and not os.path.exists(path):
            raise ValueError(f"--{name.replace('_', '-')}: no such file or directory: {path}")
    for name in ("device", "ref_device"):
        value = getattr(cfg, name)
        if value is not None:
            try:
                dev = torch.device(value)
            except RuntimeError:
                raise ValueError(f"--{name.replace('_', '-')}: not a device: {value!r}") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"--{name.replace('_', '-')} {value}: CUDA is not available")
    if cfg.fused_linear:
        try:
            import minorsft.linear  # noqa: F401
        except ImportError as e:
            raise ValueError(f"--fused-linear: minorsft.linear is not available ({e})") from e


# Config attributes of models whose logits are not plain `hidden @ W^T (+ b)`.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _check_plain_lm_head(model) -> None:
    """--fused-linear computes ``hidden @ W^T``: refuse models that transform their logits."""
    cfg = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(cfg, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"--fused-linear: the model's config sets {name}={value!r}; the fused "
                             "linear loss computes plain hidden @ lm_head.weight^T logits")


# ---------------------------------------------------------------- model / data

def load_model_and_tokenizer(path: Optional[str], *, tiny_seed: int = 0):
    """``(model fp32, tokenizer)`` from a local HF directory, or the built-in tiny model."""
    if path is None or path == "tiny":
        from minorsft.train.tiny import build_tiny_model
        return build_tiny_model(seed=tiny_seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).float()  # fp32 master weights
    return model, tok


def _load_tokenizer(cfg):
    if cfg.model is None or cfg.model == "tiny":
        from minorsft.train.tiny import build_tokenizer
        return build_tokenizer()
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(cfg.model)


def _data_paths(cfg, dist: Dist):
    if cfg.data is not None:
        return cfg.data, cfg.eval_data
    from minorsft.train.tiny import write_synthetic_dataset
    d = os.path.join(cfg.out_dir, "data")
    if dist.main and not os.path.exists(os.path.join(d, "eval.jsonl")):
        write_synthetic_dataset(d, seed=cfg.seed)
    dist.barrier()
    return os.path.join(d, "train.jsonl"), cfg.eval_data or os.path.join(d, "eval.jsonl")


class Sampler:
    """Deterministic data order: position ``p`` of an endless stream is example
    ``perm_e[p % N]`` with ``e = p // N`` and ``perm_e`` a permutation seeded by ``(seed, e)``."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def indices(self, start: int, count: int) -> list:
        out = []
        for p in range(start, start + count):
            e = p // self.n
            if e not in self._perms:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
                self._perms = {e: torch.randperm(self.n, generator=g).tolist()}
            out.append(self._perms[e][p % self.n])
        return out


def _lr_lambda(cfg, total_steps):
    def f(step):
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


# ---------------------------------------------------------------- the loss

def _hidden_states(model, unwrapped, fwd):
    """Final (normed) hidden states ``[B, T, H]`` from the decoder, captured by a forward
    hook while the (possibly DDP-wrapped) model runs with ``logits_to_keep=1``, so the
    full logits are never formed."""
    captured = {}

    def hook(_module, _inputs, output):
        captured["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = unwrapped.get_decoder().register_forward_hook(hook)
    try:
        model(**fwd, logits_to_keep=1)
    finally:
        handle.remove()
    return captured["h"]


def _to(fwd, module):
    """``fwd``'s tensors on ``module``'s device (a reference model may live elsewhere)."""
    dev = next(module.parameters()).device
    return {k: v.to(dev) for k, v in fwd.items()}


def _loss_inputs(cfg, model, unwrapped, ref_model, ref_logps, fwd):
    """``(funcs, policy_args, policy_kwargs, ref_kwargs)`` for the logits path or, with
    ``cfg.fused_linear``, the fused linear path (hidden states + lm_head weight)."""
    import minorsft as ms
    if not cfg.fused_linear:
        logits = model(**fwd).logits[:, :-1]
        ref_kw = {}
        if ref_model is not None and ref_logps is None:
            with torch.no_grad():
                ref_logits = ref_model(**_to(fwd, ref_model)).logits[:, :-1]
            ref_kw["ref_logits"] = ref_logits.to(device=logits.device, dtype=logits.dtype)
        funcs = (ms.token_logprobs, ms.minor_sft_loss, ms.minor_dpo_loss, ms.dpo_loss)
        return funcs, (logits,), {}, ref_kw
    from minorsft import linear as L
    head = unwrapped.get_output_embeddings()
    hidden = _hidden_states(model, unwrapped, fwd)[:, :-1]
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):   # FSDP2: a sharded DTensor; gather it (differentiably)
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    if weight.dtype != hidden.dtype:  # autocast: the head runs in the activations' dtype
        weight = weight.to(hidden.dtype)
        bias = bias.to(hidden.dtype) if bias is not None else None
    ref_kw = {}
    if ref_model is not None and ref_logps is None:
        with torch.no_grad():
            rhead = ref_model.get_output_embeddings()
            rh = _hidden_states(ref_model, ref_model, _to(fwd, ref_model))[:, :-1]
            rh = rh.to(device=hidden.device, dtype=hidden.dtype)
            ref_kw = {"ref_hidden": rh, "ref_weight": rhead.weight.to(rh.device, rh.dtype),
                      "ref_bias": rhead.bias.to(rh.device, rh.dtype) if rhead.bias is not None else None}
    funcs = (L.linear_token_logprobs, L.linear_minor_sft_loss, L.linear_minor_dpo_loss, L.linear_dpo_loss)
    return funcs, (hidden, weight), {"bias": bias}, ref_kw


def compute_loss(cfg, model, batch, *, ref_model=None, ref_logps=None, denom=None,
                 num_items=None, reduction="sum", unwrapped=None):
    """Forward the policy (and the reference) on ``batch`` and return ``(loss, metrics)``.

    ``batch``: ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` on the device
    (for pairs ``B = 2P``, chosen rows first). Labels are shifted here: ``logits[:, :-1]``
    against ``labels[:, 1:]``. ``ref_logps``: ``[B]`` precomputed per-sequence reference
    sums (or None with ``ref_model``). ``sft`` divides by ``num_items`` (global label
    tokens); the others sum over sequences / pairs and divide by ``denom``.
    ``unwrapped``: the model under a DDP wrapper (for the fused linear path).
    Metrics are detached tensors (no host sync).
    """
    from minorsft.losses import loss_from_token_logprobs

    labels = batch["labels"][:, 1:]
    fwd = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    funcs, args, kw, ref_kw = _loss_inputs(cfg, model, unwrapped or model, ref_model, ref_logps, fwd)
    token_logprobs, minor_sft, minor_dpo, dpo = funcs
    common = dict(backend=cfg.backend, temperature=cfg.temperature, check_labels=False)
    metrics = {}
    if cfg.loss == "sft":
        lp = token_logprobs(*args, labels, **kw, **common)
        mask = labels != D.IGNORE_INDEX
        loss = loss_from_token_logprobs("sft", lp, mask, reduction="mean" if reduction == "sum" else reduction,
                                        num_items_in_batch=num_items)
        if ref_kw or ref_logps is not None:  # the deviation metric, detached
            if ref_kw:
                with torch.no_grad():
                    if "ref_logits" in ref_kw:
                        rargs, rkw = (ref_kw["ref_logits"],), {}
                    else:
                        rargs, rkw = (ref_kw["ref_hidden"], ref_kw["ref_weight"]), {"bias": ref_kw["ref_bias"]}
                    ref_logps = token_logprobs(*rargs, labels, **rkw, **common).sum(-1)
            _, m = loss_from_token_logprobs("minor_sft", lp.detach(), mask, ref_seq_logps=ref_logps,
                                            beta=cfg.beta, return_metrics=True)
            metrics["deviation"] = m["deviation"]
        return loss, metrics
    opts = dict(ref_logprobs=ref_logps, beta=cfg.beta, reduction=reduction, return_metrics=True,
                **ref_kw, **kw, **common)
    if cfg.loss == "minor_sft":
        loss, m = minor_sft(*args, labels, length_norm=cfg.length_norm, **opts)
        metrics["deviation"] = m["deviation"]
    elif cfg.loss == "minor_dpo":
        loss, m = minor_dpo(*args, labels, **opts)
        metrics.update(m)
    else:
        loss, m = dpo(*args, labels, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing, **opts)
        metrics.update(m)
    if denom is not None:
        loss = loss / denom
    return loss, metrics


# ---------------------------------------------------------------- eval

@torch.no_grad()
def evaluate(cfg, model, dataset, *, pad_id, device, ref_model=None, ref_table=None,
             tokenizer=None, autocast=None):
    """Held-out loss (the training loss, averaged per token for ``sft`` and per
    sequence / pair otherwise), ``ce`` (token-level cross-entropy, SFT data), deviation
    (MinorSFT, or SFT with a reference), DPO reward accuracy, and with
    ``cfg.eval_generate`` exact-match accuracy by greedy generation."""
    was = model.training
    model.eval()
    bs = cfg.eval_batch_size or cfg.batch_size
    tot_loss = torch.zeros((), device=device, dtype=torch.float64)
    tot_items, sums = 0, {}
    tot_ce, ce_tokens = torch.zeros((), device=device, dtype=torch.float64), 0
    ce_cfg = dataclasses.replace(cfg, loss="sft", track_deviation=False, precompute_ref=False)
    counts = {}
    try:
        for start in range(0, len(dataset), bs):
            exs = dataset.examples[start: start + bs]
            b = D.collate(exs, pad_id, dataset.kind)
            idx = b.pop("index")
            b = {k: v.to(device) for k, v in b.items()}
            ref = R.lookup(ref_table, idx, dataset.kind).to(device) if ref_table is not None else None
            n_tok = int((b["labels"][:, 1:] != D.IGNORE_INDEX).sum()) if cfg.loss == "sft" else None
            with autocast():
                loss, m = compute_loss(cfg, model, b, ref_model=ref_model, ref_logps=ref,
                                       num_items=n_tok, reduction="sum", unwrapped=getattr(model, "module", model))
            n = n_tok if cfg.loss == "sft" else len(exs)
            tot_loss += loss.double() * (n_tok if cfg.loss == "sft" else 1)
            tot_items += n
            if dataset.kind == "sft":  # token-level cross-entropy, comparable across losses
                if cfg.loss == "sft":
                    tot_ce += loss.double() * n_tok
                else:
                    n_tok = int((b["labels"][:, 1:] != D.IGNORE_INDEX).sum())
                    with autocast():
                        ce, _ = compute_loss(ce_cfg, model, b, num_items=n_tok,
                                             unwrapped=getattr(model, "module", model))
                    tot_ce += ce.double() * n_tok
                ce_tokens += n_tok
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v.double() * len(exs)
                counts[k] = counts.get(k, 0) + len(exs)
        out = {"loss": float(tot_loss / max(1, tot_items))}
        if ce_tokens:
            out["ce"] = float(tot_ce / ce_tokens)
        for k, v in sums.items():
            out[k] = float(v / counts[k])
        if cfg.eval_generate and tokenizer is not None:
            out["accuracy"] = exact_match(model, dataset, tokenizer, device=device, batch_size=bs)
    finally:
        model.train(was)
    return out


@torch.no_grad()
def exact_match(model, dataset, tokenizer, *, device, batch_size=32, limit=None) -> float:
    """Fraction of examples whose greedy continuation of the prompt equals the answer
    (whitespace-stripped). Examples without ``answer`` / ``prompt_ids`` are skipped."""
    exs = [e for e in dataset.examples if e.answer is not None and e.prompt_ids]
    exs = exs[:limit] if limit else exs
    if not exs:
        return float("nan")
    inner = getattr(model, "module", model)
    pad = D.pad_token_id(tokenizer)
    correct = 0
    for start in range(0, len(exs), batch_size):
        chunk = exs[start: start + batch_size]
        L = max(len(e.prompt_ids) for e in chunk)
        ids = torch.full((len(chunk), L), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(chunk):  # left padding for batched generation
            ids[i, L - len(e.prompt_ids):] = torch.tensor(e.prompt_ids)
            mask[i, L - len(e.prompt_ids):] = 1
        new = max(len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in chunk) + 1
        out = inner.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=new, do_sample=False, pad_token_id=pad, use_cache=True,
                             eos_token_id=tokenizer.eos_token_id)
        for i, e in enumerate(chunk):
            text = tokenizer.decode(out[i, L:], skip_special_tokens=True)
            correct += int(text.strip() == e.answer.strip())
    return correct / len(exs)


# ---------------------------------------------------------------- the loop

def _peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def check_config(cfg: TrainConfig):
    """Everything that can be refused before work starts: the flags, and a ``--resume``
    checkpoint whose configuration (or world size) differs. Returns
    ``(resume_path, resume_state)`` (``None, None`` without ``--resume``)."""
    validate_config(cfg)
    resume_path = resolve_resume(cfg)
    if resume_path is None:
        return None, None
    state = read_trainer_state(resume_path)
    check_resume_config(cfg, state, int(os.environ.get("WORLD_SIZE", "1")))
    return resume_path, state


def train(cfg: TrainConfig) -> dict:
    """Run training as configured; returns ``{"history", "evals", "final_eval", "step",
    "checkpoint", "out_dir", "skipped_rows"}`` (history: one dict per optimiser step with
    ``loss``, ``lr``, ``grad_norm`` and the loss metrics, gathered at each log interval)."""
    resume_path, resume_state = check_config(cfg)
    dist = init_distributed(cfg)
    try:
        return _train(cfg, dist, resume_path, resume_state)
    finally:
        if dist.owns_group:
            torch.distributed.destroy_process_group()


def _log(dist, msg):
    if dist.main:
        from tqdm.auto import tqdm
        tqdm.write(msg, file=sys.stdout)


def _train(cfg, dist, resume_path, resume_state):
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    device = select_device(cfg, dist)
    os.makedirs(cfg.out_dir, exist_ok=True)
    if dist.main:
        repair_checkpoint_debris(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    kind = "pairs" if cfg.loss in ("dpo", "minor_dpo") else "sft"

    # Data first: a bad row is refused before any model is built.
    tokenizer = _load_tokenizer(cfg)
    train_path, eval_path = _data_paths(cfg, dist)
    train_ds = D.load_dataset(train_path, tokenizer, max_length=cfg.max_length, kind=kind,
                              skip_bad_rows=cfg.skip_bad_rows)
    if resume_state is not None:   # refused before any model is built
        check_resume_data(resume_state, train_ds.fingerprint)
    eval_ds = (D.load_dataset(eval_path, tokenizer, max_length=cfg.max_length, kind=kind,
                              skip_bad_rows=cfg.skip_bad_rows, limit=cfg.eval_limit)
               if eval_path else None)
    if train_ds.skipped:
        _log(dist, f"skipped {len(train_ds.skipped)} bad rows in {train_path} (first: {train_ds.skipped[0]})")
    pad_id = D.pad_token_id(tokenizer)

    model, _ = load_model_and_tokenizer(cfg.model, tiny_seed=cfg.tiny_seed)
    model.to(device)
    vocab = model.get_output_embeddings().weight.shape[0]
    for flag, ds in (("--data", train_ds), ("--eval-data", eval_ds)):
        if ds is None or not ds.examples:
            continue
        top = max(max(e.input_ids + (e.rejected_input_ids or [])) for e in ds.examples)
        if top >= vocab:
            raise ValueError(f"{flag}: token id {top} >= the model's vocabulary {vocab} "
                             "(tokenizer/model mismatch)")
    if cfg.fused_linear:
        _check_plain_lm_head(model)
    ref_dtype = _DTYPES[cfg.ref_dtype] if cfg.ref_dtype else None
    ref_device = torch.device(cfg.ref_device) if cfg.ref_device else device
    autocast_dtype = torch.bfloat16 if (cfg.bf16 and device.type == "cuda") else None

    def autocast():
        if autocast_dtype is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=autocast_dtype)

    # Reference: precomputed table (then no reference model) or a frozen copy.
    ref_model = ref_table = eval_ref_table = None
    if cfg.uses_reference():
        if cfg.precompute_ref:
            cache_dir = cfg.ref_cache_dir or os.path.join(cfg.out_dir, "ref-cache")
            ref = (R.frozen_copy(model, dtype=ref_dtype, device=ref_device)
                   if ref_dtype is not None or ref_device != device else model)
            tables = []
            model_hash = R.model_fingerprint(ref)   # one read of the weights, not one per dataset
            for ds in (train_ds, eval_ds):
                if ds is None:
                    tables.append(None)
                    continue
                collate = lambda exs: D.collate(exs, pad_id, ds.kind)  # noqa: E731
                if dist.main:  # rank 0 fills the cache; the others then read it
                    R.precompute_reference_logprobs(
                        ref, ds, collate_fn=collate, batch_size=cfg.eval_batch_size or cfg.batch_size,
                        max_length=cfg.max_length, cache_dir=cache_dir, temperature=cfg.temperature,
                        backend=cfg.backend, autocast_dtype=autocast_dtype, log=lambda m: _log(dist, m),
                        model_hash=model_hash)
                dist.barrier()
                table, _ = R.precompute_reference_logprobs(
                    ref, ds, collate_fn=collate, batch_size=cfg.batch_size, max_length=cfg.max_length,
                    cache_dir=cache_dir, temperature=cfg.temperature, backend=cfg.backend,
                    autocast_dtype=autocast_dtype, log=lambda m: None, model_hash=model_hash)
                tables.append(table)
            # On the device once: a per-step host-to-device copy would sync every micro-step.
            ref_table, eval_ref_table = (t.to(device) if t is not None else None for t in tables)
            del ref  # training runs without the reference model in memory
        else:
            ref_model = R.frozen_copy(model, dtype=ref_dtype, device=ref_device)

    if resume_path is not None:  # the policy continues from the checkpoint's weights
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(resume_path).float()
    model.to(device)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    unwrapped = model
    model = wrap_model(model, dist, device, fsdp=cfg.fsdp)

    optimizer = torch.optim.AdamW(unwrapped.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_train = len(train_ds)
    per_step = cfg.batch_size * cfg.grad_accum * dist.world
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * n_train / per_step))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))
    start_step = 0
    if resume_path is not None:
        load_training_state(resume_path, unwrapped, optimizer, scheduler)
        start_step = int(resume_state["step"])
        _log(dist, f"resumed from {resume_path} at step {start_step}")

    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if dist.main:
        kept = []
        if resume_path is not None and os.path.exists(metrics_path):
            with open(metrics_path, encoding="utf-8") as f:
                kept = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= start_step]
        atomic_write(metrics_path, "".join(kept))

    def write_metrics(rec):
        if dist.main:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    sampler = Sampler(n_train, cfg.seed)
    history, evals = [], []
    pending = []  # (step, loss tensor, grad_norm tensor, lr, metrics tensors) until the next log
    tokens_since, t_last = 0, time.perf_counter()
    bar = tqdm(total=total_steps, initial=start_step, disable=not (cfg.progress and dist.main),
               desc=cfg.run_name or cfg.loss, dynamic_ncols=True, file=sys.stderr)

    def run_eval(step):
        if eval_ds is None:
            return None
        res = evaluate(cfg, model, eval_ds, pad_id=pad_id, device=device, ref_model=ref_model,
                       ref_table=eval_ref_table, tokenizer=tokenizer, autocast=autocast)
        rec = {"split": "eval", "step": step, **res}
        if cfg.run_name:
            rec["run"] = cfg.run_name
        evals.append(rec)
        write_metrics(rec)
        _log(dist, "eval  step %4d  " % step + "  ".join(
            f"{k}={v:.4f}" for k, v in res.items()))
        return res

    def flush(step):
        nonlocal tokens_since, t_last
        if not pending:
            return
        vals = torch.stack([torch.stack([p[1], p[2]] + [p[4][k] for k in metric_keys]).double()
                            for p in pending])
        if dist.world > 1:  # loss parts sum over ranks, metrics average
            torch.distributed.all_reduce(vals)
            vals[:, 2:] /= dist.world
            vals[:, 1] /= dist.world
        rows = vals.tolist()
        now = time.perf_counter()
        tps = tokens_since * dist.world / max(now - t_last, 1e-9)
        tokens_since, t_last = 0, now
        mem = _peak_memory_gb(device)
        for p, row in zip(pending, rows):
            rec = {"split": "train", "step": p[0], "loss": row[0], "grad_norm": row[1], "lr": p[3]}
            rec.update({k: row[2 + i] for i, k in enumerate(metric_keys)})
            rec.update({"tokens_per_s": tps, "peak_mem_gb": mem})
            if cfg.run_name:
                rec["run"] = cfg.run_name
            history.append(rec)
            write_metrics(rec)
        pending.clear()
        last = history[-1]
        post = {"loss": f"{last['loss']:.4f}"}
        if "deviation" in last:
            post["dev"] = f"{last['deviation']:.4f}"
        if "rewards/accuracies" in last:
            post["acc"] = f"{last['rewards/accuracies']:.3f}"
        post["tok/s"] = f"{tps:.0f}"
        post["mem"] = f"{mem:.2f}G"
        bar.set_postfix(post, refresh=False)
        if cfg.print_steps:
            for rec in history[-len(rows):]:
                _log(dist, "train step %4d  loss=%.4f" % (rec["step"], rec["loss"]) + "".join(
                    f"  {k}={rec[k]:.4f}" for k in ("deviation", "rewards/accuracies") if k in rec))

    metric_keys = {"sft": ["deviation"] if cfg.uses_reference() else [], "minor_sft": ["deviation"],
                   "dpo": ["rewards/accuracies", "rewards/margins"],
                   "minor_dpo": ["rewards/accuracies", "rewards/margins"]}[cfg.loss]
    last_ckpt = None
    step = start_step
    A, B, W = cfg.grad_accum, cfg.batch_size, dist.world
    for step in range(start_step + 1, total_steps + 1):
        # The whole global batch of this step, known on the host: its counts normalise the loss.
        first = (step - 1) * A * B * W
        micro = []
        for a in range(A):
            idx = sampler.indices(first + a * B * W, B * W)
            micro.append([train_ds.examples[i] for i in idx])
        if cfg.loss == "sft":
            num_items = sum(sum(l != D.IGNORE_INDEX for l in e.labels[1:]) for mb in micro for e in mb)
            denom = None
        else:
            num_items, denom = None, float(sum(len(mb) for mb in micro))
        step_loss = torch.zeros((), device=device)
        step_metrics = {k: torch.zeros((), device=device) for k in metric_keys}
        for a, mb in enumerate(micro):
            mine = mb[dist.rank * B: (dist.rank + 1) * B]
            b = D.collate(mine, pad_id, kind)
            idx = b.pop("index")
            tokens_since += int(b["attention_mask"].sum())
            b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            ref = (R.lookup(ref_table, idx.to(device, non_blocking=True), kind)
                   if ref_table is not None else None)
            sync = a == A - 1
            if dist.world > 1 and cfg.fsdp:
                model.set_requires_gradient_sync(sync)
            ctx = model.no_sync() if (dist.world > 1 and not cfg.fsdp and not sync) else contextlib.nullcontext()
            with ctx:
                with autocast():
                    loss, m = compute_loss(cfg, model, b, ref_model=ref_model, ref_logps=ref, denom=denom,
                                           num_items=num_items, reduction="sum", unwrapped=unwrapped)
                # DDP / FSDP average gradients over ranks; the loss is normalised globally.
                (loss * W).backward()
            step_loss += loss.detach().float()
            for k in metric_keys:
                step_metrics[k] += m[k].float() / A
        if cfg.dump_grads and step == start_step + 1:
            _dump_grads(cfg.dump_grads, unwrapped, dist)
        if cfg.clip_grad:
            gn = torch.nn.utils.clip_grad_norm_(unwrapped.parameters(), cfg.clip_grad)
        else:
            gn = torch.nn.utils.get_total_norm([p.grad for p in unwrapped.parameters() if p.grad is not None])
        if hasattr(gn, "full_tensor"):
            gn = gn.full_tensor()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # grad_norm is identical on every rank; divided by W again in flush after the sum.
        pending.append((step, step_loss, gn.detach().float().to(device), lr, step_metrics))
        bar.update(1)
        if step % cfg.log_every == 0 or step == total_steps:
            flush(step)
        if cfg.eval_every and step % cfg.eval_every == 0 and step != total_steps:
            flush(step)
            run_eval(step)
        if cfg.save_every and step % cfg.save_every == 0 and step != total_steps:
            flush(step)
            last_ckpt = save_checkpoint(cfg, dist, model, unwrapped, tokenizer, optimizer, scheduler,
                                        step, step * A * B * W, train_ds.fingerprint)
    flush(step)
    bar.close()
    final_eval = run_eval(step)
    last_ckpt = save_checkpoint(cfg, dist, model, unwrapped, tokenizer, optimizer, scheduler,
                                step, step * A * B * W, train_ds.fingerprint)
    return {"history": history, "evals": evals, "final_eval": final_eval, "step": step,
            "checkpoint": last_ckpt, "out_dir": cfg.out_dir, "skipped_rows": len(train_ds.skipped)}


def _dump_grads(path, unwrapped, dist):
    """Write the accumulated, rank-averaged gradients (full tensors) to ``path`` (rank 0)."""
    from safetensors.torch import save_file
    grads = {}
    for name, p in unwrapped.named_parameters():
        if p.grad is not None:
            g = p.grad
            g = g.full_tensor() if hasattr(g, "full_tensor") else g
            grads[name] = g.detach().float().cpu().contiguous()
    if dist.main:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(grads, path)
