"""Shared benchmark utilities: timing, peak memory, copy bandwidth, byte floors, JSON.

Measurement rules (issue 4):
- time: median and 20th/80th percentiles of ``triton.testing.do_bench`` on CUDA (device
  events, L2 flushed between runs); on CPU (the Triton interpreter, for validating the
  harness only) a host-clock fallback with the same return shape (``host_times_ms``, which
  also times several providers round-robin). Interpreter numbers are not performance
  figures; the PyTorch backend's (``--cpu``) are the CPU's.
- modes: ``fwd`` times the forward with gradients enabled; ``bwd`` one backward of a graph
  built by an untimed forward just before it (``BackwardOnly``); ``fwd_bwd`` both.
- memory: the peak of ``torch.cuda.max_memory_allocated`` during one call *minus* what
  was allocated before it (the inputs, and for ``bwd`` the saved forward state); ``None``
  on CPU.
- floor: the bytes of SPEC.md section 4 (``floor_bytes``) over a device-to-device copy
  bandwidth measured in the same run (``copy_bandwidth_gbs``: a ``COPY_BYTES`` = 1 GiB
  copy on every device, bytes read + written).
- results: one JSON per run with exactly the schema of issue 4 (``write_results``); a
  failed row carries one extra key, ``error``.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import re
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

ROW_KEYS = ("case", "provider", "mode", "dtype", "tokens", "vocab", "ms_median", "ms_p20", "ms_p80",
            "peak_mem_delta_mib", "floor_ms")
TOP_KEYS = ("device", "torch", "triton", "git_sha", "timestamp", "copy_bandwidth_gbs", "rows")
MODES = ("fwd", "bwd", "fwd_bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Cases whose loss reads reference *logits* (one more [N, V] read in the forward). The
# "_reflogps" variants take precomputed reference token log-probs instead ([N] fp32).
REF_LOGITS_CASES = ("minor_sft", "minor_dpo", "dpo")
REF_LOGPS_SUFFIX = "_reflogps"
BASE_CASES = ("token_logprobs", "sft") + REF_LOGITS_CASES
ALL_CASES = BASE_CASES + tuple(c + REF_LOGPS_SUFFIX for c in REF_LOGITS_CASES)
# The copy that measures the bandwidth of the floors, on every device: 1 GiB of fp32, far
# beyond any cache the data could sit in (an H100/H200's 50/60 MiB L2, a server CPU's L3)
# and the size of one vocabulary-sized tensor of the shapes measured (the --cpu shape's
# fp32 logits are 1.05 GB), so the floor is set by device memory, as the kernels are.
COPY_BYTES = 2**30


def base_case(case: str) -> str:
    """The loss of a case name: ``minor_sft_reflogps`` -> ``minor_sft``."""
    return case[: -len(REF_LOGPS_SUFFIX)] if case.endswith(REF_LOGPS_SUFFIX) else case


def ref_kind(case: str) -> Optional[str]:
    """What reference a case reads: ``"logits"`` (a live reference: ``[B, T, V]`` logits,
    or ``[B, T, H]`` hidden states on the linear path), ``"logprobs"`` (precomputed token
    log-probs ``[B, T]``) or ``None`` (no reference)."""
    if case.endswith(REF_LOGPS_SUFFIX):
        return "logprobs"
    return "logits" if case in REF_LOGITS_CASES else None


def interpreter() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def bench_device(cpu: bool = False) -> torch.device:
    """``cuda`` when a GPU is present (and ``cpu`` is not asked for), else ``cpu``."""
    return torch.device("cuda") if torch.cuda.is_available() and not cpu else torch.device("cpu")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``) and torch's thread count."""
    name = "unknown cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def device_label(device: Optional[torch.device] = None) -> str:
    """The ``device`` field: the GPU name, ``cpu-interpreter`` (Triton kernels interpreted:
    no performance figures), or ``cpu (<model>, <n> threads)`` (the PyTorch backend)."""
    device = device or bench_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu-interpreter" if interpreter() else f"cpu ({cpu_name()})"


