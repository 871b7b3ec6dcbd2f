"""Benchmark of the logits path: token log-probs and the SFT / MinorSFT / MinorDPO / DPO losses.

Every (shape, case, provider, mode) gets one row in a JSON results file (schema in
``benchmarks/utils.py`` and issue 4). Shapes: ``tokens = B * T`` rows of ``V`` logits,
``T = min(1024, tokens / 2)``, ``B = tokens / T`` (even, so DPO pairs split the batch);
labels uniform in ``[0, V)``, none masked, so every row is read and the byte floor is
exact. Inputs are fresh ``randn * 2`` logits drawn from a fixed seed (never zeros), drawn
again for every provider and mode because some providers write gradients into their
logits.

Cases (``--cases``): ``token_logprobs``, ``sft``, ``minor_sft``, ``minor_dpo``, ``dpo`` with
reference *logits*, and ``minor_sft_reflogps``, ``minor_dpo_reflogps``, ``dpo_reflogps``
with precomputed reference token log-probs (the 8V and 6V byte floors of SPEC.md).

Providers (``--providers``):
- ``minorsft``: ``ms.token_logprobs`` / ``ms.sft_loss`` / ``ms.minor_sft_loss`` / ...
- ``minorsft_shift``: the drop-in as users call it: the same functions on the model's
  full logits with Hugging Face labels (``shift=True``: position ``t`` scored against
  label ``t + 1``, so ``T - 1`` positions a sequence are scored; checked against the eager
  formula on ``logits[:, :-1]``, ``labels[:, 1:]``)
- ``minorsft_inplace``: ``inplace_backward=True`` (losses, ``fwd_bwd`` only) on logits
  produced by a layer, as in training (a non-leaf whose gradient the layer consumes: a
  leaf would make autograd clone the gradient). The "layer" is a no-op autograd node over
  a buffer refilled from the inputs before every call, outside the timed region.
- ``eager``: fp32 ``log_softmax`` + ``gather`` + loss (``benchmarks/eager.py``)
- ``eager_shift``: the same on ``logits[:, :-1]``, ``labels[:, 1:]`` as users write the
  shift (autograd's slice backward zero-fills a second ``[B, T, V]`` buffer): what
  ``minorsft_shift`` replaces, scored on the same positions
- ``compile``: ``torch.compile`` of that same eager function
- ``liger``: Liger-Kernel's ``LigerCrossEntropyLoss`` (``sft`` only)
- ``trl``: ``trl.kernels.selective_log_softmax_and_entropy`` for the token log-probs
  (policy and reference), then the same loss formula on ``[B, T]``

A row's ``tokens`` is the number of positions it scores (``B * T``; ``B * (T - 1)`` for
the shift providers) and its ``floor_ms`` the byte floor of that work (``row_tokens``,
``row_floor_ms``).

Modes: ``fwd`` (forward with gradients enabled, as in training), ``bwd`` (backward only:
each timed call is the one backward of a graph whose forward ran untimed just before it,
``utils.BackwardOnly``), ``fwd_bwd``. Before timing, each
provider's forward output is checked against a chunked fp32 eager reference on the same
inputs; a mismatch, an exception or an out-of-memory is recorded as a row with an
``error`` field, never dropped. A provider whose package is missing gets rows with
``error: "unavailable: ..."``.

Examples::

    python -m benchmarks.bench_logprobs                       # the full sweep (CUDA)
    python -m benchmarks.bench_logprobs --goal                # bf16, V=128256, 16384 tokens
    TRITON_INTERPRET=1 python -m benchmarks.bench_logprobs --tiny   # CPU harness check
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks import eager
from benchmarks import utils as U

# --goal runs every case, the issue-4 goal cases first (a time budget may cut the tail)
GOAL_CASES = ("minor_sft", "minor_dpo", "minor_sft_reflogps", "minor_dpo_reflogps", "sft", "token_logprobs",
              "dpo", "dpo_reflogps")
PROVIDERS = ("minorsft", "minorsft_shift", "minorsft_inplace", "eager", "eager_shift", "compile", "liger", "trl")
SHIFT_PROVIDERS = ("minorsft_shift", "eager_shift")   # score T - 1 positions a sequence
VOCABS = (32000, 128256, 151936, 262144)
TOKENS = (4096, 16384, 65536)
FP32_SHAPE = (128256, 4096)           # (vocab, tokens): the one fp32 shape
GOAL_SHAPE = (128256, 16384)          # issue 4 goals: bf16, fwd_bwd
CPU_SHAPE = (32000, 8192)             # --cpu: the PyTorch backend vs eager / compile, fp32
CPU_CASES = ("minor_sft", "sft")
TINY_VOCABS = (1000, 3001)
TINY_TOKENS = (64,)
TINY_FP32_SHAPE = (1000, 64)
BETA = 0.1
LOGIT_SCALE = 2.0


class Unavailable(RuntimeError):
    """A provider whose library is missing or cannot run on this device."""


# --------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """One problem: ``logits [B, T, V]`` (leaf, requires grad), ``labels [B, T]``,
    reference logits ``[B, T, V]`` or reference token log-probs ``[B, T]`` fp32 (or
    neither), ``grad_out [B, T]`` fp32 (upstream gradient for ``token_logprobs``)."""
    logits: torch.Tensor
    labels: torch.Tensor
    ref_logits: Optional[torch.Tensor]
    ref_logprobs: Optional[torch.Tensor]
    grad_out: torch.Tensor


def batch_shape(tokens: int) -> Tuple[int, int]:
    """``(B, T)`` with ``B * T = tokens``, ``T = min(1024, tokens / 2)``, ``B`` even."""
    seq = min(1024, tokens // 2)
    if seq < 1 or tokens % seq or (tokens // seq) % 2:
        raise ValueError(f"tokens: {tokens} must split into an even number of sequences of {seq}")
    return tokens // seq, seq


def is_shift(provider: str) -> bool:
    """Whether the provider scores the shifted positions (HF labels, ``T - 1`` a sequence)."""
    return provider in SHIFT_PROVIDERS


def row_tokens(provider: str, tokens: int) -> int:
    """A row's ``tokens`` field: the positions ``provider`` scores on ``tokens = B * T``
    input rows: ``B * T``, or ``B * (T - 1)`` for a shift provider."""
    if not is_shift(provider):
        return tokens
    b, t = batch_shape(tokens)
    return b * (t - 1)


def row_floor_ms(case: str, mode: str, provider: str, tokens: int, vocab: int, elem: int,
                 bandwidth: Optional[float]) -> Optional[float]:
    """A row's ``floor_ms``: the byte floor of its scored rows (``row_tokens``); the backward
    writes the gradient of all ``tokens`` input rows (with shift the last position's is a
    row of zeros, which must still be written)."""
    nbytes = U.floor_bytes(case, mode, row_tokens(provider, tokens), vocab, elem, grad_rows=tokens)
    return U.floor_ms(nbytes, bandwidth)


def upstream_grad(provider: str, case: str, inp: "Inputs") -> Optional[torch.Tensor]:
    """The upstream gradient of ``token_logprobs``' output (``[B, T]``, ``[B, T - 1]`` with
    shift); ``None`` for the losses (scalars)."""
    if U.base_case(case) != "token_logprobs":
        return None
    return inp.grad_out[:, :-1] if is_shift(provider) else inp.grad_out


def make_inputs(case: str, tokens: int, vocab: int, dtype: torch.dtype, device: torch.device,
                seed: int) -> Inputs:
    """Fresh random inputs, identical for the same arguments (seeded generator)."""
    b, t = batch_shape(tokens)
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(b, t, vocab, generator=gen, device=device, dtype=dtype).mul_(LOGIT_SCALE)
    labels = torch.randint(0, vocab, (b, t), generator=gen, device=device)
    ref_logits = ref_logprobs = None
    kind = U.ref_kind(case)
    if kind == "logits":
        ref_logits = torch.randn(b, t, vocab, generator=gen, device=device, dtype=dtype).mul_(LOGIT_SCALE)
    elif kind == "logprobs":
        # plausible per-token log-probs of a reference model, in (-3 log V, 0)
        ref_logprobs = torch.rand(b, t, generator=gen, device=device).mul_(-3.0 * math.log(vocab))
    grad_out = torch.randn(b, t, generator=gen, device=device)
    logits.requires_grad_(True)
    return Inputs(logits, labels, ref_logits, ref_logprobs, grad_out)


def input_bytes(case: str, tokens: int, vocab: int, elem: int) -> int:
    """Bytes of the vocabulary-sized inputs plus one gradient buffer of the logits."""
    n_vocab_tensors = 2 + (1 if U.ref_kind(case) == "logits" else 0)
    return n_vocab_tensors * tokens * vocab * elem


# --------------------------------------------------------------------------- reference
@torch.no_grad()
def reference_output(case: str, inp: Inputs, max_chunk_bytes: int = 2**30,
                     shift: bool = False) -> torch.Tensor:
    """The case's output (token log-probs ``[B, T]`` or the scalar loss) computed with the
    eager fp32 formula sequence-chunk by sequence-chunk, so that it fits in memory where
    the unchunked eager provider does not. ``shift``: the output of the ``shift=True``
    call, i.e. of ``logits[:, :-1]`` against ``labels[:, 1:]``."""
    b, t, v = inp.logits.shape
    rows = max(1, min(b, max_chunk_bytes // max(1, t * v * 4)))
    labels = inp.labels[:, 1:] if shift else inp.labels
    cut = (lambda x: x[:, :-1]) if shift else (lambda x: x)

    def tok_of(x):
        parts = [eager.token_logprobs(cut(x[i:i + rows]), labels[i:i + rows])[0] for i in range(0, b, rows)]
        return torch.cat(parts, 0)

    tok = tok_of(inp.logits.detach())
    mask = labels != eager.IGNORE_INDEX
    ref_tok = None
    if inp.ref_logits is not None:
        ref_tok = tok_of(inp.ref_logits)
    elif inp.ref_logprobs is not None:
        ref_tok = cut(inp.ref_logprobs)
    return eager.loss_from_token_logprobs(U.base_case(case), tok, mask, ref_tok, BETA)


def check_close(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-3) -> Optional[str]:
    """``None`` if ``out`` matches the fp32 reference, else a short description.

    Tolerance ``rtol (1 + max|ref|)``, plus one rounding step of ``out``'s dtype when a
    provider returns a half-precision loss (Liger returns the loss in the logits' dtype).
    """
    half = out.dtype in (torch.bfloat16, torch.float16)
    eps = torch.finfo(out.dtype).eps if half else 0.0
    out = out.detach().float()
    if out.shape != ref.shape:
        return f"mismatch vs fp32 eager: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = (out - ref).abs().max().item() if out.numel() else 0.0
    ref_max = ref.abs().max().item() if ref.numel() else 0.0
    scale = 1.0 + ref_max
    if not (err <= rtol * scale + eps * ref_max):          # also catches NaN
        return f"mismatch vs fp32 eager: max abs err {err:.3g} (scale {scale:.3g})"
    return None


# --------------------------------------------------------------------------- providers
def applicable(provider: str, case: str, mode: str) -> bool:
    """Combinations that exist at all (others are not rows, not failures)."""
    if provider == "liger":
        return case == "sft"
    if provider == "minorsft_inplace":
        return case != "token_logprobs" and mode == "fwd_bwd"
    return True


class _Layer(torch.autograd.Function):
    """A stand-in for the layer that produces the logits in training: its output is
    ``buf`` (no copy, a non-leaf), and its backward consumes the gradient (drops it), so
    an in-place gradient is never cloned the way a leaf's would be."""

    @staticmethod
    def forward(ctx, anchor, buf):
        return buf

    @staticmethod
    def backward(ctx, grad):
        return None, None


def _from_layer(inp: Inputs):
    """``(logits_fn, setup, leaves)`` for layer-fed logits: a buffer refilled from the
    inputs by ``setup`` (untimed), behind a :class:`_Layer` node."""
    buf = torch.empty_like(inp.logits, requires_grad=False)
    anchor = torch.zeros((), device=inp.logits.device, requires_grad=True)
    setup = lambda: buf.copy_(inp.logits.detach())   # noqa: E731
    setup()
    return (lambda: _Layer.apply(anchor, buf)), setup, [anchor]


def _eager_token_logprobs(logits, labels):
    return eager.token_logprobs(logits, labels)[0]


_COMPILED: Dict[str, Callable] = {}


def _compiled(base: str) -> Callable:
    if base not in _COMPILED:
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):   # renamed across torch versions
            if hasattr(cfg, name):
                setattr(cfg, name, max(64, getattr(cfg, name)))
        fn = _eager_token_logprobs if base == "token_logprobs" else eager.LOSSES[base]
        _COMPILED[base] = torch.compile(fn)       # torch's defaults, as users run it
    return _COMPILED[base]


