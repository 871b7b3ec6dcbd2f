"""Argument checks shared by every public entry point.

Each check raises ``ValueError`` / ``TypeError`` naming the offending argument and
the shapes or values involved (SPEC.md section 5). Nothing here launches a kernel;
only :func:`check_labels_range` touches tensor data (one host synchronisation), and
it is skipped while ``torch.compile`` traces or a CUDA graph is being captured.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("mean", "sum", "none")


def check_choice(name: str, value, options: Iterable) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``options``."""
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{name}: got {value!r}, expected one of {options}")


def check_reduction(reduction: str) -> None:
    check_choice("reduction", reduction, REDUCTIONS)


def check_positive(name: str, value) -> float:
    """``value`` must be a finite real number > 0 (``beta``, ``temperature``)."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: must be a Python float, got a tensor")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: must be a real number, got {type(value).__name__}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: must be finite and > 0, got {value}")
    return value


def check_beta(beta) -> float:
    return check_positive("beta", beta)


def check_label_smoothing(eps, loss_type: str) -> float:
    eps = float(eps)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing: must be in [0, 0.5), got {eps}")
    if eps > 0 and loss_type not in ("sigmoid", "robust"):
        raise ValueError(
            f"label_smoothing: only the 'sigmoid' and 'robust' loss types use it, "
            f"got label_smoothing={eps} with loss_type={loss_type!r}")
    return eps


def check_logits(name: str, logits) -> None:
    """``logits`` must be a floating ``[B, T, V]`` tensor (any strides)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype must be one of bfloat16/float16/float32, got {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"{name}: expected shape [B, T, V], got {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name}: vocabulary dimension is empty, shape {tuple(logits.shape)}")


def check_labels(labels, batch_shape, device, logits_name: str = "logits") -> None:
    """``labels`` must be an integer ``[B, T]`` tensor matching ``batch_shape``."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels: dtype must be an integer type, got {labels.dtype}")
    if tuple(labels.shape) != tuple(batch_shape):
        raise ValueError(
            f"labels: shape {tuple(labels.shape)} does not match {logits_name} "
            f"batch shape {tuple(batch_shape)} (labels must already be aligned: pass "
            f"logits[:, :-1] with labels[:, 1:])")
    if labels.device != device:
        raise ValueError(f"labels: on {labels.device}, but {logits_name} is on {device}")


def check_same(name: str, tensor, ref_name: str, ref) -> None:
    """``tensor`` must have the shape and device of ``ref`` (dtype may differ)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(ref.shape):
        raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match "
                         f"{ref_name} shape {tuple(ref.shape)}")
    if tensor.device != ref.device:
        raise ValueError(f"{name}: on {tensor.device}, but {ref_name} is on {ref.device}")


def check_reference(a_name: str, a, b_name: str, b) -> None:
    """Exactly one of the two reference inputs must be given."""
    if a is None and b is None:
        raise ValueError(f"a reference is required: pass exactly one of {a_name} or {b_name}")
    if a is not None and b is not None:
        raise ValueError(f"pass exactly one of {a_name} or {b_name}, not both")


def check_ref_logprobs(ref_logprobs, batch_shape, device) -> None:
    """``ref_logprobs`` is ``[B, T]`` per-token or ``[B]`` per-sequence sums."""
    if not isinstance(ref_logprobs, torch.Tensor):
        raise TypeError(f"ref_logprobs: expected a torch.Tensor, got {type(ref_logprobs).__name__}")
    if not ref_logprobs.dtype.is_floating_point:
        raise TypeError(f"ref_logprobs: dtype must be floating, got {ref_logprobs.dtype}")
    shape = tuple(ref_logprobs.shape)
    if shape not in (tuple(batch_shape), tuple(batch_shape[:1])):
        raise ValueError(
            f"ref_logprobs: expected [B, T] = {tuple(batch_shape)} per-token log-probs or "
            f"[B] = {tuple(batch_shape[:1])} per-sequence sums, got {shape}")
    if ref_logprobs.device != device:
        raise ValueError(f"ref_logprobs: on {ref_logprobs.device}, but logits are on {device}")


def check_token_options(labels, vocab: int, ignore_index, temperature,
                        check_labels: Optional[bool]) -> float:
    """Options every token log-prob entry point takes: ``ignore_index`` an int,
    ``temperature`` > 0 (returned as a float) and the label range (see
    :func:`check_labels_range`)."""
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: must be an int, got {type(ignore_index).__name__}")
    temperature = check_positive("temperature", temperature)
    check_labels_range(labels, vocab, ignore_index, check_labels)
    return temperature


def check_pairs(batch_size: int) -> None:
    """DPO-family batches hold B/2 chosen rows then B/2 rejected rows."""
    if batch_size % 2 != 0 or batch_size == 0:
        raise ValueError(
            f"logits: a DPO-family batch must hold an even, non-zero number of rows "
            f"(B/2 chosen then B/2 rejected), got B={batch_size}")


def _skip_data_checks() -> bool:
    if torch.compiler.is_compiling():
        return True
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return True
    return os.environ.get("MINORSFT_CHECK_LABELS", "1") == "0"


def check_labels_range(labels: torch.Tensor, vocab: int, ignore_index: int,
                       enabled: Optional[bool] = None) -> None:
    """Raise ``ValueError`` if a label is outside ``[0, vocab)`` and not ``ignore_index``.

    This reads the labels on the host (one synchronisation). It is skipped under
    ``torch.compile`` / CUDA-graph capture, when ``enabled=False``, or when the
    environment sets ``MINORSFT_CHECK_LABELS=0``. The kernels never read out of
    bounds whatever the labels hold: an out-of-range label gives a NaN log-prob.
    """
    if enabled is False or (enabled is None and _skip_data_checks()):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise ValueError(
            f"labels: {int(bad.sum())} entries outside [0, V={vocab}) that are not "
            f"ignore_index={ignore_index}; first at index {tuple(idx)} with value "
            f"{int(labels[tuple(idx)])}")
