"""The autograd layer: ``torch.library`` custom ops of both paths and the backend choice.

``minorsft::token_logprobs`` (logits path) and ``minorsft::linear_token_logprobs`` (fused
linear path) give per-token log-probs; ``minorsft::linear_loss`` is the fused linear
path's scalar loss with its gradients formed in the forward. Each is registered with
``torch.library.custom_op`` plus a fake (meta) implementation and ``register_autograd``,
so ``torch.compile(fullgraph=True)`` traces it as one opaque node (the logits path's ops
are also CUDA-graph capturable; the linear ops read row counts on the host). The
per-token backwards are second ops that recompute the softmax from the saved
logsumexp; the logits path's in-place twin (opt-in) writes the gradient into the logits
buffer.

Backends: ``"triton"`` (``minorsft.kernels.logprobs``) or ``"torch"``
(``minorsft.backends.torch_logprobs``), two implementations of the same fold functions with
the same arguments; :func:`select_backend` picks one and :func:`implementation` returns its
module. The fused linear path's chunk driver (``minorsft.kernels.linear``: GEMMs + the
fold) is one for both.
"""
from __future__ import annotations

import importlib
import logging
from typing import Optional, Tuple

import torch
from torch import Tensor

from minorsft.kernels.common import interpreting, scored_labels
from minorsft.label_errors import label_flag

log = logging.getLogger("minorsft")
BACKENDS = ("auto", "triton", "torch")
# backend -> the fold module: same function names, same arguments.
_FOLDS = {"triton": "minorsft.kernels.logprobs", "torch": "minorsft.backends.torch_logprobs"}
_warned = set()


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def select_backend(backend: Optional[str], device: torch.device) -> str:
    """Resolve ``backend`` (None/"auto"/"triton"/"torch") for tensors on ``device``.

    auto: Triton for CUDA tensors, or for CPU tensors when ``TRITON_INTERPRET=1``;
    the PyTorch backend otherwise. A CUDA tensor without Triton falls back to the
    PyTorch backend with a logged warning (never silently).
    """
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend: got {backend!r}, expected one of {BACKENDS}")
    on_cuda = device.type == "cuda"
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' was requested but triton is not installed")
        if not (on_cuda or interpreting()):
            raise ValueError(f"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1; "
                             f"the tensors are on {device}")
        return "triton"
    if (on_cuda or interpreting()) and triton_available():
        return "triton"
    if on_cuda and "no-triton" not in _warned:
        _warned.add("no-triton")
        log.warning("minorsft: triton is not importable; using the PyTorch backend on CUDA")
    return "torch"


def implementation(backend: str):
    """The fold module (``logprobs_forward`` / ``logprobs_backward``) of a resolved backend."""
    return importlib.import_module(_FOLDS[backend])


# --------------------------------------------------------------------------- logits path

