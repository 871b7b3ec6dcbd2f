"""The benchmark harness: byte floors, and a tiny end-to-end run whose JSON has the issue-4 schema.

The run goes through a subprocess (``python -m benchmarks.bench_logprobs``) so that
``TRITON_INTERPRET=1`` is set before Triton compiles anything on a CPU-only machine;
on a GPU it runs natively. It takes a few seconds on CPU (V=1000, 32 tokens).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import utils as U
from tests.util import ROOT, subprocess_env

# Spawns its own TRITON_INTERPRET=1 subprocesses: one pass of `make test` is enough.
pytestmark = pytest.mark.no_interpreter



def _run(module: str, args: list, *, interpret: bool) -> dict:
    """``python -m benchmarks.MODULE ARGS`` in this checkout (under the Triton interpreter
    when ``interpret`` and no GPU), which must succeed; the JSON it wrote to ``--out``."""
    env = subprocess_env()
    env.pop("TRITON_INTERPRET", None)
    if interpret and not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(args[args.index("--out") + 1], encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("case, per_token_bf16", [
    ("minor_sft", 8), ("minor_dpo", 8), ("dpo", 8),                       # reference logits: 8V
    ("minor_sft_reflogps", 6), ("minor_dpo_reflogps", 6), ("dpo_reflogps", 6),  # precomputed: 6V
    ("sft", 6), ("token_logprobs", 6),
])
def test_floor_bytes_fwd_bwd_matches_spec(case, per_token_bf16):
    vocab, tokens = 128256, 16384
    assert U.floor_bytes(case, "fwd_bwd", tokens, vocab, 2) == per_token_bf16 * vocab * tokens
    # fwd + bwd add up, and fp32 doubles everything
    assert (U.floor_bytes(case, "fwd", tokens, vocab, 2) + U.floor_bytes(case, "bwd", tokens, vocab, 2)
            == U.floor_bytes(case, "fwd_bwd", tokens, vocab, 2))
    assert U.floor_bytes(case, "fwd_bwd", tokens, vocab, 4) == 2 * per_token_bf16 * vocab * tokens


def test_floor_bytes_grad_rows():
    """With shift the backward writes more gradient rows (the zero row of the last position)
    than it reads; the forward reads the scored rows only."""
    v, e = 1000, 2
    assert U.floor_bytes("minor_sft", "fwd", 30, v, e, grad_rows=32) == U.floor_bytes("minor_sft", "fwd", 30, v, e)
    assert U.floor_bytes("sft", "bwd", 30, v, e, grad_rows=32) == (30 + 32) * v * e
    assert U.floor_bytes("sft", "bwd", 30, v, e) == 2 * 30 * v * e


def test_floor_bytes_rejects_unknown_names():
    with pytest.raises(ValueError, match="mode"):
        U.floor_bytes("sft", "fwd+bwd", 1, 1, 2)
    with pytest.raises(ValueError, match="case"):
        U.floor_bytes("kto", "fwd", 1, 1, 2)


def test_schema_check_rejects_extra_keys():
    res = U.new_results("cpu", "nogit", 1.0)
    U.add_row(res, U.make_row("sft", "eager", "fwd", "bf16", 64, 1000, [1.0, 0.9, 1.1], None, 0.5))
    U.check_schema(res)
    res["rows"][0]["extra"] = 1
    with pytest.raises(ValueError, match="row keys"):
        U.check_schema(res)


def test_tiny_run_writes_schema(tmp_path):
    res = _run("bench_logprobs", ["--tiny", "--vocabs", "1000", "--tokens", "32", "--cases", "minor_sft",
                                  "--modes", "fwd_bwd",
                                  "--providers", "minorsft,minorsft_shift,minorsft_inplace,eager,eager_shift,liger",
                                  "--fp32-shapes", "", "--cpu-reps", "1", "--out", tmp_path / "bench.json"],
               interpret=True)
    assert list(res) == list(U.TOP_KEYS)
    assert res["device"] == ("cpu-interpreter" if not torch.cuda.is_available() else torch.cuda.get_device_name())
    assert res["copy_bandwidth_gbs"] > 0
    rows = {r["provider"]: r for r in res["rows"]}
    # liger does not apply to minor_sft: no row at all (not a failure); the others measured
    # (each checked against the fp32 eager formula first: the shift drop-in and eager on
    # the sliced logits against the sliced formula, the in-place one on layer-fed logits)
    assert set(rows) == {"minorsft", "minorsft_shift", "minorsft_inplace", "eager", "eager_shift"}, res["rows"]
    for provider, row in rows.items():
        assert set(row) == set(U.ROW_KEYS), (provider, row)          # no "error" key: it ran
        # 32 tokens = 2 sequences of 16; with shift 2 x 15 positions are scored (and read),
        # while the backward still writes the gradient of all 32 rows
        scored = 30 if provider.endswith("_shift") else 32
        assert (row["case"], row["mode"], row["dtype"], row["tokens"], row["vocab"]) == (
            "minor_sft", "fwd_bwd", "bf16", scored, 1000)
        assert 0 < row["ms_p20"] <= row["ms_median"] <= row["ms_p80"]
        nbytes = (2 + 1) * scored * 1000 * 2 + 32 * 1000 * 2   # policy + reference + backward read, grad write
        assert row["floor_ms"] == pytest.approx(nbytes / (res["copy_bandwidth_gbs"] * 1e9) * 1e3, rel=1e-3)
        assert (row["peak_mem_delta_mib"] is None) == (not torch.cuda.is_available())


def test_cpu_comparison_run(tmp_path):
    """--cpu: the PyTorch backend against eager (and torch.compile) on the CPU, side by side."""
    res = _run("bench_logprobs", ["--cpu", "--vocabs", "500", "--tokens", "64", "--providers", "minorsft,eager",
                                  "--cpu-reps", "1", "--out", tmp_path / "cpu.json"], interpret=False)
    assert res["device"].startswith("cpu (")
    rows = res["rows"]
    assert {(r["case"], r["provider"], r["dtype"]) for r in rows} == {
        (c, p, "fp32") for c in ("minor_sft", "sft") for p in ("minorsft", "eager")}
    assert all("error" not in r for r in rows), rows


def test_tiny_linear_run_writes_schema(tmp_path):
    res = _run("bench_linear", ["--tiny", "--vocabs", "1000", "--tokens", "32", "--cases", "minor_dpo",
                                "--providers", "minorsft,gemms,eager,cce", "--cpu-reps", "1",
                                "--out", tmp_path / "bench_linear.json"], interpret=True)
    assert list(res) == list(U.TOP_KEYS)
    rows = {r["provider"]: r for r in res["rows"]}
    assert set(rows) == {"minorsft", "gemms", "eager"}, res["rows"]      # cce is sft-only: no row
    for provider, row in rows.items():
        assert set(row) == set(U.ROW_KEYS), (provider, row)
        assert row["case"] == "linear_minor_dpo" and row["floor_ms"] is None
        assert 0 < row["ms_p20"] <= row["ms_median"] <= row["ms_p80"]


def test_plot_goal_table_ratios():
    """The README goal check divides the right numbers (synthetic rows, never written to disk)."""
    from benchmarks import plot

    res = U.new_results("test-gpu", "nogit", 3000.0)
    shape = ("minor_sft", "fwd_bwd", "bf16", 16384, 128256)

    def add(provider, ms, mib, floor=8.0):
        case, mode, dt, n, v = shape
        U.add_row(res, U.make_row(case, provider, mode, dt, n, v, [ms, ms * 0.9, ms * 1.1], mib, floor))

    grad_mib = 16384 * 128256 * 2 / 2**20
    add("minorsft", 10.0, grad_mib)
    add("minorsft_inplace", 10.0, 0.01 * grad_mib)
    add("eager", 40.0, 6 * grad_mib)
    add("compile", 15.0, 2 * grad_mib)
    lines = plot.goal_table(res)
    row = [ln for ln in lines if ln.startswith("| minor_sft ")]
    assert row == ["| minor_sft | 10.000 | 80.0 | 4.00x | 1.50x | 1.000 | 0.010 |"], lines


# --------------------------------------------------------------------------- shared facts and timing
def test_shared_facts_live_in_utils():
    """Case names and their parsing are stated once, in utils (the scripts use those)."""
    from benchmarks import bench_linear as L, bench_logprobs as B

    for mod in (B, L):
        for name in ("base_case", "ref_kind", "BASE_CASES", "ALL_CASES"):
            assert getattr(mod, name, getattr(U, name)) is getattr(U, name), (mod.__name__, name)
    assert U.base_case("minor_dpo_reflogps") == "minor_dpo" and U.base_case("sft") == "sft"
    assert [U.ref_kind(c) for c in ("sft", "dpo", "dpo_reflogps")] == [None, "logits", "logprobs"]


def test_host_times_round_robin_setup_untimed():
    """One warm-up round, then rounds of one call each; setup and grad reset are not timed."""
    import time

    log = []

    def call(n):
        return (lambda: log.append(("call", n)), lambda: (log.append(("setup", n)), time.sleep(0.05)), None)

    res = U.host_times_ms({"a": call("a"), "b": call("b")}, 2)
    assert log == [(k, n) for _ in range(3) for n in "ab" for k in ("setup", "call")]
    assert set(res) == {"a", "b"}
    assert all(len(v) == 3 and v[0] < 25.0 for v in res.values()), res


def _tiny_inputs(case="sft"):
    from benchmarks import bench_logprobs as B

    return B.make_inputs(case, 8, 16, torch.float32, torch.device("cpu"), 0)


def _side_by_side_args(providers, reps=2):
    import argparse

    return argparse.Namespace(providers=list(providers), no_label_check=False, cpu_reps=reps)


def test_side_by_side_times_through_utils(monkeypatch):
    """The round-robin CPU comparison uses the one timing loop of utils, every provider in it."""
    from benchmarks import bench_logprobs as B

    inp = _tiny_inputs()
    fwd = lambda: inp.logits.float().logsumexp(-1).sum()  # noqa: E731
    monkeypatch.setattr(B, "loss_fn_for", lambda provider, case, inp, nlc=False: fwd)
    seen = []
    real = U.host_times_ms
    monkeypatch.setattr(U, "host_times_ms", lambda calls, reps: (seen.append((sorted(calls), reps)), real(calls, reps))[1])
    ref = fwd().detach()
    out = B.side_by_side("sft", "fwd", inp, {False: ref, True: ref}, _side_by_side_args(["minorsft", "eager"]))
    assert seen == [(["eager", "minorsft"], 2)]
    assert set(out) == {"minorsft", "eager"} and all(err is None for _, err in out.values())


class _GraphSpy:
    """A forward whose graph records, in its backward, its own number and how many of the
    spy's graphs are alive (a graph dies with its last reference)."""

    def __init__(self, x):
        self.x, self.alive, self.seq, self.backwards = x, 0, 0, []
        spy = self

        class Marker:
            def __init__(self):
                spy.seq += 1
                spy.alive += 1
                self.seq = spy.seq

            def __del__(self):
                spy.alive -= 1

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                ctx.marker = Marker()
                return x.float().logsumexp(-1).sum()

            @staticmethod
            def backward(ctx, g):
                spy.backwards.append((ctx.marker.seq, spy.alive))
                return torch.zeros_like(spy.x)

        self.fn = Fn

    def __call__(self):
        return self.fn.apply(self.x)


