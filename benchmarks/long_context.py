"""Long-context demonstration: the longest sequence one MinorSFT training step fits.

A Llama-3.2-1B-shaped model built from a config (hidden 2048, 16 layers, 32 heads /
8 KV heads, MLP 8192, vocabulary 128256, tied embeddings; random init, bf16, SDPA
attention, gradient checkpointing, AdamW), batch of one sequence, labels = the input
ids (the usual causal shift), reference log-probs precomputed per token before the
step (as TRL's ``precompute_ref_log_probs``; the precompute is not part of the
measured step). For each loss method the longest sequence that completes one
step (forward, backward, optimizer step) is found by doubling then bisection to
``--granularity`` tokens:

- ``eager``: ``model(...).logits`` (``[1, T, V]`` bf16) -> fp32 ``log_softmax`` ->
  gather -> MinorSFT (``benchmarks/eager.py``), what most training scripts do;
- ``logits``: the same logits into the fused ``ms.minor_sft_loss`` (no fp32 copies,
  but the bf16 logits and their gradient still exist);
- ``linear``: ``model.model(...)`` hidden states and ``lm_head.weight`` into
  ``minorsft.linear.linear_minor_sft_loss``: the logits never exist.

Reported per method: the longest length, tokens/s at it (median of ``--repeats``
steps) and at the longest length all methods reach, every trial (length, ok, peak MiB,
seconds). Separately, the loss's *own* memory: peak allocated during loss forward +
backward minus what was allocated before, from a ``[1, T, H]`` hidden-state leaf at the
eager method's longest length (``loss_memory``). Goals (issue 5): ``linear`` trains
>= 4x longer sequences than ``eager``, and its loss memory is < 1% of eager's.

Results go to ``benchmarks/results/long_context-<device>-<date>-<sha>.json``.

    python -m benchmarks.long_context                    # CUDA, the real demonstration
    python -m benchmarks.long_context --tiny             # CPU, seconds: proves the code path

``--tiny`` uses a 2-layer, 64-wide, 1000-token-vocabulary model on CPU with the torch
backends, and an emulated memory limit (``--mem-limit-mib``, default 24): a trial
fails when its peak of live tensor bytes (torch's profiler allocation counter) exceeds
it (default 6 MiB, lengths 32..1024). Its numbers only show that the search runs;
they are not measurements of anything.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from benchmarks import eager
from benchmarks import utils as U

METHODS = ("eager", "logits", "linear")
LLAMA_32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                   rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                   max_position_embeddings=262144)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=1000, rope_theta=10000.0,
            rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192)
BETA = 0.1


# --------------------------------------------------------------------------- model


def build_model(config: Dict[str, object], dtype: torch.dtype, device: torch.device, seed: int):
    """Random-init ``LlamaForCausalLM`` from ``config`` on ``device`` with gradient checkpointing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**config, use_cache=False)
    cfg._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)       # initialise directly in the target dtype
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):          # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    return model


# --------------------------------------------------------------------------- memory


