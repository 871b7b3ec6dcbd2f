"""Public functions of the logits path.

Every loss is ``token log-probs (one fused op) -> per-sequence sums -> a small loss
formula (losses.py) -> reduction``. The op streams the policy (and reference) logits
once; the epilogue works on ``[B, T]`` / ``[B]`` fp32 tensors only, with no host
synchronisation, and its gradient reaches the logits through the op's backward.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from minorsft import losses
from minorsft import validation as V
from minorsft.ops import select_backend

LossOut = Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]
LOSS_KINDS = ("sft", "minor_sft", "dpo", "minor_dpo")


def _check_common(logits, labels, ignore_index, temperature, check_labels):
    V.check_logits("logits", logits)
    V.check_labels(labels, logits.shape[:2], logits.device)
    return V.check_token_options(labels, logits.shape[-1], ignore_index, temperature, check_labels)


def _check_ref(logits, ref_logits, ref_logprobs):
    V.check_reference("ref_logits", ref_logits, "ref_logprobs", ref_logprobs)
    if ref_logits is not None:
        V.check_logits("ref_logits", ref_logits)
        V.check_same("ref_logits", ref_logits, "logits", logits)
    else:
        V.check_ref_logprobs(ref_logprobs, logits.shape[:2], logits.device)


def _logprobs(logits, labels, ref_logits, ignore_index, temperature, backend, inplace_backward):
    """Run the fused op: ``(lp [B,T], ref_lp [B,T] or None)``, fp32."""
    be = select_backend(backend, logits.device)
    if ref_logits is not None:
        ref_logits = ref_logits.detach()   # the reference is frozen
    lp, _lse, ref_lp = torch.ops.minorsft.token_logprobs(
        logits, labels, ref_logits, ignore_index, float(temperature), be, bool(inplace_backward))
    return lp, (ref_lp if ref_logits is not None else None)


def token_logprobs(logits: Tensor, labels: Tensor, *, ignore_index: int = -100,
                   temperature: float = 1.0, backend: Optional[str] = None,
                   check_labels: Optional[bool] = None) -> Tensor:
    """Per-token log-probability of each label.

    Args:
        logits: ``[B, T, V]`` bf16/fp16/fp32, any strides (e.g. ``logits[:, :-1]``).
        labels: ``[B, T]`` integer, aligned with ``logits``; ``ignore_index`` masks.
        temperature: logits are divided by it first.
        backend: None/"auto", "triton" or "torch" (see :func:`minorsft.ops.select_backend`).
        check_labels: validate the label range (one host sync); default on except
            under ``torch.compile`` / CUDA-graph capture or ``MINORSFT_CHECK_LABELS=0``.
    Returns:
        ``[B, T]`` fp32 ``log softmax(logits / temperature)[label]``, 0 where masked;
        differentiable with respect to ``logits``.
    """
    temperature = _check_common(logits, labels, ignore_index, temperature, check_labels)
    return _logprobs(logits, labels, None, ignore_index, temperature, backend, False)[0]


def _sequence_stats(logps, mask, ref_token_logps, ref_seq_logps):
    """``(S [B], S_ref [B], m [B] int, valid [B] bool)`` from per-token values."""
    S = logps.sum(-1)
    m = mask.sum(-1)
    if ref_token_logps is not None:
        ref = ref_token_logps.detach().float()
        S_ref = torch.where(mask, ref, torch.zeros_like(ref)).sum(-1)
    else:
        S_ref = ref_seq_logps.detach().float()
    return S, S_ref, m, m > 0


def loss_from_token_logprobs(
    loss: str,
    logps: Tensor,
    mask: Tensor,
    *,
    ref_token_logps: Optional[Tensor] = None,
    ref_seq_logps: Optional[Tensor] = None,
    beta: float = 0.1,
    length_norm: str = "outside",
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
    return_metrics: bool = False,
) -> LossOut:
    """The shared loss epilogue (logits path and fused linear path).

    Args:
        loss: "sft", "minor_sft", "dpo" or "minor_dpo".
        logps: ``[B, T]`` fp32 per-token log-probs, 0 where masked, differentiable.
        mask: ``[B, T]`` bool, ``labels != ignore_index``.
        ref_token_logps: ``[B, T]`` reference log-probs (masked entries ignored), or
        ref_seq_logps: ``[B]`` reference per-sequence sums (one of the two, not for sft).
        reduction: "mean" (over sequences / pairs with at least one unmasked token;
            for sft over tokens, or ``num_items_in_batch``), "sum" or "none"
            (sft ``[B, T]``, minor_sft ``[B]``, DPO family ``[B/2]``).
    Returns:
        the loss, or ``(loss, metrics)`` with ``return_metrics=True`` (detached scalars).
    """
    V.check_choice("loss", loss, LOSS_KINDS)
    V.check_reduction(reduction)
    if loss == "sft":
        if reduction == "none":
            return -logps
        total = -logps.sum()
        if reduction == "sum":
            return total
        denom = mask.sum() if num_items_in_batch is None else num_items_in_batch
        if isinstance(denom, Tensor):
            denom = denom.to(device=total.device, dtype=total.dtype).clamp(min=1)
        else:
            denom = max(int(denom), 1)
        return total / denom
    beta = V.check_beta(beta)
    S, S_ref, m, valid = _sequence_stats(logps, mask, ref_token_logps, ref_seq_logps)
    r = S - S_ref
    if loss == "minor_sft":
        V.check_choice("length_norm", length_norm, losses.LENGTH_NORMS)
        out = losses.reduce(losses.minor_sft(r, m, beta, length_norm), valid, reduction)
        metrics = losses.minor_sft_metrics(S, S_ref, m, valid) if return_metrics else None
    else:
        V.check_pairs(logps.shape[0])
        P = logps.shape[0] // 2
        valid_pair = valid[:P] & valid[P:]
        if loss == "dpo":
            V.check_choice("loss_type", loss_type, losses.DPO_LOSS_TYPES)
            eps = V.check_label_smoothing(label_smoothing, loss_type)
            per = losses.dpo(r[:P], r[P:], m[:P], m[P:], beta, loss_type, eps)
        else:
            per = losses.minor_dpo(r[:P], r[P:], beta)
        out = losses.reduce(per, valid_pair, reduction)
        metrics = (losses.dpo_metrics(S[:P], S[P:], r[:P], r[P:], beta, valid_pair)
                   if return_metrics else None)
    return (out, metrics) if return_metrics else out


def _reference_loss(loss, logits, labels, ref_logits, ref_logprobs, *, beta, ignore_index,
                    reduction, temperature, return_metrics, backend, inplace_backward,
                    check_labels, **opts) -> LossOut:
    temperature = _check_common(logits, labels, ignore_index, temperature, check_labels)
    _check_ref(logits, ref_logits, ref_logprobs)
    V.check_beta(beta)
    V.check_reduction(reduction)
    if loss != "minor_sft":
        V.check_pairs(logits.shape[0])
    lp, ref_lp = _logprobs(logits, labels, ref_logits, ignore_index, temperature, backend,
                           inplace_backward)
    per_token_ref = ref_lp if ref_lp is not None else (ref_logprobs if ref_logprobs.dim() == 2 else None)
    per_seq_ref = ref_logprobs if (ref_logprobs is not None and ref_logprobs.dim() == 1) else None
    return loss_from_token_logprobs(
        loss, lp, labels != ignore_index, ref_token_logps=per_token_ref, ref_seq_logps=per_seq_ref,
        beta=beta, reduction=reduction, return_metrics=return_metrics, **opts)


def sft_loss(logits: Tensor, labels: Tensor, *, ignore_index: int = -100, reduction: str = "mean",
             num_items_in_batch: Optional[Union[int, Tensor]] = None, temperature: float = 1.0,
             backend: Optional[str] = None, inplace_backward: bool = False,
             check_labels: Optional[bool] = None) -> Tensor:
    """Token-level cross-entropy ``-sum(M l) / sum(M)``.

    Args:
        logits: ``[B, T, V]`` (any strides); labels: ``[B, T]`` aligned.
        reduction: "mean" (over unmasked tokens, or ``num_items_in_batch`` when given,
            for gradient accumulation), "sum", or "none" (``[B, T]``, 0 where masked).
        inplace_backward: write the logits gradient into ``logits``' buffer (opt-in;
            ``logits`` must not be needed afterwards).
    Returns:
        scalar loss (or ``[B, T]`` for "none"), fp32.
    """
    temperature = _check_common(logits, labels, ignore_index, temperature, check_labels)
    V.check_reduction(reduction)
    lp, _ = _logprobs(logits, labels, None, ignore_index, temperature, backend, inplace_backward)
    return loss_from_token_logprobs("sft", lp, labels != ignore_index, reduction=reduction,
                                    num_items_in_batch=num_items_in_batch)


def minor_sft_loss(logits: Tensor, labels: Tensor, *, ref_logits: Optional[Tensor] = None,
                   ref_logprobs: Optional[Tensor] = None, beta: float = 0.1,
                   length_norm: str = "outside", ignore_index: int = -100, reduction: str = "mean",
                   temperature: float = 1.0, return_metrics: bool = False,
                   backend: Optional[str] = None, inplace_backward: bool = False,
                   check_labels: Optional[bool] = None) -> LossOut:
    """MinorSFT (Xie et al. 2024): SFT with a DPO-style per-sample coefficient.

    Per sequence ``i`` with log-ratio ``r_i = S_i - S_ref_i`` and ``m_i`` unmasked tokens:
    ``outside`` ``-(2/(beta m_i)) log sigmoid(beta r_i)`` (the paper), ``inside``
    ``-log sigmoid(beta r_i / m_i)``, ``none`` ``-log sigmoid(beta r_i)``.

    Args:
        logits: ``[B, T, V]`` policy logits; labels ``[B, T]`` aligned.
        ref_logits: ``[B, T, V]`` reference logits (same shape, any float dtype), or
        ref_logprobs: ``[B, T]`` per-token or ``[B]`` per-sequence reference log-probs.
        reduction: "mean" over sequences with an unmasked token, "sum", "none" (``[B]``).
    Returns:
        loss, or ``(loss, {"deviation", "logps", "ref_logps"})`` with ``return_metrics``.
    """
    return _reference_loss("minor_sft", logits, labels, ref_logits, ref_logprobs, beta=beta,
                           length_norm=length_norm, ignore_index=ignore_index, reduction=reduction,
                           temperature=temperature, return_metrics=return_metrics, backend=backend,
                           inplace_backward=inplace_backward, check_labels=check_labels)


def minor_dpo_loss(logits: Tensor, labels: Tensor, *, ref_logits: Optional[Tensor] = None,
                   ref_logprobs: Optional[Tensor] = None, beta: float = 0.1,
                   ignore_index: int = -100, reduction: str = "mean", temperature: float = 1.0,
                   return_metrics: bool = False, backend: Optional[str] = None,
                   inplace_backward: bool = False, check_labels: Optional[bool] = None) -> LossOut:
    """MinorDPO (Xie et al. 2024): ``-log sigmoid(beta r_w - beta max(0, r_l))`` per pair.

    Args:
        logits: ``[2P, T, V]``, rows ``[0, P)`` chosen and ``[P, 2P)`` rejected.
        labels, ref_logits, ref_logprobs: as :func:`minor_sft_loss`.
        reduction: "mean" over pairs whose two rows have an unmasked token, "sum",
            "none" (``[P]``).
    Returns:
        loss, or ``(loss, metrics)`` with TRL's names (``rewards/chosen``, ...).
    """
    return _reference_loss("minor_dpo", logits, labels, ref_logits, ref_logprobs, beta=beta,
                           ignore_index=ignore_index, reduction=reduction, temperature=temperature,
                           return_metrics=return_metrics, backend=backend,
                           inplace_backward=inplace_backward, check_labels=check_labels)


def dpo_loss(logits: Tensor, labels: Tensor, *, ref_logits: Optional[Tensor] = None,
             ref_logprobs: Optional[Tensor] = None, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
             temperature: float = 1.0, return_metrics: bool = False, backend: Optional[str] = None,
             inplace_backward: bool = False, check_labels: Optional[bool] = None) -> LossOut:
    """DPO family (Rafailov et al. 2023) with TRL's loss types.

    ``loss_type``: "sigmoid" (label smoothing = conservative DPO), "ipo" (length-averaged),
    "hinge", "robust". Shapes, reference and reduction as :func:`minor_dpo_loss`.
    Also SPIN: chosen = human response, rejected = self-generated, reference = the
    previous round's model.
    """
    return _reference_loss("dpo", logits, labels, ref_logits, ref_logprobs, beta=beta,
                           loss_type=loss_type, label_smoothing=label_smoothing,
                           ignore_index=ignore_index, reduction=reduction, temperature=temperature,
                           return_metrics=return_metrics, backend=backend,
                           inplace_backward=inplace_backward, check_labels=check_labels)


@torch.no_grad()
def lobass_learnability(logits_original: Tensor, logits_finetuned: Tensor, labels: Tensor, *,
                        ignore_index: int = -100, temperature: float = 1.0,
                        backend: Optional[str] = None) -> Tensor:
    """LoBaSS learnability ``(L0_i - L1_i) / L0_i`` per sample, ``[B]`` fp32.

    ``L`` is the per-sample token-mean cross-entropy under the original (0) and the
    fine-tuned (1) model; both ``[B, T, V]`` logits are streamed once, no gradient.
    """
    mask = labels != ignore_index
    n = mask.sum(-1).clamp(min=1)
    l0 = -token_logprobs(logits_original, labels, ignore_index=ignore_index,
                         temperature=temperature, backend=backend).sum(-1) / n
    l1 = -token_logprobs(logits_finetuned, labels, ignore_index=ignore_index,
                         temperature=temperature, backend=backend).sum(-1) / n
    return losses.learnability(l0, l1)
