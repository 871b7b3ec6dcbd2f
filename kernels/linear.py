"""Fused linear log-prob kernels: hidden states and lm_head weight in, per-token
log-probs out, with no ``[N, V]`` logits buffer in either direction.

Token rows ``n = b * T + t`` (``N = B * T``), hidden ``h [B, T, H]``, weight
``W [V, H]``, optional bias ``c [V]``, temperature ``tau``, ``z = (h W^T + c) / tau``.

Forward (one program per block of ``BLOCK_N`` rows; it sweeps the vocabulary in
``BLOCK_V`` tiles, each tile a ``tl.dot`` over ``H`` in ``BLOCK_H`` slices)::

    lse[n] = logsumexp_v z[n, v]        online across vocabulary tiles, fp32, exp2 form
    lp[n]  = z[n, y[n]] - lse[n]        0 where y[n] == ignore_index

The label logit is picked out of the very fp32 tile the logsumexp consumes (a
compare-and-sum over the tile, no extra memory traffic), so ``lp <= 0`` holds to
rounding and no second pass over ``W[y]`` is needed.

Backward (one program per ``(BLOCK_N rows) x (BLOCK_V columns)`` tile): with
``g[n] = dLoss/dlp[n]`` (the per-sequence loss coefficient is already inside) and
``p = exp(z - lse)`` recomputed from the saved ``lse``::

    G[n, v] = g[n] / tau * (1[v == y[n]] - p[n, v])       fp32, in registers only
    dH[n, :] += G[n, tile] @ W[tile, :]                     fp32 atomics
    dW[tile, :] += G[n, tile]^T @ h[n, :]                   fp32 atomics
    dc[tile] += sum_n G[n, tile]                            fp32 atomics

``G`` is formed in fp32 (the target column ``1 - p`` before any rounding) and only
rounded to the input dtype as the ``tl.dot`` operand, the same rounding the eager
formula applies to its logits gradient. ``dW``/``dc`` accumulate in fp32 buffers over
all token tiles (no bf16 drift); they are rounded once by the launcher. A tile whose
rows are all masked, or whose coefficients are all exactly 0 (e.g. MinorDPO's
rejected rows with a negative log-ratio), returns before reading anything: an
exact skip, not an approximation.

Bytes: the forward reads each ``W`` tile once per row block (the GEMM's own traffic)
and writes 8 bytes per token; the backward reads ``h`` and ``W`` twice per tile
(logits recompute + gradient products) and issues fp32 atomic adds of
``4 N V H (1/BLOCK_N + 1/BLOCK_V)`` bytes in all (the likely bottleneck; untuned).
Nothing of size ``N x V`` is ever written. For low-precision inputs the launcher keeps
one whole fp32 accumulator, dH or dW, whichever is smaller (see :func:`linear_backward`).

Offsets are int64: ``b * stride_b`` and ``v * stride_v`` pass 2^31 at real sizes
(128k tokens x 2048 hidden, 128k vocabulary x 2048). Every stride is passed, so
``hidden[:, :-1]`` needs no copy. A label outside ``[0, V)`` is never used as an
address (it is only compared), so it cannot read out of bounds: it yields a NaN
log-prob.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import LN2, LOG2E, alloc_output as _alloc, device_guard

# Inside @triton.jit code a global must be a constexpr (a plain float global is a
# compile error on the GPU that the CPU interpreter does not report).
LN2_C = tl.constexpr(LN2)
LOG2E_C = tl.constexpr(LOG2E)


# Default launch configuration (untuned until measured on hardware): 64 token rows x
# 128 vocabulary columns per tile, 64 hidden elements per tl.dot slice, 8 warps.
# Overridable for experiments and the interpreter tests through MINORSFT_LINEAR_BLOCK_N,
# MINORSFT_LINEAR_BLOCK_V, MINORSFT_LINEAR_BLOCK_H and MINORSFT_LINEAR_NUM_WARPS; never
# probed at import time.
DEFAULT_BLOCK_N = 64
DEFAULT_BLOCK_V = 128
DEFAULT_BLOCK_H = 64
DEFAULT_NUM_WARPS = 8
# Low-precision backward: launches cover at most this many token rows (when dW is the
# whole fp32 buffer) or vocabulary columns (when dH is), bounding the fp32 staging
# buffer of the other gradient (32k x 2048 x 4 B = 256 MiB, 16k x 2048 x 4 B = 128 MiB).
DEFAULT_BWD_ROWS = 32768
DEFAULT_BWD_VOCAB = 16384
# Tiles of the backward grid grouped along the token axis so that concurrently
# running programs share W tiles in L2.
GROUP_N = 8


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _staging(memory_budget: Optional[int], H: int) -> int:
    """Rows (or columns) of an fp32 ``[*, H]`` staging buffer that fit ``memory_budget``."""
    return max(1, memory_budget // (4 * H)) if memory_budget else 0


def launch_config(N: int, V: int, H: int) -> Tuple[int, int, int, int]:
    """Return ``(BLOCK_N, BLOCK_V, BLOCK_H, num_warps)``; every block >= 16 (tl.dot)."""
    bn = _env_int("MINORSFT_LINEAR_BLOCK_N", DEFAULT_BLOCK_N)
    bv = _env_int("MINORSFT_LINEAR_BLOCK_V", DEFAULT_BLOCK_V)
    bh = _env_int("MINORSFT_LINEAR_BLOCK_H", DEFAULT_BLOCK_H)
    warps = _env_int("MINORSFT_LINEAR_NUM_WARPS", DEFAULT_NUM_WARPS)

    def fit(block: int, size: int) -> int:
        return max(16, min(triton.next_power_of_2(block), triton.next_power_of_2(max(size, 1))))

    return fit(bn, N), fit(bv, V), fit(bh, H), warps


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact ``ieee`` for fp32 inputs unless
    ``MINORSFT_ALLOW_TF32=1``; irrelevant for bf16/fp16 (products are exact in fp32)."""
    if dtype == torch.float32 and os.environ.get("MINORSFT_ALLOW_TF32") != "1":
        return "ieee"
    return "tf32"


