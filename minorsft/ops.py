"""The token log-prob op: ``torch.library`` custom ops with an autograd formula.

``minorsft::token_logprobs`` is the one op every logits-path loss goes through. It is
registered with ``torch.library.custom_op`` plus a fake (meta) implementation and
``register_autograd``, so ``torch.compile(fullgraph=True)`` traces it as a single
opaque node and CUDA graphs capture it. The backward is a second op that recomputes
the softmax from the saved logsumexp; its in-place twin (opt-in) writes the gradient
into the logits buffer.

Backend dispatch happens inside the op on the ``backend`` string ("triton" or
"torch"), chosen by :func:`select_backend`.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from minorsft.backends import torch_logprobs

log = logging.getLogger("minorsft")
BACKENDS = ("auto", "triton", "torch")
_warned = set()


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
        if not (on_cuda or _interpreting()):
            raise ValueError(f"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1; "
                             f"the tensors are on {device}")
        return "triton"
    if (on_cuda or _interpreting()) and triton_available():
        return "triton"
    if on_cuda and "no-triton" not in _warned:
        _warned.add("no-triton")
        log.warning("minorsft: triton is not importable; using the PyTorch backend on CUDA")
    return "torch"


def _impl(backend: str):
    if backend == "triton":
        from minorsft.kernels import logprobs
        return logprobs
    return torch_logprobs


@torch.library.custom_op("minorsft::token_logprobs", mutates_args=())
def token_logprobs_op(logits: Tensor, labels: Tensor, ref_logits: Optional[Tensor],
                      ignore_index: int, temperature: float, backend: str,
                      inplace_backward: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``(lp [B,T], lse [B,T], ref_lp [B,T] or [0])``, fp32; see kernels/logprobs.py."""
    return _impl(backend).logprobs_forward(
        logits, labels, ref_logits, ignore_index=ignore_index, temperature=temperature)


@token_logprobs_op.register_fake
def _(logits, labels, ref_logits, ignore_index, temperature, backend, inplace_backward):
    B, T, _ = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    ref_shape = (B, T) if ref_logits is not None else (0,)
    return logits.new_empty((B, T), **f32), logits.new_empty((B, T), **f32), logits.new_empty(ref_shape, **f32)


@torch.library.custom_op("minorsft::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(logits: Tensor, labels: Tensor, lse: Tensor, grad_lp: Tensor,
                               ignore_index: int, temperature: float, backend: str) -> Tensor:
    """``[B, T, V]`` gradient in ``logits``' dtype."""
    return _impl(backend).logprobs_backward(
        logits, labels, lse, grad_lp, ignore_index=ignore_index, temperature=temperature)


@token_logprobs_backward_op.register_fake
def _(logits, labels, lse, grad_lp, ignore_index, temperature, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("minorsft::token_logprobs_backward_", mutates_args=("logits",))
def token_logprobs_backward_inplace_op(logits: Tensor, labels: Tensor, lse: Tensor, grad_lp: Tensor,
                                       ignore_index: int, temperature: float, backend: str) -> None:
    """Like ``token_logprobs_backward`` but overwrites ``logits`` with the gradient."""
    _impl(backend).logprobs_backward(
        logits, labels, lse, grad_lp, ignore_index=ignore_index, temperature=temperature, out=logits)


def _setup_context(ctx, inputs, output):
    logits, labels, _ref, ignore_index, temperature, backend, inplace = inputs
    _lp, lse, ref_lp = output
    ctx.save_for_backward(logits, labels, lse)
    ctx.opts = (ignore_index, temperature, backend)
    ctx.inplace = inplace
    ctx.mark_non_differentiable(lse, ref_lp)


def _backward(ctx, grad_lp, _grad_lse, _grad_ref):
    logits, labels, lse = ctx.saved_tensors
    grad = None
    if grad_lp is not None and ctx.needs_input_grad[0]:
        if ctx.inplace:
            torch.ops.minorsft.token_logprobs_backward_(logits, labels, lse, grad_lp, *ctx.opts)
            grad = logits
        else:
            grad = torch.ops.minorsft.token_logprobs_backward(logits, labels, lse, grad_lp, *ctx.opts)
    # The reference is frozen: no gradient flows to ref_logits.
    return grad, None, None, None, None, None, None


token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)