def loss_fn_for(provider: str, case: str, inp: Inputs, no_label_check: bool = False) -> Callable[[], torch.Tensor]:
    """A zero-argument callable computing the case's output with ``provider``.

    Raises ``Unavailable`` when the provider's library is missing or cannot run here.
    """
    base = U.base_case(case)
    ref = {}
    if inp.ref_logits is not None:
        ref = {"ref_logits": inp.ref_logits}
    elif inp.ref_logprobs is not None:
        ref = {"ref_logprobs": inp.ref_logprobs}
    logits, labels = inp.logits, inp.labels

    if provider in ("minorsft", "minorsft_shift", "minorsft_inplace"):
        try:
            import minorsft as ms
            fn = {"token_logprobs": ms.token_logprobs, "sft": ms.sft_loss, "minor_sft": ms.minor_sft_loss,
                  "minor_dpo": ms.minor_dpo_loss, "dpo": ms.dpo_loss}[base]
        except (ImportError, AttributeError) as exc:
            raise Unavailable(f"minorsft API not importable: {exc}") from exc
        kw = dict(ref)
        if base in U.REF_LOGITS_CASES:
            kw["beta"] = BETA
        if no_label_check:
            kw["check_labels"] = False
        if provider == "minorsft_shift":
            if "ref_logprobs" in kw:
                kw["ref_logprobs"] = kw["ref_logprobs"][:, :-1]   # one per scored position
            return lambda: fn(logits, labels, shift=True, **kw)
        if provider == "minorsft_inplace":
            make_logits, setup, leaves = _from_layer(inp)
            run = lambda: fn(make_logits(), labels, inplace_backward=True, **kw)  # noqa: E731
            run.setup, run.leaves = setup, leaves
            return run
        return lambda: fn(logits, labels, **kw)

    if provider in ("eager", "eager_shift", "compile"):
        # eager_shift: the slices as users write them, inside the call (their backward is timed)
        cut = (lambda x: x[:, :-1]) if provider == "eager_shift" else (lambda x: x)  # noqa: E731
        labels = labels[:, 1:] if provider == "eager_shift" else labels
        if base == "token_logprobs":
            fn = _compiled(base) if provider == "compile" else _eager_token_logprobs
            return lambda: fn(cut(logits), labels)
        fn = _compiled(base) if provider == "compile" else eager.LOSSES[base]
        kw = {k: cut(v) for k, v in ref.items()}
        if base in U.REF_LOGITS_CASES:
            kw["beta"] = BETA
        return lambda: fn(cut(logits), labels, **kw)

    if provider == "liger":
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except ImportError as exc:
            raise Unavailable(f"liger-kernel not installed: {exc}") from exc
        if logits.device.type != "cuda" and not U.interpreter():
            raise Unavailable("liger-kernel needs CUDA or TRITON_INTERPRET=1")
        mod = LigerCrossEntropyLoss(ignore_index=eager.IGNORE_INDEX, reduction="mean")
        v = logits.shape[-1]
        return lambda: mod(logits.view(-1, v), labels.view(-1))

    if provider == "trl":
        try:
            from trl.kernels import selective_log_softmax_and_entropy as trl_logps
        except ImportError as exc:
            raise Unavailable(f"trl.kernels.selective_log_softmax_and_entropy not importable: {exc}") from exc
        mask = labels != eager.IGNORE_INDEX
        safe = labels.clamp(min=0)

        def run():
            tok = trl_logps(logits, safe, 1.0, mask)[0]
            ref_tok = None
            if inp.ref_logits is not None:
                with torch.no_grad():
                    ref_tok = trl_logps(inp.ref_logits, safe, 1.0, mask)[0]
            elif inp.ref_logprobs is not None:
                ref_tok = inp.ref_logprobs
            return eager.loss_from_token_logprobs(base, tok, mask, ref_tok, BETA)
        return run

    raise ValueError(f"provider: unknown {provider!r}, expected one of {PROVIDERS}")


