"""The one loss dispatch shared by the logits path and the fused linear path.

A public loss function builds its path's *inputs* object (:class:`LogitsInputs` in
:mod:`minorsft.functional`, :class:`LinearInputs` in :mod:`minorsft.linear`: the tensors
plus the token options, checked on construction) and hands it to :func:`run_loss`, which
checks the loss's options and the reference, runs the fused op once for the policy (and
the reference) and finishes with the shared epilogue
:func:`minorsft.losses.loss_from_token_logprobs`. So the two paths cannot disagree on a
check, a loss formula, a reduction or a metric.

An inputs object provides: ``labels`` ``[B, T']`` (the scored positions' labels),
``ignore_index``, ``device``, ``ref_name`` (the name of its reference-tensor argument, for
errors), ``has_ref`` and ``logprobs() -> (lp [B, T'], ref_lp [B, T'] or None)``. A path that
can form a scalar loss's gradient in its forward (the fused linear path) also provides
``gradient_in_forward()``, ``reference_logprobs()`` and ``fused_loss(...)``.
"""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from minorsft import losses
from minorsft import validation as V


def run_loss(loss: str, inputs, *, ref_logprobs: Optional[Tensor] = None, reduction: str = "mean",
             num_items_in_batch: Optional[Union[int, Tensor]] = None, return_metrics: bool = False,
             **options) -> losses.LossOut:
    """Loss ``loss`` (a :data:`minorsft.losses.LOSSES` name) on a path's ``inputs``.

    Everything is checked before any kernel runs: the loss options, ``reduction``,
    ``num_items_in_batch`` (token-level losses only), the reference (exactly one of the path's reference tensors or ``ref_logprobs`` for a
    reference loss, none for ``sft``) and the pair layout.
    """
    spec = losses.get_loss(loss)
    opts = losses.check_options(loss, options)
    V.check_reduction(reduction)
    losses.check_num_items(loss, num_items_in_batch)
    labels = inputs.labels
    if spec.reference:
        if inputs.has_ref == (ref_logprobs is not None):
            raise ValueError(f"pass exactly one of {inputs.ref_name} or ref_logprobs, not both"
                             if inputs.has_ref else f"a reference is required: pass exactly one of "
                             f"{inputs.ref_name} or ref_logprobs")
        if ref_logprobs is not None:
            V.check_ref_logprobs(ref_logprobs, labels.shape, inputs.device)
    elif inputs.has_ref or ref_logprobs is not None:
        raise ValueError(f"{inputs.ref_name} / ref_logprobs: the {loss!r} loss uses no reference")
    if spec.pairs:
        V.check_pairs(labels.shape[0])
    if reduction != "none" and getattr(inputs, "gradient_in_forward", lambda: False)():
        return _gradient_in_forward(loss, inputs, opts, ref_logprobs, reduction, num_items_in_batch,
                                    return_metrics)
    lp, ref_lp = inputs.logprobs()
    ref_token = ref_lp if ref_lp is not None else (
        ref_logprobs if ref_logprobs is not None and ref_logprobs.dim() == 2 else None)
    ref_seq = ref_logprobs if ref_logprobs is not None and ref_logprobs.dim() == 1 else None
    return losses.loss_from_token_logprobs(
        loss, lp, labels != inputs.ignore_index, ref_token_logps=ref_token, ref_seq_logps=ref_seq,
        reduction=reduction, num_items_in_batch=num_items_in_batch,
        return_metrics=return_metrics, **opts)


def _gradient_in_forward(loss, inputs, opts, ref_logprobs, reduction, num_items, return_metrics):
    """A scalar loss by the path's gradient-in-forward op, with the same value, metrics and
    gradients as the per-token route: the reference reduced to per-sequence sums first."""
    spec = losses.get_loss(loss)
    mask = inputs.labels != inputs.ignore_index
    ref_seq = None
    if spec.reference:
        ref_tok = inputs.reference_logprobs() if inputs.has_ref else (
            ref_logprobs if ref_logprobs.dim() == 2 else None)
        ref_seq = losses.reference_sums(mask, ref_tok, ref_logprobs)
    value, S = inputs.fused_loss(loss, opts, reduction, num_items, ref_seq)
    if not return_metrics:
        return value
    if spec.metric_fn is None:
        return value, {}
    return value, spec.metric_fn(losses.sequence_stats(S, mask, ref_seq), **opts)
