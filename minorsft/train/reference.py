"""The reference model of a training run, two ways.

(a) :func:`frozen_copy`: a frozen copy of the initial policy (eval mode, no grad,
    optionally another dtype / device) whose logits feed the fused loss each step.
(b) :func:`precompute_reference_logprobs`: one pass over the dataset computes each
    sequence's summed reference log-probability; the result is cached on disk as
    safetensors keyed by a hash of (model weights, tokenised data, max length), so
    training then runs without the reference model in memory.

Loading the cache never unpickles anything (safetensors holds only tensors). Each cache
file records the SHA-256 of its table in its header; a file that fails that check (or
cannot be read, or has the wrong shape) is recomputed, never used (:func:`read_cache`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

import minorsft as ms
from minorsft.train.checkpoint import atomic_write

CACHE_VERSION = "1"


def frozen_copy(model: torch.nn.Module, *, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> torch.nn.Module:
    """A deep copy of ``model`` in eval mode with ``requires_grad=False`` everywhere,
    optionally cast to ``dtype`` and moved to ``device``."""
    ref = copy.deepcopy(model)
    if dtype is not None or device is not None:
        ref = ref.to(device=device, dtype=dtype)
    ref.eval()
    ref.requires_grad_(False)
    if getattr(ref, "config", None) is not None:
        ref.config.use_cache = False   # a KV cache is never reused here: don't build one
    return ref


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the model config (what changes the numbers: eps, rope, softcapping, ...)
    and parameter/buffer names, shapes, dtypes and bytes (one read of the weights)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_diff_dict"):
        diff = {k: v for k, v in config.to_diff_dict().items()
                if k not in ("use_cache", "_name_or_path", "transformers_version")}
        diff["_attn_implementation"] = getattr(config, "_attn_implementation", None)
        h.update(json.dumps(diff, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(model_hash: str, data_hash: str, max_length: int, temperature: float = 1.0,
              compute_dtype: str = "none") -> str:
    """The cache key: a short hash of model, data, max length, temperature and autocast dtype."""
    payload = json.dumps({"v": CACHE_VERSION, "model": model_hash, "data": data_hash,
                          "max_length": int(max_length), "temperature": float(temperature),
                          "compute_dtype": compute_dtype},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@torch.no_grad()
def sequence_logprobs(model, batch: dict, *, temperature: float = 1.0, backend=None,
                      autocast_dtype=None) -> torch.Tensor:
    """Summed log-probability of the labelled tokens of each row: ``[B]`` fp32.

    ``batch`` holds ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` (HF convention,
    unshifted) already on the model's device.
    """
    device = batch["input_ids"].device
    ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else torch.autocast(device.type, enabled=False))
    with ctx:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits
    lp = ms.token_logprobs(logits, batch["labels"], temperature=temperature, backend=backend,
                           check_labels=False, shift=True)
    return lp.float().sum(-1)


def precompute_reference_logprobs(model, dataset, *, collate_fn, batch_size: int, max_length: int,
                                  cache_dir: str | None, device=None, temperature: float = 1.0,
                                  backend=None, autocast_dtype=None, log=print,
                                  model_hash: str | None = None):
    """Per-sequence reference log-prob sums for every example of ``dataset``.

    Returns ``(table, hit)``: ``table`` is ``[N]`` (SFT) or ``[N, 2]`` (pairs: chosen,
    rejected) fp32 on the CPU, indexed by ``Example.index``; ``hit`` tells whether it
    came from the cache ``{cache_dir}/ref-{key}.safetensors`` (written atomically on a
    miss; no cache when ``cache_dir`` is None).
    """
    from safetensors.torch import save

    key = cache_key(model_hash or model_fingerprint(model), dataset.fingerprint, max_length,
                    temperature, str(autocast_dtype))
    path = os.path.join(cache_dir, f"ref-{key}.safetensors") if cache_dir else None
    n = len(dataset)
    if path and os.path.exists(path):
        table, problem = read_cache(path, (n, 2) if dataset.kind == "pairs" else (n,))
        if problem is None:
            log(f"reference cache hit: {path}")
            return table, True
        log(f"reference cache {path} {problem}: recomputing")
    log(f"reference cache miss: computing reference log-probs for {n} examples")
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rows = []
    try:
        for start in range(0, n, batch_size):
            exs = dataset.examples[start: start + batch_size]
            b = collate_fn(exs)
            b = {k: v.to(device) for k, v in b.items() if k != "index"}
            s = sequence_logprobs(model, b, temperature=temperature, backend=backend,
                                  autocast_dtype=autocast_dtype).cpu()
            rows.append(torch.stack(s.chunk(2), dim=1) if dataset.kind == "pairs" else s)
    finally:
        model.train(was_training)
    table = torch.cat(rows).contiguous()
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        # [n] or [n, 2] floats: serialised in memory, written durably like every other file
        atomic_write(path, save({"ref_logps": table}, metadata={"key": key, "kind": dataset.kind,
                                                                 "source": str(dataset.source),
                                                                 "sha256": table_digest(table)}))
        log(f"reference cache written: {path}")
    return table, False


def table_digest(table: torch.Tensor) -> str:
    """SHA-256 of a cache table: its dtype, shape and bytes."""
    h = hashlib.sha256(f"{table.dtype}:{tuple(table.shape)}:".encode())
    h.update(table.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_cache(path: str, expected_shape: tuple):
    """``(table, None)`` when the cache file at ``path`` verifies (a readable safetensors
    file whose table matches the SHA-256 its header records, of ``expected_shape``), else
    ``(None, why not)``."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            table = f.get_tensor("ref_logps")
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as e:
        return None, f"is unreadable ({type(e).__name__}: {e})"
    if "sha256" not in meta:
        return None, "records no SHA-256 (written by an older version)"
    if table_digest(table) != meta["sha256"]:
        return None, "fails verification: its table's SHA-256 differs from the recorded one"
    if tuple(table.shape) != tuple(expected_shape):
        return None, f"has shape {tuple(table.shape)}, expected {tuple(expected_shape)}"
    return table, None


def lookup(table: torch.Tensor, index: torch.Tensor, kind: str) -> torch.Tensor:
    """Rows of ``table`` for a batch's ``index`` ``[B]`` in the loss layout: ``[B]`` for SFT,
    ``[2B]`` (chosen then rejected) for pairs."""
    rows = table[index]
    return torch.cat([rows[:, 0], rows[:, 1]]) if kind == "pairs" else rows


@dataclass
class ReferenceSetup:
    """The reference of a run: a frozen ``model`` (live, each step) or precomputed
    per-sequence ``train_table`` / ``eval_table`` on the device (then no reference model
    stays in memory); all None for a loss without a reference."""

    model: Optional[torch.nn.Module] = None
    train_table: Optional[torch.Tensor] = None
    eval_table: Optional[torch.Tensor] = None


def setup_reference(policy, datasets, *, precompute: bool, dtype, device, policy_device,
                    collate_fn, batch_size: int, max_length: int, cache_dir: str,
                    temperature: float, backend, autocast_dtype, main: bool, barrier, log):
    """The :class:`ReferenceSetup` of a run whose reference is the initial ``policy``.

    Without ``precompute``: a frozen copy (``dtype`` / ``device`` when given). With it:
    the ``[N]`` / ``[N, 2]`` tables of ``datasets`` (train, eval or None), rank 0 filling
    the cache first (``main``) and every rank reading it after ``barrier()``.
    ``collate_fn(examples, kind)`` builds a batch.
    """
    if not precompute:
        return ReferenceSetup(model=frozen_copy(policy, dtype=dtype, device=device))
    ref = (frozen_copy(policy, dtype=dtype, device=device)
           if dtype is not None or device != policy_device else policy)
    model_hash = model_fingerprint(ref)   # one read of the weights, not one per dataset
    tables = []
    for ds in datasets:
        if ds is None:
            tables.append(None)
            continue
        kw = dict(collate_fn=lambda exs, k=ds.kind: collate_fn(exs, k), batch_size=batch_size,
                  max_length=max_length, cache_dir=cache_dir, temperature=temperature,
                  backend=backend, autocast_dtype=autocast_dtype, model_hash=model_hash)
        # rank 0 fills the cache and keeps its table; the others then read the cache
        table = precompute_reference_logprobs(ref, ds, log=log, **kw)[0] if main else None
        barrier()
        if table is None:
            table = precompute_reference_logprobs(ref, ds, log=lambda m: None, **kw)[0]
        tables.append(table)
    # On the device once: a per-step host-to-device copy would sync every micro-step.
    train_table, eval_table = (t.to(policy_device) if t is not None else None for t in tables)
    return ReferenceSetup(train_table=train_table, eval_table=eval_table)
