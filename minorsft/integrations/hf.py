"""Hugging Face drop-ins: a ``transformers.Trainer`` and a TRL ``DPOTrainer`` on the fused losses.

This is the only file in minorsft that knows about Hugging Face trainers, and it is
optional: importing it needs ``transformers``; :class:`FusedDPOTrainer` also needs
``trl`` and is built on first access, so the module imports without TRL.

- :class:`FusedLossTrainer` -- a ``transformers.Trainer`` whose loss is ``sft``,
  ``minor_sft``, ``dpo`` or ``minor_dpo``, computed by the fused kernels from the
  policy logits and, on the same batch, a frozen reference model's logits (eval mode,
  no grad). It logs the loss's metrics (``deviation`` for MinorSFT, ``rewards/*`` for
  the DPO family).
- :class:`FusedDPOTrainer` -- TRL's ``DPOTrainer`` with its loss hook replaced by
  ``minor_dpo`` (default) or ``dpo`` (``sigmoid`` / ``ipo`` / ``hinge`` / ``robust``),
  keeping TRL's data pipeline, reference handling and metric names.
- :func:`causal_lm_loss` -- the shared step: Hugging Face style outputs and labels into
  the public loss with ``shift=True`` (position ``t`` predicts label ``t + 1``; the logits
  are never sliced).

Metrics are kept as detached tensors and only read on the host when the trainer
logs, so a training step adds no host synchronisation of its own.
"""
from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Any, Dict, Optional, Tuple

import torch
import transformers

import minorsft as ms
from minorsft.validation import check_choice, check_positive

__all__ = ["causal_lm_loss", "FusedLossTrainer", "FusedDPOTrainer", "REF_LOGPS_KEY", "LOSSES"]

LOSSES = ms.losses.LOSS_NAMES
REF_LOGPS_KEY = "ref_logps"  # optional batch column: precomputed per-sequence reference sums, [B]
_TRL_DPO_LOSSES = tuple(name for name, spec in ms.LOSSES.items() if spec.pairs)


