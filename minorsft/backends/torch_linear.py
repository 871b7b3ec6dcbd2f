"""Pure-PyTorch backend for the fused linear path: the same math as ``kernels/linear.py``.

Per-token log-probs straight from the hidden states and the lm_head weight, without
ever holding the ``[N, V]`` logits. The ``N = B * T`` token rows are walked in chunks
whose fp32 temporaries fit a byte budget (``memory_budget`` argument, else the
environment variable ``MINORSFT_LINEAR_CHUNK_BYTES``, else 128 MiB)::

    z   = (h @ W^T + b) / tau                     [R, V] fp32, one chunk of R rows
    lse = logsumexp_v z                            [R]
    lp  = z[y] - lse                               [R], 0 where y == ignore_index

Backward, with ``g = dLoss/dlp`` (the per-sequence loss coefficient already inside)
and ``p = exp(z - lse)`` recomputed per chunk from the saved ``lse``::

    G   = g / tau * (onehot(y) - p)                [R, V] fp32, in place in the chunk
    dH  = G @ W                                    [R, H] (complete per chunk: full V)
    dW += G^T @ h                                  [V, H] fp32 accumulator over chunks
    db += sum_rows G                               [V]    fp32 accumulator

Low-precision weights are upcast to fp32 once per call (an ``O(V H)`` copy, not
``O(N V)``), so every logit is the fp32 dot of the rounded inputs, exactly what the
Triton kernels compute with fp32 accumulation. The functions mirror
:mod:`minorsft.kernels.linear` function for function and argument for argument; the
autograd formula is the custom ops' in :mod:`minorsft.ops`.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Tuple

import torch

DEFAULT_MEMORY_BUDGET = 128 << 20
# fp32 [R, V] buffers alive at once: one. The forward's logsumexp and the backward's
# gradient are formed in place in the chunk's logits.
_TEMPS_PER_ROW = 1


def memory_budget_bytes(memory_budget: Optional[int] = None) -> int:
    """The byte budget for a chunk's ``[R, V]`` fp32 temporaries."""
    if memory_budget is None:
        memory_budget = int(os.environ.get("MINORSFT_LINEAR_CHUNK_BYTES", DEFAULT_MEMORY_BUDGET))
    if int(memory_budget) <= 0:
        raise ValueError(f"memory_budget: must be a positive number of bytes, got {memory_budget}")
    return int(memory_budget)


