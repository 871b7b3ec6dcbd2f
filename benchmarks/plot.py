"""Turn benchmark JSON files into ``README.md`` tables and PNG plots.

    python -m benchmarks.plot                          # every benchmarks/results/*.json
    python -m benchmarks.plot a.json b.json --out-dir DIR

For each results file ``<stem>.json`` it writes ``<stem>-time_vs_vocab.png`` (fwd_bwd
median time against V at the largest common token count, one panel per case, the byte
floor dashed) and ``<stem>-mem_vs_tokens.png`` (fwd_bwd peak memory delta against
tokens at the largest V, with one bf16 ``[N, V]`` gradient buffer for scale), and one
``README.md`` with, per file, the issue-4 goal check at the goal shape and the full
table. Files measured on a CPU (device ``cpu...``) are labelled as harness checks:
their times are not performance figures.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Dict, List, Optional, Sequence

from benchmarks.utils import TOP_KEYS, check_schema

GOAL = {"dtype": "bf16", "vocab": 128256, "tokens": 16384, "mode": "fwd_bwd"}
GOAL_CASES = ("minor_sft", "minor_dpo", "minor_sft_reflogps", "minor_dpo_reflogps")
PROVIDER_ORDER = ("minorsft", "minorsft_inplace", "minorsft_torch", "eager", "compile", "liger", "trl", "cce", "torch_lce",
                  "minorsft_shift", "eager_shift", "gemms")


def eager_counterpart(provider: str) -> Optional[str]:
    """The eager provider a row is compared with: ``eager_shift`` for the shift providers
    (same scored positions, same ``tokens``), none for the ``gemms`` floor (plain matrix
    products, no loss: unlike work), else ``eager``."""
    if provider == "gemms":
        return None
    return "eager_shift" if provider.endswith("_shift") else "eager"


def load(path: str) -> Dict[str, object]:
    with open(path, encoding="utf-8") as f:
        res = json.load(f)
    check_schema(res)
    return res


def is_cpu(res: Dict[str, object]) -> bool:
    return str(res["device"]).lower().startswith("cpu")


def cpu_note(res: Dict[str, object]) -> Optional[str]:
    """What a CPU file's times are: the interpreter's (``device`` ``cpu-interpreter``:
    harness validation, no performance figures) or the PyTorch backend's on that CPU
    (``cpu (<model>, <n> threads)``, ``bench_logprobs --cpu``); ``None`` for a GPU file."""
    if not is_cpu(res):
        return None
    if str(res["device"]) == "cpu-interpreter":
        return ("CPU run under the Triton interpreter: this validates the harness only. "
                "These times are not performance figures and say nothing about GPU speed.")
    return ("CPU run of the PyTorch backend (`bench_logprobs --cpu`, providers timed round-robin "
            "on the host clock): figures of this CPU, not of a GPU.")


def _f(x: Optional[float], spec: str = "{:.3f}") -> str:
    return "" if x is None else spec.format(x)


def _index(rows: List[dict]) -> Dict[tuple, dict]:
    return {(r["case"], r["provider"], r["mode"], r["dtype"], r["tokens"], r["vocab"]): r for r in rows}


def goal_table(res: Dict[str, object]) -> List[str]:
    """Markdown lines: the issue-4 goals at the goal shape (empty if the shape is absent)."""
    idx = _index(res["rows"])
    g = GOAL
    grad_mib = g["tokens"] * g["vocab"] * 2 / 2**20
    lines = []
    for case in GOAL_CASES:
        def row(p):
            return idx.get((case, p, g["mode"], g["dtype"], g["tokens"], g["vocab"]))
        ours = row("minorsft")
        if ours is None:
            continue
        if not lines:
            lines += [f"Goal shape: {g['dtype']}, V = {g['vocab']}, {g['tokens']} tokens, {g['mode']}. "
                      f"One bf16 [N, V] gradient buffer = {grad_mib:.0f} MiB.", "",
                      "| case | minorsft ms | % of floor (goal >= 85) | vs eager (goal >= 3x) | "
                      "vs compile (goal >= 1.3x) | peak / grad buffer (goal <= 1.1) | "
                      "in-place peak / grad buffer (goal <= 0.05) |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
        t = ours["ms_median"]
        cells = [case, _f(t) if t else f"error: {ours.get('error', '')}"]
        cells.append(_f(100 * ours["floor_ms"] / t, "{:.1f}") if t and ours["floor_ms"] else "")
        for p in ("eager", "compile"):
            other = row(p)
            if t and other and other["ms_median"]:
                cells.append(f"{other['ms_median'] / t:.2f}x")
            else:
                cells.append("" if other is None else (other.get("error", "") or "")[:40])
        mem = ours["peak_mem_delta_mib"]
        cells.append(_f(mem / grad_mib, "{:.3f}") if mem is not None else "")
        inpl = row("minorsft_inplace")
        cells.append(_f(inpl["peak_mem_delta_mib"] / grad_mib, "{:.3f}")
                     if inpl and inpl["peak_mem_delta_mib"] is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def full_table(res: Dict[str, object]) -> List[str]:
    """Markdown lines: every row, grouped by shape and case, with % of floor and speed-up vs
    its eager counterpart (``eager_counterpart``)."""
    rows = res["rows"]
    idx = _index(rows)
    order = {p: i for i, p in enumerate(PROVIDER_ORDER)}
    rows = sorted(rows, key=lambda r: (r["dtype"], r["tokens"], r["vocab"], r["case"], r["mode"],
                                       order.get(r["provider"], 99), r["provider"]))
    lines = ["| case | mode | dtype | tokens | V | provider | ms median | ms p20-p80 | peak MiB | floor ms | "
             "% of floor | vs eager | error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        t = r["ms_median"]
        pct = _f(100 * r["floor_ms"] / t, "{:.1f}") if t and r["floor_ms"] else ""
        e = idx.get((r["case"], eager_counterpart(r["provider"]), r["mode"], r["dtype"], r["tokens"], r["vocab"]))
        speed = f"{e['ms_median'] / t:.2f}x" if t and e and e["ms_median"] else ""
        spread = f"{_f(r['ms_p20'])}-{_f(r['ms_p80'])}" if t else ""
        err = str(r.get("error", "")).replace("|", "/")[:80]
        lines.append(f"| {r['case']} | {r['mode']} | {r['dtype']} | {r['tokens']} | {r['vocab']} | {r['provider']} | "
                     f"{_f(t)} | {spread} | {_f(r['peak_mem_delta_mib'], '{:.1f}')} | {_f(r['floor_ms'])} | "
                     f"{pct} | {speed} | {err} |")
    return lines


def _plot_panels(res, stem: str, out_dir: str, x_key: str, fixed_key: str, y_key: str,
                 title: str, ylabel: str, fname: str) -> Optional[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if r["mode"] == "fwd_bwd" and r["dtype"] == "bf16"]
    if not rows:
        return None
    fixed_vals = sorted({r[fixed_key] for r in rows})
    prefer = GOAL[fixed_key]
    fixed = prefer if prefer in fixed_vals else fixed_vals[-1]
    rows = [r for r in rows if r[fixed_key] == fixed]
    if not any(r[y_key] is not None for r in rows):
        return None                        # e.g. memory on a CPU run: nothing to draw
    cases = sorted({r["case"] for r in rows}, key=lambda c: (c.endswith("_reflogps"), c))
    ncol = min(3, len(cases))
    nrow = (len(cases) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.8 * nrow), squeeze=False)
    for ax, case in zip(axes.flat, cases):
        crow = [r for r in rows if r["case"] == case]
        providers = sorted({r["provider"] for r in crow}, key=lambda p: PROVIDER_ORDER.index(p)
                           if p in PROVIDER_ORDER else 99)
        plotted = False
        for p in providers:
            pts = sorted((r[x_key], r[y_key]) for r in crow if r["provider"] == p and r[y_key] is not None)
            if pts:
                color = f"C{PROVIDER_ORDER.index(p) % 10}" if p in PROVIDER_ORDER else None
                ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=p, color=color)
                plotted = True
        if y_key == "ms_median":
            fl = sorted({(r[x_key], r["floor_ms"]) for r in crow if r["floor_ms"] is not None})
            if fl:
                ax.plot([a for a, _ in fl], [b for _, b in fl], "k--", label="byte floor")
        else:
            xs = sorted({r[x_key] for r in crow})
            ax.plot(xs, [x * fixed * 2 / 2**20 for x in xs], "k--", label="one bf16 [N,V] grad")
        if not plotted:
            ax.text(0.5, 0.5, "no data" + (" (CPU: no memory figures)" if is_cpu(res) else ""),
                    ha="center", va="center", transform=ax.transAxes)
        ax.set_title(case)
        ax.set_xlabel(x_key)
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        if plotted:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    label = f"{res['device']} | torch {res['torch']} | triton {res['triton']} | {res['git_sha']}"
    if is_cpu(res):
        label += " | CPU INTERPRETER: NOT PERFORMANCE FIGURES" if res["device"] == "cpu-interpreter" else " | CPU"
    fig.suptitle(f"{title} ({fixed_key} = {fixed}, bf16, fwd_bwd)\n{label}", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{stem}-{fname}.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def render(paths: Sequence[str], out_dir: str) -> str:
    """Write the PNGs and ``README.md`` into ``out_dir``; return the README path."""
    os.makedirs(out_dir, exist_ok=True)
    md = ["# Benchmark results", "",
          "Made by `python -m benchmarks.plot` from the JSON files in this folder (schema: issue 4, "
          "`benchmarks/utils.py`). Times are medians of `triton.testing.do_bench` with the 20th-80th "
          "percentile range; `peak MiB` is the peak allocated memory during one call minus what was allocated "
          "before it; `floor ms` is the SPEC.md byte floor (`benchmarks/utils.py::floor_bytes`) over the "
          "device-to-device copy bandwidth measured in the same run; `% of floor` = floor / median.", ""]
    for path in sorted(paths):
        res = load(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        md += [f"## {stem}", "",
               f"device **{res['device']}**, torch {res['torch']}, triton {res['triton']}, git `{res['git_sha']}`, "
               f"{res['timestamp']}, copy bandwidth {_f(res['copy_bandwidth_gbs'], '{:.1f}')} GB/s "
               "(read + write).", ""]
        if cpu_note(res):
            md += [f"**{cpu_note(res)}**", ""]
        goal = goal_table(res)
        if goal:
            md += goal + [""]
        for fname, args in (("time_vs_vocab", ("vocab", "tokens", "ms_median", "Time vs vocabulary", "ms")),
                            ("mem_vs_tokens", ("tokens", "vocab", "peak_mem_delta_mib", "Peak memory delta vs tokens",
                                               "MiB"))):
            png = _plot_panels(res, stem, out_dir, *args, fname=fname)
            if png:
                md += [f"![{fname}]({os.path.basename(png)})", ""]
        md += full_table(res) + [""]
    readme = os.path.join(out_dir, "README.md")
    with open(readme, "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    return readme


def main(argv: Optional[Sequence[str]] = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description="benchmark JSON -> README.md table + PNG plots")
    p.add_argument("files", nargs="*", help="results JSON files (default: benchmarks/results/*.json)")
    p.add_argument("--out-dir", default=os.path.join(here, "results"))
    args = p.parse_args(argv)
    files = args.files
    if not files:   # every issue-4 results file; other JSON there (e.g. long_context-*) is not ours
        files = []
        for path in sorted(glob.glob(os.path.join(here, "results", "*.json"))):
            with open(path, encoding="utf-8") as f:
                keys = set(json.load(f))
            if keys == set(TOP_KEYS):
                files.append(path)
            else:
                print(f"skipping {os.path.basename(path)}: not a bench_logprobs/bench_linear results file")
    if not files:
        p.error("no results JSON files found")
    print(f"wrote {render(files, args.out_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
