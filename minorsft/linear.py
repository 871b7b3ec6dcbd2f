"""Public functions of the fused linear path: hidden states and the lm_head weight in,
the loss out, the ``[N, V]`` logits never formed.

The work happens in ``minorsft.kernels.linear`` (GEMMs on chunks of rows that fit a
memory budget, each chunk folded by the logits path's kernel; :mod:`minorsft.ops` wraps
it in custom ops). A scalar loss with gradients (``reduction`` "mean" or "sum") runs the
gradient-in-forward plan (op ``minorsft::linear_loss``: three GEMMs' worth of work); per-
token log-probs, ``reduction="none"`` and no-grad calls run ``minorsft::linear_token_logprobs``
(statistics in the forward, a recompute in the backward) and then the dispatch and epilogue
shared with the logits path (:func:`minorsft.dispatch.run_loss`).

Real-model inputs: bf16/fp16 hidden states with an fp32 lm_head (what ``torch.autocast``
gives) compute in the activations' dtype, and each gradient comes back in its input's
dtype; ``softcap`` (Gemma's ``final_logit_softcapping``: logits ``c tanh(z / c)``) and
``logit_scale`` (Cohere) transform the logits before the temperature; ``shift=True`` takes
the model's full hidden states with Hugging Face labels.

The reference model's log-probs come from the same statistics op under ``no_grad``
(``ref_hidden`` + ``ref_weight``/``ref_bias``) or from the caller (``ref_logprobs``,
per token or ``[B]`` per-sequence sums).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from minorsft import validation as V
from minorsft.dispatch import run_loss
from minorsft.kernels.common import scored_labels
from minorsft.losses import OPTIONS, LossOut
from minorsft.ops import select_backend


class LinearInputs:
    """The fused linear path's tensors and token options, checked on construction.

    ``hidden [B, T, H]`` (any strides), ``weight [V, H]``, ``bias [V]`` or None, ``labels
    [B, T]`` (with ``shift``, Hugging Face labels); optionally the reference's
    ``ref_hidden [B, T, H_ref]`` with its own ``ref_weight [V, H_ref]`` / ``ref_bias``
    (default: the policy's head, for a shared frozen lm_head). ``self.labels``: the labels
    of the ``T'`` scored positions.
    """

    ref_name = "ref_hidden"

    def __init__(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                 ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                 ref_bias: Optional[Tensor] = None, *, ignore_index: int, temperature: float,
                 backend: Optional[str], memory_budget: Optional[int] = None,
                 check_labels: Optional[bool] = None, shift: bool = False,
                 softcap: Optional[float] = None, logit_scale: float = 1.0):
        V.check_flag("shift", shift)
        V.check_linear("", hidden, weight, bias)
        V.check_labels(labels, hidden.shape[:2], hidden.device, "hidden", shift=shift)
        self.labels = scored_labels(labels, shift)
        self.memory_budget = V.check_memory_budget(memory_budget)
        self.temperature = V.check_token_options(self.labels, weight.shape[0], ignore_index,
                                                 temperature, check_labels)
        self.logit_scale, self.softcap = V.check_logit_transform(logit_scale, softcap)
        if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
            raise ValueError("ref_weight/ref_bias: only meaningful with ref_hidden, which is None")
        if ref_hidden is not None:
            if ref_weight is None:   # a shared (frozen) lm_head, e.g. LoRA on the backbone
                ref_weight, ref_bias = weight, (bias if ref_bias is None else ref_bias)
            V.check_linear("ref_", ref_hidden, ref_weight, ref_bias, batch_shape=hidden.shape[:2])
            if ref_weight.shape[0] != weight.shape[0]:
                raise ValueError(f"ref_weight: vocabulary size {ref_weight.shape[0]} does not match "
                                 f"weight vocabulary size {weight.shape[0]}")
            ref_bias = None if ref_bias is None else ref_bias.detach()
            ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
        self.backend = select_backend(backend, hidden.device)
        self.policy = (hidden, weight, bias)
        self.reference = (ref_hidden, ref_weight, ref_bias)
        self.all_labels, self.shift, self.ignore_index = labels, shift, ignore_index
        self.device = hidden.device
        self.has_ref = ref_hidden is not None

    def _transform(self):
        return (self.ignore_index, self.temperature, self.logit_scale, self.softcap, self.shift,
                self.backend, self.memory_budget)

    def _token_op(self, hidden, weight, bias, flag_labels: bool = True) -> Tensor:
        lp, _lse = torch.ops.minorsft.linear_token_logprobs(
            hidden, weight, bias, self.all_labels, *self._transform(), flag_labels)
        return lp

    def reference_logprobs(self) -> Tensor:
        """The reference's per-token log-probs ``[B, T']`` (no graph, no label flag)."""
        with torch.no_grad():   # the reference is frozen: no graph, no saved tensors
            return self._token_op(*self.reference, flag_labels=False)

    def logprobs(self):
        """``(lp [B,T'], ref_lp [B,T'] or None)``, fp32; the reference under no_grad."""
        lp = self._token_op(*self.policy)
        return lp, (self.reference_logprobs() if self.has_ref else None)

    def gradient_in_forward(self) -> bool:
        """True when a scalar loss will be differentiated: the fused loss op applies."""
        return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in self.policy)

    def fused_loss(self, loss: str, options: dict, reduction: str, num_items, ref_seq: Optional[Tensor]):
        """``(loss [], S [B])`` by the gradient-in-forward op (``minorsft::linear_loss``);
        ``ref_seq``: the reference's per-sequence sums (None for a loss without one)."""
        hidden, weight, bias = self.policy
        need = [x is not None and x.requires_grad for x in self.policy]
        if num_items is not None and not isinstance(num_items, Tensor):
            num_items = torch.full((), float(num_items), device=self.device)   # a fill: no host copy
        opts = {name: opt.default for name, opt in OPTIONS.items()}   # the op takes every option
        opts.update(options)
        out = torch.ops.minorsft.linear_loss(
            hidden, weight, bias, self.all_labels, ref_seq, num_items, loss, float(opts["beta"]),
            opts["length_norm"], opts["loss_type"], float(opts["label_smoothing"]), reduction,
            *self._transform(), *need)
        return out[0], out[1]


def linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                          bias: Optional[Tensor] = None, ignore_index: int = -100,
                          temperature: float = 1.0, backend: Optional[str] = None,
                          memory_budget: Optional[int] = None,
                          check_labels: Optional[bool] = None, shift: bool = False,
                          softcap: Optional[float] = None, logit_scale: float = 1.0) -> Tensor:
    """Per-token log-probability of each label, without forming the logits.

    Args:
        hidden: ``[B, T, H]`` bf16/fp16/fp32 final hidden states, any strides.
        weight: ``[V, H]`` lm_head weight on the same device, in ``hidden``'s dtype or fp32
            (autocast: the math runs in ``hidden``'s dtype; its gradient comes back fp32).
        labels: ``[B, T]`` integer, aligned with ``hidden``; ``ignore_index`` masks.
        bias: optional ``[V]`` lm_head bias, in the weight's dtype.
        temperature: logits are divided by it (after the transforms below).
        backend: None/"auto", "triton" or "torch" (see :func:`minorsft.ops.select_backend`):
            the fold of each logits chunk; the GEMMs are torch's (cuBLAS on a GPU).
        memory_budget: bytes of one ``[R, V]`` logits chunk in the compute dtype (default
            ``MINORSFT_LINEAR_CHUNK_BYTES`` or 256 MiB); the peak extra memory is about this
            plus ``O((n + V) H)`` (see ``minorsft.kernels.linear``).
        check_labels: validate the label range, as the logits path.
        shift: ``hidden`` is the model's full ``[B, T, H]`` output and ``labels`` its
            Hugging Face labels; position ``t`` is scored against label ``t + 1`` (result
            ``[B, T - 1]``), as :func:`minorsft.token_logprobs` with ``shift=True``.
        softcap: logits ``softcap * tanh(z / softcap)`` (Gemma 2/3's
            ``final_logit_softcapping``); None or 0: none.
        logit_scale: logits ``logit_scale * z`` (Cohere), before the soft-capping.
    Returns:
        ``[B, T']`` fp32 ``log softmax(capped(hidden @ weight^T + bias) / temperature)[label]``,
        0 where masked; differentiable with respect to hidden, weight and bias.
    """
    return LinearInputs(hidden, weight, labels, bias, ignore_index=ignore_index,
                        temperature=temperature, backend=backend, memory_budget=memory_budget,
                        check_labels=check_labels, shift=shift,
                        softcap=softcap, logit_scale=logit_scale).logprobs()[0]


