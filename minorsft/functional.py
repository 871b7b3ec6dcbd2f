"""Public functions of the logits path.

Every loss is ``token log-probs (one fused op) -> per-sequence sums -> a small loss
formula (losses.py) -> reduction``. The op streams the policy (and reference) logits
once; the epilogue works on ``[B, T]`` / ``[B]`` fp32 tensors only, with no host
synchronisation, and its gradient reaches the logits through the op's backward.
The functions build a :class:`LogitsInputs` and hand it to the dispatch shared with the
fused linear path (:func:`minorsft.dispatch.run_loss`).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from minorsft import losses
from minorsft import validation as V
from minorsft.dispatch import run_loss
from minorsft.kernels.common import scored_labels
from minorsft.losses import LossOut
from minorsft.ops import select_backend


class LogitsInputs:
    """The logits path's tensors and token options, checked on construction.

    ``logits`` / ``ref_logits``: ``[B, T, V]`` (any strides, any float dtype each);
    ``labels``: ``[B, T]`` aligned with the logits, or with ``shift`` Hugging Face labels
    (position ``t`` is scored against label ``t + 1``). ``self.labels`` are the labels the
    ``T'`` scored positions are compared with (``T' = T - 1`` with ``shift``).
    """

    ref_name = "ref_logits"

    def __init__(self, logits: Tensor, labels: Tensor, ref_logits: Optional[Tensor] = None, *,
                 ignore_index: int, temperature: float, backend: Optional[str],
                 inplace_backward: bool = False, check_labels: Optional[bool] = None,
                 shift: bool = False):
        V.check_flag("shift", shift)
        V.check_logits("logits", logits)
        V.check_labels(labels, logits.shape[:2], logits.device, shift=shift)
        scored = scored_labels(labels, shift)
        self.temperature = V.check_token_options(scored, logits.shape[-1], ignore_index,
                                                 temperature, check_labels)
        if ref_logits is not None:
            V.check_logits("ref_logits", ref_logits)
            V.check_same("ref_logits", ref_logits, "logits", logits)
            ref_logits = ref_logits.detach()   # the reference is frozen
        self.backend = select_backend(backend, logits.device)
        self.logits, self.all_labels, self.ref_logits = logits, labels, ref_logits
        self.labels, self.shift = scored, shift
        self.ignore_index, self.inplace_backward = ignore_index, V.check_flag("inplace_backward",
                                                                              inplace_backward)
        self.device = logits.device
        self.has_ref = ref_logits is not None

    def logprobs(self):
        """Run the fused op: ``(lp [B,T'], ref_lp [B,T'] or None)``, fp32."""
        lp, _lse, ref_lp = torch.ops.minorsft.token_logprobs(
            self.logits, self.all_labels, self.ref_logits, self.ignore_index, self.temperature,
            self.backend, self.inplace_backward, self.shift)
        return lp, (ref_lp if self.has_ref else None)


def token_logprobs(logits: Tensor, labels: Tensor, *, ignore_index: int = -100,
                   temperature: float = 1.0, backend: Optional[str] = None,
                   check_labels: Optional[bool] = None, shift: bool = False) -> Tensor:
    """Per-token log-probability of each label.

    Args:
        logits: ``[B, T, V]`` bf16/fp16/fp32, any strides (e.g. ``logits[:, :-1]``).
        labels: ``[B, T]`` integer, aligned with ``logits``; ``ignore_index`` masks.
        temperature: logits are divided by it first.
        backend: None/"auto", "triton" or "torch" (see :func:`minorsft.ops.select_backend`).
        check_labels: read the labels on the host and raise for one outside ``[0, V)``:
            ``True`` always, ``None`` (default) only for CPU tensors outside
            ``torch.compile``, ``False`` never. Unchecked, a bad label gives a NaN
            log-prob and raises the device's label flag (:func:`minorsft.check_label_errors`).
        shift: ``True``: ``logits`` is the model's full output ``[B, T, V]`` and ``labels``
            its Hugging Face labels ``[B, T]`` (the positions of ``input_ids``); position
            ``t`` is scored against label ``t + 1`` and the last position contributes
            nothing. The result is ``[B, T - 1]`` and equals the call on
            ``logits[:, :-1]``, ``labels[:, 1:]`` exactly, without slicing the logits (the
            backward of such a slice allocates and zero-fills a second ``[B, T, V]``).
            The same holds for every loss of this module.
    Returns:
        ``[B, T']`` fp32 ``log softmax(logits / temperature)[label]``, 0 where masked
        (``T' = T - 1`` with ``shift``, else ``T``); differentiable with respect to ``logits``.
    """
    return LogitsInputs(logits, labels, ignore_index=ignore_index, temperature=temperature,
                        backend=backend, check_labels=check_labels, shift=shift).logprobs()[0]


def fused_loss(loss: str, logits: Tensor, labels: Tensor, *, ref_logits: Optional[Tensor] = None,
               ref_logprobs: Optional[Tensor] = None, ignore_index: int = -100,
               reduction: str = "mean", num_items_in_batch: Optional[Union[int, Tensor]] = None,
               temperature: float = 1.0, return_metrics: bool = False,
               backend: Optional[str] = None, inplace_backward: bool = False,
               check_labels: Optional[bool] = None, shift: bool = False,
               **options) -> LossOut:
    """Any loss of :data:`minorsft.LOSSES` by name, e.g. for a trainer configured by name.

    ``fused_loss("minor_sft", logits, labels, ref_logits=r, beta=0.1)`` equals
    :func:`minor_sft_loss` with the same arguments; ``**options`` are the loss's own
    (``beta``, ``length_norm``, ``loss_type``, ``label_smoothing``: see
    :data:`minorsft.losses.OPTIONS`). Shapes, reference and reductions as the named function.
    """
    inputs = LogitsInputs(logits, labels, ref_logits, ignore_index=ignore_index,
                          temperature=temperature, backend=backend,
                          inplace_backward=inplace_backward, check_labels=check_labels,
                          shift=shift)
    return run_loss(loss, inputs, ref_logprobs=ref_logprobs, reduction=reduction,
                    num_items_in_batch=num_items_in_batch, return_metrics=return_metrics,
                    **options)


def sft_loss(logits: Tensor, labels: Tensor, *, ignore_index: int = -100, reduction: str = "mean",
             num_items_in_batch: Optional[Union[int, Tensor]] = None, temperature: float = 1.0,
             backend: Optional[str] = None, inplace_backward: bool = False,
             check_labels: Optional[bool] = None, shift: bool = False) -> Tensor:
    """Token-level cross-entropy ``-sum(M l) / sum(M)``.

    Args:
        logits: ``[B, T, V]`` (any strides); labels: ``[B, T]`` aligned.
        reduction: "mean" (over unmasked tokens, or ``num_items_in_batch`` when given,
            for gradient accumulation), "sum", or "none" (``[B, T]``, 0 where masked).
        inplace_backward: write the logits gradient into ``logits``' buffer (opt-in;
            ``logits`` must not be needed afterwards).
        shift: full logits with Hugging Face labels (see :func:`token_logprobs`).
    Returns:
        scalar loss (or ``[B, T']`` for "none"), fp32.
    """
    inputs = LogitsInputs(logits, labels, ignore_index=ignore_index, temperature=temperature,
                          backend=backend, inplace_backward=inplace_backward,
                          check_labels=check_labels, shift=shift)
    return run_loss("sft", inputs, reduction=reduction, num_items_in_batch=num_items_in_batch)


def minor_sft_loss(logits: Tensor, labels: Tensor, *, ref_logits: Optional[Tensor] = None,
                   ref_logprobs: Optional[Tensor] = None, beta: float = 0.1,
                   length_norm: str = "outside", ignore_index: int = -100, reduction: str = "mean",
                   temperature: float = 1.0, return_metrics: bool = False,
                   backend: Optional[str] = None, inplace_backward: bool = False,
                   check_labels: Optional[bool] = None, shift: bool = False) -> LossOut:
    """MinorSFT (Xie et al. 2024): SFT with a DPO-style per-sample coefficient.

    Per sequence ``i`` with log-ratio ``r_i = S_i - S_ref_i`` and ``m_i`` unmasked tokens:
    ``outside`` ``-(2/(beta m_i)) log sigmoid(beta r_i)`` (the paper), ``inside``
    ``-log sigmoid(beta r_i / m_i)``, ``none`` ``-log sigmoid(beta r_i)``.

    Args:
        logits: ``[B, T, V]`` policy logits; labels ``[B, T]`` aligned.
        ref_logits: ``[B, T, V]`` reference logits (same shape, any float dtype), or
        ref_logprobs: ``[B, T']`` per-token (one per scored position: ``[B, T - 1]`` with
            ``shift``) or ``[B]`` per-sequence reference log-probs.
        reduction: "mean" over sequences with an unmasked token, "sum", "none" (``[B]``).
        shift: full logits with Hugging Face labels (see :func:`token_logprobs`).
    Returns:
        loss, or ``(loss, {"deviation", "logps", "ref_logps"})`` with ``return_metrics``.
    """
    inputs = LogitsInputs(logits, labels, ref_logits, ignore_index=ignore_index,
                          temperature=temperature, backend=backend,
                          inplace_backward=inplace_backward, check_labels=check_labels,
                          shift=shift)
    return run_loss("minor_sft", inputs, ref_logprobs=ref_logprobs, reduction=reduction,
                    return_metrics=return_metrics, beta=beta, length_norm=length_norm)


def minor_dpo_loss(logits: Tensor, labels: Tensor, *, ref_logits: Optional[Tensor] = None,
                   ref_logprobs: Optional[Tensor] = None, beta: float = 0.1,
                   ignore_index: int = -100, reduction: str = "mean", temperature: float = 1.0,
                   return_metrics: bool = False, backend: Optional[str] = None,
                   inplace_backward: bool = False, check_labels: Optional[bool] = None,
                   shift: bool = False) -> LossOut:
    """MinorDPO (Xie et al. 2024): ``-log sigmoid(beta r_w - beta max(0, r_l))`` per pair.

    Args:
        logits: ``[2P, T, V]``, rows ``[0, P)`` chosen and ``[P, 2P)`` rejected.
        labels, ref_logits, ref_logprobs: as :func:`minor_sft_loss`.
        reduction: "mean" over pairs whose two rows have an unmasked token, "sum",
            "none" (``[P]``).
    Returns:
        loss, or ``(loss, metrics)`` with TRL's names (``rewards/chosen``, ...).
    """
    inputs = LogitsInputs(logits, labels, ref_logits, ignore_index=ignore_index,
                          temperature=temperature, backend=backend,
                          inplace_backward=inplace_backward, check_labels=check_labels,
                          shift=shift)
    return run_loss("minor_dpo", inputs, ref_logprobs=ref_logprobs, reduction=reduction,
                    return_metrics=return_metrics, beta=beta)


def dpo_loss(logits: Tensor, labels: Tensor, *, ref_logits: Optional[Tensor] = None,
             ref_logprobs: Optional[Tensor] = None, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
             temperature: float = 1.0, return_metrics: bool = False, backend: Optional[str] = None,
             inplace_backward: bool = False, check_labels: Optional[bool] = None,
             shift: bool = False) -> LossOut:
    """DPO family (Rafailov et al. 2023) with TRL's loss types.

    ``loss_type``: "sigmoid" (label smoothing = conservative DPO), "ipo" (length-averaged),
    "hinge", "robust". Shapes, reference and reduction as :func:`minor_dpo_loss`.
    Also SPIN: chosen = human response, rejected = self-generated, reference = the
    previous round's model.
    """
    inputs = LogitsInputs(logits, labels, ref_logits, ignore_index=ignore_index,
                          temperature=temperature, backend=backend,
                          inplace_backward=inplace_backward, check_labels=check_labels,
                          shift=shift)
    return run_loss("dpo", inputs, ref_logprobs=ref_logprobs, reduction=reduction,
                    return_metrics=return_metrics, beta=beta, loss_type=loss_type,
                    label_smoothing=label_smoothing)


@torch.no_grad()
def lobass_learnability(logits_original: Tensor, logits_finetuned: Tensor, labels: Tensor, *,
                        ignore_index: int = -100, temperature: float = 1.0,
                        backend: Optional[str] = None, shift: bool = False) -> Tensor:
    """LoBaSS learnability ``(L0_i - L1_i) / L0_i`` per sample, ``[B]`` fp32.

    ``L`` is the per-sample token-mean cross-entropy under the original (0) and the
    fine-tuned (1) model; both ``[B, T, V]`` logits (same shape: the same tokenizer) are
    streamed once, no gradient. ``shift``: full logits with Hugging Face labels (see
    :func:`token_logprobs`).
    """
    V.check_logits("logits_original", logits_original)
    V.check_logits("logits_finetuned", logits_finetuned)
    V.check_same("logits_finetuned", logits_finetuned, "logits_original", logits_original)
    V.check_labels(labels, logits_original.shape[:2], logits_original.device, "logits_original",
                   shift=shift)
    mask = scored_labels(labels, shift) != ignore_index
    n = mask.sum(-1).clamp(min=1)
    l0, l1 = (-token_logprobs(z, labels, ignore_index=ignore_index, temperature=temperature,
                              backend=backend, shift=shift).sum(-1) / n
              for z in (logits_original, logits_finetuned))
    return losses.learnability(l0, l1)