def causal_lm_loss(loss: str, logits: torch.Tensor, labels: torch.Tensor, *,
                   ref_logits: Optional[torch.Tensor] = None,
                   ref_logprobs: Optional[torch.Tensor] = None,
                   num_items_in_batch=None, **options) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One fused loss on Hugging Face causal-LM outputs, with the next-token shift done here.

    Args:
        loss: ``"sft"``, ``"minor_sft"``, ``"dpo"`` or ``"minor_dpo"``.
        logits: ``[B, T, V]`` policy logits; position ``t`` predicts ``labels[:, t + 1]``.
        labels: ``[B, T]`` unshifted labels (``input_ids`` with ``ignore_index`` where
            nothing is trained), as ``transformers`` collators build them.
        ref_logits: ``[B, T, V]`` reference logits for the same batch (not for ``sft``).
        ref_logprobs: instead of ``ref_logits``: ``[B]`` per-sequence reference sums, or
            ``[B, T - 1]`` per-token log-probs already aligned with ``labels[:, 1:]``.
        num_items_in_batch: ``sft`` only: token count to divide by (gradient accumulation).
        **options: passed on to the loss (``beta``, ``length_norm``, ``loss_type``,
            ``label_smoothing``, ``ignore_index``, ``temperature``, ``backend``, ...).

    The shift is the loss's own (``shift=True``): no slice of the logits, so autograd
    allocates no second vocabulary-sized gradient.
    DPO-family batches hold ``B/2`` chosen rows then ``B/2`` rejected rows.

    Returns:
        ``(loss, metrics)``: the scalar loss (``reduction`` as given, default mean) and
        a dict of detached scalar tensors (empty for ``sft``).
    """
    check_choice("loss", loss, LOSSES)
    if ref_logits is not None:
        ref_logits = ref_logits.to(logits.device)
    if ref_logprobs is not None:
        ref_logprobs = ref_logprobs.to(logits.device)
    return ms.fused_loss(loss, logits, labels, ref_logits=ref_logits, ref_logprobs=ref_logprobs,
                         num_items_in_batch=num_items_in_batch, return_metrics=True, shift=True,
                         **options)


class _LabelErrorLog:
    """Each loss call's label flag (``ms.take_label_errors``: device tensors, no host sync)
    with its step, read in one synchronisation when the trainer logs: a label that is no
    token stops training with an error naming the step and the value."""

    def __init__(self, device):
        self.pending = []
        ms.take_label_errors(device)   # the trainer reports its own bad labels only

    def add(self, step: int, device) -> None:
        self.pending.append((step, ms.take_label_errors(device)))

    def check(self, gather) -> None:
        if not self.pending:
            return
        steps, errors = zip(*self.pending)
        self.pending = []
        rows = gather(torch.stack(errors)).tolist()        # every rank's flags: all raise
        for i, row in enumerate(rows):
            ms.raise_label_errors(row, f"step {steps[i % len(steps)]}")


def _host_means(pending: Dict[str, list], gather) -> Dict[str, float]:
    """Average lists of detached scalar tensors over steps (and ranks, via ``gather``): one sync."""
    keys = [k for k, v in pending.items() if v]
    if not keys:
        return {}
    per_key = [torch.stack([v.detach().float().reshape(()) for v in pending[k]]).mean() for k in keys]
    stacked = torch.stack(per_key)
    return dict(zip(keys, gather(stacked).reshape(-1, len(keys)).mean(0).tolist()))


class FusedLossTrainer(transformers.Trainer):
    """``transformers.Trainer`` that trains with a fused minorsft loss against a frozen reference.

    Use it exactly like ``Trainer``, with these extra keyword arguments::

        trainer = FusedLossTrainer(model=model, ref_model=ref, loss="minor_sft", beta=0.1,
                                   args=TrainingArguments(...), train_dataset=ds,
                                   data_collator=collator)

    Args:
        ref_model: the frozen reference (``eval()``, no grad; any dtype). Needed by every
            loss but ``sft`` unless the batches carry precomputed sums under
            ``REF_LOGPS_KEY`` (``"ref_logps"``, ``[B]``); then it may be ``None``.
        loss: ``"sft"``, ``"minor_sft"`` (default), ``"dpo"`` or ``"minor_dpo"``.
        beta, length_norm, loss_type, label_smoothing, temperature, backend: the
            loss's options (``length_norm`` for ``minor_sft``, ``loss_type`` /
            ``label_smoothing`` for ``dpo``); see ``minorsft`` for their meaning.
        All other arguments go to ``transformers.Trainer``.

    Batches are the usual causal-LM dicts (``input_ids``, ``attention_mask``,
    ``labels`` unshifted, ``-100`` where not trained); for ``dpo`` / ``minor_dpo`` the
    collator must put ``B/2`` chosen rows first, then the ``B/2`` rejected rows.
    ``sft`` divides by the Trainer's ``num_items_in_batch`` (correct under gradient
    accumulation); the sequence-level losses average sequences (pairs) per micro-batch
    and the Trainer divides by the accumulation steps. Logged metrics: ``deviation``,
    ``logps``, ``ref_logps`` (``minor_sft``) or TRL's ``rewards/*`` and ``logps/*``
    names (DPO family), averaged over the logging interval.
    """

    def __init__(self, *args, ref_model: Optional[torch.nn.Module] = None, loss: str = "minor_sft",
                 beta: float = 0.1, length_norm: str = "outside", loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, temperature: float = 1.0, backend: Optional[str] = None,
                 **kwargs):
        # Refuse bad options before the Trainer is built, not at the first step.
        given = dict(beta=beta, length_norm=length_norm, loss_type=loss_type,
                     label_smoothing=label_smoothing)
        spec = ms.losses.get_loss(loss)
        # check_labels=False: the label-range check is a host sync per step; the label
        # flag is read when the trainer logs instead (_LabelErrorLog).
        options: Dict[str, Any] = {"temperature": check_positive("temperature", temperature),
                                   "backend": backend, "check_labels": False}
        options.update(ms.losses.check_options(loss, {k: given[k] for k in spec.options}))
        if ref_model is not None and not isinstance(ref_model, torch.nn.Module):
            raise TypeError(f"ref_model: expected a torch.nn.Module, got {type(ref_model).__name__}")
        super().__init__(*args, **kwargs)
        if spec.pairs:
            self._refuse_row_splitting()
        self.fused_loss = loss
        self.fused_options = options
        self.ref_model = None
        if ref_model is not None and spec.reference:
            ref_model.eval().requires_grad_(False)
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        # Only sft divides by a token count (the Trainer passes num_items_in_batch to
        # compute_loss only when this is True, whatever the model accepts: the loss is
        # ours); the others must not get one, and the Trainer then divides their
        # per-micro-batch mean by the accumulation steps.
        self.model_accepts_loss_kwargs = spec.token_level
        self._fused_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._label_errors = _LabelErrorLog(self.args.device)

    def _refuse_row_splitting(self) -> None:
        """A DPO batch is ``[chosen...; rejected...]``: accelerate must not slice one
        collated batch by rows across processes (``split_batches``, or
        ``dispatch_batches``, the default for iterable datasets), or chosen rows would be
        paired with other pairs' rows."""
        if self.accelerator.num_processes <= 1:
            return
        dl = getattr(self.accelerator, "dataloader_config", None)
        split = bool(getattr(dl, "split_batches", False))
        dispatch = getattr(dl, "dispatch_batches", None)
        iterable = isinstance(self.train_dataset, torch.utils.data.IterableDataset)
        if split or dispatch or (dispatch is None and iterable):
            raise ValueError(
                "DPO-family loss: accelerate would "
                "split each collated [chosen; rejected] batch by rows across processes "
                f"(split_batches={split}, dispatch_batches={dispatch}, iterable dataset={iterable}); "
                "use a map-style dataset with split_batches=False and dispatch_batches=False")

    def _set_signature_columns_if_needed(self):
        # Keep the optional precomputed-reference column when unused columns are removed.
        super()._set_signature_columns_if_needed()
        if REF_LOGPS_KEY not in self._signature_columns:
            self._signature_columns = list(self._signature_columns) + [REF_LOGPS_KEY]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Policy forward, reference forward (no grad) on the same inputs, then the fused loss."""
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        ref_logprobs = inputs.pop(REF_LOGPS_KEY, None)
        if labels is None:
            raise ValueError(f"{type(self).__name__}: the batch has no 'labels' (keys: {sorted(inputs)}); "
                             "the collator must build them (-100 where nothing is trained)")
        # No labels go to the model: it returns logits and skips its own cross-entropy.
        outputs = model(**inputs)
        ref_logits = None
        if ms.LOSSES[self.fused_loss].reference and ref_logprobs is None:
            if self.ref_model is None:
                raise ValueError(
                    f"ref_model: loss={self.fused_loss!r} needs a reference; pass ref_model= to "
                    f"{type(self).__name__} or put per-sequence sums in the batch under {REF_LOGPS_KEY!r}")
            with torch.no_grad():
                ref_logits = self.ref_model(**inputs, use_cache=False).logits
        count = num_items_in_batch if ms.LOSSES[self.fused_loss].token_level else None
        loss, metrics = causal_lm_loss(self.fused_loss, outputs.logits, labels, ref_logits=ref_logits,
                                       ref_logprobs=ref_logprobs, num_items_in_batch=count,
                                       **self.fused_options)
        # Tell training_step whether the loss is already normalised over the accumulated batch.
        self.loss_is_scaled_for_ga = count is not None
        if count is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # the count is global; DDP averages ranks
        mode = "train" if self.model.training else "eval"
        for key, value in metrics.items():
            self._fused_metrics[mode][key].append(value)
        self._label_errors.add(self.state.global_step + (mode == "train"), loss.device)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        """Add the loss metrics averaged since the last log (``eval_`` prefixed in evaluation);
        raise if a label since the last log was no token (naming its step)."""
        self._label_errors.check(self.accelerator.gather)
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        means = _host_means(self._fused_metrics[mode], self.accelerator.gather)
        logs.update({prefix + key: value for key, value in means.items()})
        self._fused_metrics[mode].clear()
        super().log(logs, *args, **kwargs)


# --------------------------------------------------------------------------------------
# TRL DPOTrainer path. TRL is optional, so the subclass is built on first access.

_TRL_HOOK = "_compute_loss"
_TRL_HOOK_PARAMS = ["self", "model", "inputs", "return_outputs"]
_TRL_BATCH_KEYS = ("input_ids", "attention_mask", "completion_mask")
_TRL_ATTRIBUTES = ("beta", "precompute_ref_logps", "loss_types", "loss_weights", "label_smoothing", "ld_alpha",
                   "f_divergence_type", "use_weighting", "aux_loss_enabled", "ref_model", "_metrics")


def _trl_version() -> str:
    import trl

    return getattr(trl, "__version__", "unknown")


def _trl_mismatch(what: str) -> RuntimeError:
    return RuntimeError(
        f"FusedDPOTrainer replaces trl.DPOTrainer.{_TRL_HOOK}(model, inputs, return_outputs) and reads "
        f"TRL's preference batches (input_ids / attention_mask / completion_mask, chosen rows first), "
        f"as in trl 1.16; the installed trl {_trl_version()} {what}. Use a trl version with that hook, "
        f"or FusedLossTrainer with your own preference collator.")


def _check_trl_hook(base) -> None:
    hook = getattr(base, _TRL_HOOK, None)
    if hook is None:
        raise _trl_mismatch(f"has no DPOTrainer.{_TRL_HOOK}")
    params = list(inspect.signature(hook).parameters)
    if params[:len(_TRL_HOOK_PARAMS)] != _TRL_HOOK_PARAMS:
        raise _trl_mismatch(f"has DPOTrainer.{_TRL_HOOK}{inspect.signature(hook)}")


def _last_positions(logits: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The last ``seq_len`` positions of ``[B, T, V]`` logits (prompt-learning PEFT prepends
    virtual tokens). ``logits`` itself when ``T == seq_len``: a slice, even a full one,
    would make autograd allocate a second ``[B, T, V]`` buffer for its gradient."""
    return logits if logits.shape[1] == seq_len else logits[:, -seq_len:]