def linear_fused_loss(loss: str, hidden: Tensor, weight: Tensor, labels: Tensor, *,
                      bias: Optional[Tensor] = None, ref_hidden: Optional[Tensor] = None,
                      ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                      ref_logprobs: Optional[Tensor] = None, ignore_index: int = -100,
                      reduction: str = "mean",
                      num_items_in_batch: Optional[Union[int, Tensor]] = None,
                      temperature: float = 1.0, return_metrics: bool = False,
                      backend: Optional[str] = None, memory_budget: Optional[int] = None,
                      check_labels: Optional[bool] = None, shift: bool = False,
                      softcap: Optional[float] = None, logit_scale: float = 1.0,
                      **options) -> LossOut:
    """Any loss of :data:`minorsft.LOSSES` by name from hidden states (the fused linear
    form of :func:`minorsft.fused_loss`); tensors as :func:`linear_minor_sft_loss`."""
    inputs = LinearInputs(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias,
                          ignore_index=ignore_index, temperature=temperature, backend=backend,
                          memory_budget=memory_budget, check_labels=check_labels, shift=shift,
                          softcap=softcap, logit_scale=logit_scale)
    return run_loss(loss, inputs, ref_logprobs=ref_logprobs, reduction=reduction,
                    num_items_in_batch=num_items_in_batch, return_metrics=return_metrics,
                    **options)


def linear_sft_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                    bias: Optional[Tensor] = None, ignore_index: int = -100,
                    reduction: str = "mean", num_items_in_batch: Optional[Union[int, Tensor]] = None,
                    temperature: float = 1.0, backend: Optional[str] = None,
                    memory_budget: Optional[int] = None,
                    check_labels: Optional[bool] = None, shift: bool = False,
                    softcap: Optional[float] = None, logit_scale: float = 1.0) -> Tensor:
    """Token-level cross-entropy from ``hidden [B,T,H]`` and ``weight [V,H]`` (+ ``bias [V]``).

    Same reductions as :func:`minorsft.sft_loss`: "mean" over unmasked tokens (or
    ``num_items_in_batch``), "sum", "none" (``[B, T]``).
    """
    inputs = LinearInputs(hidden, weight, labels, bias, ignore_index=ignore_index,
                          temperature=temperature, backend=backend, memory_budget=memory_budget,
                          check_labels=check_labels, shift=shift,
                          softcap=softcap, logit_scale=logit_scale)
    return run_loss("sft", inputs, reduction=reduction, num_items_in_batch=num_items_in_batch)