def dot_upcast(dtype: torch.dtype) -> bool:
    """True when ``tl.dot`` operands must be upcast to fp32 before the product.

    Only under ``TRITON_INTERPRET=1`` with bf16: the interpreter stores bf16 as raw
    uint16 and its ``dot`` multiplies those integers. The upcast is exact (a bf16
    value is an fp32 value), so the result matches the GPU's bf16 x bf16 -> fp32 dot
    up to summation order.
    """
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"



@triton.jit
def _operand(x, DOT_UPCAST: tl.constexpr):
    """A ``tl.dot`` operand as loaded, or upcast to fp32 (see :func:`dot_upcast`)."""
    if DOT_UPCAST:
        return x.to(tl.float32)
    return x


@triton.jit
def _logits_tile(h_rows, row_live, stride_hh, w_ptr, cols, col_ok, stride_wv, stride_wh,
                 c_ptr, stride_cv, H,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """fp32 ``[BLOCK_N, BLOCK_V]`` tile of ``h W^T + c`` (no temperature yet).

    ``h_rows``: ``[BLOCK_N]`` int64 row base pointers; rows with ``row_live`` false
    are not read (they load as 0).
    """
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_H).to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        k = h0 + ks
        k_ok = k < H
        a = tl.load(h_rows[:, None] + k[None, :] * stride_hh,
                    mask=row_live[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_wv + k[:, None] * stride_wh,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(_operand(a, DOT_UPCAST), _operand(w, DOT_UPCAST), acc,
                     input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(c_ptr + cols * stride_cv, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.heuristics({"HAS_BIAS": lambda args: args["c_ptr"] is not None})
@triton.jit
def _linear_fwd_kernel(
    # pointers
    h_ptr, w_ptr, c_ptr, y_ptr,          # [B, T, H], [V, H], [V] or None, [B, T] int
    lp_ptr, lse_ptr,                     # [N] fp32 outputs (contiguous)
    # shapes
    N, T, V, H,
    # strides, in elements
    stride_hb, stride_ht, stride_hh,
    stride_wv, stride_wh,
    stride_cv,
    stride_yb, stride_yt,
    # runtime scalars (not constexpr: changing them never recompiles)
    ignore_index, scale2,                # scale2 = log2(e) / tau
    # flags and tiles
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # int64 rows: b * stride_hb passes 2^31 elements at long context.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    b = rows // T
    t = rows % T
    y = tl.load(y_ptr + b * stride_yb + t * stride_yt, mask=row_ok, other=ignore_index).to(tl.int64)
    keep = row_ok & (y != ignore_index)
    y_ok = (y >= 0) & (y < V)
    zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if tl.max(keep.to(tl.int32), 0) == 0:
        # A block of masked (prompt) tokens: nothing but the labels is read.
        tl.store(lp_ptr + rows, zero, mask=row_ok)
        tl.store(lse_ptr + rows, zero, mask=row_ok)
        return
    h_rows = h_ptr + b * stride_hb + t * stride_ht
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tgt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    vs = tl.arange(0, BLOCK_V).to(tl.int64)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + vs
        col_ok = cols < V
        x = _logits_tile(h_rows, keep, stride_hh, w_ptr, cols, col_ok, stride_wv, stride_wh,
                         c_ptr, stride_cv, H, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H,
                         DOT_PRECISION, DOT_UPCAST) * scale2
        x = tl.where(col_ok[None, :], x, float("-inf"))
        tgt += tl.sum(tl.where(cols[None, :] == y[:, None], x, 0.0), 1)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)   # an all -inf tile: no NaN
        s = s * tl.exp2(m - m_ref) + tl.sum(tl.exp2(x - m_ref[:, None]), 1)
        m = m_new
    lse2 = m + tl.log2(s)
    lp = tl.where(y_ok, (tgt - lse2) * LN2_C, float("nan"))
    tl.store(lp_ptr + rows, tl.where(keep, lp, zero), mask=row_ok)
    tl.store(lse_ptr + rows, tl.where(keep, lse2 * LN2_C, zero), mask=row_ok)


@triton.heuristics({
    "HAS_BIAS": lambda args: args["c_ptr"] is not None,
    "NEED_DH": lambda args: args["dh_ptr"] is not None,
    "NEED_DW": lambda args: args["dw_ptr"] is not None,
    "NEED_DC": lambda args: args["dc_ptr"] is not None,
})
@triton.jit
def _linear_bwd_kernel(
    # pointers
    h_ptr, w_ptr, c_ptr, y_ptr,          # as in the forward
    lse_ptr, g_ptr,                      # [N] fp32 saved lse (contiguous), [B, T] upstream grad
    dh_ptr, dw_ptr, dc_ptr,              # fp32 accumulators (contiguous): [n1 - n0, H], [v1 - v0, H], [V]
    # shapes: this launch covers token rows [n0, n1) x vocabulary columns [v0, v1)
    n0, n1, v0, v1, T, V, H,
    # strides, in elements
    stride_hb, stride_ht, stride_hh,
    stride_wv, stride_wh,
    stride_cv,
    stride_yb, stride_yt,
    stride_gb, stride_gt,                # upstream gradient (0 when expanded)
    # runtime scalars
    ignore_index, scale2, inv_temp,
    # flags and tiles
    HAS_BIAS: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
    NEED_DC: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP: tl.constexpr,
):
    # Grouped tile order: GROUP consecutive row blocks walk the vocabulary together.
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(n1 - n0, BLOCK_N)
    v_blocks = tl.cdiv(v1 - v0, BLOCK_V)
    per_group = GROUP * v_blocks
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_blocks - first, GROUP)
    pid_n = first + (pid % per_group) % size
    pid_v = (pid % per_group) // size

    local = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rows = n0 + local
    row_ok = rows < n1
    b = rows // T
    t = rows % T
    y = tl.load(y_ptr + b * stride_yb + t * stride_yt, mask=row_ok, other=ignore_index).to(tl.int64)
    g = tl.load(g_ptr + b * stride_gb + t * stride_gt, mask=row_ok, other=0.0).to(tl.float32)
    live = row_ok & (y != ignore_index) & (g != 0.0)
    if tl.max(live.to(tl.int32), 0) == 0:
        # Every coefficient in this tile is exactly 0: its gradient is exactly 0.
        return
    coef = tl.where(live, g * inv_temp, 0.0)
    lse2 = tl.load(lse_ptr + rows, mask=live, other=0.0) * LOG2E_C

    cols = v0 + pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    col_ok = cols < v1
    h_rows = h_ptr + b * stride_hb + t * stride_ht
    x = _logits_tile(h_rows, live, stride_hh, w_ptr, cols, col_ok, stride_wv, stride_wh,
                     c_ptr, stride_cv, H, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
                     DOT_UPCAST)
    p = tl.exp2(x * scale2 - lse2[:, None])
    d = tl.where(cols[None, :] == y[:, None], 1.0 - p, -p)      # target column in fp32
    G = tl.where(live[:, None] & col_ok[None, :], coef[:, None] * d, 0.0)

    if NEED_DC:
        tl.atomic_add(dc_ptr + cols, tl.sum(G, 0), mask=col_ok, sem="relaxed")
    Gq = _operand(G.to(h_ptr.dtype.element_ty), DOT_UPCAST)   # rounded like eager's grad
    ks = tl.arange(0, BLOCK_H).to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        k = h0 + ks
        k_ok = k < H
        if NEED_DH:
            w = tl.load(w_ptr + cols[:, None] * stride_wv + k[None, :] * stride_wh,
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            part = tl.dot(Gq, _operand(w, DOT_UPCAST), input_precision=DOT_PRECISION)             # [BLOCK_N, BLOCK_H]
            tl.atomic_add(dh_ptr + local[:, None] * H + k[None, :], part,
                          mask=live[:, None] & k_ok[None, :], sem="relaxed")
        if NEED_DW:
            a = tl.load(h_rows[:, None] + k[None, :] * stride_hh,
                        mask=live[:, None] & k_ok[None, :], other=0.0)
            part = tl.dot(tl.trans(Gq), _operand(a, DOT_UPCAST), input_precision=DOT_PRECISION)  # [BLOCK_V, BLOCK_H]
            tl.atomic_add(dw_ptr + (cols - v0)[:, None] * H + k[None, :], part,
                          mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")


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
        weight: ``[V, H]``, same dtype, any strides.
        labels: ``[B, T]`` integer, any strides.
        bias: optional ``[V]``.
        memory_budget: accepted for the backends' common signature; the forward tiles
            hold no buffer that grows with the budget.
    Returns:
        ``(lp, lse)``: ``[B, T]`` fp32 each (contiguous). ``lp`` is 0 where masked and
        NaN for a label outside ``[0, V)``; ``lse`` is 0 where masked.
    """
    B, T, H = hidden.shape
    V = weight.shape[0]
    N = B * T
    lp = _alloc((B, T), torch.float32, hidden.device)
    lse = _alloc((B, T), torch.float32, hidden.device)
    if N == 0:
        return lp, lse
    bn, bv, bh, warps = launch_config(N, V, H)
    with device_guard(hidden):
        _linear_fwd_kernel[(triton.cdiv(N, bn),)](
            hidden, weight, bias, labels, lp, lse,
            N, T, V, H,
            *hidden.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0,
            *labels.stride(),
            ignore_index, LOG2E / temperature,
            DOT_PRECISION=dot_precision(hidden.dtype), DOT_UPCAST=dot_upcast(hidden.dtype),
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=warps,
        )
    return lp, lse


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
        hidden, weight, labels, bias: as given to :func:`linear_forward`.
        lse: ``[B, T]`` fp32 from :func:`linear_forward` (contiguous).
        grad_lp: ``[B, T]`` upstream gradient of the log-probs (any strides, may be expanded).
        need_*: which gradients to form (``None`` is returned for the others).
        memory_budget: bytes of the fp32 staging buffer of the low-precision paths
            below (``budget / (4 H)`` token rows or vocabulary columns per launch);
            default ``DEFAULT_BWD_ROWS`` rows / ``DEFAULT_BWD_VOCAB`` columns.

    fp32 accumulation of low-precision gradients needs one whole fp32 buffer, either dH
    or dW; the launcher keeps the smaller one: with ``N < V`` tokens a whole fp32 dH
    (``4 N H`` bytes) and the vocabulary in slices of fp32 dW, otherwise a whole fp32
    dW (``4 V H`` bytes) and the tokens in chunks of fp32 dH. Each fp32 value is rounded
    once, at the end of its accumulation.
    Returns:
        ``(d_hidden [B, T, H] in hidden's dtype, d_weight [V, H] in weight's dtype,
        d_bias [V] in bias's dtype)``, accumulated in fp32 and rounded once.
    """
    B, T, H = hidden.shape
    V = weight.shape[0]
    N = B * T
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    need_bias = need_bias and bias is not None
    dh = torch.zeros((B, T, H), dtype=hidden.dtype, device=dev) if need_hidden else None
    dw = torch.zeros((V, H), dtype=weight.dtype, device=dev) if need_weight else None
    dc = torch.zeros((V,), **f32) if need_bias else None
    if N == 0 or not (need_hidden or need_weight or need_bias):
        return dh, dw, (dc.to(bias.dtype) if dc is not None else None)
    lse = lse.contiguous()
    bn, bv, bh, warps = launch_config(N, V, H)
    dh_flat = dh.view(N, H) if need_hidden else None
    lowp = hidden.dtype != torch.float32

    def launch(n0, n1, v0, v1, dh_acc, dw_acc):
        grid = (triton.cdiv(n1 - n0, bn) * triton.cdiv(v1 - v0, bv),)
        with device_guard(hidden):
            _linear_bwd_kernel[grid](
                hidden, weight, bias, labels, lse, grad_lp,
                dh_acc, dw_acc, dc,
                n0, n1, v0, v1, T, V, H,
                *hidden.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0,
                *labels.stride(), *grad_lp.stride(),
                ignore_index, LOG2E / temperature, 1.0 / temperature,
                DOT_PRECISION=dot_precision(hidden.dtype), DOT_UPCAST=dot_upcast(hidden.dtype),
                BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, GROUP=GROUP_N, num_warps=warps,
            )

    if not lowp:
        # fp32 inputs: the outputs are the fp32 accumulators, one launch.
        launch(0, N, 0, V, dh_flat, dw)
    elif N < V:
        # Fewer tokens than vocabulary entries: a whole fp32 dH (4 N H bytes) and the
        # vocabulary in slices, each slice's fp32 dW rounded once into dw.
        vstep = max(bv, _staging(memory_budget, H) or _env_int("MINORSFT_LINEAR_BWD_VOCAB", DEFAULT_BWD_VOCAB))
        dh32 = torch.zeros((N, H), **f32) if need_hidden else None
        dw32 = torch.empty((min(vstep, V), H), **f32) if need_weight else None
        for v0 in range(0, V, vstep):
            v1 = min(V, v0 + vstep)
            acc = dw32[: v1 - v0].zero_() if need_weight else None
            launch(0, N, v0, v1, dh32, acc)
            if need_weight:
                dw[v0:v1] = acc.to(dw.dtype)
        if need_hidden:
            dh_flat.copy_(dh32)
    else:
        # At least as many tokens as vocabulary entries: a whole fp32 dW (4 V H bytes)
        # and the tokens in chunks, each chunk's fp32 dH rounded once into dh.
        nstep = max(bn, _staging(memory_budget, H) or _env_int("MINORSFT_LINEAR_BWD_ROWS", DEFAULT_BWD_ROWS))
        dw32 = torch.zeros((V, H), **f32) if need_weight else None
        dh32 = torch.empty((min(nstep, N), H), **f32) if need_hidden else None
        for n0 in range(0, N, nstep):
            n1 = min(N, n0 + nstep)
            acc = dh32[: n1 - n0].zero_() if need_hidden else None
            launch(n0, n1, 0, V, acc, dw32)
            if need_hidden:
                dh_flat[n0:n1] = acc.to(dh.dtype)
        if need_weight:
            dw.copy_(dw32)
    if dc is not None and bias.dtype != torch.float32:
        dc = dc.to(bias.dtype)
    return dh, dw, dc
