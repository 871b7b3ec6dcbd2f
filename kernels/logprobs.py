"""Token log-prob kernels for the logits path: one streaming pass per row.

Forward (one program per token row ``n = b * T + t``)::

    lse[n] = logsumexp_v(z[n, v] / tau)        online, fp32, exp2 form
    lp[n]  = z[n, y[n]] / tau - lse[n]         0 where y[n] == ignore_index
    ref_lp[n]  likewise from the reference row, in the same program (HAS_REF)

Bytes per unmasked token (bf16, vocabulary V): the policy row is read once (2V) and,
with reference logits, the reference row once (2V); the outputs are 12 bytes. A
masked row reads nothing but its label. The eager formula instead writes and
re-reads an fp32 ``[N, V]`` log-softmax (8V more bytes each way per tensor).

Backward: with ``g[n] = dLoss/dlp[n]`` (any upstream gradient, already containing the
per-sequence loss coefficient) and ``p = softmax(z / tau)`` recomputed from the saved
``lse``::

    dLoss/dz[n, v] = g[n] / tau * (1[v == y[n]] - p[n, v])

computed in fp32 (the target column ``1 - p`` before rounding) and written once in
the logits dtype: 2V read + 2V write per row. Rows that are masked or whose
coefficient is exactly 0 (e.g. MinorDPO's rejected rows with a negative log-ratio)
skip the read and write zeros. With ``out=logits`` the gradient overwrites the
logits buffer in place (opt-in by the caller).

Offsets are int64: ``N * V`` passes 2^31 elements at real sizes (20k tokens x 128k
vocabulary). Every stride is passed, so ``logits[:, :-1]`` needs no copy. A label
outside ``[0, V)`` is never used as an address: it yields a NaN log-prob.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Default launch configuration (all architectures until tuned on hardware): a
# vocabulary block of up to 4096 elements (8 KiB of bf16 per load, enough bytes in
# flight per SM to saturate HBM) and 8 warps. Overridable for experiments and tests
# through MINORSFT_BLOCK_V / MINORSFT_NUM_WARPS; never probed at import time.
DEFAULT_BLOCK_V = 4096
DEFAULT_NUM_WARPS = 8


def launch_config(vocab: int, block_v: Optional[int] = None) -> Tuple[int, int]:
    """Return ``(BLOCK_V, num_warps)`` for a vocabulary of ``vocab`` entries."""
    block = block_v or int(os.environ.get("MINORSFT_BLOCK_V", DEFAULT_BLOCK_V))
    block = min(triton.next_power_of_2(block), triton.next_power_of_2(vocab))
    warps = int(os.environ.get("MINORSFT_NUM_WARPS", DEFAULT_NUM_WARPS))
    return max(block, 16), warps


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Output buffer; NaN-poisoned when MINORSFT_DEBUG_POISON=1 (tests) so that an
    element the kernel forgets to write shows up."""
    if os.environ.get("MINORSFT_DEBUG_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _cast_out(x, dtype: tl.constexpr):
    """fp32 -> output dtype, round-to-nearest-even for every dtype.

    bf16 is rounded by hand (add 0x7FFF plus the lsb, keep the high half): the
    Triton CPU interpreter truncates fp32 -> bf16 where the GPU rounds, so doing it
    explicitly makes both give the same bits. NaN stays NaN, overflow gives inf.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = tl.where(x != x, 0x7FC00000, bits)   # a NaN payload could carry into the sign
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _row_lse2(row_ptr, stride_v, V, scale2, BLOCK_V: tl.constexpr):
    """logsumexp of ``row * scale2`` in base 2 (``scale2 = log2(e) / tau``), fp32.

    Online form: per block, one max reduction, one exp2 per element, one sum.
    """
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(row_ptr + cols.to(tl.int64) * stride_v, mask=cols < V,
                    other=float("-inf")).to(tl.float32) * scale2
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new), 0)
        m = m_new
    return m + tl.log2(s)


@triton.jit
def _row_logprob(row_ptr, stride_v, V, y, y_ok, scale2, BLOCK_V: tl.constexpr):
    """(target log-prob, natural-log lse) of one row; NaN log-prob if ``y_ok`` is false."""
    lse2 = _row_lse2(row_ptr, stride_v, V, scale2, BLOCK_V)
    tgt = tl.load(row_ptr + y * stride_v, mask=y_ok, other=float("nan")).to(tl.float32)
    return (tgt * scale2 - lse2) * LN2, lse2 * LN2


@triton.heuristics({"HAS_REF": lambda args: args["ref_ptr"] is not None})
@triton.jit
def _logprobs_fwd_kernel(
    # pointers
    logits_ptr, ref_ptr, labels_ptr,        # [B, T, V], [B, T, V] or None, [B, T] int
    lp_ptr, lse_ptr, ref_lp_ptr,            # [B, T] fp32 outputs (contiguous)
    # shapes
    T, V,
    # strides, in elements
    stride_zb, stride_zt, stride_zv,
    stride_rb, stride_rt, stride_rv,
    stride_yb, stride_yt,
    # runtime scalars (not constexpr: changing them never recompiles)
    ignore_index, scale2,
    # flags
    HAS_REF: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # int64 row index: b * stride_zb overflows int32 once N * V passes 2^31.
    n = tl.program_id(0).to(tl.int64)
    b = n // T
    t = n % T
    y = tl.load(labels_ptr + b * stride_yb + t * stride_yt).to(tl.int64)
    if y == ignore_index:
        # Masked token: no logits are read.
        tl.store(lp_ptr + n, 0.0)
        tl.store(lse_ptr + n, 0.0)
        if HAS_REF:
            tl.store(ref_lp_ptr + n, 0.0)
        return
    y_ok = (y >= 0) & (y < V)
    y_safe = tl.where(y_ok, y, 0)
    lp, lse = _row_logprob(logits_ptr + b * stride_zb + t * stride_zt, stride_zv, V,
                           y_safe, y_ok, scale2, BLOCK_V)
    tl.store(lp_ptr + n, lp)
    tl.store(lse_ptr + n, lse)
    if HAS_REF:
        ref_lp, _ = _row_logprob(ref_ptr + b * stride_rb + t * stride_rt, stride_rv, V,
                                 y_safe, y_ok, scale2, BLOCK_V)
        tl.store(ref_lp_ptr + n, ref_lp)


@triton.jit
def _logprobs_bwd_kernel(
    # pointers
    logits_ptr, labels_ptr, lse_ptr, glp_ptr,   # [B, T, V], [B, T] int, [B, T] fp32 x2
    grad_ptr,                                   # [B, T, V] output (may alias logits)
    # shapes
    T, V,
    # strides, in elements
    stride_zb, stride_zt, stride_zv,
    stride_yb, stride_yt,
    stride_gb, stride_gt,                       # upstream gradient (may be 0: expanded)
    stride_db, stride_dt, stride_dv,            # output gradient
    # runtime scalars
    ignore_index, scale2, inv_temp,
    BLOCK_V: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    b = n // T
    t = n % T
    y = tl.load(labels_ptr + b * stride_yb + t * stride_yt).to(tl.int64)
    g = tl.load(glp_ptr + b * stride_gb + t * stride_gt).to(tl.float32)
    row_out = grad_ptr + b * stride_db + t * stride_dt
    offs = tl.arange(0, BLOCK_V)
    if (y == ignore_index) | (g == 0.0):
        # Zero coefficient: the gradient row is exactly 0, nothing to read.
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            tl.store(row_out + cols.to(tl.int64) * stride_dv,
                     _cast_out(tl.zeros((BLOCK_V,), tl.float32), grad_ptr.dtype.element_ty),
                     mask=cols < V)
        return
    row_in = logits_ptr + b * stride_zb + t * stride_zt
    lse2 = tl.load(lse_ptr + n) * LOG2E
    gs = g * inv_temp
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        cmask = cols < V
        x = tl.load(row_in + cols.to(tl.int64) * stride_zv, mask=cmask, other=0.0).to(tl.float32)
        p = tl.exp2(x * scale2 - lse2)
        d = tl.where(cols == y, 1.0 - p, -p)   # target column in fp32, before rounding
        tl.store(row_out + cols.to(tl.int64) * stride_dv,
                 _cast_out(gs * d, grad_ptr.dtype.element_ty), mask=cmask)


def logprobs_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logits: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    block_v: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the labels.

    Args:
        logits: ``[B, T, V]`` bf16/fp16/fp32, any strides.
        labels: ``[B, T]`` integer, aligned with ``logits``.
        ref_logits: optional ``[B, T, V]`` reference logits (any float dtype, strides).
    Returns:
        ``(lp, lse, ref_lp)``: ``[B, T]`` fp32 each (contiguous); ``lp``/``ref_lp`` are 0
        where masked; ``ref_lp`` is an empty tensor when ``ref_logits`` is None.
    """
    B, T, V = logits.shape
    dev = logits.device
    lp = _alloc((B, T), torch.float32, dev)
    lse = _alloc((B, T), torch.float32, dev)
    has_ref = ref_logits is not None
    ref_lp = _alloc((B, T) if has_ref else (0,), torch.float32, dev)
    if B * T == 0:
        return lp, lse, ref_lp
    block, warps = launch_config(V, block_v)
    rs = ref_logits.stride() if has_ref else (0, 0, 0)
    _logprobs_fwd_kernel[(B * T,)](
        logits, ref_logits, labels, lp, lse, ref_lp,
        T, V,
        *logits.stride(), *rs, *labels.stride(),
        ignore_index, LOG2E / temperature,
        BLOCK_V=block, num_warps=warps,
    )
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
    block_v: Optional[int] = None,
) -> torch.Tensor:
    """Gradient of the loss with respect to the logits.

    Args:
        logits: ``[B, T, V]`` as given to :func:`logprobs_forward`.
        labels: ``[B, T]``.
        lse: ``[B, T]`` fp32 from the forward.
        grad_lp: ``[B, T]`` upstream gradient of the per-token log-probs (any strides).
        out: ``[B, T, V]`` destination; ``out=logits`` writes in place. Default: a new
            tensor of ``logits``' dtype.
    Returns:
        ``out``, holding ``grad_lp / tau * (onehot(labels) - softmax(logits / tau))``
        (zero rows where masked).
    """
    B, T, V = logits.shape
    if out is None:
        out = _alloc((B, T, V), logits.dtype, logits.device)
    if B * T == 0:
        return out
    block, warps = launch_config(V, block_v)
    _logprobs_bwd_kernel[(B * T,)](
        logits, labels, lse, grad_lp, out,
        T, V,
        *logits.stride(), *labels.stride(), *grad_lp.stride(), *out.stride(),
        ignore_index, LOG2E / temperature, 1.0 / temperature,
        BLOCK_V=block, num_warps=warps,
    )
    return out
