"""The fused linear path: hidden states and the lm_head weight in, log-probs (and the
gradients) out, with no ``[N, V]`` logits buffer.

Rows ``n`` are the scored positions (``hidden [B, T, H]`` and ``labels [B, T]``; with
``shift`` position ``t`` is scored against label ``t + 1``); rows whose label is
``ignore_index`` are dropped first (compacted: prompt and padding tokens cost no GEMM).
The rest are cut into chunks of ``R`` rows that fit the memory budget, and per chunk::

    Z = h W^T (+ b)                     [R, V] in the compute dtype: a cuBLAS GEMM (fp32
                                        accumulation; TF32 for fp32 inputs only when
                                        torch.backends.cuda.matmul.allow_tf32 says so)
    lse, lp = fold forward(Z)           the logits path's kernel (kernels/logprobs.py, or
                                        its PyTorch mirror): online logsumexp, the label's
                                        log-prob, soft-capping / logit scale / temperature
    G = fold backward(Z, coef), in Z    coef (1[v = y] - p) d capped / d z, written in place
    dH[rows] = G W                      [R, H] GEMM, scattered back to the rows
    dW += G^T h,  db += sum_rows G      fp32 accumulators across chunks (fixed order)

Three plans share that chunk step:

- :func:`linear_loss` (the default for a scalar loss with gradients): chunks of whole
  sequences (both rows of a DPO pair in one chunk), so each sequence's log-prob sum, and
  with it the loss coefficient ``dL/dS``, is known while the chunk's logits are still in
  hand: the gradient is formed in the forward. Three GEMMs' worth of work
  (``2 n V H`` FLOPs each, ``n`` the scored rows); the backward only scales the saved
  ``dH, dW, db`` by the upstream gradient. When one sequence (or pair) does not fit the
  budget it runs two passes instead (statistics, then recompute + gradients): four GEMMs.
- :func:`linear_forward` / :func:`linear_backward` (per-token log-probs: ``reduction="none"``
  with any upstream gradient, ``token_logprobs``, no-grad): the forward's GEMM + fold,
  then a backward that recomputes each chunk: four GEMMs in all.

Bytes beyond the GEMMs' own: the logits chunk is written once and read by the fold
(forward: ``2 R V e``), read and written once by the fold's backward (``2 R V e``), ``e``
the compute dtype's size. Memory beyond the inputs and the gradients themselves: one
``[R, V]`` chunk in the compute dtype (``R = memory_budget / (V e)``), the compacted rows
``[n, H]``, an fp32 ``[V, H]`` accumulator of ``dW`` (and ``[V]`` of ``db``) for
low-precision weights, a copy of ``W`` in the activations' dtype when the lm_head is kept
in fp32 under autocast, and ``O(n)`` per-row vectors. Nothing here is ``N x V``.

Deterministic: the GEMMs and reductions run in a fixed order, nothing is accumulated with
atomics, so ``dH``, ``dW`` and ``db`` are bitwise identical from run to run on one device.

Compaction reads the number of scored rows of each sequence on the host: one
synchronisation per call (``torch.compile`` traces the path as one opaque custom op). With
``MINORSFT_LINEAR_SKIP_MASKED=0``, and always while a CUDA graph is being captured, every
position is a row instead (masked ones get a zero gradient from the fold): no host read,
no synchronisation, at the price of the GEMMs of the prompt and padding rows
(:func:`skip_masked_rows`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from .common import capturing, scored_labels

log = logging.getLogger("minorsft")
DEFAULT_MEMORY_BUDGET = 256 << 20     # bytes of the logits chunk (R x V in the compute dtype)
_warned = set()


def memory_budget_bytes(memory_budget: Optional[int] = None) -> int:
    """The byte budget of a chunk's ``[R, V]`` logits: ``memory_budget``, else the
    environment variable ``MINORSFT_LINEAR_CHUNK_BYTES``, else 256 MiB."""
    if memory_budget is None:
        memory_budget = int(os.environ.get("MINORSFT_LINEAR_CHUNK_BYTES", DEFAULT_MEMORY_BUDGET))
    if int(memory_budget) <= 0:
        raise ValueError(f"memory_budget: must be a positive number of bytes, got {memory_budget}")
    return int(memory_budget)


def skip_masked_rows(device: torch.device) -> bool:
    """Whether :func:`compact` drops the rows whose label is ``ignore_index`` (reading
    their count on the host): yes unless the environment sets
    ``MINORSFT_LINEAR_SKIP_MASKED=0`` or a CUDA graph is being captured."""
    if os.environ.get("MINORSFT_LINEAR_SKIP_MASKED", "1") == "0":
        return False
    return not capturing(device)


# --------------------------------------------------------------------------- the rows

@dataclass
class Rows:
    """The rows to score in sequence order: those that carry a label, compacted (or every
    position, see :func:`compact`).

    ``h`` ``[n, H]`` hidden rows in the compute dtype, ``y`` ``[n]`` labels, ``b`` / ``t``
    ``[n]`` their positions (``b`` is also each row's sequence), ``seq`` the sequences in
    row order (host list; for pairs ``[0, P, 1, P + 1, ...]``) with ``counts`` rows each
    (host list), ``seq_ids`` the same sequences on the device (chunks index it by slices:
    no host-to-device copy, so no synchronisation, per chunk).
    """

    h: torch.Tensor
    y: torch.Tensor
    b: torch.Tensor
    t: torch.Tensor
    seq: List[int]
    counts: List[int]
    seq_ids: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    def offsets(self) -> List[int]:
        out, o = [], 0
        for c in self.counts:
            out.append(o)
            o += c
        return out


def compact(hidden: torch.Tensor, labels: torch.Tensor, *, ignore_index: int, shift: bool,
            pairs: bool, dtype: torch.dtype, skip_masked: bool = True) -> Rows:
    """The :class:`Rows` of ``hidden [B, T, H]`` (any strides) scored against ``labels``.

    ``skip_masked``: only the rows with a label (one host read: the scored rows per
    sequence); else every position, ``T`` rows a sequence, with no host read. ``pairs``:
    order the sequences ``0, P, 1, P + 1, ...`` so that both rows of a DPO pair are
    adjacent (chunks of whole pairs are then contiguous).
    """
    lab = scored_labels(labels, shift)
    B, Tp = lab.shape
    order = ([i for k in range(B // 2) for i in (k, B // 2 + k)] if pairs else list(range(B)))
    # the same order built on the device (a list would be a host-to-device copy: a sync)
    perm = torch.arange(B, device=lab.device)
    if pairs:
        perm = perm.view(2, B // 2).t().reshape(-1)
    if skip_masked:
        keep = lab != ignore_index
        counts_all = keep.sum(1).tolist()                  # the one host read of a call
        counts = [counts_all[s] for s in order]
        flat = torch.nonzero_static(keep[perm].flatten(), size=sum(counts)).squeeze(1)
        b = perm[flat // max(Tp, 1)]
        t = flat % max(Tp, 1)
    else:
        counts = [Tp] * B
        b = perm[:, None].expand(B, Tp).reshape(-1)
        t = torch.arange(Tp, device=lab.device).repeat(B)
    h = hidden[b, t]
    return Rows(h=h if h.dtype == dtype else h.to(dtype), y=lab[b, t].long(), b=b, t=t,
                seq=order, counts=counts, seq_ids=perm)


def token_chunks(n: int, rows: int) -> List[Tuple[int, int]]:
    """``[r0, r1)`` ranges of at most ``rows`` rows."""
    return [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]


def sequence_chunks(rows_: Rows, rows: int, pairs: bool) -> Optional[List[Tuple[int, int, List[int]]]]:
    """``(r0, r1, sequences)`` chunks of whole sequences (whole pairs when ``pairs``) of at
    most ``rows`` rows, or None when one sequence (pair) alone is larger."""
    unit = 2 if pairs else 1
    out, r0, start, used = [], 0, 0, 0
    offs = rows_.offsets() + [rows_.n]
    for i in range(0, len(rows_.seq), unit):
        size = offs[i + unit] - offs[i]
        if size > rows:
            return None
        if used + size > rows:
            out.append((r0, r0 + used, rows_.seq[start:i]))
            r0, start, used = r0 + used, i, 0
        used += size
    if used or not out:
        out.append((r0, r0 + used, rows_.seq[start:]))
    return out


# --------------------------------------------------------------------------- one chunk

@dataclass
class Setup:
    """What every chunk needs: the weight and bias in the compute dtype, the fold module
    (``minorsft.kernels.logprobs`` or its PyTorch mirror) and its options, the chunk
    buffer."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    fold: object
    opts: dict
    buf: torch.Tensor

    @classmethod
    def make(cls, hidden, weight, bias, *, fold, ignore_index, temperature, logit_scale, softcap,
             rows_per_chunk: int) -> "Setup":
        dt = hidden.dtype
        w = weight if weight.dtype == dt else weight.to(dt)   # autocast: the activations' dtype
        b = None if bias is None else (bias if bias.dtype == dt else bias.to(dt))
        buf = torch.empty((rows_per_chunk, weight.shape[0]), dtype=dt, device=hidden.device)
        opts = dict(ignore_index=ignore_index, temperature=temperature, logit_scale=logit_scale,
                    softcap=softcap)
        return cls(w, b, fold, opts, buf)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``h W^T + b`` into the chunk buffer: ``[r, V]``."""
        z = self.buf[: h.shape[0]]
        if self.bias is not None:
            return torch.addmm(self.bias, h, self.weight.t(), out=z)
        return torch.mm(h, self.weight.t(), out=z)

    def stats(self, z, y, bad_labels=None):
        """Fold forward on a chunk: ``(lp [r], lse [r])`` fp32."""
        lp, lse, _ = self.fold.logprobs_forward(z[None], y[None], bad_labels=bad_labels, **self.opts)
        return lp[0], lse[0]

    def grad_in_place(self, z, y, lse, g) -> torch.Tensor:
        """Fold backward on a chunk, written into ``z``: ``G [r, V]``."""
        self.fold.logprobs_backward(z[None], y[None], lse[None], g[None], out=z[None], **self.opts)
        return z


def _accumulate_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32 and ``a``, ``b`` in the compute dtype: cuBLAS
    writes the fp32 sum directly (out_dtype); elsewhere the chunk operands are upcast."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda and "no-out-dtype" not in _warned:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError) as e:   # an older torch: say so, once
            _warned.add("no-out-dtype")
            log.warning("minorsft: addmm(out_dtype=float32) unavailable (%s); the fused linear "
                        "path upcasts each chunk for its dW GEMM", e)
    acc.addmm_(a.float(), b.float())


class Grads:
    """The gradients being formed: ``dH [B, T, H]`` in hidden's dtype (rows scattered
    back), fp32 accumulators of ``dW [V, H]`` and ``db [V]``; ``need_*`` select them."""

    def __init__(self, hidden, weight, bias, need_hidden, need_weight, need_bias):
        dev = hidden.device
        self.dh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=dev) if need_hidden else None
        self.dw = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_weight else None
        self.db = (torch.zeros(weight.shape[0], dtype=torch.float32, device=dev)
                   if need_bias and bias is not None else None)
        self.weight_dtype, self.bias_dtype = weight.dtype, None if bias is None else bias.dtype

    def add(self, G: torch.Tensor, w: torch.Tensor, h: torch.Tensor, b: torch.Tensor, t: torch.Tensor):
        """Add one chunk's ``G [r, V]`` (rows at positions ``b, t``)."""
        if self.dh is not None:
            self.dh[b, t] = (G @ w).to(self.dh.dtype)
        if self.dw is not None:
            _accumulate_f32(self.dw, G.t(), h)
        if self.db is not None:
            self.db += torch.sum(G, 0, dtype=torch.float32)

    def result(self):
        """``(dh, dw, db)`` in the inputs' dtypes (None where not needed)."""
        dw = None if self.dw is None else self.dw.to(self.weight_dtype)
        db = None if self.db is None else self.db.to(self.bias_dtype)
        return self.dh, dw, db