# --------------------------------------------------------------------------- measuring
def measure(provider: str, case: str, mode: str, inp: Inputs, ref_out: Dict[bool, torch.Tensor],
            device: torch.device, args) -> Tuple[Optional[List[float]], Optional[float], Optional[str]]:
    """``(times [median, p20, p80], peak MiB, error)`` of one provider/case/mode;
    ``ref_out``: the reference output without and with ``shift`` (key ``True``)."""
    try:
        fn_fwd = loss_fn_for(provider, case, inp, args.no_label_check)
    except Unavailable as exc:
        return None, None, f"unavailable: {exc}"[:300]
    leaves = getattr(fn_fwd, "leaves", [inp.logits])
    return time_mode(fn_fwd, mode, leaves, upstream_grad(provider, case, inp), ref_out[is_shift(provider)],
                     device, args,
                     setup=getattr(fn_fwd, "setup", None))


def prepared(fn_fwd: Callable[[], torch.Tensor], mode: str, g: Optional[torch.Tensor],
             ref_out: torch.Tensor, rtol: float = 1e-3, setup: Optional[Callable[[], object]] = None
             ) -> Tuple[Optional[Callable], Optional[Callable[[], object]], Optional[str]]:
    """``(fn, setup, error)``: check ``fn_fwd()`` against ``ref_out`` (one warm-up call,
    compiles included, and for ``bwd``/``fwd_bwd`` one warm-up backward), then the
    zero-argument call that ``mode`` times and the untimed ``setup`` to run before each
    call: ``fwd`` ``fn_fwd``; ``bwd`` a :class:`utils.BackwardOnly` (its setup runs a fresh
    forward, the call that graph's one backward); ``fwd_bwd`` ``fn_fwd().backward(g)``.
    ``g``: the upstream gradient of a non-scalar output (``[B, T]``), ``None`` for a loss;
    ``setup``: the provider's own (e.g. refilling a buffer an in-place call overwrote)."""
    if setup is not None:
        setup()
    out = fn_fwd()
    bad = check_close(out, ref_out, rtol)
    if bad:
        return None, None, bad
    if mode == "fwd":
        return fn_fwd, setup, None
    out.backward(g)                       # warm the backward (compiles it), then drop the graph
    del out
    if mode == "bwd":
        call = U.BackwardOnly(fn_fwd, g, setup)
        return call, call.setup, None
    return (lambda: fn_fwd().backward(g)), setup, None


