"""Argument checks shared by every public entry point.

Each check raises ``ValueError`` / ``TypeError`` naming the offending argument and
the shapes or values involved (SPEC.md section 5). Nothing here launches a kernel;
only :func:`check_labels_range` touches tensor data (one host synchronisation), and
it is skipped while ``torch.compile`` traces or a CUDA graph is being captured.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Iterable, Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("mean", "sum", "none")


def checked_choice(name: str, value, options: Iterable):
    """``value`` if it is one of ``options``, else ``ValueError`` naming ``name``."""
    options = tuple(options)
    if isinstance(value, bool) or value not in options:
        raise ValueError(f"{name}: got {value!r}, expected one of {options}")
    return value


def check_choice(name: str, value, options: Iterable) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``options``."""
    checked_choice(name, value, options)


def check_flag(name: str, value) -> bool:
    """``value`` must be a bool (``shift``, ``return_metrics``, ``inplace_backward``)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_reduction(reduction: str) -> None:
    check_choice("reduction", reduction, REDUCTIONS)


def check_real(name: str, value) -> float:
    """``value`` must be a real Python number (an int or a float, not a bool, a string or
    a tensor); returned as a float."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: must be a Python float, got a tensor")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_positive(name: str, value) -> float:
    """``value`` must be a finite real number > 0 (``beta``, ``temperature``)."""
    value = check_real(name, value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: must be finite and > 0, got {value}")
    return value


def check_beta(beta) -> float:
    return check_positive("beta", beta)


def _check_float_tensor(name: str, x) -> None:
    """``x`` must be a tensor of a dtype the kernels read (bf16/fp16/fp32)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype must be one of bfloat16/float16/float32, got {x.dtype}")


def check_logits(name: str, logits) -> None:
    """``logits`` must be a floating ``[B, T, V]`` tensor (any strides)."""
    _check_float_tensor(name, logits)
    if logits.dim() != 3:
        raise ValueError(f"{name}: expected shape [B, T, V], got {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name}: vocabulary dimension is empty, shape {tuple(logits.shape)}")


def check_labels(labels, batch_shape, device, logits_name: str = "logits",
                 shift: bool = False) -> None:
    """``labels`` must be an integer ``[B, T]`` tensor matching ``batch_shape`` (with
    ``shift``, Hugging Face labels: the same positions as the logits, at least one)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels: dtype must be an integer type, got {labels.dtype}")
    if tuple(labels.shape) != tuple(batch_shape):
        how = ("with shift=True, labels are the model's Hugging Face labels, one per position"
               if shift else "labels aligned with the logits; for Hugging Face labels pass shift=True")
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match {logits_name} "
                         f"batch shape {tuple(batch_shape)} ({how})")
    if shift and labels.shape[1] < 1:
        raise ValueError(f"labels: shift=True needs at least one position, got shape {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels: on {labels.device}, but {logits_name} is on {device}")


def check_linear(prefix: str, hidden, weight, bias, batch_shape=None) -> None:
    """``hidden [B,T,H]``, ``weight [V,H]`` on one device, ``bias [V]`` or None in the
    weight's dtype. The weight has the hidden states' dtype, or is fp32 with bf16/fp16
    hidden states (an fp32 lm_head under autocast: the math runs in the activations'
    dtype)."""
    h, w, c = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    _check_float_tensor(h, hidden)
    _check_float_tensor(w, weight)
    if hidden.dim() != 3:
        raise ValueError(f"{h}: expected shape [B, T, H], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"{w}: expected shape [V, H] with V > 0, got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"{w}: hidden size {weight.shape[1]} (shape {tuple(weight.shape)}) does "
                         f"not match {h} hidden size {hidden.shape[2]} (shape {tuple(hidden.shape)})")
    if weight.dtype != hidden.dtype and weight.dtype != torch.float32:
        raise TypeError(f"{w}: dtype {weight.dtype} does not match {h} dtype {hidden.dtype} "
                        f"(allowed: the same dtype, or an fp32 weight with bf16/fp16 {h})")
    if weight.device != hidden.device:
        raise ValueError(f"{w}: on {weight.device}, but {h} is on {hidden.device}")
    if batch_shape is not None and tuple(hidden.shape[:2]) != tuple(batch_shape):
        raise ValueError(f"{h}: batch shape {tuple(hidden.shape[:2])} does not match hidden "
                         f"batch shape {tuple(batch_shape)}")
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{c}: expected a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{c}: expected shape [V] = ({weight.shape[0]},) to match {w} "
                         f"{tuple(weight.shape)}, got {tuple(bias.shape)}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"{c}: dtype {bias.dtype} does not match {w} dtype {weight.dtype}")
    if bias.device != weight.device:
        raise ValueError(f"{c}: on {bias.device}, but {w} is on {weight.device}")