class Meter:
    """Peak memory of a region: CUDA allocator statistics, or (CPU) torch's profiler
    allocation counter; ``limit_bytes`` emulates a smaller device on either."""

    def __init__(self, device: torch.device, limit_bytes: Optional[int]):
        self.device = device
        self.limit = limit_bytes

    def run(self, fn: Callable[[], object]) -> Dict[str, object]:
        """Run ``fn``; return ``ok``, ``peak_mib`` (above the memory before), ``seconds``, ``error``."""
        if self.device.type == "cuda":
            U.free_memory(self.device)
            return self._run_cuda(fn)
        return self._run_cpu(fn)

    def _run_cuda(self, fn):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        t0 = time.perf_counter()
        try:
            fn()
            torch.cuda.synchronize(self.device)
        except torch.cuda.OutOfMemoryError as exc:
            U.free_memory(self.device)
            return {"ok": False, "peak_mib": None, "seconds": None, "error": U.error_text(exc)}
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(self.device) - base
        ok = self.limit is None or peak <= self.limit
        return {"ok": ok, "peak_mib": peak / 2**20, "seconds": dt,
                "error": None if ok else "over --mem-limit"}

    def _run_cpu(self, fn):
        from torch.profiler import ProfilerActivity, profile

        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        dt = time.perf_counter() - t0
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"long_context_{os.getpid()}.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
        os.remove(path)
        peak = max([e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
                   or [0])
        ok = self.limit is None or peak <= self.limit
        return {"ok": ok, "peak_mib": peak / 2**20, "seconds": dt,
                "error": None if ok else "over --mem-limit"}


# --------------------------------------------------------------------------- steps


def loss_from_hidden(method: str, hidden, weight, labels, ref_lp, budget: Optional[int]):
    """MinorSFT loss of ``method`` from aligned ``hidden [1, T, H]`` and ``labels [1, T]``."""
    import minorsft as ms
    from minorsft import linear as ML

    if method == "linear":
        return ML.linear_minor_sft_loss(hidden, weight, labels, ref_logprobs=ref_lp, beta=BETA,
                                        check_labels=False, memory_budget=budget)
    logits = torch.nn.functional.linear(hidden, weight)
    if method == "logits":
        return ms.minor_sft_loss(logits, labels, ref_logprobs=ref_lp, beta=BETA, check_labels=False)
    return eager.minor_sft_loss(logits, labels, ref_logprobs=ref_lp, beta=BETA)


def train_step(method: str, model, opt, input_ids, ref_lp, budget: Optional[int]):
    """One MinorSFT step on ``input_ids [1, T]`` (labels = inputs, shifted): ours with
    ``shift=True`` (no slice of the logits or hidden states), eager sliced as users write it."""
    import minorsft as ms
    from minorsft import linear as ML

    opt.zero_grad(set_to_none=True)
    if method == "linear":
        hidden = model.model(input_ids=input_ids).last_hidden_state
        loss = ML.linear_minor_sft_loss(hidden, model.lm_head.weight, input_ids, ref_logprobs=ref_lp,
                                        beta=BETA, check_labels=False, memory_budget=budget,
                                        shift=True)
    else:
        logits = model(input_ids=input_ids).logits
        if method == "logits":
            loss = ms.minor_sft_loss(logits, input_ids, ref_logprobs=ref_lp, beta=BETA,
                                     check_labels=False, shift=True)
        else:
            loss = eager.minor_sft_loss(logits[:, :-1], input_ids[:, 1:], ref_logprobs=ref_lp, beta=BETA)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def reference_logprobs(model, input_ids, budget: Optional[int]) -> torch.Tensor:
    """Per-token reference log-probs ``[1, T - 1]`` fp32 of the (initial) model, computed
    without logits; stands in for a precomputed table."""
    from minorsft import linear as ML

    hidden = model.model(input_ids=input_ids).last_hidden_state
    return ML.linear_token_logprobs(hidden, model.lm_head.weight, input_ids, check_labels=False,
                                    memory_budget=budget, shift=True)


# --------------------------------------------------------------------------- search


class Runner:
    def __init__(self, args, model, device, meter):
        self.args, self.model, self.device, self.meter = args, model, device, meter
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=False)
        self.vocab = model.config.vocab_size
        self.budget = int(args.linear_budget_mib * 2**20) if args.linear_budget_mib else None
        self.trials: Dict[str, List[Dict[str, object]]] = {m: [] for m in METHODS}

    def inputs(self, length: int):
        g = torch.Generator().manual_seed(length)
        ids = torch.randint(0, self.vocab, (1, length), generator=g).to(self.device)
        ref = reference_logprobs(self.model, ids, self.budget)
        return ids, ref

    def trial(self, method: str, length: int, record: bool = True) -> Dict[str, object]:
        try:
            ids, ref = self.inputs(length)
        except torch.cuda.OutOfMemoryError as exc:
            res = {"ok": False, "peak_mib": None, "seconds": None,
                   "error": "reference precompute: " + U.error_text(exc)}
        else:
            res = self.meter.run(lambda: train_step(method, self.model, self.opt, ids, ref,
                                                    self.budget))
            del ids, ref
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            U.free_memory(self.device)
        res = {"length": length, **res}
        if record:
            self.trials[method].append(res)
        print(f"  {method:7s} T={length:7d} ok={res['ok']!s:5s} peak={res['peak_mib']} MiB "
              f"t={res['seconds']}", flush=True)
        return res

    def longest(self, method: str) -> Optional[int]:
        """Double from ``--min-len`` until a step fails, then bisect to ``--granularity``."""
        a = self.args
        good, bad, length = None, None, a.min_len
        while length <= a.max_len:
            if self.trial(method, length)["ok"]:
                good, length = length, length * 2
            else:
                bad = length
                break
        if good is None or bad is None:
            return good
        while bad - good > a.granularity:
            mid = (good + bad) // 2 // a.granularity * a.granularity
            if mid <= good:
                break
            if self.trial(method, mid)["ok"]:
                good = mid
            else:
                bad = mid
        return good

    def tokens_per_s(self, method: str, length: int) -> Optional[float]:
        """Median tokens/s of ``--repeats`` steps at ``length`` (after one warm-up step)."""
        self.trial(method, length, record=False)
        times = []
        for _ in range(self.args.repeats):
            res = self.trial(method, length, record=False)
            if not res["ok"]:
                return None
            times.append(res["seconds"])
        return length / statistics.median(times)

    def loss_memory(self, length: int) -> Dict[str, Optional[float]]:
        """Peak MiB of each method's loss forward + backward alone, from a hidden-state leaf."""
        H = self.model.config.hidden_size
        weight = self.model.lm_head.weight
        out = {}
        for method in METHODS:
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, self.vocab, (1, length + 1), generator=g).to(self.device)
            hidden = torch.randn(1, length, H, generator=g).to(self.device, weight.dtype)
            hidden.requires_grad_(True)
            ref = torch.zeros(1, length, device=self.device)

            def run():
                loss_from_hidden(method, hidden, weight, ids[:, 1:], ref, self.budget).backward()

            res = self.meter.run(run)
            weight.grad = None
            out[method] = res["peak_mib"]          # None when it ran out of memory
            del hidden, ids, ref
            if self.device.type == "cuda":
                U.free_memory(self.device)
        return out