def time_mode(fn_fwd: Callable[[], torch.Tensor], mode: str, leaves: List[torch.Tensor],
              g: Optional[torch.Tensor], ref_out: torch.Tensor, device: torch.device,
              args, rtol: float = 1e-3,
              setup: Optional[Callable[[], object]] = None) -> Tuple[Optional[List[float]], Optional[float], Optional[str]]:
    """Check ``fn_fwd()`` against ``ref_out``, then time ``mode`` and measure its peak memory.

    ``leaves``: the tensors that receive gradients (their ``.grad`` is reset before every
    call); ``g``: the upstream gradient of a non-scalar output (``None`` for a loss);
    ``setup``: run untimed before every call (refills what an in-place call overwrote).
    Exceptions (OOM included) become the error string.
    """
    try:
        fn, setup, bad = prepared(fn_fwd, mode, g, ref_out, rtol, setup)
        if bad:
            return None, None, bad
        for t in leaves:
            t.grad = None
        times = U.bench_ms(fn, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, grad_to_none=leaves,
                           cpu_reps=args.cpu_reps, setup=setup)
        peak = U.peak_mem_delta_mib(fn, device, grad_to_none=leaves, setup=setup)
        return times, peak, None
    except Exception as exc:  # noqa: BLE001 - a failing provider is a result, not a crash
        return None, None, U.error_text(exc)
    finally:
        for t in leaves:
            t.grad = None


