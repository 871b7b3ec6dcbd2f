"""The fused linear path: hidden states and the lm_head weight in, the loss out.

The logits ``hidden @ weight^T + bias`` never exist, not even in chunks of whole
sequences: the op ``minorsft::linear_token_logprobs`` returns the per-token fp32
log-probs (and the saved logsumexp), and its backward recomputes the logits tile by
tile to form the gradients of ``hidden``, ``weight`` and ``bias``
(:mod:`minorsft.kernels.linear` on CUDA / under ``TRITON_INTERPRET=1``,
:mod:`minorsft.linear_reference` elsewhere). Everything after the log-probs is the
logits path's shared epilogue, :func:`minorsft.functional.loss_from_token_logprobs`,
so the two paths cannot disagree on a loss formula, a reduction or a metric.

The reference model's log-probs come from the same forward op under ``no_grad``
(``ref_hidden`` + ``ref_weight``/``ref_bias``) or from the caller (``ref_logprobs``,
``[B, T]`` per-token or ``[B]`` per-sequence sums).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from minorsft.backends import torch_linear
from minorsft import validation as V
from minorsft.functional import loss_from_token_logprobs
from minorsft.ops import select_backend

LossOut = Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]


def _impl(backend: str):
    if backend == "triton":
        from minorsft.kernels import linear
        return linear.linear_forward, linear.linear_backward
    return torch_linear.linear_logprobs_forward, torch_linear.linear_logprobs_backward


def _budget_kw(backend: str, memory_budget: int) -> dict:
    """The torch backend's chunk budget (0 = its default); the kernels ignore it."""
    return {"memory_budget": memory_budget or None} if backend == "torch" else {}


# --------------------------------------------------------------------------- ops


@torch.library.custom_op("minorsft::linear_token_logprobs", mutates_args=())
def linear_token_logprobs_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                             ignore_index: int, temperature: float, backend: str,
                             memory_budget: int) -> Tuple[Tensor, Tensor]:
    """``(lp [B, T], lse [B, T])`` fp32 from ``hidden [B,T,H]``, ``weight [V,H]``, ``bias [V]``."""
    fwd, _ = _impl(backend)
    return fwd(hidden, weight, labels, bias, ignore_index=ignore_index, temperature=temperature,
               **_budget_kw(backend, memory_budget))


@linear_token_logprobs_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, backend, memory_budget):
    B, T, _ = hidden.shape
    return (hidden.new_empty((B, T), dtype=torch.float32),
            hidden.new_empty((B, T), dtype=torch.float32))


