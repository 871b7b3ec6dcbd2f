"""Opt-in autotuning of the logits-path launch configuration (``MINORSFT_AUTOTUNE=1``).

The default is a fixed configuration (``logprobs.DEFAULT_BLOCK_V`` / ``DEFAULT_NUM_WARPS``):
no timing, no synchronisation, the same numbers on every run. With ``MINORSFT_AUTOTUNE=1``
the first launch of a kernel for a shape bucket times each of :data:`CANDIDATES` on the
call's own tensors (outputs the real launch then overwrites; never an in-place backward,
whose input it would destroy) and keeps the fastest for the process. The bucket is the
kernel, the device's compute capability, the logits dtype, ``V`` rounded up to a power of
two and the rows rounded up to a power of two (capped at 2^16), so a training run tunes
once per distinct shape class, not per batch. Tuning synchronises (it times on the
device): it is skipped while a CUDA graph is being captured, and the explicit overrides
``MINORSFT_BLOCK_V`` / ``MINORSFT_NUM_WARPS`` win over it.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Dict, Optional, Tuple

import torch
import triton
import triton.testing

log = logging.getLogger("minorsft")

# (BLOCK_V, num_warps): 2-16 KiB of bf16 per load, 4-16 warps.
CANDIDATES: Tuple[Tuple[int, int], ...] = (
    (1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 8), (8192, 16))

_chosen: Dict[tuple, Tuple[int, int]] = {}


def enabled() -> bool:
    """``MINORSFT_AUTOTUNE=1`` and no explicit ``MINORSFT_BLOCK_V`` / ``MINORSFT_NUM_WARPS``."""
    if os.environ.get("MINORSFT_AUTOTUNE", "0") != "1":
        return False
    return not (os.environ.get("MINORSFT_BLOCK_V") or os.environ.get("MINORSFT_NUM_WARPS"))


def bucket(kernel: str, logits: torch.Tensor, vocab: int, n_rows: int) -> tuple:
    """The cache key of a launch: kernel name, device capability (or type), logits dtype,
    ``V`` and the rows each rounded up to a power of two (rows capped at 2^16)."""
    dev = logits.device
    arch = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else dev.type
    return (kernel, arch, logits.dtype, triton.next_power_of_2(vocab),
            min(triton.next_power_of_2(max(n_rows, 1)), 1 << 16))


def _time_ms(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        return float(triton.testing.do_bench(fn, warmup=5, rep=25))
    t0 = time.perf_counter()        # the interpreter: exercises the path, times nothing real
    fn()
    return (time.perf_counter() - t0) * 1e3


def chosen(key: tuple) -> Optional[Tuple[int, int]]:
    """The configuration already tuned for ``key``, or None."""
    return _chosen.get(key)


def tune(key: tuple, vocab: int, device: torch.device,
         launch: Callable[[int, int], None]) -> Tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for ``key``: the cached choice, else the fastest of the
    :data:`CANDIDATES` that fit ``vocab`` under ``launch(block, warps)`` (which must only
    write outputs the real launch overwrites). Logged once per key."""
    if key in _chosen:
        return _chosen[key]
    limit = triton.next_power_of_2(vocab)
    cands = [c for c in CANDIDATES if c[0] <= max(limit, CANDIDATES[0][0])]
    times = {c: _time_ms(lambda c=c: launch(*c), device) for c in cands}
    best = min(times, key=times.get)
    _chosen[key] = best
    log.info("minorsft autotune %s: BLOCK_V=%d num_warps=%d (%s)", key, best[0], best[1],
             ", ".join(f"{b}/{w}: {ms:.3f} ms" for (b, w), ms in times.items()))
    return best


def reset() -> None:
    """Forget every tuned choice (tests)."""
    _chosen.clear()