def slug(text: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3`` (file-name safe)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def git_sha() -> str:
    """Short commit of the checkout: ``$MINORSFT_GIT_SHA`` if set (the device machine may
    have no ``.git``), else ``git rev-parse --short HEAD``, else ``nogit``. A ``+dirty``
    suffix is *not* added: run benchmarks on committed code."""
    env = os.environ.get("MINORSFT_GIT_SHA")
    if env:
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
        sha = out.stdout.strip()
        return sha if out.returncode == 0 and sha else "nogit"
    except (OSError, subprocess.SubprocessError):
        return "nogit"


def versions() -> Dict[str, str]:
    """``torch`` and ``triton`` version strings (``"absent"`` when Triton is missing)."""
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "absent"
    return {"torch": torch.__version__, "triton": tv}


def default_result_path(results_dir: str, device: str, sha: str, when: Optional[_dt.datetime] = None) -> str:
    """``<results_dir>/<gpu>-<yyyymmdd>-<sha>.json``."""
    when = when or _dt.datetime.now(_dt.timezone.utc)
    return os.path.join(results_dir, f"{slug(device)}-{when:%Y%m%d}-{sha}.json")


# --------------------------------------------------------------------------- bytes
def floor_bytes(case: str, mode: str, tokens: int, vocab: int, elem_bytes: int,
                grad_rows: Optional[int] = None) -> int:
    """Fewest device-memory bytes a fused kernel must move, SPEC.md section 4.

    ``tokens``: the scored rows (each read in the forward and again in the backward);
    ``grad_rows``: the rows of the logits gradient written in the backward (default
    ``tokens``; with ``shift=True`` it is ``B * T`` for ``B * (T - 1)`` scored rows, the
    last position's gradient being a row of zeros that must still be written).

    Per token, with ``e`` bytes per logit element and vocabulary ``V``:

    ============================== ========= ======= ============
    case                            fwd       bwd     fwd_bwd
    ============================== ========= ======= ============
    token_logprobs, sft             eV        2eV     3eV
    minor_sft, minor_dpo, dpo       2eV       2eV     4eV  (8V bf16)
    (reference logits)
    ``*_reflogps`` (precomputed     eV        2eV     3eV  (6V bf16)
    reference token log-probs)
    ============================== ========= ======= ============

    forward reads the policy row (and the reference row when the case takes reference
    logits); backward reads the policy row once and writes its gradient once (the
    reference has no gradient). Per-token O(1) traffic (labels, fp32 log-probs,
    logsumexp, per-sequence sums: under 32 bytes a token, < 0.05% at V >= 32000) is left
    out, so the floor is a slight *under*-estimate.
    """
    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}, expected one of {MODES}")
    if case not in ALL_CASES:
        raise ValueError(f"case: unknown {case!r}")
    grad_rows = tokens if grad_rows is None else grad_rows
    ref_rows = 1 if ref_kind(case) == "logits" else 0
    row = vocab * elem_bytes
    fwd = (1 + ref_rows) * row * tokens
    bwd = row * tokens + row * grad_rows
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def floor_ms(nbytes: int, copy_bandwidth_gbs: Optional[float]) -> Optional[float]:
    """``nbytes`` at the measured copy bandwidth (GB/s = 1e9 bytes/s), in milliseconds."""
    if not copy_bandwidth_gbs:
        return None
    return nbytes / (copy_bandwidth_gbs * 1e9) * 1e3


# --------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(times: List[float]) -> List[float]:
    """``[median, p20, p80]`` of ``times``."""
    qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return [statistics.median(times), qs[1], qs[7]]