def side_by_side(case: str, mode: str, inp: Inputs, ref_out: Dict[bool, torch.Tensor], args) -> Dict[str, tuple]:
    """``{provider: (times, error)}`` on the CPU, the providers timed round-robin by
    ``utils.host_times_ms`` (``cpu_reps`` rounds after a warm-up round). Each is checked
    first."""
    calls, out = {}, {}
    for provider in args.providers:
        if not applicable(provider, case, mode):
            continue
        try:
            fn_fwd = loss_fn_for(provider, case, inp, args.no_label_check)
            fn, setup, bad = prepared(fn_fwd, mode, upstream_grad(provider, case, inp), ref_out[is_shift(provider)],
                                      setup=getattr(fn_fwd, "setup", None))
        except Unavailable as exc:
            fn, bad = None, f"unavailable: {exc}"[:300]
        except Exception as exc:  # noqa: BLE001
            fn, bad = None, U.error_text(exc)
        if bad:
            out[provider] = (None, bad)
        else:
            calls[provider] = (fn, setup, getattr(fn_fwd, "leaves", [inp.logits]))
    for provider, times in U.host_times_ms(calls, args.cpu_reps).items():
        out[provider] = (times, None)
    return out


def shape_list(args) -> List[Tuple[str, int, int]]:
    """``(dtype, vocab, tokens)`` in run order, so that a time budget cuts the least useful
    part: 16384 tokens across V (time vs V) first, then V = 128256 across the other token
    counts (memory vs tokens), then the rest of the grid, then the fp32 shapes."""
    n0 = GOAL_SHAPE[1] if GOAL_SHAPE[1] in args.tokens else args.tokens[0]
    v0 = GOAL_SHAPE[0] if GOAL_SHAPE[0] in args.vocabs else args.vocabs[0]
    grid = [(v, n) for v in args.vocabs for n in args.tokens]
    ordered = sorted(grid, key=lambda vn: (0 if vn[1] == n0 else 1 if vn[0] == v0 else 2,
                                           args.tokens.index(vn[1]), args.vocabs.index(vn[0])))
    shapes = [(dt, v, n) for v, n in ordered for dt in args.dtypes]
    for v, n in args.fp32_shapes:
        if ("fp32", v, n) not in shapes:
            shapes.append(("fp32", v, n))
    return shapes


