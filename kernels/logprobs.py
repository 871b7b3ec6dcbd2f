"""Token log-prob kernels for the logits path: one streaming pass per row.

Forward (one program per token row ``n = b * T + t``)::

    lse[n] = logsumexp_v(z[n, v] / tau)        online, fp32, exp2 form
    lp[n]  = z[n, y[n]] / tau - lse[n]         0 where y[n] == ignore_index
    ref_lp[n]  likewise from the reference row, in the same program (HAS_REF)

Bytes per unmasked token (bf16, vocabulary V): the policy row is read once (2V) and,
with reference logits, the reference row once (2V); the outputs are 12 bytes. A
masked row reads nothing but its label. The eager formula instead materialises fp32
``[N, V]`` tensors (the upcast, the log-softmax): 4V bytes written and 4V read back per
token for each of them.

With fewer rows than two per SM a row's vocabulary is split over several programs
(grid ``(N, S)``): each writes its chunk's (max, sum-of-exp) partials and the chunk
holding the label writes the target logit; a small ``[N, S]`` merge follows.

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

import functools
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import tuning
from .common import (LN2, LOG2E, alloc_output as _alloc, capturing, device_guard, fold_scales, hand_round,
                     scored_labels)

# Inside @triton.jit code a global must be a constexpr (a plain float global is a
# compile error on the GPU that the CPU interpreter does not report).
LN2_C = tl.constexpr(LN2)
LOG2E_C = tl.constexpr(LOG2E)


# Default launch configuration (all architectures until tuned on hardware): a
# vocabulary block of up to 4096 elements (8 KiB of bf16 per load, enough bytes in
# flight per SM to saturate HBM) and 8 warps. Overridable for experiments and tests
# through MINORSFT_BLOCK_V / MINORSFT_NUM_WARPS; never probed at import time. Opt-in
# autotuning per shape bucket: MINORSFT_AUTOTUNE=1 (kernels/tuning.py).
DEFAULT_BLOCK_V = 4096
DEFAULT_NUM_WARPS = 8


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_config(vocab: int, n_rows: int, device: torch.device,
                  tuned: Optional[Tuple[int, int]] = None) -> Tuple[int, int, int, int]:
    """Return ``(BLOCK_V, num_warps, CHUNK_V, splits)`` for ``n_rows`` rows of ``vocab``.

    With many rows a program owns a whole row (``splits == 1``). With few rows (fewer
    than two per SM) the vocabulary is split into ``splits`` chunks of ``CHUNK_V``
    columns so that about four programs per SM stream the logits; the forward then
    merges the per-chunk (max, sum) partials. ``MINORSFT_SPLIT_V`` forces a split count
    (tests, tuning). ``tuned``: ``(BLOCK_V, num_warps)`` instead of the environment's or
    the default (:mod:`.tuning`).
    """
    block, warps = tuned or (int(os.environ.get("MINORSFT_BLOCK_V", DEFAULT_BLOCK_V)),
                             int(os.environ.get("MINORSFT_NUM_WARPS", DEFAULT_NUM_WARPS)))
    block = max(16, min(triton.next_power_of_2(block), triton.next_power_of_2(vocab)))
    n_blocks = triton.cdiv(vocab, block)
    forced = os.environ.get("MINORSFT_SPLIT_V")
    if forced:
        splits = int(forced)
    elif device.type == "cuda" and n_rows < 2 * _sm_count(device.index or 0):
        splits = triton.cdiv(4 * _sm_count(device.index or 0), max(n_rows, 1))
    else:
        splits = 1
    splits = max(1, min(splits, n_blocks))
    chunk = triton.cdiv(n_blocks, splits) * block
    return block, warps, chunk, triton.cdiv(vocab, chunk)



@triton.jit
def _cast_out(x, dtype: tl.constexpr, HAND_ROUND: tl.constexpr):
    """fp32 -> output dtype, round-to-nearest-even for every dtype.

    On the GPU this is the hardware conversion (``cvt.rn``). The Triton CPU interpreter
    truncates fp32 -> bf16 instead, so there (``HAND_ROUND``) bf16 is rounded by hand:
    add 0x7FFF plus the lsb, keep the high half (about eight integer operations per
    element), which gives the GPU's bits. NaN stays NaN, overflow gives inf.
    """
    if HAND_ROUND and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = tl.where(x != x, 0x7FC00000, bits)   # a NaN payload could carry into the sign
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _tanh(x):
    """tanh in fp32 from exp2 (the same on every GPU and in the interpreter):
    ``sign(x) (1 - 2 / (exp(2|x|) + 1))``; +-1 for large ``|x|``, NaN stays NaN."""
    e = tl.exp2(tl.abs(x) * (2.0 * LOG2E_C))
    t = 1.0 - 2.0 / (e + 1.0)
    return tl.where(x < 0, -t, t)


@triton.jit
def _capped(x, pre_cap, softcap, SOFTCAP: tl.constexpr):
    """The logit the loss sees, before ``scale2``: ``softcap * tanh(x * pre_cap)`` with
    ``pre_cap = logit_scale / softcap`` (Gemma's final_logit_softcapping); else ``x``
    (then the logit scale is folded into ``scale2``)."""
    if SOFTCAP:
        return softcap * _tanh(x * pre_cap)
    else:
        return x


@triton.jit
def _chunk_stats(row_ptr, stride_v, lo, hi, y, y_ok, scale2, pre_cap, softcap,
                 SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """Online max / sum-of-exp2 of ``capped(row[lo:hi]) * scale2`` (``scale2 =
    log2(e) / tau``, times the logit scale without soft-capping).

    Returns ``(m, s, tgt)``: the running max and ``sum exp2(x - m)`` in fp32 (one max
    reduction, one exp2 per element, one sum per block) and the scaled target logit
    when ``y`` lies in ``[lo, hi)`` (NaN when the label is out of range).
    """
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(lo, hi, BLOCK_V):
        cols = start + offs
        cmask = cols < hi
        x = tl.load(row_ptr + cols.to(tl.int64) * stride_v, mask=cmask, other=float("-inf")).to(tl.float32)
        if SOFTCAP:   # tanh(-inf) is finite: keep the padding at -inf
            x = tl.where(cmask, _capped(x, pre_cap, softcap, SOFTCAP), float("-inf"))
        x = x * scale2
        m_new = tl.maximum(m, tl.max(x, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)   # an all -inf block: no NaN
        s = s * tl.exp2(m - m_ref) + tl.sum(tl.exp2(x - m_ref), 0)
        m = m_new
    hit = y_ok & (y >= lo) & (y < hi)
    tgt = tl.load(row_ptr + y * stride_v, mask=hit, other=float("nan")).to(tl.float32)
    return m, s, _capped(tgt, pre_cap, softcap, SOFTCAP) * scale2


@triton.jit
def _store_row(m, s, tgt, n, sp, S, y_ok, hit, out_ptr, lse_ptr, part_ptr, tgt_ptr,
               SPLIT: tl.constexpr):
    """Whole row: write the log-prob (and lse). Split row: write this chunk's (m, s)
    partials and, from the chunk holding the label, the target logit."""
    if SPLIT:
        tl.store(part_ptr + (n * S + sp) * 2, m)
        tl.store(part_ptr + (n * S + sp) * 2 + 1, s)
        tl.store(tgt_ptr + n, tgt, mask=hit | ((sp == 0) & ~y_ok))
    else:
        lse2 = m + tl.log2(s)
        tl.store(out_ptr + n, (tgt - lse2) * LN2_C)
        if lse_ptr is not None:
            tl.store(lse_ptr + n, lse2 * LN2_C)


@triton.heuristics({
    "HAS_REF": lambda args: args["ref_ptr"] is not None,
    "SPLIT": lambda args: args["part_ptr"] is not None,
    "HAS_FLAG": lambda args: args["flag_ptr"] is not None,
    "SOFTCAP": lambda args: args["softcap"] > 0,
})
@triton.jit
def _logprobs_fwd_kernel(
    # pointers
    logits_ptr, ref_ptr, labels_ptr,        # [B, >=T, V], the same or None, [B, T] int
    lp_ptr, lse_ptr, ref_lp_ptr,            # [B, T] fp32 outputs (contiguous); whole rows
    part_ptr, ref_part_ptr, tgt_ptr, ref_tgt_ptr,  # split rows: [N, S, 2] partials, [N] targets
    flag_ptr,                               # int64 [2]: bad-label count, one bad value; or None
    # shapes: T scored positions per sequence (the logits may hold more, e.g. one more
    # with shift: their position t is read with label t from a labels view offset by one)
    T, V, CHUNK_V,                          # CHUNK_V: columns per program (a BLOCK_V multiple)
    # strides, in elements
    stride_zb, stride_zt, stride_zv,
    stride_rb, stride_rt, stride_rv,
    stride_yb, stride_yt,
    # runtime scalars (not constexpr: changing them never recompiles)
    ignore_index, scale2, pre_cap, softcap,  # log2(e)/tau (x logit scale), logit scale/softcap, softcap
    # flags
    HAS_REF: tl.constexpr, SPLIT: tl.constexpr, HAS_FLAG: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # int64 row index: b * stride_zb overflows int32 once N * V passes 2^31.
    n = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)                   # vocabulary chunk (0 unless SPLIT)
    S = tl.num_programs(1)
    b = n // T
    t = n % T
    lo = sp * CHUNK_V
    hi = tl.minimum(lo + CHUNK_V, V)
    y = tl.load(labels_ptr + b * stride_yb + t * stride_yt).to(tl.int64)
    if y == ignore_index:
        # Masked token: no logits are read. (m, s) = (0, 1) gives a finite lse of 0.
        zero = tl.zeros((), tl.float32)
        is_true = y == ignore_index         # a tensor `True`, for the store masks
        _store_row(zero, zero + 1.0, zero, n, sp, S, is_true, sp == 0,
                   lp_ptr, lse_ptr, part_ptr, tgt_ptr, SPLIT)
        if HAS_REF:
            _store_row(zero, zero + 1.0, zero, n, sp, S, is_true, sp == 0,
                       ref_lp_ptr, None, ref_part_ptr, ref_tgt_ptr, SPLIT)
        return
    y_ok = (y >= 0) & (y < V)
    if HAS_FLAG:
        if (~y_ok) & (sp == 0):   # a label that is no token: NaN log-prob, and the flag says so
            tl.atomic_add(flag_ptr, 1, sem="relaxed")
            tl.atomic_xchg(flag_ptr + 1, y, sem="relaxed")
    y_safe = tl.where(y_ok, y, 0)
    hit = y_ok & (y >= lo) & (y < hi)
    m, s, tgt = _chunk_stats(logits_ptr + b * stride_zb + t * stride_zt, stride_zv, lo, hi,
                             y_safe, y_ok, scale2, pre_cap, softcap, SOFTCAP, BLOCK_V)
    _store_row(m, s, tgt, n, sp, S, y_ok, hit, lp_ptr, lse_ptr, part_ptr, tgt_ptr, SPLIT)
    if HAS_REF:
        m, s, tgt = _chunk_stats(ref_ptr + b * stride_rb + t * stride_rt, stride_rv, lo, hi,
                                 y_safe, y_ok, scale2, pre_cap, softcap, SOFTCAP, BLOCK_V)
        _store_row(m, s, tgt, n, sp, S, y_ok, hit, ref_lp_ptr, None, ref_part_ptr, ref_tgt_ptr,
                   SPLIT)


@triton.heuristics({"SOFTCAP": lambda args: args["softcap"] > 0})
@triton.jit
def _logprobs_bwd_kernel(
    # pointers
    logits_ptr, labels_ptr, lse_ptr, glp_ptr,   # [B, T, V], [B, T_LAB] int, [B, T_LAB] fp32 x2
    grad_ptr,                                   # [B, T, V] output (may alias logits)
    # shapes: rows t >= T_LAB (the last one with shift) have no label: zero gradient
    T, T_LAB, V, CHUNK_V,                       # CHUNK_V: columns per program
    # strides, in elements
    stride_zb, stride_zt, stride_zv,
    stride_yb, stride_yt,
    stride_gb, stride_gt,                       # upstream gradient (may be 0: expanded)
    stride_db, stride_dt, stride_dv,            # output gradient
    # runtime scalars: scale2 as the forward's; dscale = logit scale / tau (the chain rule)
    ignore_index, scale2, dscale, pre_cap, softcap,
    SOFTCAP: tl.constexpr, HAND_ROUND: tl.constexpr, BLOCK_V: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    lo = tl.program_id(1) * CHUNK_V
    hi = tl.minimum(lo + CHUNK_V, V)
    b = n // T
    t = n % T
    scored = t < T_LAB
    y = tl.load(labels_ptr + b * stride_yb + t * stride_yt, mask=scored, other=ignore_index).to(tl.int64)
    g = tl.load(glp_ptr + b * stride_gb + t * stride_gt, mask=scored, other=0.0).to(tl.float32)
    row_out = grad_ptr + b * stride_db + t * stride_dt
    offs = tl.arange(0, BLOCK_V)
    if (y == ignore_index) | (g == 0.0):
        # Zero coefficient: the gradient row is exactly 0, nothing to read.
        for start in range(lo, hi, BLOCK_V):
            cols = start + offs
            tl.store(row_out + cols.to(tl.int64) * stride_dv,
                     _cast_out(tl.zeros((BLOCK_V,), tl.float32), grad_ptr.dtype.element_ty, HAND_ROUND),
                     mask=cols < hi)
        return
    row_in = logits_ptr + b * stride_zb + t * stride_zt
    lse2 = tl.load(lse_ptr + b * T_LAB + t) * LOG2E_C   # lse is [B, T_LAB], contiguous
    gs = g * dscale
    for start in range(lo, hi, BLOCK_V):
        cols = start + offs
        cmask = cols < hi
        x = tl.load(row_in + cols.to(tl.int64) * stride_zv, mask=cmask, other=0.0).to(tl.float32)
        if SOFTCAP:
            th = _tanh(x * pre_cap)
            p = tl.exp2(softcap * th * scale2 - lse2)
            d = tl.where(cols == y, 1.0 - p, -p) * (1.0 - th * th)   # d capped / d x, fp32
        else:
            p = tl.exp2(x * scale2 - lse2)
            d = tl.where(cols == y, 1.0 - p, -p)   # target column in fp32, before rounding
        tl.store(row_out + cols.to(tl.int64) * stride_dv,
                 _cast_out(gs * d, grad_ptr.dtype.element_ty, HAND_ROUND), mask=cmask)


def _combine(part: torch.Tensor, tgt: torch.Tensor, keep: torch.Tensor):
    """Merge split-row partials ``[N, S, 2]`` and targets ``[N]`` into (log-prob, lse)."""
    m, s = part[..., 0], part[..., 1]
    mx = m.amax(dim=1, keepdim=True)
    lse2 = mx[:, 0] + torch.log2((s * torch.exp2(m - mx)).sum(dim=1))
    zero = torch.zeros_like(lse2)
    return torch.where(keep, (tgt - lse2) * LN2, zero), torch.where(keep, lse2 * LN2, zero)


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
    """Per-token log-probs of the labels under ``softmax(capped(logits) / temperature)``,
    ``capped(z) = softcap * tanh(logit_scale * z / softcap)`` (``logit_scale * z`` when
    ``softcap`` is 0: the logit transforms of Gemma and Cohere, for the fused linear path).

    Args:
        logits: ``[B, T, V]`` bf16/fp16/fp32, any strides.
        labels: ``[B, T]`` integer: aligned with ``logits``, or with ``shift`` Hugging
            Face labels (position ``t`` is scored against label ``t + 1``; the logits'
            last position is never read).
        ref_logits: optional ``[B, T, V]`` reference logits (any float dtype, strides).
        bad_labels: optional int64 ``[2]`` device flag: a label outside ``[0, V)`` that
            is not ``ignore_index`` adds 1 to ``[0]`` and leaves its value in ``[1]``.
    Returns:
        ``(lp, lse, ref_lp)``: ``[B, T']`` fp32 each (contiguous; ``T' = T - 1`` with
        ``shift``, else ``T``); ``lp``/``ref_lp`` are 0 where masked and NaN for a bad
        label; ``ref_lp`` is an empty tensor when ``ref_logits`` is None.
    """
    labels = scored_labels(labels, shift)
    B, T = labels.shape
    V = logits.shape[-1]
    N = B * T
    dev = logits.device
    has_ref = ref_logits is not None
    ref_lp = _alloc((B, T) if has_ref else (0,), torch.float32, dev)
    if N == 0:
        return _alloc((B, T), torch.float32, dev), _alloc((B, T), torch.float32, dev), ref_lp
    block, warps, chunk, splits = launch_config(V, N, dev)
    scale2, dscale, pre_cap, softcap = fold_scales(temperature, logit_scale, softcap)
    rs = ref_logits.stride() if has_ref else (0, 0, 0)
    if splits == 1:
        lp = _alloc((B, T), torch.float32, dev)
        lse = _alloc((B, T), torch.float32, dev)
        part = ref_part = tgt = ref_tgt = None
    else:
        lp = lse = None
        part = _alloc((N, splits, 2), torch.float32, dev)
        tgt = _alloc((N,), torch.float32, dev)
        ref_part = _alloc((N, splits, 2), torch.float32, dev) if has_ref else None
        ref_tgt = _alloc((N,), torch.float32, dev) if has_ref else None

    def launch(block, warps, chunk, flag=bad_labels):
        with device_guard(logits):
            _logprobs_fwd_kernel[(N, splits)](
                logits, ref_logits, labels,
                lp, lse, ref_lp if has_ref and splits == 1 else None,
                part, ref_part, tgt, ref_tgt, flag,
                T, V, chunk,
                *logits.stride(), *rs, *labels.stride(),
                ignore_index, scale2, pre_cap, softcap,
                BLOCK_V=block, num_warps=warps,
            )

    if splits == 1:   # tuning times candidates without the flag (it counts bad labels)
        block, warps, chunk = _tuned("fwd", logits, V, N, lambda b, w, c: launch(b, w, c, None)) \
            or (block, warps, chunk)
    launch(block, warps, chunk)
    if splits > 1:
        keep = (labels != ignore_index).reshape(N)
        lp, lse = (x.view(B, T) for x in _combine(part, tgt, keep))
        if has_ref:
            ref_lp = _combine(ref_part, ref_tgt, keep)[0].view(B, T)
    return lp, lse, ref_lp


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
    """Gradient of the loss with respect to the logits (``logit_scale`` / ``softcap`` as
    the forward's: the chain rule through them is applied).

    Args:
        logits: ``[B, T, V]`` as given to :func:`logprobs_forward`.
        labels: ``[B, T]``, as given to :func:`logprobs_forward` (with the same ``shift``).
        lse: ``[B, T']`` fp32 from the forward.
        grad_lp: ``[B, T']`` upstream gradient of the per-token log-probs (any strides).
        out: ``[B, T, V]`` destination; ``out=logits`` writes in place. Default: a new
            tensor of ``logits``' dtype.
    Returns:
        ``out``, holding ``grad_lp / tau * (onehot(labels) - softmax(logits / tau))``
        (zero rows where masked, and the last position's rows with ``shift``).
    """
    labels = scored_labels(labels, shift)
    B, T, V = logits.shape
    if out is None:
        out = _alloc((B, T, V), logits.dtype, logits.device)
    if B * T == 0:
        return out
    block, warps, chunk, splits = launch_config(V, B * T, logits.device)
    scale2, dscale, pre_cap, softcap = fold_scales(temperature, logit_scale, softcap)

    def launch(block, warps, chunk):
        with device_guard(logits):
            _logprobs_bwd_kernel[(B * T, splits)](
                logits, labels, lse, grad_lp, out,
                T, labels.shape[1], V, chunk,
                *logits.stride(), *labels.stride(), *grad_lp.stride(), *out.stride(),
                ignore_index, scale2, dscale, pre_cap, softcap,
                HAND_ROUND=hand_round(), BLOCK_V=block, num_warps=warps,
            )

    in_place = out.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    if splits == 1 and not in_place:   # timing an in-place write would destroy the logits
        block, warps, chunk = _tuned("bwd", logits, V, B * T, launch) or (block, warps, chunk)
    elif splits == 1:                   # in place: what the out-of-place calls chose, if any
        block, warps, chunk = _tuned("bwd", logits, V, B * T, None) or (block, warps, chunk)
    launch(block, warps, chunk)
    return out


def _tuned(kernel: str, logits: torch.Tensor, vocab: int, n_rows: int, launch):
    """``(BLOCK_V, num_warps, CHUNK_V)`` chosen by :func:`.tuning.tune` for one program
    per row, or None (autotuning off, a CUDA graph being captured, or ``launch`` None and
    nothing tuned yet). ``launch(block, warps, chunk)`` writes only outputs that the real
    launch overwrites."""
    if not tuning.enabled() or capturing(logits.device):
        return None
    key = tuning.bucket(kernel, logits, vocab, n_rows)
    if launch is None:
        choice = tuning.chosen(key)
    else:
        def run(block, warps):
            launch(*launch_config(vocab, n_rows, logits.device, (block, warps))[:3])
        choice = tuning.tune(key, vocab, logits.device, run)
    return None if choice is None else launch_config(vocab, n_rows, logits.device, choice)[:3]
