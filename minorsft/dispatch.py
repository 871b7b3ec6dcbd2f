"""The one loss dispatch shared by the logits path and the fused linear path.

A public loss function builds its path's *inputs* object (:class:`LogitsInputs` in
:mod:`minorsft.functional`, :class:`LinearInputs` in :mod:`minorsft.linear`: the tensors
plus the token options, checked on construction) and hands it to :func:`run_loss`, which
checks the loss's options and the reference, runs the fused op once for the policy (and
the reference) and finishes with the shared epilogue
:func:`minorsft.losses.loss_from_token_logprobs`. So the two paths cannot disagree on a
check, a loss formula, a reduction or a metric.

An inputs object provides: ``labels`` ``[B, T]``, ``ignore_index``, ``device``,
``ref_name`` (the name of its reference-tensor argument, for errors), ``has_ref`` and
``logprobs() -> (lp [B, T], ref_lp [B, T] or None)``.
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

    Everything is checked before any kernel runs: the loss options, ``reduction``, the
    reference (exactly one of the path's reference tensors or ``ref_logprobs`` for a
    reference loss, none for ``sft``) and the pair layout.
    """
    spec = losses.get_loss(loss)
    opts = losses.check_options(loss, options)
    V.check_reduction(reduction)
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
    lp, ref_lp = inputs.logprobs()
    ref_token = ref_lp if ref_lp is not None else (
        ref_logprobs if ref_logprobs is not None and ref_logprobs.dim() == 2 else None)
    ref_seq = ref_logprobs if ref_logprobs is not None and ref_logprobs.dim() == 1 else None
    return losses.loss_from_token_logprobs(
        loss, lp, labels != inputs.ignore_index, ref_token_logps=ref_token, ref_seq_logps=ref_seq,
        reduction=reduction, num_items_in_batch=num_items_in_batch,
        return_metrics=return_metrics, **opts)