def test_bwd_mode_times_one_backward_of_one_graph(monkeypatch):
    """bwd: every timed call is the backward of a graph of its own, built untimed, and no
    other graph of any provider is alive meanwhile (side by side and alone)."""
    import argparse

    from benchmarks import bench_logprobs as B

    inp = _tiny_inputs()
    spies = {p: _GraphSpy(inp.logits) for p in ("minorsft", "eager")}
    monkeypatch.setattr(B, "loss_fn_for", lambda provider, case, inp, nlc=False: spies[provider])
    ref = inp.logits.detach().float().logsumexp(-1).sum()
    out = B.side_by_side("sft", "bwd", inp, {False: ref, True: ref}, _side_by_side_args(spies, reps=3))
    assert all(err is None for _, err in out.values()), out
    for spy in spies.values():
        seqs = [s for s, _ in spy.backwards]
        assert len(seqs) == 1 + 1 + 3 and len(set(seqs)) == len(seqs), spy.backwards   # check + warm-up + reps
        assert sum(s.alive for s in spies.values()) == 0
        assert all(alive == 1 for _, alive in spy.backwards), spy.backwards

    alone = _GraphSpy(inp.logits)
    args = argparse.Namespace(warmup_ms=1.0, rep_ms=1.0, cpu_reps=3)
    times, _, err = B.time_mode(alone, "bwd", [inp.logits], None, ref, torch.device("cpu"), args)
    assert err is None and times[0] > 0
    seqs = [s for s, _ in alone.backwards]
    assert len(set(seqs)) == len(seqs) == 1 + 1 + 3 and all(a == 1 for _, a in alone.backwards)