# --------------------------------------------------------------------------- per-token plan

def _prepare(hidden, weight, labels, bias, *, fold, ignore_index, temperature, logit_scale, softcap,
             shift, memory_budget, pairs=False):
    rows = compact(hidden, labels, ignore_index=ignore_index, shift=shift, pairs=pairs,
                   dtype=hidden.dtype, skip_masked=skip_masked_rows(hidden.device))
    elem = torch.empty((), dtype=hidden.dtype).element_size()
    per_chunk = max(1, memory_budget_bytes(memory_budget) // (weight.shape[0] * elem))
    setup = Setup.make(hidden, weight, bias, fold=fold, ignore_index=ignore_index,
                       temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                       rows_per_chunk=max(1, min(per_chunk, rows.n)))
    return rows, setup, per_chunk


def linear_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    fold,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
    shift: bool = False,
    memory_budget: Optional[int] = None,
    bad_labels: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the labels under ``softmax(capped(hidden W^T + b) / tau)``.

    Args:
        hidden: ``[B, T, H]`` bf16/fp16/fp32, any strides; the compute dtype.
        weight: ``[V, H]`` (the compute dtype, or fp32 under autocast); bias ``[V]`` or None.
        labels: ``[B, T]``: aligned with ``hidden`` or, with ``shift``, Hugging Face labels.
        fold: the fold implementation (``minorsft.kernels.logprobs`` or its PyTorch mirror).
        bad_labels: the label flag the fold adds labels outside ``[0, V)`` to.
    Returns:
        ``(lp, lse)``: ``[B, T']`` fp32 (``T' = T - 1`` with ``shift``); 0 where masked,
        ``lp`` NaN for a label outside ``[0, V)``.
    """
    lab = scored_labels(labels, shift)
    lp = torch.zeros(lab.shape, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros(lab.shape, dtype=torch.float32, device=hidden.device)
    rows, setup, per_chunk = _prepare(
        hidden, weight, labels, bias, fold=fold, ignore_index=ignore_index, temperature=temperature,
        logit_scale=logit_scale, softcap=softcap, shift=shift, memory_budget=memory_budget)
    for r0, r1 in token_chunks(rows.n, per_chunk):
        z = setup.logits(rows.h[r0:r1])
        lp[rows.b[r0:r1], rows.t[r0:r1]], lse[rows.b[r0:r1], rows.t[r0:r1]] = setup.stats(
            z, rows.y[r0:r1], bad_labels)
    return lp, lse


def linear_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_lp: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    fold,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
    shift: bool = False,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
    memory_budget: Optional[int] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of ``sum(grad_lp * lp)`` with respect to hidden, weight and bias.

    Args:
        hidden, weight, labels, bias, fold and the options: as given to :func:`linear_forward`.
        lse: ``[B, T']`` fp32 from the forward; grad_lp: ``[B, T']`` (any strides).
    Returns:
        ``(d_hidden [B, T, H], d_weight [V, H], d_bias [V])`` in the inputs' own dtypes
        (None where not needed); ``d_weight`` / ``d_bias`` accumulated in fp32.
    """
    grads = Grads(hidden, weight, bias, need_hidden, need_weight, need_bias)
    rows, setup, per_chunk = _prepare(
        hidden, weight, labels, bias, fold=fold, ignore_index=ignore_index, temperature=temperature,
        logit_scale=logit_scale, softcap=softcap, shift=shift, memory_budget=memory_budget)
    g_rows = grad_lp[rows.b, rows.t].float()
    lse_rows = lse[rows.b, rows.t]
    for r0, r1 in token_chunks(rows.n, per_chunk):
        G = setup.grad_in_place(setup.logits(rows.h[r0:r1]), rows.y[r0:r1], lse_rows[r0:r1],
                                g_rows[r0:r1])
        grads.add(G, setup.weight, rows.h[r0:r1], rows.b[r0:r1], rows.t[r0:r1])
    return grads.result()


# --------------------------------------------------------------------------- the loss plan

def linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    fold,
    coefficients: Callable,
    pairs: bool,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
    shift: bool = False,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
    memory_budget: Optional[int] = None,
    bad_labels: Optional[torch.Tensor] = None,
):
    """A scalar loss and its gradients, formed in the forward.

    Args:
        coefficients: the loss's chunk coefficients (``minorsft.losses.Coefficients``):
            ``coefficients(ids, S) -> (dL/dS [k], loss part [])`` for the sequences
            ``ids [k]`` (a device tensor; whole pairs) whose log-prob sums are ``S``; for a
            token-level loss (``coefficients.token_level``) ``coefficients(None, sum of
            the chunk's log-probs) -> (dL/dlp, loss part)``.
        pairs: the loss compares pairs ``(k, P + k)``: chunks hold whole pairs.
        The rest as :func:`linear_forward` / :func:`linear_backward`.
    Returns:
        ``(loss [], S [B], d_hidden, d_weight, d_bias)``: the loss (fp32), the sequences'
        log-prob sums (fp32, for the metrics) and the gradients as :func:`linear_backward`.
    """
    grads = Grads(hidden, weight, bias, need_hidden, need_weight, need_bias)
    rows, setup, per_chunk = _prepare(
        hidden, weight, labels, bias, fold=fold, ignore_index=ignore_index, temperature=temperature,
        logit_scale=logit_scale, softcap=softcap, shift=shift, memory_budget=memory_budget,
        pairs=pairs)
    lp = torch.zeros(scored_labels(labels, shift).shape, dtype=torch.float32, device=hidden.device)
    if coefficients.token_level:     # one coefficient for every row: any chunks of rows
        chunks = [(r0, r1, None) for r0, r1 in token_chunks(rows.n, per_chunk)]
    else:
        chunks = sequence_chunks(rows, per_chunk, pairs)
        if chunks is None:   # a sequence larger than the budget: statistics first, then gradients
            return _loss_two_passes(rows, setup, per_chunk, grads, lp, coefficients, bad_labels)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    s0 = 0
    for r0, r1, seqs in chunks:
        z = setup.logits(rows.h[r0:r1])
        lp_c, lse_c = setup.stats(z, rows.y[r0:r1], bad_labels)
        lp[rows.b[r0:r1], rows.t[r0:r1]] = lp_c
        if seqs is None:
            coef, part = coefficients(None, lp_c.sum())
            g = coef.float().expand(r1 - r0)
        else:
            ids = rows.seq_ids[s0: s0 + len(seqs)]
            s0 += len(seqs)
            dS, part = coefficients(ids, lp[ids].sum(-1))
            g = _per_row(dS, ids, rows.b[r0:r1], lp.shape[0])
        loss += part
        G = setup.grad_in_place(z, rows.y[r0:r1], lse_c, g)
        grads.add(G, setup.weight, rows.h[r0:r1], rows.b[r0:r1], rows.t[r0:r1])
    return (loss, lp.sum(-1), *grads.result())