def linear_minor_sft_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                          bias: Optional[Tensor] = None, ref_hidden: Optional[Tensor] = None,
                          ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                          ref_logprobs: Optional[Tensor] = None, beta: float = 0.1,
                          length_norm: str = "outside", ignore_index: int = -100,
                          reduction: str = "mean", temperature: float = 1.0,
                          return_metrics: bool = False, backend: Optional[str] = None,
                          memory_budget: Optional[int] = None,
                          check_labels: Optional[bool] = None, shift: bool = False,
                          softcap: Optional[float] = None, logit_scale: float = 1.0) -> LossOut:
    """MinorSFT from hidden states: the loss of :func:`minorsft.minor_sft_loss` without logits.

    Args:
        hidden: ``[B, T, H]`` policy hidden states; weight ``[V, H]``; bias ``[V]`` or None.
        labels: ``[B, T]`` aligned with ``hidden``.
        ref_hidden: ``[B, T, H_ref]`` reference hidden states with ``ref_weight``
            ``[V, H_ref]`` / ``ref_bias`` ``[V]`` (default: the policy's ``weight`` and
            ``bias``, for a shared frozen lm_head); or
        ref_logprobs: ``[B, T]`` per-token or ``[B]`` per-sequence reference log-probs.
        beta, length_norm, reduction, temperature, return_metrics: as the logits path.
    Returns:
        loss, or ``(loss, {"deviation", "logps", "ref_logps"})`` with ``return_metrics``.
    """
    inputs = LinearInputs(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias,
                          ignore_index=ignore_index, temperature=temperature, backend=backend,
                          memory_budget=memory_budget, check_labels=check_labels, shift=shift,
                          softcap=softcap, logit_scale=logit_scale)
    return run_loss("minor_sft", inputs, ref_logprobs=ref_logprobs, reduction=reduction,
                    return_metrics=return_metrics, beta=beta, length_norm=length_norm)


def linear_minor_dpo_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                          bias: Optional[Tensor] = None, ref_hidden: Optional[Tensor] = None,
                          ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                          ref_logprobs: Optional[Tensor] = None, beta: float = 0.1,
                          ignore_index: int = -100, reduction: str = "mean",
                          temperature: float = 1.0, return_metrics: bool = False,
                          backend: Optional[str] = None, memory_budget: Optional[int] = None,
                          check_labels: Optional[bool] = None, shift: bool = False,
                          softcap: Optional[float] = None, logit_scale: float = 1.0) -> LossOut:
    """MinorDPO from hidden states (see :func:`minorsft.minor_dpo_loss`).

    ``hidden`` is ``[2P, T, H]``: rows ``[0, P)`` chosen, ``[P, 2P)`` rejected. Reference
    inputs as :func:`linear_minor_sft_loss`. Returns loss or ``(loss, metrics)``.
    """
    inputs = LinearInputs(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias,
                          ignore_index=ignore_index, temperature=temperature, backend=backend,
                          memory_budget=memory_budget, check_labels=check_labels, shift=shift,
                          softcap=softcap, logit_scale=logit_scale)
    return run_loss("minor_dpo", inputs, ref_logprobs=ref_logprobs, reduction=reduction,
                    return_metrics=return_metrics, beta=beta)


def linear_dpo_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                    bias: Optional[Tensor] = None, ref_hidden: Optional[Tensor] = None,
                    ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                    ref_logprobs: Optional[Tensor] = None, beta: float = 0.1,
                    loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                    ignore_index: int = -100, reduction: str = "mean", temperature: float = 1.0,
                    return_metrics: bool = False, backend: Optional[str] = None,
                    memory_budget: Optional[int] = None,
                    check_labels: Optional[bool] = None, shift: bool = False,
                    softcap: Optional[float] = None, logit_scale: float = 1.0) -> LossOut:
    """DPO family from hidden states (see :func:`minorsft.dpo_loss`; ``loss_type`` in
    "sigmoid", "ipo", "hinge", "robust"). Layout and reference as
    :func:`linear_minor_dpo_loss`. Returns loss or ``(loss, metrics)``."""
    inputs = LinearInputs(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias,
                          ignore_index=ignore_index, temperature=temperature, backend=backend,
                          memory_budget=memory_budget, check_labels=check_labels, shift=shift,
                          softcap=softcap, logit_scale=logit_scale)
    return run_loss("dpo", inputs, ref_logprobs=ref_logprobs, reduction=reduction,
                    return_metrics=return_metrics, beta=beta, loss_type=loss_type,
                    label_smoothing=label_smoothing)