# --------------------------------------------------------------------------- linear path: the gemms row
@pytest.mark.parametrize("case, n_gemms", [("minor_dpo", 4), ("minor_dpo_reflogps", 3), ("sft", 3)])
def test_gemms_row_counts_the_reference_gemm(case, n_gemms):
    """The plain-GEMM floor does the GEMMs of the case: h W^T, (h_ref W^T with a live
    reference), G W, G^T h; counted by torch's FLOP counter, not by the harness's own sum."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks import bench_linear as L

    inp = L.LInputs(case, 32, 100, 16, torch.float32, torch.device("cpu"), 0)
    fn, flops = L.gemm_call(inp)
    with FlopCounterMode(display=False) as counter:
        fn()
    assert counter.get_total_flops() == flops == n_gemms * 2 * 32 * 16 * 100


def test_gemms_row_only_for_fwd_bwd(tmp_path):
    """No gemms row for fwd or bwd (the fused path has no plain-GEMM counterpart there)."""
    from benchmarks import bench_linear as L

    out = tmp_path / "gemms.json"
    L.main(["--tiny", "--vocabs", "100", "--tokens", "32", "--hidden", "16", "--cases", "minor_dpo,sft",
            "--providers", "gemms", "--modes", "fwd,bwd,fwd_bwd", "--cpu-reps", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["case"], r["mode"]) for r in rows) == [("linear_minor_dpo", "fwd_bwd"), ("linear_sft", "fwd_bwd")]
    assert all("error" not in r for r in rows), rows


def test_plot_compares_shift_rows_with_eager_shift():
    """A shift row's speed-up is against eager on the sliced logits (same scored tokens)."""
    from benchmarks import plot

    res = U.new_results("test-gpu", "nogit", 3000.0)
    for provider, tokens, ms in (("eager", 64, 8.0), ("eager_shift", 62, 12.0), ("minorsft_shift", 62, 3.0)):
        U.add_row(res, U.make_row("sft", provider, "fwd_bwd", "bf16", tokens, 1000, [ms, ms, ms], None, 1.0))
    line = [ln for ln in plot.full_table(res) if "| minorsft_shift |" in ln]
    assert len(line) == 1 and "| 4.00x |" in line[0], line


