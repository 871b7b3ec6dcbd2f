"""Launcher helpers shared by the kernel files (no Triton import: the PyTorch
backends use them too)."""
import contextlib
import os
from typing import Optional

import torch

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def alloc_output(shape, dtype, device) -> torch.Tensor:
    """An output buffer the kernel must fill entirely.

    NaN-poisoned when ``MINORSFT_DEBUG_POISON=1`` (the test suite sets it), so an
    element a kernel forgets to write shows up as NaN instead of stale memory.
    """
    if os.environ.get("MINORSFT_DEBUG_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream (then nothing
    may synchronise with the host)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def device_guard(tensor: torch.Tensor):
    """Context making ``tensor``'s GPU the current device for a launch.

    Triton launches on the *current* CUDA device and stream, not the tensors' device;
    with a model spread over GPUs (``device_map="auto"``) the lm_head's device is often
    not the current one.
    """
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (Triton kernels run on the CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def hand_round() -> bool:
    """Round fp32 -> bf16 by hand in the kernels: under the interpreter (which truncates),
    or when ``MINORSFT_HAND_ROUND=1`` (a test compares both ways on a GPU)."""
    return interpreting() or os.environ.get("MINORSFT_HAND_ROUND") == "1"


def scored_labels(labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """The labels the positions are scored against: ``labels`` itself, or with ``shift``
    the view ``labels[:, 1:]`` (Hugging Face labels: position ``t`` predicts label
    ``t + 1``). A view of the ``[B, T]`` labels: the data pointer moves by one stride."""
    return labels[:, 1:] if shift else labels


def fold_scales(temperature: float, logit_scale: float = 1.0, softcap: Optional[float] = 0.0):
    """``(scale2, dscale, pre_cap, softcap)`` of the fold kernels for logits seen as
    ``capped(z) / temperature``, ``capped(z) = softcap * tanh(logit_scale * z / softcap)``
    (``logit_scale * z`` without ``softcap``): ``scale2`` multiplies the capped logit into
    log2 units (the logit scale folded in when there is no soft-capping), ``dscale`` is
    ``logit_scale / temperature`` (the backward's chain rule), ``pre_cap`` is
    ``logit_scale / softcap``."""
    softcap = float(softcap or 0.0)
    if softcap > 0:
        return LOG2E / temperature, logit_scale / temperature, logit_scale / softcap, softcap
    return LOG2E * logit_scale / temperature, logit_scale / temperature, 0.0, 0.0
