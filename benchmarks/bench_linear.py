"""Benchmark of the fused linear path: hidden states + lm_head weight in, loss out (no logits).

Rows go into the same JSON schema as ``bench_logprobs``, with the case names prefixed
``linear_`` (``linear_sft``, ``linear_minor_sft``, ...) so both scripts can share one
results file. ``floor_ms`` is ``null`` here: the linear path is bound by its matrix
products (forward ``2 N H V`` FLOPs, backward ``4 N H V`` plus any recomputation), not
by the SPEC.md byte floor, so compare providers with each other.

Shapes: hidden ``[B, T, H]`` (``randn``), weight ``[V, H]`` (``randn * 2 / sqrt(H)``, so
logits have a standard deviation near 2), ``tokens = B * T`` as in ``bench_logprobs``.
Reference cases use reference hidden states ``[B, T, H]`` through the same (frozen)
weight, or precomputed reference token log-probs (``*_reflogps``).

Providers: ``minorsft`` (``minorsft.linear.linear_*``: cuBLAS GEMMs on chunks folded by
the Triton kernel; a scalar loss forms its gradient in the forward), ``minorsft_torch``
(the same driver with the PyTorch fold), ``gemms`` (the plain GEMMs of the shape in the
input dtype, ``h W^T``, ``h_ref W^T`` with a live reference, ``G W``, ``G^T h``: the bar for
the fused path, ``fwd_bwd`` rows only, see ``gemm_call``; not checked, it computes no
loss), ``eager`` (``hidden @ W^T``
in the input dtype, then the fp32 eager loss of ``benchmarks/eager.py``), ``compile``
(``torch.compile`` of that), ``liger`` (``LigerFusedLinearCrossEntropyLoss`` for sft,
``LigerFusedLinearDPOLoss`` for dpo), ``cce`` (``cut_cross_entropy.linear_cross_entropy``,
sft), ``torch_lce`` (``torch.nn.functional.linear_cross_entropy`` where torch has it,
sft), ``trl`` (``trl.kernels.ChunkedLogProbFunction`` token log-probs, then the loss).

Each provider's forward is checked against an fp32 reference (upcast inputs, chunked)
with a loose tolerance (5e-2 relative: providers that round the logits to bf16 differ
by that much over 1024-token sums); the check guards against broken adapters, the
tests guard numerics.

    python -m benchmarks.bench_linear                       # CUDA sweep
    TRITON_INTERPRET=1 python -m benchmarks.bench_linear --tiny   # CPU harness check
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks import eager
from benchmarks import utils as U
from benchmarks.bench_logprobs import BETA, Unavailable, batch_shape, fmt_row, time_mode

PROVIDERS = ("minorsft", "minorsft_torch", "gemms", "eager", "compile", "liger", "cce", "torch_lce", "trl")
VOCABS = (32000, 128256, 151936, 262144)
TOKENS = (4096, 16384)
HIDDEN = 4096
TINY = dict(vocabs=(1000, 3001), tokens=(64,), hidden=64)
RTOL = 5e-2
TRL_CHUNK = 32768      # TRL's own default vocabulary chunk for ChunkedLogProbFunction


class LInputs:
    """``hidden [B, T, H]`` and ``weight [V, H]`` (leaves with gradients), ``labels [B, T]``,
    ``ref_hidden [B, T, H]`` or ``ref_logprobs [B, T]`` (or neither), ``grad_out [B, T]``."""

    def __init__(self, case, tokens, vocab, hidden, dtype, device, seed):
        b, t = batch_shape(tokens)
        gen = torch.Generator(device=device).manual_seed(seed)
        self.hidden = torch.randn(b, t, hidden, generator=gen, device=device, dtype=dtype)
        self.weight = torch.randn(vocab, hidden, generator=gen, device=device, dtype=dtype).mul_(
            2.0 / math.sqrt(hidden))
        self.labels = torch.randint(0, vocab, (b, t), generator=gen, device=device)
        self.ref_hidden = self.ref_logprobs = None
        if U.ref_kind(case) == "logprobs":
            self.ref_logprobs = torch.rand(b, t, generator=gen, device=device).mul_(-3.0 * math.log(vocab))
        elif U.ref_kind(case) == "logits":
            self.ref_hidden = torch.randn(b, t, hidden, generator=gen, device=device, dtype=dtype)
        self.grad_out = torch.randn(b, t, generator=gen, device=device)
        self.hidden.requires_grad_(True)
        self.weight.requires_grad_(True)


def eager_linear(base: str, hidden, weight, labels, ref_hidden=None, ref_logprobs=None):
    """``hidden @ W^T`` in the input dtype, then the eager fp32 formula (users' code)."""
    logits = hidden @ weight.t()
    if base == "token_logprobs":
        return eager.token_logprobs(logits, labels)[0]
    kw = {}
    if ref_hidden is not None:
        with torch.no_grad():
            kw["ref_logits"] = ref_hidden @ weight.t()
    elif ref_logprobs is not None:
        kw["ref_logprobs"] = ref_logprobs
    if base in U.REF_LOGITS_CASES:
        kw["beta"] = BETA
    return eager.LOSSES[base](logits, labels, **kw)


@torch.no_grad()
def reference_output(case: str, inp: LInputs, max_chunk_bytes: int = 2**30) -> torch.Tensor:
    """fp32 output of the case on upcast inputs, in sequence chunks."""
    b, t, _ = inp.hidden.shape
    v = inp.weight.shape[0]
    rows = max(1, min(b, max_chunk_bytes // max(1, t * v * 4)))
    w = inp.weight.detach().float()

    def tok_of(h):
        parts = [eager.token_logprobs(h[i:i + rows].float() @ w.t(), inp.labels[i:i + rows])[0]
                 for i in range(0, b, rows)]
        return torch.cat(parts, 0)

    tok = tok_of(inp.hidden.detach())
    ref_tok = tok_of(inp.ref_hidden) if inp.ref_hidden is not None else inp.ref_logprobs
    return eager.loss_from_token_logprobs(U.base_case(case), tok, inp.labels != eager.IGNORE_INDEX, ref_tok, BETA)


def gemm_call(inp: LInputs) -> Tuple[Callable[[], object], int]:
    """``(fn, flops)``: the plain GEMMs of a fused linear ``fwd_bwd`` on this case's shapes,
    in the input dtype, the floor of the path's matrix work (the ``gemms`` row):

    - ``z = h W^T`` ``[N, V]`` (the logits, N = B * T rows of ``h [N, H]``, ``W [V, H]``);
    - with a live reference (``ref_hidden``), ``z_ref = h_ref W_ref^T`` ``[N, V]``, no
      gradient (the benchmark's reference head ``W_ref`` is the policy's ``W``, frozen);
    - ``dH = G W`` ``[N, H]`` and ``dW = G^T h`` ``[V, H]``, ``G`` ``[N, V]`` standing for the
      logits' gradient (the buffer ``z``: same shape and dtype, values immaterial).

    ``flops``: ``2 N H V`` per GEMM, ``6 N H V`` without a live reference, ``8 N H V``
    with one. Not counted: the softmax fold (bandwidth, not GEMMs), precomputed reference
    log-probs (no reference GEMM), and the fourth GEMM (a recompute of ``z``) that the fused
    path pays for per-token outputs and sequences longer than a chunk: this is the floor.
    ``fn`` writes ``z`` and ``z_ref`` into buffers allocated here, outside the timed call.
    """
    h = inp.hidden.detach().reshape(-1, inp.hidden.shape[-1])
    w = inp.weight.detach()
    z = h @ w.t()
    gemms = [lambda: torch.mm(h, w.t(), out=z)]
    if inp.ref_hidden is not None:
        h_ref = inp.ref_hidden.reshape(-1, inp.ref_hidden.shape[-1])
        z_ref = torch.empty_like(z)
        gemms.append(lambda: torch.mm(h_ref, w.t(), out=z_ref))
    gemms += [lambda: torch.mm(z, w), lambda: torch.mm(z.t(), h)]
    n, hid = h.shape
    return (lambda: [mm() for mm in gemms]), 2 * n * hid * w.shape[0] * len(gemms)


def gemm_times(inp: LInputs, device, args):
    """``(times, peak, None)`` of :func:`gemm_call` (the ``gemms`` row, ``fwd_bwd`` only)."""
    fn = gemm_call(inp)[0]
    fn()
    times = U.bench_ms(fn, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, cpu_reps=args.cpu_reps)
    return times, U.peak_mem_delta_mib(fn, device), None


def applicable(provider: str, case: str, mode: str) -> bool:
    """Combinations that exist at all (others are not rows, not failures). ``gemms`` is
    the matching work of ``fwd_bwd`` only (the fused path forms the gradient in its
    forward, so its ``fwd`` and ``bwd`` have no plain-GEMM counterpart)."""
    if provider == "gemms":
        return mode == "fwd_bwd"
    if provider in ("cce", "torch_lce"):
        return case == "sft"
    if provider == "liger":
        return case in ("sft", "dpo")
    return True


_COMPILED: Dict[str, Callable] = {}


def loss_fn_for(provider: str, case: str, inp: LInputs) -> Callable[[], torch.Tensor]:
    base = U.base_case(case)
    h, w, y = inp.hidden, inp.weight, inp.labels
    n_h = h.shape[-1]
    if provider in ("minorsft", "minorsft_torch"):
        try:
            from minorsft import linear as ML
            fn = {"token_logprobs": ML.linear_token_logprobs, "sft": ML.linear_sft_loss,
                  "minor_sft": ML.linear_minor_sft_loss, "minor_dpo": ML.linear_minor_dpo_loss,
                  "dpo": ML.linear_dpo_loss}[base]
        except (ImportError, AttributeError) as exc:
            raise Unavailable(f"minorsft.linear not importable: {exc}") from exc
        kw = {"backend": "torch"} if provider == "minorsft_torch" else {}
        if inp.ref_hidden is not None:
            kw["ref_hidden"] = inp.ref_hidden
        elif inp.ref_logprobs is not None:
            kw["ref_logprobs"] = inp.ref_logprobs
        if base in U.REF_LOGITS_CASES:
            kw["beta"] = BETA
        return lambda: fn(h, w, y, **kw)
    if provider in ("eager", "compile"):
        fn = eager_linear
        if provider == "compile":
            if base not in _COMPILED:
                _COMPILED[base] = torch.compile(lambda *a, **k: eager_linear(base, *a, **k))
            return lambda: _COMPILED[base](h, w, y, inp.ref_hidden, inp.ref_logprobs)
        return lambda: fn(base, h, w, y, inp.ref_hidden, inp.ref_logprobs)
    if provider == "liger":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as exc:
            raise Unavailable(f"liger-kernel not installed: {exc}") from exc
        if base == "sft":
            mod = LigerFusedLinearCrossEntropyLoss(ignore_index=eager.IGNORE_INDEX)
            return lambda: mod(w, h.reshape(-1, n_h), y.reshape(-1))
        mod = LigerFusedLinearDPOLoss(ignore_index=eager.IGNORE_INDEX, beta=BETA, use_ref_model=True)

        def run():
            out = mod(w, h, y, ref_input=inp.ref_hidden, ref_weight=w.detach())
            return out[0] if isinstance(out, tuple) else out
        return run
    if provider == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError as exc:
            raise Unavailable(f"cut-cross-entropy not installed: {exc}") from exc
        return lambda: linear_cross_entropy(h.reshape(-1, n_h), w, y.reshape(-1), reduction="mean")
    if provider == "torch_lce":
        lce = getattr(torch.nn.functional, "linear_cross_entropy", None)
        if lce is None:
            raise Unavailable(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
        return lambda: lce(h.reshape(-1, n_h), w, y.reshape(-1), ignore_index=eager.IGNORE_INDEX)
    if provider == "trl":
        try:
            from trl.kernels import ChunkedLogProbFunction
        except ImportError as exc:
            raise Unavailable(f"trl.kernels.ChunkedLogProbFunction not importable: {exc}") from exc
        mask = y != eager.IGNORE_INDEX
        safe = y.clamp(min=0).reshape(-1)

        def tok_of(x):
            return ChunkedLogProbFunction.apply(x.reshape(-1, n_h), w, None, safe, 1.0, TRL_CHUNK, None, 1.0,
                                                ())[0].view(y.shape)

        def run():
            tok = tok_of(h)
            ref_tok = inp.ref_logprobs
            if inp.ref_hidden is not None:
                with torch.no_grad():
                    ref_tok = tok_of(inp.ref_hidden)
            return eager.loss_from_token_logprobs(base, tok, mask, ref_tok, BETA)
        return run
    raise ValueError(f"provider: unknown {provider!r}, expected one of {PROVIDERS}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    ints = lambda s: [int(x) for x in csv(s)]  # noqa: E731
    p.add_argument("--cases", type=csv, default=list(U.BASE_CASES), help=f"comma list of {U.ALL_CASES}")
    p.add_argument("--modes", type=csv, default=["fwd_bwd"])
    p.add_argument("--providers", type=csv, default=list(PROVIDERS))
    p.add_argument("--vocabs", type=ints, default=None)
    p.add_argument("--tokens", type=ints, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--dtype", default="bf16", choices=tuple(U.DTYPES))
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--cpu-reps", type=int, default=3)
    p.add_argument("--time-budget-s", type=float, default=None)
    args = p.parse_args(argv)
    args.vocabs = args.vocabs or list(TINY["vocabs"] if args.tiny else VOCABS)
    args.tokens = args.tokens or list(TINY["tokens"] if args.tiny else TOKENS)
    args.hidden = args.hidden or (TINY["hidden"] if args.tiny else HIDDEN)
    for name, vals, allowed in (("cases", args.cases, U.ALL_CASES), ("modes", args.modes, U.MODES),
                                ("providers", args.providers, PROVIDERS)):
        bad = [v for v in vals if v not in allowed]
        if bad:
            p.error(f"--{name}: unknown {bad}, expected some of {allowed}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = U.bench_device()
    label, sha = U.device_label(), U.git_sha()
    here = os.path.dirname(os.path.abspath(__file__))
    path = args.out or U.default_result_path(os.path.join(here, "results"), label, sha)
    results = U.load_results(path)
    if results is None or results.get("device") != label or results.get("git_sha") != sha:
        results = U.new_results(label, sha, U.copy_bandwidth_gbs(device))
    print(f"{label}  torch {results['torch']}  triton {results['triton']}  git {sha}  -> {path}  (H = {args.hidden})")
    dtype = U.DTYPES[args.dtype]
    start, not_run = time.perf_counter(), []
    for tokens in args.tokens:
        for vocab in args.vocabs:
            for case in args.cases:
                if args.time_budget_s is not None and time.perf_counter() - start > args.time_budget_s:
                    not_run.append(f"{case} V={vocab} N={tokens}")
                    continue
                ref_out, skip = None, None
                try:
                    inp = LInputs(case, tokens, vocab, args.hidden, dtype, device, args.seed)
                    ref_out = reference_output(case, inp)
                    del inp
                except Exception as exc:  # noqa: BLE001
                    skip = f"reference failed: {U.error_text(exc)}"
                U.free_memory(device)
                for provider in args.providers:
                    for mode in [m for m in args.modes if applicable(provider, case, m)]:
                        err, times, peak = skip, None, None
                        if not skip:
                            try:
                                inp = LInputs(case, tokens, vocab, args.hidden, dtype, device, args.seed)
                                if provider == "gemms":
                                    fn = None
                                    times, peak, err = gemm_times(inp, device, args)
                                else:
                                    fn = loss_fn_for(provider, case, inp)
                                    g = inp.grad_out if U.base_case(case) == "token_logprobs" else None
                                    times, peak, err = time_mode(fn, mode, [inp.hidden, inp.weight], g,
                                                                 ref_out, device, args, rtol=RTOL)
                            except Unavailable as exc:
                                err = f"unavailable: {exc}"[:300]
                            except Exception as exc:  # noqa: BLE001
                                err = f"inputs: {U.error_text(exc)}"
                            inp = fn = None
                            U.free_memory(device)
                        row = U.make_row("linear_" + case, provider, mode, args.dtype, tokens, vocab, times, peak,
                                         None, error=err)
                        U.add_row(results, row)
                        U.write_results(path, results)
                        print(fmt_row(row), flush=True)
    if not_run:
        print(f"time budget reached; NOT run ({len(not_run)}): " + "; ".join(not_run))
    print(f"wrote {path} ({len(results['rows'])} rows) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