def fmt_row(row: Dict[str, object]) -> str:
    def f(x, spec="{:.3f}"):
        return "-" if x is None else spec.format(x)
    pct = ""
    if row["ms_median"] and row["floor_ms"]:
        pct = f"{100.0 * row['floor_ms'] / row['ms_median']:5.1f}%"
    tail = f"  ERROR {row['error']}" if "error" in row else ""
    return (f"{row['case']:<19} {row['provider']:<17} {row['mode']:<7} {row['dtype']:<4} "
            f"N={row['tokens']:<6} V={row['vocab']:<6} med={f(row['ms_median'])} "
            f"[{f(row['ms_p20'])}, {f(row['ms_p80'])}] ms  mem={f(row['peak_mem_delta_mib'], '{:.1f}')} MiB  "
            f"floor={f(row['floor_ms'])} ms {pct}{tail}")


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    ints = lambda s: [int(x) for x in csv(s)]  # noqa: E731
    p.add_argument("--cases", type=csv, default=None,
                   help=f"comma list of {U.ALL_CASES} (default: the first five; --goal: all)")
    p.add_argument("--modes", type=csv, default=list(U.MODES))
    p.add_argument("--providers", type=csv, default=list(PROVIDERS))
    p.add_argument("--vocabs", type=ints, default=None, help=f"default {VOCABS} (--tiny {TINY_VOCABS})")
    p.add_argument("--tokens", type=ints, default=None, help=f"default {TOKENS} (--tiny {TINY_TOKENS})")
    p.add_argument("--dtypes", type=csv, default=["bf16"], help="dtypes of the V x tokens grid")
    p.add_argument("--fp32-shapes", type=csv, default=None,
                   help=f"extra fp32 shapes VxTOKENS, '' for none (default {FP32_SHAPE[0]}x{FP32_SHAPE[1]}, "
                        f"--tiny {TINY_FP32_SHAPE[0]}x{TINY_FP32_SHAPE[1]}, --goal none)")
    p.add_argument("--no-label-check", action="store_true",
                   help="pass check_labels=False to minorsft (skips its one host sync per call)")
    p.add_argument("--goal", action="store_true",
                   help="only the goal shape (bf16, V=128256, 16384 tokens), all cases incl. *_reflogps")
    p.add_argument("--tiny", action="store_true", help="tiny shapes for the CPU interpreter (harness check)")
    p.add_argument("--cpu", action="store_true",
                   help=f"the PyTorch backend on the CPU against eager and torch.compile: fp32, "
                        f"V={CPU_SHAPE[0]}, {CPU_SHAPE[1]} tokens, {', '.join(CPU_CASES)} (even with a GPU)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/<gpu>-<date>-<sha>.json)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--cpu-reps", type=int, default=3)
    p.add_argument("--skip-existing", action="store_true",
                   help="skip rows already in the results file without an error (resume / avoid repeats)")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="start no new shape/case after this many seconds (the rest is listed as not run)")
    args = p.parse_args(argv)
    if args.cpu and U.interpreter():
        p.error("--cpu measures the PyTorch backend: unset TRITON_INTERPRET")
    if args.cpu:
        vocabs, tokens, fp32, cases = [CPU_SHAPE[0]], [CPU_SHAPE[1]], [], list(CPU_CASES)
        args.dtypes = ["fp32"]
        if args.providers == list(PROVIDERS):
            args.providers = ["minorsft", "eager", "compile"]
    elif args.goal:
        vocabs, tokens, fp32, cases = [GOAL_SHAPE[0]], [GOAL_SHAPE[1]], [], list(GOAL_CASES)
    elif args.tiny:
        vocabs, tokens, cases = list(TINY_VOCABS), list(TINY_TOKENS), list(U.BASE_CASES)
        fp32 = [f"{TINY_FP32_SHAPE[0]}x{TINY_FP32_SHAPE[1]}"]
    else:
        vocabs, tokens, cases = list(VOCABS), list(TOKENS), list(U.BASE_CASES)
        fp32 = [f"{FP32_SHAPE[0]}x{FP32_SHAPE[1]}"]
    args.vocabs = args.vocabs if args.vocabs is not None else vocabs
    args.tokens = args.tokens if args.tokens is not None else tokens
    args.cases = args.cases if args.cases is not None else cases
    args.fp32_shapes = args.fp32_shapes if args.fp32_shapes is not None else fp32
    args.fp32_shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.fp32_shapes]
    for name, vals, allowed in (("cases", args.cases, U.ALL_CASES), ("modes", args.modes, U.MODES),
                                ("providers", args.providers, PROVIDERS), ("dtypes", args.dtypes, tuple(U.DTYPES))):
        bad = [v for v in vals if v not in allowed]
        if bad:
            p.error(f"--{name}: unknown {bad}, expected some of {allowed}")
    return args