@torch.library.custom_op("minorsft::linear_token_logprobs_backward", mutates_args=())
def linear_token_logprobs_backward_op(
        hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, lse: Tensor,
        grad_lp: Tensor, ignore_index: int, temperature: float, backend: str, memory_budget: int,
        need_hidden: bool, need_weight: bool, need_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``(d_hidden, d_weight, d_bias)`` in the inputs' dtypes; an empty ``[0]`` tensor
    stands for a gradient that was not requested (ops cannot return None)."""
    _, bwd = _impl(backend)
    grads = bwd(hidden, weight, labels, lse, grad_lp, bias, ignore_index=ignore_index,
                temperature=temperature, need_hidden=need_hidden, need_weight=need_weight,
                need_bias=need_bias, **_budget_kw(backend, memory_budget))
    return tuple(g if g is not None else hidden.new_empty((0,)) for g in grads)


@linear_token_logprobs_backward_op.register_fake
def _(hidden, weight, bias, labels, lse, grad_lp, ignore_index, temperature, backend,
      memory_budget, need_hidden, need_weight, need_bias):
    empty = hidden.new_empty((0,))
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else empty,
            torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else empty,
            torch.empty_like(bias) if (need_bias and bias is not None) else empty)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, temperature, backend, memory_budget = inputs
    _lp, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse)
    ctx.opts = (ignore_index, temperature, backend, memory_budget)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_lp, _grad_lse):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_lp is None or not (need_h or need_w or need_b):
        return (None,) * 8
    dh, dw, db = torch.ops.minorsft.linear_token_logprobs_backward(
        hidden, weight, bias, labels, lse, grad_lp, *ctx.opts, need_h, need_w,
        bool(need_b and bias is not None))
    return (dh if need_h else None, dw if need_w else None,
            db if (need_b and bias is not None) else None, None, None, None, None, None)


linear_token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- checks


def _check_linear(prefix: str, hidden, weight, bias, batch_shape=None) -> None:
    """``hidden [B,T,H]``, ``weight [V,H]`` of the same dtype/device, ``bias [V]`` or None."""
    h, w, c = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    for name, x in ((h, hidden), (w, weight)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"{name}: dtype must be one of bfloat16/float16/float32, got {x.dtype}")
    if hidden.dim() != 3:
        raise ValueError(f"{h}: expected shape [B, T, H], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"{w}: expected shape [V, H] with V > 0, got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"{w}: hidden size {weight.shape[1]} (shape {tuple(weight.shape)}) does "
                         f"not match {h} hidden size {hidden.shape[2]} (shape {tuple(hidden.shape)})")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{w}: dtype {weight.dtype} does not match {h} dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{w}: on {weight.device}, but {h} is on {hidden.device}")
    if batch_shape is not None and tuple(hidden.shape[:2]) != tuple(batch_shape):
        raise ValueError(f"{h}: batch shape {tuple(hidden.shape[:2])} does not match hidden "
                         f"batch shape {tuple(batch_shape)}")
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"{c}: expected a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{c}: expected shape [V] = ({weight.shape[0]},) to match {w} "
                         f"{tuple(weight.shape)}, got {tuple(bias.shape)}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"{c}: dtype {bias.dtype} does not match {w} dtype {weight.dtype}")
    if bias.device != weight.device:
        raise ValueError(f"{c}: on {bias.device}, but {w} is on {weight.device}")


def _check_common(hidden, weight, bias, labels, ignore_index, temperature, memory_budget,
                  check_labels) -> Tuple[float, int]:
    _check_linear("", hidden, weight, bias)
    V.check_labels(labels, hidden.shape[:2], hidden.device, "hidden")
    if memory_budget is not None:
        if not isinstance(memory_budget, int) or isinstance(memory_budget, bool):
            raise TypeError(f"memory_budget: must be an int (bytes) or None, got "
                            f"{type(memory_budget).__name__}")
        torch_linear.memory_budget_bytes(memory_budget)
    temperature = V.check_token_options(labels, weight.shape[0], ignore_index, temperature,
                                        check_labels)
    return temperature, int(memory_budget or 0)


def _logprobs(hidden, weight, bias, labels, ignore_index, temperature, backend, budget) -> Tensor:
    be = select_backend(backend, hidden.device)
    lp, _lse = torch.ops.minorsft.linear_token_logprobs(
        hidden, weight, bias, labels, ignore_index, float(temperature), be, budget)
    return lp


# --------------------------------------------------------------------------- public


def linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                          bias: Optional[Tensor] = None, ignore_index: int = -100,
                          temperature: float = 1.0, backend: Optional[str] = None,
                          memory_budget: Optional[int] = None,
                          check_labels: Optional[bool] = None) -> Tensor:
    """Per-token log-probability of each label, without forming the logits.

    Args:
        hidden: ``[B, T, H]`` bf16/fp16/fp32 final hidden states, any strides (e.g.
            ``hidden[:, :-1]``).
        weight: ``[V, H]`` lm_head weight, same dtype and device.
        labels: ``[B, T]`` integer, aligned with ``hidden``; ``ignore_index`` masks.
        bias: optional ``[V]`` lm_head bias, same dtype.
        temperature: logits are divided by it first.
        backend: None/"auto", "triton" or "torch" (see :func:`minorsft.ops.select_backend`).
        memory_budget: bytes of fp32 temporaries per chunk for the torch backend
            (default ``MINORSFT_LINEAR_CHUNK_BYTES`` or 128 MiB).
        check_labels: validate the label range (one host sync), as the logits path.
    Returns:
        ``[B, T]`` fp32 ``log softmax((hidden @ weight^T + bias) / temperature)[label]``,
        0 where masked; differentiable with respect to hidden, weight and bias.
    """
    temperature, budget = _check_common(hidden, weight, bias, labels, ignore_index, temperature,
                                        memory_budget, check_labels)
    return _logprobs(hidden, weight, bias, labels, ignore_index, temperature, backend, budget)


def linear_sft_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                    bias: Optional[Tensor] = None, ignore_index: int = -100,
                    reduction: str = "mean", num_items_in_batch: Optional[Union[int, Tensor]] = None,
                    temperature: float = 1.0, backend: Optional[str] = None,
                    memory_budget: Optional[int] = None,
                    check_labels: Optional[bool] = None) -> Tensor:
    """Token-level cross-entropy from ``hidden [B,T,H]`` and ``weight [V,H]`` (+ ``bias [V]``).

    Same reductions as :func:`minorsft.sft_loss`: "mean" over unmasked tokens (or
    ``num_items_in_batch``), "sum", "none" (``[B, T]``).
    """
    temperature, budget = _check_common(hidden, weight, bias, labels, ignore_index, temperature,
                                        memory_budget, check_labels)
    V.check_reduction(reduction)
    lp = _logprobs(hidden, weight, bias, labels, ignore_index, temperature, backend, budget)
    return loss_from_token_logprobs("sft", lp, labels != ignore_index, reduction=reduction,
                                    num_items_in_batch=num_items_in_batch)


def _reference_loss(loss, hidden, weight, labels, *, bias, ref_hidden, ref_weight, ref_bias,
                    ref_logprobs, beta, ignore_index, reduction, temperature, return_metrics,
                    backend, memory_budget, check_labels, **opts) -> LossOut:
    temperature, budget = _check_common(hidden, weight, bias, labels, ignore_index, temperature,
                                        memory_budget, check_labels)
    V.check_reference("ref_hidden", ref_hidden, "ref_logprobs", ref_logprobs)
    if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
        raise ValueError("ref_weight/ref_bias: only meaningful with ref_hidden, which is None")
    if ref_hidden is not None:
        if ref_weight is None:
            # Shared (frozen) lm_head, e.g. LoRA on the backbone: reuse the policy's.
            ref_weight, ref_bias = weight, (bias if ref_bias is None else ref_bias)
        _check_linear("ref_", ref_hidden, ref_weight, ref_bias, batch_shape=hidden.shape[:2])
        if ref_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"ref_weight: vocabulary size {ref_weight.shape[0]} does not match "
                             f"weight vocabulary size {weight.shape[0]}")
    else:
        V.check_ref_logprobs(ref_logprobs, hidden.shape[:2], hidden.device)
    V.check_beta(beta)
    V.check_reduction(reduction)
    if loss != "minor_sft":
        V.check_pairs(hidden.shape[0])
    lp = _logprobs(hidden, weight, bias, labels, ignore_index, temperature, backend, budget)
    per_token_ref = per_seq_ref = None
    if ref_hidden is not None:
        with torch.no_grad():   # the reference is frozen: no graph, no saved tensors
            per_token_ref = _logprobs(ref_hidden.detach(), ref_weight.detach(),
                                      None if ref_bias is None else ref_bias.detach(), labels,
                                      ignore_index, temperature, backend, budget)
    elif ref_logprobs.dim() == 2:
        per_token_ref = ref_logprobs
    else:
        per_seq_ref = ref_logprobs
    return loss_from_token_logprobs(
        loss, lp, labels != ignore_index, ref_token_logps=per_token_ref, ref_seq_logps=per_seq_ref,
        beta=beta, reduction=reduction, return_metrics=return_metrics, **opts)


def linear_minor_sft_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                          bias: Optional[Tensor] = None, ref_hidden: Optional[Tensor] = None,
                          ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                          ref_logprobs: Optional[Tensor] = None, beta: float = 0.1,
                          length_norm: str = "outside", ignore_index: int = -100,
                          reduction: str = "mean", temperature: float = 1.0,
                          return_metrics: bool = False, backend: Optional[str] = None,
                          memory_budget: Optional[int] = None,
                          check_labels: Optional[bool] = None) -> LossOut:
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
    return _reference_loss("minor_sft", hidden, weight, labels, bias=bias, ref_hidden=ref_hidden,
                           ref_weight=ref_weight, ref_bias=ref_bias, ref_logprobs=ref_logprobs,
                           beta=beta, length_norm=length_norm, ignore_index=ignore_index,
                           reduction=reduction, temperature=temperature,
                           return_metrics=return_metrics, backend=backend,
                           memory_budget=memory_budget, check_labels=check_labels)


def linear_minor_dpo_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                          bias: Optional[Tensor] = None, ref_hidden: Optional[Tensor] = None,
                          ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                          ref_logprobs: Optional[Tensor] = None, beta: float = 0.1,
                          ignore_index: int = -100, reduction: str = "mean",
                          temperature: float = 1.0, return_metrics: bool = False,
                          backend: Optional[str] = None, memory_budget: Optional[int] = None,
                          check_labels: Optional[bool] = None) -> LossOut:
    """MinorDPO from hidden states (see :func:`minorsft.minor_dpo_loss`).

    ``hidden`` is ``[2P, T, H]``: rows ``[0, P)`` chosen, ``[P, 2P)`` rejected. Reference
    inputs as :func:`linear_minor_sft_loss`. Returns loss or ``(loss, metrics)``.
    """
    return _reference_loss("minor_dpo", hidden, weight, labels, bias=bias, ref_hidden=ref_hidden,
                           ref_weight=ref_weight, ref_bias=ref_bias, ref_logprobs=ref_logprobs,
                           beta=beta, ignore_index=ignore_index, reduction=reduction,
                           temperature=temperature, return_metrics=return_metrics,
                           backend=backend, memory_budget=memory_budget, check_labels=check_labels)


def linear_dpo_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                    bias: Optional[Tensor] = None, ref_hidden: Optional[Tensor] = None,
                    ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                    ref_logprobs: Optional[Tensor] = None, beta: float = 0.1,
                    loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                    ignore_index: int = -100, reduction: str = "mean", temperature: float = 1.0,
                    return_metrics: bool = False, backend: Optional[str] = None,
                    memory_budget: Optional[int] = None,
                    check_labels: Optional[bool] = None) -> LossOut:
    """DPO family from hidden states (see :func:`minorsft.dpo_loss`; ``loss_type`` in
    "sigmoid", "ipo", "hinge", "robust"). Layout and reference as
    :func:`linear_minor_dpo_loss`. Returns loss or ``(loss, metrics)``."""
    return _reference_loss("dpo", hidden, weight, labels, bias=bias, ref_hidden=ref_hidden,
                           ref_weight=ref_weight, ref_bias=ref_bias, ref_logprobs=ref_logprobs,
                           beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                           ignore_index=ignore_index, reduction=reduction,
                           temperature=temperature, return_metrics=return_metrics,
                           backend=backend, memory_budget=memory_budget, check_labels=check_labels)


# --------------------------------------------------------------------------- modules


class LinearSFTLoss(nn.Module):
    """Token-level cross-entropy from hidden states.

    ``forward(hidden [B,T,H], weight [V,H], labels [B,T], bias=None, num_items_in_batch=None)``.
    """

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean",
                 temperature: float = 1.0, backend: Optional[str] = None,
                 memory_budget: Optional[int] = None):
        super().__init__()
        self.opts = dict(ignore_index=ignore_index, reduction=reduction, temperature=temperature,
                         backend=backend, memory_budget=memory_budget)

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                num_items_in_batch=None) -> Tensor:
        return linear_sft_loss(hidden, weight, labels, bias=bias,
                               num_items_in_batch=num_items_in_batch, **self.opts)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.opts.items())


class _LinearRefLoss(nn.Module):
    """Shared body: ``forward(hidden, weight, labels, bias=None, ref_hidden=None,
    ref_weight=None, ref_bias=None, ref_logprobs=None)``."""

    _fn = None

    def __init__(self, **opts):
        super().__init__()
        self.opts = opts

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                ref_bias: Optional[Tensor] = None, ref_logprobs: Optional[Tensor] = None):
        return type(self)._fn(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden,
                              ref_weight=ref_weight, ref_bias=ref_bias, ref_logprobs=ref_logprobs,
                              **self.opts)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.opts.items())


class LinearMinorSFTLoss(_LinearRefLoss):
    """MinorSFT from hidden states (see :func:`linear_minor_sft_loss`)."""

    _fn = staticmethod(linear_minor_sft_loss)

    def __init__(self, *, beta: float = 0.1, length_norm: str = "outside", ignore_index: int = -100,
                 reduction: str = "mean", temperature: float = 1.0, return_metrics: bool = False,
                 backend: Optional[str] = None, memory_budget: Optional[int] = None):
        super().__init__(beta=beta, length_norm=length_norm, ignore_index=ignore_index,
                         reduction=reduction, temperature=temperature,
                         return_metrics=return_metrics, backend=backend,
                         memory_budget=memory_budget)


class LinearMinorDPOLoss(_LinearRefLoss):
    """MinorDPO from hidden states (see :func:`linear_minor_dpo_loss`); rows chosen then rejected."""

    _fn = staticmethod(linear_minor_dpo_loss)

    def __init__(self, *, beta: float = 0.1, ignore_index: int = -100, reduction: str = "mean",
                 temperature: float = 1.0, return_metrics: bool = False,
                 backend: Optional[str] = None, memory_budget: Optional[int] = None):
        super().__init__(beta=beta, ignore_index=ignore_index, reduction=reduction,
                         temperature=temperature, return_metrics=return_metrics, backend=backend,
                         memory_budget=memory_budget)


class LinearDPOLoss(_LinearRefLoss):
    """DPO family from hidden states (see :func:`linear_dpo_loss`); rows chosen then rejected."""

    _fn = staticmethod(linear_dpo_loss)

    def __init__(self, *, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
                 temperature: float = 1.0, return_metrics: bool = False,
                 backend: Optional[str] = None, memory_budget: Optional[int] = None):
        super().__init__(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                         ignore_index=ignore_index, reduction=reduction, temperature=temperature,
                         return_metrics=return_metrics, backend=backend,
                         memory_budget=memory_budget)