def check_same(name: str, tensor, ref_name: str, ref) -> None:
    """``tensor`` must have the shape and device of ``ref`` (dtype may differ)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(ref.shape):
        raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match "
                         f"{ref_name} shape {tuple(ref.shape)}")
    if tensor.device != ref.device:
        raise ValueError(f"{name}: on {tensor.device}, but {ref_name} is on {ref.device}")


def check_ref_logprobs(ref_logprobs, batch_shape, device) -> None:
    """``ref_logprobs`` is ``[B, T]`` per-token (``batch_shape``: the scored positions, so
    ``[B, T - 1]`` with ``shift=True``, as ``token_logprobs(..., shift=True)`` returns) or
    ``[B]`` per-sequence sums."""
    if not isinstance(ref_logprobs, torch.Tensor):
        raise TypeError(f"ref_logprobs: expected a torch.Tensor, got {type(ref_logprobs).__name__}")
    if not ref_logprobs.dtype.is_floating_point:
        raise TypeError(f"ref_logprobs: dtype must be floating, got {ref_logprobs.dtype}")
    shape = tuple(ref_logprobs.shape)
    if shape not in (tuple(batch_shape), tuple(batch_shape[:1])):
        raise ValueError(
            f"ref_logprobs: expected {tuple(batch_shape)} per-token log-probs (one per scored "
            f"position) or {tuple(batch_shape[:1])} per-sequence sums, got {shape}")
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


def check_logit_transform(logit_scale, softcap) -> tuple:
    """``(logit_scale, softcap)`` as floats: ``logit_scale`` finite and > 0 (Cohere's
    ``logit_scale``), ``softcap`` None/0 (none) or finite and > 0 (Gemma's
    ``final_logit_softcapping``)."""
    logit_scale = check_positive("logit_scale", logit_scale)
    if softcap is None:
        return logit_scale, 0.0
    return logit_scale, check_positive("softcap", softcap) if softcap != 0 else 0.0


def check_memory_budget(memory_budget) -> int:
    """``memory_budget``: None (the backend's default, returned as 0) or a positive int of bytes."""
    if memory_budget is None:
        return 0
    if not isinstance(memory_budget, int) or isinstance(memory_budget, bool):
        raise TypeError(f"memory_budget: must be an int (bytes) or None, got "
                        f"{type(memory_budget).__name__}")
    if memory_budget <= 0:
        raise ValueError(f"memory_budget: must be a positive number of bytes, got {memory_budget}")
    return memory_budget


def check_pairs(batch_size: int) -> None:
    """DPO-family batches hold B/2 chosen rows then B/2 rejected rows."""
    if batch_size % 2 != 0 or batch_size == 0:
        raise ValueError(
            f"logits: a DPO-family batch must hold an even, non-zero number of rows "
            f"(B/2 chosen then B/2 rejected), got B={batch_size}")


def _eager_check_by_default(labels: torch.Tensor) -> bool:
    """The default of ``check_labels``: on for CPU labels (reading them costs nothing),
    off on a GPU (a host synchronisation per call; the label flag of
    :mod:`minorsft.label_errors` reports bad labels instead), under ``torch.compile``,
    and when the environment sets ``MINORSFT_CHECK_LABELS=0``."""
    if torch.compiler.is_compiling() or os.environ.get("MINORSFT_CHECK_LABELS", "1") == "0":
        return False
    return labels.device.type == "cpu"


def check_labels_range(labels: torch.Tensor, vocab: int, ignore_index: int,
                       enabled: Optional[bool] = None) -> None:
    """Raise ``ValueError`` if a label is outside ``[0, vocab)`` and not ``ignore_index``.

    This reads the labels on the host: ``enabled=True`` always (one synchronisation on a
    GPU), ``None`` (the default) only where that is free (see
    :func:`_eager_check_by_default`), ``False`` never. Unchecked, a bad label is still
    never used as an address: the kernels give it a NaN log-prob and raise the device's
    label flag (:func:`minorsft.label_errors.check_label_errors` reads it).
    """
    if enabled is False or (enabled is None and not _eager_check_by_default(labels)):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise ValueError(
            f"labels: {int(bad.sum())} entries outside [0, V={vocab}) that are not "
            f"ignore_index={ignore_index}; first at index {tuple(idx)} with value "
            f"{int(labels[tuple(idx)])}")