def _cuda_bench_with_setup(fn, setup, warmup_ms: float, rep_ms: float, grad_to_none) -> List[float]:
    """``do_bench``'s method (CUDA events, L2 flushed before each call) with an untimed
    ``setup()`` before every call (e.g. refilling a buffer that the call overwrites)."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    events = []
    for _ in range(3):                                     # estimate one call
        setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        events.append(start.elapsed_time(end))
    est = max(statistics.median(events), 1e-3)
    n_warm, n_rep = max(1, int(warmup_ms / est)), max(5, int(rep_ms / est))
    times = []
    for i in range(n_warm + n_rep):
        setup()
        for t in grad_to_none or ():
            t.grad = None
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= n_warm:
            times.append(start.elapsed_time(end))
    return quantiles(times)


def bench_ms(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25.0,
             rep_ms: float = 100.0, grad_to_none: Optional[Sequence[torch.Tensor]] = None,
             cpu_reps: int = 3, setup: Optional[Callable[[], object]] = None) -> List[float]:
    """``[median, p20, p80]`` milliseconds of ``fn()``.

    CUDA: ``triton.testing.do_bench`` (events, L2 flushed, ``grad_to_none`` reset
    between runs so backward writes fresh gradients rather than accumulating); with
    ``setup``, the same method with ``setup()`` run untimed before every call. CPU:
    :func:`host_times_ms` of this one call.
    """
    if device.type == "cuda" and setup is not None:
        return _cuda_bench_with_setup(fn, setup, warmup_ms, rep_ms, grad_to_none)
    if device.type == "cuda":
        import triton.testing
        res = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                      quantiles=[0.5, 0.2, 0.8])
        return [float(x) for x in res]
    return host_times_ms({"fn": (fn, setup, grad_to_none)}, cpu_reps)["fn"]


Timed = Tuple[Callable[[], object], Optional[Callable[[], object]], Optional[Sequence[torch.Tensor]]]


def host_times_ms(calls: Dict[str, Timed], reps: int) -> Dict[str, List[float]]:
    """Host-clock ``{name: [median, p20, p80]}`` ms of several calls timed round-robin.

    ``calls``: ``{name: (fn, setup, grad_to_none)}``. One untimed warm-up round, then
    ``reps`` rounds of one call of each, so that a change of load on a shared machine
    falls on all of them alike. Before every call, untimed: ``setup()`` (when given),
    then ``.grad = None`` on each of ``grad_to_none``. The only host timing loop of the
    benchmarks (``bench_ms`` on a CPU is this with one call).
    """
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for rnd in range(reps + 1):
        for name, (fn, setup, grad_to_none) in calls.items():
            if setup is not None:
                setup()
            for t in grad_to_none or ():
                t.grad = None
            t0 = time.perf_counter()
            fn()
            if rnd:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: quantiles(ts) for name, ts in times.items()}


class BackwardOnly:
    """The ``bwd`` mode's timed call: one backward of one forward graph.

    ``setup()`` (untimed; the timing loops run it before every call) drops the previous
    graph, runs the provider's own ``setup`` (if any), then one forward ``fn_fwd()``;
    the call runs that graph's backward once (``out.backward(g)``, no ``retain_graph``,
    so the saved tensors are freed as training frees them) and drops it. At most one of
    this provider's graphs is alive, and none once its backward ran, whatever else is
    being timed beside it. ``g``: the upstream gradient of a non-scalar output (shape of
    the output, e.g. ``[B, T]``), ``None`` for a scalar loss.
    """

    def __init__(self, fn_fwd: Callable[[], torch.Tensor], g: Optional[torch.Tensor] = None,
                 setup: Optional[Callable[[], object]] = None):
        self.fn_fwd, self.g, self.provider_setup = fn_fwd, g, setup
        self.out: Optional[torch.Tensor] = None

    def setup(self) -> None:
        self.out = None
        if self.provider_setup is not None:
            self.provider_setup()
        self.out = self.fn_fwd()

    def __call__(self) -> None:
        out, self.out = self.out, None
        if out is None:
            raise RuntimeError("BackwardOnly: call setup() before every timed call")
        out.backward(self.g)


def peak_mem_delta_mib(fn: Callable[[], object], device: torch.device,
                       grad_to_none: Optional[Sequence[torch.Tensor]] = None,
                       setup: Optional[Callable[[], object]] = None) -> Optional[float]:
    """Peak allocated memory during one ``fn()`` minus the memory allocated before it, MiB.

    ``setup()`` runs first, outside the measurement. What ``fn`` returns is dropped after
    the peak is read. ``None`` on CPU.
    """
    if device.type != "cuda":
        return None
    if setup is not None:
        setup()
    if grad_to_none:
        for t in grad_to_none:
            t.grad = None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return (peak - base) / 2**20


def copy_bandwidth_gbs(device: torch.device, nbytes: Optional[int] = None) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written.

    ``Tensor.copy_`` of an fp32 buffer of ``nbytes`` (default ``COPY_BYTES``, 1 GiB, on
    every device: see there), median of ``bench_ms`` (``do_bench`` on CUDA, the host clock
    on a CPU). The buffer repeats a 1 MiB random block: never zeros, and quick to fill.
    """
    nbytes = COPY_BYTES if nbytes is None else nbytes
    block = torch.randn(min(nbytes // 4, 2**18), dtype=torch.float32, device=device)
    src = block.repeat(-(-(nbytes // 4) // block.numel()))[: nbytes // 4]
    del block
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    ms = bench_ms(lambda: dst.copy_(src), device, warmup_ms=50, rep_ms=200, cpu_reps=5)[0]
    del src, dst
    free_memory(device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def free_bytes(device: torch.device) -> Optional[int]:
    """Free device memory in bytes (``None`` on CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0]


def error_text(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` for a failed row; OOM is named as such."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    kind = "OOM" if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in msg.lower() \
        else type(exc).__name__
    return f"{kind}: {msg}"[:limit]


# --------------------------------------------------------------------------- rows / JSON
def make_row(case: str, provider: str, mode: str, dtype: str, tokens: int, vocab: int,
             times: Optional[Sequence[float]], peak_mib: Optional[float], floor: Optional[float],
             error: Optional[str] = None) -> Dict[str, object]:
    """One result row with exactly ``ROW_KEYS`` (plus ``error`` on a failed row)."""
    row = {
        "case": case, "provider": provider, "mode": mode, "dtype": dtype,
        "tokens": int(tokens), "vocab": int(vocab),
        "ms_median": _num(times[0]) if times else None,
        "ms_p20": _num(times[1]) if times else None,
        "ms_p80": _num(times[2]) if times else None,
        "peak_mem_delta_mib": _num(peak_mib),
        "floor_ms": _num(floor),
    }
    if error is not None:
        row["error"] = error
    return row


def _num(x: Optional[float]) -> Optional[float]:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return float(f"{float(x):.6g}")           # 6 significant digits


def row_key(row: Dict[str, object]) -> tuple:
    return tuple(row[k] for k in ("case", "provider", "mode", "dtype", "tokens", "vocab"))


def new_results(device: str, sha: str, bandwidth: Optional[float]) -> Dict[str, object]:
    """The top-level dict of the schema, with no rows yet."""
    v = versions()
    return {
        "device": device, "torch": v["torch"], "triton": v["triton"], "git_sha": sha,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth_gbs": _num(bandwidth), "rows": [],
    }


def load_results(path: str) -> Optional[Dict[str, object]]:
    """An existing results file, or ``None``."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def add_row(results: Dict[str, object], row: Dict[str, object]) -> None:
    """Append ``row``, replacing an earlier row with the same case/provider/mode/dtype/shape."""
    key = row_key(row)
    rows = [r for r in results["rows"] if row_key(r) != key]
    rows.append(row)
    results["rows"] = rows


def write_results(path: str, results: Dict[str, object]) -> None:
    """Write ``results`` atomically (a partial run still leaves a valid file)."""
    check_schema(results)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({k: results[k] for k in TOP_KEYS}, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def check_schema(results: Dict[str, object]) -> None:
    """Raise ``ValueError`` unless ``results`` has exactly the issue-4 schema."""
    if set(results) != set(TOP_KEYS):
        raise ValueError(f"results keys: got {sorted(results)}, expected {sorted(TOP_KEYS)}")
    for row in results["rows"]:
        keys = set(row)
        if keys != set(ROW_KEYS) and keys != set(ROW_KEYS) | {"error"}:
            raise ValueError(f"row keys: got {sorted(keys)}, expected {sorted(ROW_KEYS)} (+ error)")
        if "error" not in row and row["ms_median"] is None:
            raise ValueError(f"row without time and without error: {row}")
