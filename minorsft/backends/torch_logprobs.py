"""Pure-PyTorch backend for the logits path: the same math as the Triton kernels.

Used on CPU tensors (and as a comparison). It walks the token rows in small chunks
(``MINORSFT_TORCH_CHUNK_BYTES`` of logits per chunk, default 4 MiB: a few rows that
stay in the CPU's cache while the chunk's passes run over them), so it never holds an
fp32 ``[N, V]`` copy and each logit comes from main memory once per direction, as in the
kernels. Each chunk is a view ``logits[b, t0:t1]``: strided inputs such as
``logits[:, :-1]`` are never copied whole. The functions mirror
:mod:`minorsft.kernels.logprobs` function for function and argument for argument.

Per chunk of rows ``z`` (fp32 views of fp32 logits, a cached fp32 copy otherwise):
forward torch's fused ``log_softmax(z / tau)`` into a chunk scratch, read at the label
(and ``lse = z[y] - log_softmax[y]``); backward ``g / tau * (onehot - exp(z / tau - lse))``
formed in place in the fp32 output chunk in two passes (or in an fp32 scratch chunk, then
rounded once into a low-precision output).
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Tuple

import torch

from minorsft.kernels.common import alloc_output as _alloc
from minorsft.kernels.common import scored_labels
from minorsft.label_errors import record_bad_labels

DEFAULT_CHUNK_BYTES = 4 << 20


def _chunks(B: int, T: int, V: int, elem: int) -> Iterator[Tuple[int, int, int]]:
    """Yield ``(b, t0, t1)`` row blocks of about ``MINORSFT_TORCH_CHUNK_BYTES`` of logits."""
    budget = int(os.environ.get("MINORSFT_TORCH_CHUNK_BYTES", DEFAULT_CHUNK_BYTES))
    rows = max(1, budget // (V * max(elem, 4)))
    for b in range(B):
        for t0 in range(0, T, rows):
            yield b, t0, min(T, t0 + rows)


def _scaled(z: torch.Tensor, temperature: float, logit_scale: float = 1.0,
            softcap: float = 0.0) -> torch.Tensor:
    """``capped(z) / tau`` in fp32 (see :func:`minorsft.kernels.logprobs.logprobs_forward`;
    no copy for fp32 logits without any transform)."""
    z = z.float()
    if softcap > 0:
        return torch.tanh(z * (logit_scale / softcap)).mul_(softcap / temperature)
    scale = logit_scale / temperature
    return z if scale == 1.0 else z * scale


def _label_info(labels: torch.Tensor, vocab: int, ignore_index: int):
    """``(y_safe, keep, ok)`` for all rows at once: the label as an index (0 where it is
    none), ``label != ignore_index``, and ``0 <= label < vocab``."""
    y = labels.long()
    ok = (y >= 0) & (y < vocab)
    return torch.where(ok, y, torch.zeros_like(y)), y != ignore_index, ok


def _any(mask: torch.Tensor) -> bool:
    """``mask.any()`` where reading it is free (CPU tensors); True elsewhere, so a CUDA
    fallback never synchronises and simply treats every chunk as mixed."""
    return bool(mask.any()) if mask.device.type == "cpu" else True


def _stats(logits: torch.Tensor, y_safe: torch.Tensor, keep: torch.Tensor, transform: dict):
    """``(lse, label log-prob)`` ``[B, T]`` fp32 of ``capped(logits) / tau`` (``transform``:
    :func:`_scaled`'s options), chunk by chunk, from torch's fused log-softmax into a
    chunk-sized scratch (one pass of the row in cache for the max, one for the sum, one to
    write); ``lse = z[y] - log_softmax(z)[y]``. A chunk of masked rows only is not read
    (its values are discarded by the caller)."""
    B, T = y_safe.shape
    lse = torch.zeros((B, T, 1), dtype=torch.float32, device=logits.device)
    lp = torch.zeros((B, T, 1), dtype=torch.float32, device=logits.device)
    scratch = None
    for b, t0, t1 in _chunks(B, T, logits.shape[-1], logits.element_size()):
        if not _any(keep[b, t0:t1]):
            continue
        z = _scaled(logits[b, t0:t1], **transform)
        if scratch is None or scratch.shape[0] < t1 - t0:
            scratch = torch.empty(z.shape, dtype=torch.float32, device=z.device)
        logp = torch.log_softmax(z, dim=-1, out=scratch[: t1 - t0])
        y = y_safe[b, t0:t1, None]
        torch.gather(logp, 1, y, out=lp[b, t0:t1])
        torch.sub(z.gather(1, y), lp[b, t0:t1], out=lse[b, t0:t1])
    return lse[..., 0], lp[..., 0]


def logprobs_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logits: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
    shift: bool = False,
    bad_labels: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`minorsft.kernels.logprobs.logprobs_forward` (same shapes, same math)."""
    transform = dict(temperature=temperature, logit_scale=logit_scale, softcap=float(softcap or 0.0))
    labels = scored_labels(labels, shift)
    B, T = labels.shape
    V = logits.shape[-1]
    record_bad_labels(labels, V, ignore_index, bad_labels)
    y_safe, keep, ok = _label_info(labels, V, ignore_index)
    nan = torch.full((), float("nan"), device=logits.device)

    def finish(lse, lp):   # 0 where masked, NaN for a bad label
        return torch.where(keep, torch.where(ok, lp, nan), 0.0), torch.where(keep, lse, 0.0)

    lp, lse = finish(*_stats(logits, y_safe, keep, transform))
    if ref_logits is None:
        return lp, lse, _alloc((0,), torch.float32, logits.device)
    return lp, lse, finish(*_stats(ref_logits, y_safe, keep, transform))[0]


def _grad_chunk(z: torch.Tensor, y_safe: torch.Tensor, shift_row: torch.Tensor, sign: torch.Tensor,
                hit: torch.Tensor, dead: torch.Tensor, transform: dict, dst: torch.Tensor) -> None:
    """``dst = coef * (onehot(y) - p) * d capped / d z`` for one ``[R, V]`` chunk, in place
    in ``dst`` (fp32): ``exp(capped(z) / tau - shift_row)`` with ``shift_row = lse -
    log|coef|`` is ``|coef| p`` (a row with ``coef = 0`` gives exactly 0), times
    ``sign(-coef)`` when a row needs it, plus ``hit = coef`` at the label; with soft-capping,
    times ``1 - tanh^2``. ``coef`` holds ``logit_scale / tau``. Per-row inputs are
    ``[R, 1]``; ``dead`` rows (masked, zero coefficient) are exactly 0 even where their
    logits hold NaN or inf. Without a transform: two passes over the chunk."""
    temperature, scale, cap = transform["temperature"], transform["logit_scale"], transform["softcap"]
    if cap > 0:
        th = torch.tanh(z * (scale / cap))
        torch.mul(th, cap / temperature, out=dst)
        dst.sub_(shift_row)
    elif scale / temperature == 1.0:
        torch.sub(z, shift_row, out=dst)
    else:
        torch.mul(z, scale / temperature, out=dst)
        dst.sub_(shift_row)
    dst.exp_()
    if _any(sign < 0):
        dst.mul_(sign)
    dst.scatter_add_(1, y_safe, hit)                            # coef (1 - p) at the label
    if cap > 0:
        dst.mul_(th.mul_(th).neg_().add_(1.0))                  # d capped / d z = 1 - tanh^2
    if _any(dead):
        dst.masked_fill_(dead, 0.0)                             # no NaN * 0 on skipped rows


def logprobs_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_lp: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
    shift: bool = False,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """See :func:`minorsft.kernels.logprobs.logprobs_backward` (same shapes, same math)."""
    transform = dict(temperature=temperature, logit_scale=logit_scale, softcap=float(softcap or 0.0))
    labels = scored_labels(labels, shift)
    B, T, V = logits.shape
    T_lab = labels.shape[1]
    if out is None:
        out = _alloc((B, T, V), logits.dtype, logits.device)
    if T_lab < T:
        out[:, T_lab:].zero_()          # positions without a label (the last one with shift)
    y_safe, keep, ok = _label_info(labels, V, ignore_index)
    g = grad_lp.float()
    live = keep & (g != 0)
    coef = torch.where(live, g * (logit_scale / temperature), 0.0)
    rows = dict(y_safe=y_safe[..., None], shift_row=(lse - coef.abs().log())[..., None],
                sign=torch.where(coef > 0, -1.0, 1.0)[..., None],
                hit=torch.where(ok, coef, 0.0)[..., None], dead=~live[..., None])
    scratch = None
    for b, t0, t1 in _chunks(B, T_lab, V, logits.element_size()):
        chunk = {k: v[b, t0:t1] for k, v in rows.items()}
        dst = out[b, t0:t1]
        if not _any(live[b, t0:t1]):
            dst.zero_()                  # masked or zero-coefficient rows: nothing to read
            continue
        z = logits[b, t0:t1].float()
        if dst.dtype != torch.float32:   # fp32 scratch, rounded once into the output
            if scratch is None or scratch.shape[0] < t1 - t0:
                scratch = torch.empty((t1 - t0, V), dtype=torch.float32, device=logits.device)
            _grad_chunk(z, dst=scratch[: t1 - t0], transform=transform, **chunk)
            dst.copy_(scratch[: t1 - t0])
        else:
            _grad_chunk(z, dst=dst, transform=transform, **chunk)
    return out
