"""Pure-PyTorch backend for the logits path: the same math as the Triton kernels.

Used on CPU tensors (and as a comparison). It walks the rows in chunks sized from a
byte budget (``MINORSFT_TORCH_CHUNK_BYTES``, default 64 MiB of fp32 temporaries), so
it never holds an fp32 ``[N, V]`` copy either. Each chunk is a view
``logits[b, t0:t1]``: strided inputs such as ``logits[:, :-1]`` are never copied whole.
The functions mirror :mod:`minorsft.kernels.logprobs` function for function and
argument for argument.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Tuple

import torch

from minorsft.kernels.common import alloc_output as _alloc

# fp32 temporaries alive per row in the backward: z, p and the gradient row.
_TEMPS_PER_ROW = 3


def _chunks(B: int, T: int, V: int) -> Iterator[Tuple[int, int, int]]:
    """Yield ``(b, t0, t1)`` row blocks whose fp32 temporaries fit the byte budget."""
    budget = int(os.environ.get("MINORSFT_TORCH_CHUNK_BYTES", 64 << 20))
    rows = max(1, budget // (V * 4 * _TEMPS_PER_ROW))
    for b in range(B):
        for t0 in range(0, T, rows):
            yield b, t0, min(T, t0 + rows)



def _row_logprobs(z: torch.Tensor, y: torch.Tensor, ok: torch.Tensor, keep: torch.Tensor,
                  temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[R, V]`` logits chunk -> (``[R]`` log-prob, ``[R]`` lse), fp32."""
    z = z.float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    tgt = z.gather(1, y[:, None]).squeeze(1)
    lp = torch.where(ok, tgt - lse, torch.full_like(lse, float("nan")))
    zero = torch.zeros_like(lse)
    return torch.where(keep, lp, zero), torch.where(keep, lse, zero)


def logprobs_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logits: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`minorsft.kernels.logprobs.logprobs_forward` (same shapes, same math)."""
    B, T, V = logits.shape
    dev = logits.device
    lp = _alloc((B, T), torch.float32, dev)
    lse = _alloc((B, T), torch.float32, dev)
    ref_lp = _alloc((B, T) if ref_logits is not None else (0,), torch.float32, dev)
    for b, t0, t1 in _chunks(B, T, V):
        y = labels[b, t0:t1].long()
        keep = y != ignore_index
        ok = (y >= 0) & (y < V)
        y = torch.where(ok, y, torch.zeros_like(y))
        lp[b, t0:t1], lse[b, t0:t1] = _row_logprobs(logits[b, t0:t1], y, ok, keep, temperature)
        if ref_logits is not None:
            ref_lp[b, t0:t1] = _row_logprobs(ref_logits[b, t0:t1], y, ok, keep, temperature)[0]
    return lp, lse, ref_lp


def logprobs_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_lp: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """See :func:`minorsft.kernels.logprobs.logprobs_backward` (same shapes, same math)."""
    B, T, V = logits.shape
    if out is None:
        out = _alloc((B, T, V), logits.dtype, logits.device)
    for b, t0, t1 in _chunks(B, T, V):
        y = labels[b, t0:t1].long()
        g = grad_lp[b, t0:t1].float()
        live = (y != ignore_index) & (g != 0)
        ok = (y >= 0) & (y < V)
        z = logits[b, t0:t1].float() / temperature
        d = -torch.exp(z - lse[b, t0:t1, None])
        hit = torch.where(ok, y, torch.zeros_like(y))[:, None]
        d.scatter_add_(1, hit, ok.to(d.dtype)[:, None])   # 1 - p at the target, fp32
        d.mul_(torch.where(live, g / temperature, torch.zeros_like(g))[:, None])
        d.masked_fill_(~live[:, None], 0.0)               # no NaN * 0 on skipped rows
        out[b, t0:t1] = d.to(out.dtype)
    return out