def test_copy_bandwidth_size_is_one_and_stated_in_notes(monkeypatch):
    """The floor's copy is COPY_BYTES (1 GiB) on a CPU as on a GPU, and NOTES.md says so."""
    monkeypatch.setattr(U, "bench_ms", lambda fn, device, **kw: [1.0, 1.0, 1.0])   # 1 ms a copy
    bw = U.copy_bandwidth_gbs(torch.device("cpu"))
    assert bw * 1e9 * 1e-3 / 2 == U.COPY_BYTES == 2**30
    with open(os.path.join(ROOT, "benchmarks", "NOTES.md"), encoding="utf-8") as f:
        notes = f.read()
    stated = notes[notes.index("`copy_bandwidth_gbs` in the JSON"):][:300]
    assert "`utils.COPY_BYTES` = 1 GiB" in stated and "every device" in stated, stated


def test_plot_labels_cpu_runs_by_kind():
    """Only the interpreter's files are called harness checks; a --cpu file is the CPU's figures."""
    from benchmarks import plot

    assert "not performance figures" in plot.cpu_note(U.new_results("cpu-interpreter", "x", 1.0))
    assert "PyTorch backend" in plot.cpu_note(U.new_results("cpu (AMD EPYC, 2 threads)", "x", 1.0))
    assert plot.cpu_note(U.new_results("NVIDIA H100 80GB HBM3", "x", 1.0)) is None