@torch.library.custom_op("minorsft::token_logprobs", mutates_args=())
def token_logprobs_op(logits: Tensor, labels: Tensor, ref_logits: Optional[Tensor],
                      ignore_index: int, temperature: float, backend: str,
                      inplace_backward: bool, shift: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``(lp [B,T'], lse [B,T'], ref_lp [B,T'] or [0])``, fp32, ``T' = T - shift``; see
    kernels/logprobs.py. Bad labels are added to the device's label flag (label_errors)."""
    return implementation(backend).logprobs_forward(
        logits, labels, ref_logits, ignore_index=ignore_index, temperature=temperature,
        shift=shift, bad_labels=label_flag(logits.device))


@token_logprobs_op.register_fake
def _(logits, labels, ref_logits, ignore_index, temperature, backend, inplace_backward, shift):
    B, T = logits.shape[0], logits.shape[1] - int(shift)
    f32 = dict(dtype=torch.float32, device=logits.device)
    ref_shape = (B, T) if ref_logits is not None else (0,)
    return logits.new_empty((B, T), **f32), logits.new_empty((B, T), **f32), logits.new_empty(ref_shape, **f32)


@torch.library.custom_op("minorsft::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(logits: Tensor, labels: Tensor, lse: Tensor, grad_lp: Tensor,
                               ignore_index: int, temperature: float, backend: str,
                               shift: bool) -> Tensor:
    """``[B, T, V]`` gradient in ``logits``' dtype."""
    return implementation(backend).logprobs_backward(
        logits, labels, lse, grad_lp, ignore_index=ignore_index, temperature=temperature,
        shift=shift)


@token_logprobs_backward_op.register_fake
def _(logits, labels, lse, grad_lp, ignore_index, temperature, backend, shift):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("minorsft::token_logprobs_backward_", mutates_args=("logits",))
def token_logprobs_backward_inplace_op(logits: Tensor, labels: Tensor, lse: Tensor, grad_lp: Tensor,
                                       ignore_index: int, temperature: float, backend: str,
                                       shift: bool) -> None:
    """Like ``token_logprobs_backward`` but overwrites ``logits`` with the gradient."""
    implementation(backend).logprobs_backward(
        logits, labels, lse, grad_lp, ignore_index=ignore_index, temperature=temperature,
        shift=shift, out=logits)


def _logprobs_setup_context(ctx, inputs, output):
    logits, labels, _ref, ignore_index, temperature, backend, inplace, shift = inputs
    _lp, lse, ref_lp = output
    ctx.save_for_backward(logits, labels, lse)
    ctx.opts = (ignore_index, temperature, backend, shift)
    ctx.inplace = inplace
    ctx.mark_non_differentiable(lse, ref_lp)


def _logprobs_backward(ctx, grad_lp, _grad_lse, _grad_ref):
    logits, labels, lse = ctx.saved_tensors
    grad = None
    if grad_lp is not None and ctx.needs_input_grad[0]:
        if ctx.inplace:
            torch.ops.minorsft.token_logprobs_backward_(logits, labels, lse, grad_lp, *ctx.opts)
            grad = logits
        else:
            grad = torch.ops.minorsft.token_logprobs_backward(logits, labels, lse, grad_lp, *ctx.opts)
    # The reference is frozen: no gradient flows to ref_logits.
    return grad, None, None, None, None, None, None, None


token_logprobs_op.register_autograd(_logprobs_backward, setup_context=_logprobs_setup_context)


# --------------------------------------------------------------------------- fused linear path
# The driver (kernels/linear.py) is one for both backends: cuBLAS / CPU GEMMs on chunks,
# and the logits path's fold (Triton, or its PyTorch mirror) on each chunk.

def _driver():
    return importlib.import_module("minorsft.kernels.linear")


def _linear_opts(ignore_index, temperature, logit_scale, softcap, shift, backend, memory_budget):
    return dict(fold=implementation(backend), ignore_index=ignore_index,
                temperature=temperature, logit_scale=logit_scale, softcap=softcap, shift=shift,
                memory_budget=memory_budget or None)   # ops take no None for an int: 0 = default


@torch.library.custom_op("minorsft::linear_token_logprobs", mutates_args=())
def linear_token_logprobs_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                             ignore_index: int, temperature: float, logit_scale: float,
                             softcap: float, shift: bool, backend: str, memory_budget: int,
                             flag_labels: bool) -> Tuple[Tensor, Tensor]:
    """``(lp [B, T'], lse [B, T'])`` fp32 from ``hidden [B,T,H]``, ``weight [V,H]``, ``bias [V]``;
    ``flag_labels``: add bad labels to the device's label flag (not for a reference pass)."""
    flag = label_flag(hidden.device) if flag_labels else None
    return _driver().linear_forward(
        hidden, weight, labels, bias, bad_labels=flag,
        **_linear_opts(ignore_index, temperature, logit_scale, softcap, shift, backend, memory_budget))


@linear_token_logprobs_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, logit_scale, softcap, shift,
      backend, memory_budget, flag_labels):
    shape = (hidden.shape[0], hidden.shape[1] - int(shift))
    return (hidden.new_empty(shape, dtype=torch.float32), hidden.new_empty(shape, dtype=torch.float32))


@torch.library.custom_op("minorsft::linear_token_logprobs_backward", mutates_args=())
def linear_token_logprobs_backward_op(
        hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, lse: Tensor,
        grad_lp: Tensor, ignore_index: int, temperature: float, logit_scale: float, softcap: float,
        shift: bool, backend: str, memory_budget: int, need_hidden: bool, need_weight: bool,
        need_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``(d_hidden, d_weight, d_bias)`` in the inputs' dtypes; an empty ``[0]`` tensor
    stands for a gradient that was not requested (ops cannot return None)."""
    grads = _driver().linear_backward(
        hidden, weight, labels, lse, grad_lp, bias, need_hidden=need_hidden,
        need_weight=need_weight, need_bias=need_bias,
        **_linear_opts(ignore_index, temperature, logit_scale, softcap, shift, backend, memory_budget))
    return tuple(g if g is not None else hidden.new_empty((0,)) for g in grads)


def _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias):
    empty = hidden.new_empty((0,))
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else empty,
            torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else empty,
            torch.empty_like(bias) if (need_bias and bias is not None) else empty)


@linear_token_logprobs_backward_op.register_fake
def _(hidden, weight, bias, labels, lse, grad_lp, ignore_index, temperature, logit_scale, softcap,
      shift, backend, memory_budget, need_hidden, need_weight, need_bias):
    return _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels = inputs[:4]
    _lp, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse)
    ctx.opts = inputs[4:11]   # ignore_index ... memory_budget
    ctx.mark_non_differentiable(lse)


def _linear_backward(ctx, grad_lp, _grad_lse):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = bool(need_b and bias is not None)
    if grad_lp is None or not (need_h or need_w or need_b):
        return (None,) * 12
    dh, dw, db = torch.ops.minorsft.linear_token_logprobs_backward(
        hidden, weight, bias, labels, lse, grad_lp, *ctx.opts, need_h, need_w, need_b)
    return (dh if need_h else None, dw if need_w else None, db if need_b else None) + (None,) * 9


linear_token_logprobs_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


@torch.library.custom_op("minorsft::linear_loss", mutates_args=())
def linear_loss_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                   ref_seq_logps: Optional[Tensor], num_items: Optional[Tensor], loss: str,
                   beta: float, length_norm: str, loss_type: str, label_smoothing: float,
                   reduction: str, ignore_index: int, temperature: float, logit_scale: float,
                   softcap: float, shift: bool, backend: str, memory_budget: int,
                   need_hidden: bool, need_weight: bool, need_bias: bool
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss [], S [B], d_hidden, d_weight, d_bias)``: a scalar loss of ``LOSSES`` with
    its gradients formed in the forward (kernels/linear.py); ``S`` the sequences' log-prob
    sums (fp32, for the metrics); an empty ``[0]`` tensor for a gradient not requested."""
    from minorsft import losses
    spec = losses.get_loss(loss)
    options = {k: v for k, v in dict(beta=beta, length_norm=length_norm, loss_type=loss_type,
                                     label_smoothing=label_smoothing).items() if k in spec.options}
    m = (scored_labels(labels, shift) != ignore_index).sum(-1)
    coef = losses.Coefficients(loss, options, reduction, ref_seq_logps, m, num_items)
    out = _driver().linear_loss(
        hidden, weight, labels, bias, coefficients=coef, pairs=spec.pairs,
        need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
        bad_labels=label_flag(hidden.device),
        **_linear_opts(ignore_index, temperature, logit_scale, softcap, shift, backend, memory_budget))
    return out[:2] + tuple(g if g is not None else hidden.new_empty((0,)) for g in out[2:])


@linear_loss_op.register_fake
def _(hidden, weight, bias, labels, ref_seq_logps, num_items, loss, beta, length_norm, loss_type,
      label_smoothing, reduction, ignore_index, temperature, logit_scale, softcap, shift, backend,
      memory_budget, need_hidden, need_weight, need_bias):
    f32 = dict(dtype=torch.float32)
    return (hidden.new_empty((), **f32), hidden.new_empty((hidden.shape[0],), **f32),
            *_fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias))


def _loss_setup_context(ctx, inputs, output):
    _loss, seq, dh, dw, db = output
    ctx.save_for_backward(dh, dw, db)
    ctx.mark_non_differentiable(seq, dh, dw, db)


def _loss_backward(ctx, grad_loss, *_):
    """The gradients were formed in the forward: scale them by the upstream gradient."""
    grads = tuple(g * grad_loss.to(g.dtype) if need and g.numel() else None
                  for g, need in zip(ctx.saved_tensors, ctx.needs_input_grad[:3]))
    return grads + (None,) * 19


linear_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)