# --------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    """Parse ``argv``, run the search, write and return the results dict."""
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)


def _main(argv: Optional[List[str]]) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU code-path check in seconds")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--min-len", type=int, default=None, help="first length tried")
    p.add_argument("--max-len", type=int, default=None, help="longest length tried")
    p.add_argument("--granularity", type=int, default=None, help="bisection resolution, tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed steps for tokens/s")
    p.add_argument("--mem-limit-mib", type=float, default=None,
                   help="emulated device memory limit for the step's peak (CPU: required)")
    p.add_argument("--linear-budget-mib", type=float, default=None,
                   help="torch backend chunk budget for the linear loss (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results JSON path")
    p.add_argument("--results-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)

    device = U.bench_device()
    if args.tiny:
        device = torch.device("cpu")
        torch.set_num_threads(1)     # tiny matrices: more threads only add synchronisation
        config, dtype = TINY, torch.float32
        args.min_len = args.min_len or 32
        args.max_len = args.max_len or 1024
        args.granularity = args.granularity or 32
        args.mem_limit_mib = args.mem_limit_mib or 6.0
        args.linear_budget_mib = args.linear_budget_mib or 0.25
        args.repeats = 1
    else:
        if device.type != "cuda":
            p.error("the demonstration needs a CUDA GPU; use --tiny for the CPU code-path check")
        config, dtype = LLAMA_32_1B, torch.bfloat16
        args.min_len = args.min_len or 4096
        args.max_len = args.max_len or 262144
        args.granularity = args.granularity or 1024
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}, expected some of {METHODS}")
    limit = int(args.mem_limit_mib * 2**20) if args.mem_limit_mib else None

    model = build_model(config, dtype, device, args.seed)
    runner = Runner(args, model, device, Meter(device, limit))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters, {dtype}, {device}", flush=True)

    results: Dict[str, object] = {
        "device": U.device_label() if device.type == "cuda" else "cpu-tiny",
        **U.versions(), "git_sha": U.git_sha(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tiny": bool(args.tiny), "model": {**config, "dtype": str(dtype), "params": n_params,
                                           "gradient_checkpointing": True, "optimizer": "AdamW"},
        "search": {"min_len": args.min_len, "max_len": args.max_len,
                   "granularity": args.granularity, "mem_limit_mib": args.mem_limit_mib},
        "methods": {},
    }
    longest = {}
    for m in methods:
        print(f"[{m}] searching", flush=True)
        longest[m] = runner.longest(m)
    common = min([v for v in longest.values() if v] or [None]) if longest else None
    for m in methods:
        best = longest[m]
        results["methods"][m] = {
            "max_len": best,
            # no trial failed: the true limit lies beyond --max-len
            "hit_max_len": all(t["ok"] for t in runner.trials[m]),
            "tokens_per_s_at_max": runner.tokens_per_s(m, best) if best else None,
            "tokens_per_s_at_common": runner.tokens_per_s(m, common) if common else None,
            "trials": runner.trials[m],
        }
    results["common_len"] = common
    if "eager" in longest and longest["eager"]:
        results["loss_memory_len"] = longest["eager"]
        results["loss_memory_mib"] = runner.loss_memory(longest["eager"])
        lm = results["loss_memory_mib"]
        if lm.get("eager") and lm.get("linear") is not None:
            results["loss_memory_ratio_linear_vs_eager"] = lm["linear"] / lm["eager"]
        if longest.get("linear"):
            results["length_ratio_linear_vs_eager"] = longest["linear"] / longest["eager"]

    path = args.out or os.path.join(
        args.results_dir, f"long_context-{U.slug(results['device'])}-"
        f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%d}-{results['git_sha']}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    summary = {m: (r["max_len"], r["tokens_per_s_at_max"]) for m, r in results["methods"].items()}
    print(f"longest (tokens, tokens/s): {summary}")
    print(f"length ratio linear/eager: {results.get('length_ratio_linear_vs_eager')}; "
          f"loss memory ratio linear/eager: {results.get('loss_memory_ratio_linear_vs_eager')}")
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