def run_cpu(args, results, path: str, bw: Optional[float]) -> int:
    """``--cpu``: every case and mode with the providers timed side by side (round-robin)."""
    device = torch.device("cpu")
    for dt, vocab, tokens in shape_list(args):
        elem = torch.empty((), dtype=U.DTYPES[dt]).element_size()
        for case in args.cases:
            inp = make_inputs(case, tokens, vocab, U.DTYPES[dt], device, args.seed)
            ref_out = {False: reference_output(case, inp)}
            if any(is_shift(p) for p in args.providers):
                ref_out[True] = reference_output(case, inp, shift=True)
            for mode in args.modes:
                for provider, (times, err) in side_by_side(case, mode, inp, ref_out, args).items():
                    floor = row_floor_ms(case, mode, provider, tokens, vocab, elem, bw)
                    row = U.make_row(case, provider, mode, dt, row_tokens(provider, tokens), vocab, times, None,
                                     floor, error=err)
                    U.add_row(results, row)
                    U.write_results(path, results)
                    print(fmt_row(row), flush=True)
    print(f"wrote {path} ({len(results['rows'])} rows)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = U.bench_device(cpu=args.cpu)
    if device.type == "cpu" and not U.interpreter() and not args.cpu:
        print("note: no CUDA device and TRITON_INTERPRET unset: minorsft runs its torch backend "
              "(use --cpu for the CPU comparison shape)", file=sys.stderr)
    label = U.device_label(device)
    sha = U.git_sha()
    here = os.path.dirname(os.path.abspath(__file__))
    path = args.out or U.default_result_path(os.path.join(here, "results"), label, sha)

    measured_bw = U.copy_bandwidth_gbs(device)
    results = U.load_results(path)
    if results is not None and results.get("device") == label and results.get("git_sha") == sha:
        bw = results["copy_bandwidth_gbs"]
        print(f"appending to {path}; floors use its copy bandwidth {bw:.1f} GB/s "
              f"(this run measured {measured_bw:.1f} GB/s)")
    else:
        results = U.new_results(label, sha, measured_bw)
        bw = results["copy_bandwidth_gbs"]
        print(f"writing {path}; copy bandwidth {bw:.1f} GB/s (read + write)")
    print(f"device {label}  torch {results['torch']}  triton {results['triton']}  git {sha}")
    if device.type == "cpu" and U.interpreter():
        print("interpreter run: times are NOT performance figures (harness validation only)")

    if args.cpu:
        return run_cpu(args, results, path, bw)
    start = time.perf_counter()
    not_run = []
    for dt, vocab, tokens in shape_list(args):
        dtype = U.DTYPES[dt]
        elem = torch.empty((), dtype=dtype).element_size()
        for case in args.cases:
            if args.time_budget_s is not None and time.perf_counter() - start > args.time_budget_s:
                not_run.append(f"{case} {dt} V={vocab} N={tokens}")
                continue
            combos = [(p, m) for p in args.providers for m in args.modes if applicable(p, case, m)]
            if args.skip_existing:
                done = {U.row_key(r) for r in results["rows"] if "error" not in r}
                combos = [(p, m) for p, m in combos if (case, p, m, dt, row_tokens(p, tokens), vocab) not in done]
                if not combos:
                    continue
            need, free = input_bytes(case, tokens, vocab, elem), U.free_bytes(device)
            ref_out, skip = None, None
            if free is not None and need > 0.97 * free:
                skip = f"skipped: inputs + one gradient need {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
            else:
                try:
                    inp = make_inputs(case, tokens, vocab, dtype, device, args.seed)
                    ref_out = {False: reference_output(case, inp)}
                    if any(is_shift(p) for p in args.providers):
                        ref_out[True] = reference_output(case, inp, shift=True)
                    del inp
                except Exception as exc:  # noqa: BLE001
                    skip = f"reference failed: {U.error_text(exc)}"
                U.free_memory(device)
            for provider, mode in combos:
                floor = row_floor_ms(case, mode, provider, tokens, vocab, elem, bw)
                n_row = row_tokens(provider, tokens)
                if skip:
                    row = U.make_row(case, provider, mode, dt, n_row, vocab, None, None, floor, error=skip)
                else:
                    try:
                        inp = make_inputs(case, tokens, vocab, dtype, device, args.seed)
                    except Exception as exc:  # noqa: BLE001
                        inp, res = None, (None, None, f"inputs: {U.error_text(exc)}")
                    if inp is not None:
                        res = measure(provider, case, mode, inp, ref_out, device, args)
                    times, peak, err = res
                    row = U.make_row(case, provider, mode, dt, n_row, vocab, times, peak, floor, error=err)
                    inp = None
                    U.free_memory(device)
                U.add_row(results, row)
                U.write_results(path, results)
                print(fmt_row(row), flush=True)
    if not_run:
        print(f"time budget {args.time_budget_s} s reached; NOT run ({len(not_run)}): " + "; ".join(not_run))
    print(f"wrote {path} ({len(results['rows'])} rows) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