def _per_row(dS: torch.Tensor, ids: torch.Tensor, seq_of_row: torch.Tensor, B: int) -> torch.Tensor:
    """The coefficient of each row: its sequence's ``dL/dS`` (``dS [k]`` for the sequences
    ``ids [k]``; ``seq_of_row [r]`` the rows' sequences)."""
    by_seq = torch.zeros(B, dtype=torch.float32, device=dS.device)
    by_seq[ids] = dS.float()
    return by_seq[seq_of_row]


def _loss_two_passes(rows: Rows, setup: Setup, per_chunk: int, grads: Grads, lp, coefficients,
                     bad_labels):
    """:func:`linear_loss` for sequences larger than a chunk: every row's statistics first
    (chunks of rows), then the coefficients, then a recompute that forms the gradients."""
    lse_rows = torch.empty(rows.n, dtype=torch.float32, device=rows.h.device)
    for r0, r1 in token_chunks(rows.n, per_chunk):
        lp_c, lse_rows[r0:r1] = setup.stats(setup.logits(rows.h[r0:r1]), rows.y[r0:r1], bad_labels)
        lp[rows.b[r0:r1], rows.t[r0:r1]] = lp_c
    dS, loss = coefficients(rows.seq_ids, lp[rows.seq_ids].sum(-1))
    g = _per_row(dS, rows.seq_ids, rows.b, lp.shape[0])
    for r0, r1 in token_chunks(rows.n, per_chunk):
        G = setup.grad_in_place(setup.logits(rows.h[r0:r1]), rows.y[r0:r1], lse_rows[r0:r1], g[r0:r1])
        grads.add(G, setup.weight, rows.h[r0:r1], rows.b[r0:r1], rows.t[r0:r1])
    return (loss, lp.sum(-1), *grads.result())