class _FusedDPOMixin:
    """TRL ``DPOTrainer`` whose loss is minorsft's fused ``minor_dpo`` (default) or ``dpo``.

    Use it like ``trl.DPOTrainer``, with two extra keyword arguments::

        trainer = FusedDPOTrainer(model=model, ref_model=ref, args=DPOConfig(beta=0.1, ...),
                                  train_dataset=prefs, processing_class=tokenizer,
                                  loss="minor_dpo")

    Args:
        loss: ``"minor_dpo"`` (MinorDPO; leave ``DPOConfig.loss_type`` at
            ``["sigmoid"]``) or ``"dpo"`` (``DPOConfig.loss_type`` one of
            ``sigmoid`` / ``ipo`` / ``hinge`` / ``robust``; ``label_smoothing`` is
            used by ``robust`` only, as in TRL).
        backend: minorsft backend (``None`` = Triton on CUDA, PyTorch on CPU).
        All other arguments go to ``trl.DPOTrainer``.

    TRL's data pipeline, collator, reference model (``ref_model``, a PEFT adapter
    switched off, or ``precompute_ref_log_probs``), ``beta`` and loss weight are
    used as they are. The policy and reference logits go through one fused pass;
    with ``precompute_ref_log_probs`` TRL's cached per-sequence sums are the
    reference. Logged metrics keep TRL's names (``rewards/chosen``,
    ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
    ``logps/chosen``, ``logps/rejected``, ``num_tokens``). Not supported (refused
    at construction): several loss types at once, ``ld_alpha``, a non-default
    ``f_divergence_type``, ``use_weighting``.
    """

    def __init__(self, *args, loss: str = "minor_dpo", backend: Optional[str] = None, **kwargs):
        check_choice("loss", loss, _TRL_DPO_LOSSES)
        super().__init__(*args, **kwargs)
        missing = [name for name in _TRL_ATTRIBUTES if not hasattr(self, name)]
        if missing:
            raise _trl_mismatch(f"DPOTrainer sets no {missing}")
        self.fused_loss = loss
        self.fused_options = self._fused_options_from_config(loss, backend)
        self._pending_tokens = []
        self._label_errors = _LabelErrorLog(self.args.device)

    def _fused_options_from_config(self, loss: str, backend) -> Dict[str, Any]:
        loss_types = list(self.loss_types)
        if len(loss_types) != 1:
            raise ValueError(f"loss_type: FusedDPOTrainer takes one loss type, got {loss_types}")
        for name, value, default in (("ld_alpha", self.ld_alpha, None),
                                     ("f_divergence_type", self.f_divergence_type, "reverse_kl"),
                                     ("use_weighting", self.use_weighting, False)):
            if value != default:
                raise ValueError(f"{name}: FusedDPOTrainer supports only {default!r}, got {value!r}")
        options: Dict[str, Any] = {"beta": self.beta, "backend": backend, "check_labels": False}
        if loss == "minor_dpo":
            if loss_types != ["sigmoid"]:
                raise ValueError(f"loss_type: loss='minor_dpo' replaces TRL's loss; leave "
                                 f"DPOConfig.loss_type at ['sigmoid'], got {loss_types}")
        else:
            # TRL applies label smoothing to the robust loss only; keep its meaning.
            smoothing = self.label_smoothing if loss_types[0] == "robust" else 0.0
            options.update(ms.losses.check_options(
                "dpo", {"beta": self.beta, "loss_type": loss_types[0], "label_smoothing": smoothing}))
        return options

    def _compute_loss(self, model, inputs, return_outputs):
        """TRL's loss hook: fused policy + reference pass on TRL's ``[chosen; rejected]`` batch."""
        missing = [key for key in _TRL_BATCH_KEYS if key not in inputs]
        if missing:
            raise _trl_mismatch(f"gave a batch without {missing} (keys: {sorted(inputs)})")
        mode = "train" if self.model.training else "eval"
        extra = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
        model_kwargs = {k: v for k, v in inputs.items() if k not in extra}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        seq_len = labels.shape[1]
        # Without fused_lm_head=True TRL's patched forward is the model's own: it returns logits.
        outputs = model(**model_kwargs)
        logits = _last_positions(outputs.logits, seq_len)

        ref_logits = ref_logprobs = None
        if self.precompute_ref_logps:
            ref_logprobs = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        elif self.ref_model is not None:
            ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
            with torch.no_grad():
                ref_logits = _last_positions(self.ref_model(**ref_kwargs).logits, seq_len)
        else:  # PEFT without a ref_model: TRL switches the adapter off for the reference
            ref_logprobs = torch.cat(self.compute_ref_log_probs(model, inputs))

        loss, metrics = causal_lm_loss(self.fused_loss, logits, labels, ref_logits=ref_logits,
                                       ref_logprobs=ref_logprobs, **self.fused_options)
        loss = loss * self.loss_weights[0]
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        if mode == "train":
            self._pending_tokens.append(inputs["attention_mask"].sum())
        self._label_errors.add(self.state.global_step + (mode == "train"), loss.device)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        """Turn the step tensors into floats (one sync per logging interval), then TRL's log;
        raise if a label since the last log was no token (naming its step)."""
        self._label_errors.check(self.accelerator.gather)
        mode = "train" if self.model.training else "eval"
        pending = {k: v for k, v in self._metrics[mode].items() if v and torch.is_tensor(v[0])}
        for key, value in _host_means(pending, self.accelerator.gather).items():
            self._metrics[mode][key] = [value]
        if self._pending_tokens:
            tokens = self.accelerator.gather(torch.stack(self._pending_tokens).sum().reshape(1)).sum()
            self._total_train_tokens += int(tokens) // getattr(self, "_tp_size", 1)
            self._pending_tokens = []
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        super().log(logs, start_time)


def _build_fused_dpo_trainer():
    """``FusedDPOTrainer``: :class:`_FusedDPOMixin` on top of the installed TRL's ``DPOTrainer``."""
    try:
        from trl import DPOTrainer
    except ImportError as exc:
        raise ImportError("FusedDPOTrainer needs the optional dependency trl "
                          "(pip install 'minorsft[hf]')") from exc
    _check_trl_hook(DPOTrainer)
    cls = type("FusedDPOTrainer", (_FusedDPOMixin, DPOTrainer), {"__doc__": _FusedDPOMixin.__doc__})
    cls.__module__ = __name__
    return cls


_LAZY: Dict[str, Any] = {}


def __getattr__(name: str):
    if name == "FusedDPOTrainer":
        if name not in _LAZY:
            _LAZY[name] = _build_fused_dpo_trainer()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