def chunk_rows(vocab: int, memory_budget: Optional[int] = None) -> int:
    """Token rows per chunk so that ``_TEMPS_PER_ROW`` fp32 ``[R, V]`` buffers fit the budget."""
    return max(1, memory_budget_bytes(memory_budget) // (vocab * 4 * _TEMPS_PER_ROW))


class _Rows:
    """Row access to a ``[B, T, H]`` tensor (any strides) as if it were ``[N, H]``.

    A flattening view is used when the strides allow it; otherwise (e.g.
    ``hidden[:, :-1]``) each chunk is assembled from per-sequence views, so at most
    one chunk is ever copied, never the whole tensor.
    """

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.T = x.shape[1]
        try:
            self.flat = x.view(-1, x.shape[-1])
        except RuntimeError:
            self.flat = None

    def __call__(self, n0: int, n1: int) -> torch.Tensor:
        if self.flat is not None:
            return self.flat[n0:n1]
        T = self.T
        parts = []
        n = n0
        while n < n1:
            b, t = divmod(n, T)
            t1 = min(T, t + (n1 - n))
            parts.append(self.x[b, t:t1])
            n += t1 - t
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


def _spans(N: int, rows: int) -> Iterator[Tuple[int, int]]:
    for n0 in range(0, N, rows):
        yield n0, min(N, n0 + rows)


def _fp32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.to(torch.float32)


def _chunk_logits(h: torch.Tensor, w32: torch.Tensor, b32: Optional[torch.Tensor],
                  temperature: float) -> torch.Tensor:
    """``[R, H]`` hidden rows -> ``[R, V]`` fp32 logits divided by the temperature."""
    h = h.to(torch.float32)
    z = torch.addmm(b32, h, w32.t()) if b32 is not None else h @ w32.t()
    if temperature != 1.0:
        z.mul_(1.0 / temperature)
    return z


def linear_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    memory_budget: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the labels under ``softmax((hidden @ weight^T + bias) / tau)``.

    Args:
        hidden: ``[B, T, H]`` bf16/fp16/fp32, any strides.
        weight: ``[V, H]``, same dtype as ``hidden``.
        labels: ``[B, T]`` integer, aligned with ``hidden``.
        bias: optional ``[V]``.
    Returns:
        ``(lp, lse)``: ``[B, T]`` fp32 each (contiguous). ``lp`` is 0 where masked and
        NaN for a label outside ``[0, V)``; ``lse`` is 0 where masked.
    """
    B, T, _ = hidden.shape
    V = weight.shape[0]
    N = B * T
    dev = hidden.device
    lp = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    if N == 0:
        return lp.view(B, T), lse.view(B, T)
    rows = _Rows(hidden)
    y_all = labels.reshape(-1)
    w32, b32 = _fp32(weight), _fp32(bias)
    for n0, n1 in _spans(N, chunk_rows(V, memory_budget)):
        y = y_all[n0:n1].long()
        keep = y != ignore_index
        ok = (y >= 0) & (y < V)
        z = _chunk_logits(rows(n0, n1), w32, b32, temperature)
        tgt = z.gather(1, torch.where(ok, y, torch.zeros_like(y))[:, None]).squeeze(1)
        mx = z.amax(dim=1)
        s = z.sub_(mx[:, None]).exp_().sum(dim=1).log_().add_(mx)   # logsumexp, in place
        del z
        lp_c = torch.where(ok, tgt - s, torch.full_like(s, float("nan")))
        zero = torch.zeros_like(s)
        lp[n0:n1] = torch.where(keep, lp_c, zero)
        lse[n0:n1] = torch.where(keep, s, zero)
    return lp.view(B, T), lse.view(B, T)


def linear_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_lp: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
    memory_budget: Optional[int] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of ``sum(grad_lp * lp)`` with respect to hidden, weight and bias.

    Args:
        hidden, weight, labels, bias: as given to :func:`linear_logprobs_forward`.
        lse: ``[B, T]`` fp32 from the forward.
        grad_lp: ``[B, T]`` upstream gradient of the per-token log-probs (any strides).
        need_*: which gradients to form (``None`` is returned for the others).
    Returns:
        ``(d_hidden [B, T, H] in hidden's dtype, d_weight [V, H] in weight's dtype,
        d_bias [V] in bias's dtype)``. ``d_weight``/``d_bias`` are accumulated in fp32
        over all chunks and rounded once. Masked rows and rows with ``grad_lp == 0``
        contribute exactly 0 (no ``NaN * 0``).
    """
    B, T, H = hidden.shape
    V = weight.shape[0]
    N = B * T
    dev = hidden.device
    need_bias = need_bias and bias is not None
    dh = torch.empty((B, T, H), dtype=hidden.dtype, device=dev) if need_hidden else None
    dw = torch.zeros((V, H), dtype=torch.float32, device=dev) if need_weight else None
    db = torch.zeros((V,), dtype=torch.float32, device=dev) if need_bias else None
    if N > 0 and (need_hidden or need_weight or need_bias):
        rows = _Rows(hidden)
        dh_flat = dh.view(N, H) if need_hidden else None
        y_all = labels.reshape(-1)
        g_all = grad_lp.reshape(-1)
        lse_all = lse.reshape(-1)
        w32, b32 = _fp32(weight), _fp32(bias)
        for n0, n1 in _spans(N, chunk_rows(V, memory_budget)):
            y = y_all[n0:n1].long()
            g = g_all[n0:n1].to(torch.float32)
            ok = (y >= 0) & (y < V)
            live = (y != ignore_index) & (g != 0)
            h = rows(n0, n1)
            G = _chunk_logits(h, w32, b32, temperature)
            G.sub_(lse_all[n0:n1, None]).exp_().neg_()              # -p
            hit = torch.where(ok, y, torch.zeros_like(y))[:, None]
            G.scatter_add_(1, hit, ok.to(G.dtype)[:, None])          # 1 - p at the label, fp32
            coef = torch.where(live, g / temperature, torch.zeros_like(g))
            G.mul_(coef[:, None])
            G.masked_fill_(~live[:, None], 0.0)                      # no NaN * 0 on skipped rows
            if need_hidden:
                dh_flat[n0:n1] = (G @ w32).to(dh.dtype)
            if need_weight:
                dw.addmm_(G.t(), h.to(torch.float32))
            if need_bias:
                db += G.sum(0)
            del G
    elif need_hidden:
        dh.zero_()
    if dw is not None and weight.dtype != torch.float32:
        dw = dw.to(weight.dtype)
    if db is not None and bias.dtype != torch.float32:
        db = db.to(bias.dtype)
    return dh, dw, db

