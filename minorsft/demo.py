"""The demo (``make demo`` / ``minorsft demo``): what MinorSFT is for, on the built-in tiny model.

MinorSFT (SPEC.md section 1) fine-tunes a model that already knows something, and its
loss coefficient ``2 sigmoid(-beta r)`` shrinks as the policy moves away from that model.
The demo measures what that buys, against SFT, on a problem small enough for a CPU:

1. Stage 0 trains the tiny Llama model on task family A (``tiny.TASK_FAMILIES["A"]``)
   until it solves A's held-out prompts. The result is cached in ``OUT/base/``, keyed by
   a hash of its recipe (settings, A's training data, the package's source, torch
   version, thread count, device), so a rerun skips it and a change of recipe retrains it. It is the starting point of every
   fine-tune and their reference model.
2. The base model is fine-tuned on the held-out family B with SFT and with MinorSFT at
   the same grid of learning rates (same steps, batch and seed), each run in its own
   fresh folder ``OUT/runs/<method>-lr<lr>/``.
3. Every run is measured on held-out prompts: exact match and cross-entropy on B (what
   it learned), exact match on A (what it kept), and the deviation metric (mean
   per-token log-ratio to the base model on B).

It writes ``OUT/results.json`` and ``OUT/frontier.png`` and prints a table and a
conclusion built from that same dict. The numbers repeat exactly on one machine: fixed
seeds, deterministic algorithms and one CPU thread (unless ``OMP_NUM_THREADS`` is set).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time

from minorsft.train.checkpoint import atomic_write
from minorsft.train.manifest import sha256_file
from minorsft.train.tiny import TASK_FAMILIES

LRS = (2e-4, 4e-4, 8e-4, 1.6e-3, 3.2e-3, 6.4e-3, 1.28e-2)  # x2 steps; brackets both methods' best
METHODS = ("sft", "minor_sft")
LEVELS = (0.25, 0.5, 0.75)      # target accuracies at which the methods are compared
MAX_LENGTH = 32                 # the longest row ("swap abc=" + answer) is 14 tokens
MATCHED_HOW = ("each method's curve (base model, then its runs in order of learning rate) "
               "interpolated linearly where it first reaches the level")


def run_demo(out_dir: str = "runs/demo", *, seed: int = 0, base_steps: int = 400,
             base_lr: float = 2e-3, steps: int = 200, lrs=LRS, methods=METHODS, beta: float = 0.1,
             batch_size: int = 32, n_train: int = 4000, n_eval: int = 150, hidden_size: int = 128,
             tasks_a=TASK_FAMILIES["A"], tasks_b=TASK_FAMILIES["B"], progress: bool = True,
             print_fn=print) -> dict:
    """Run the demo (stage 0 if not cached, then one fine-tune per method and learning
    rate); write ``results.json`` and ``frontier.png`` to ``out_dir`` and print the table.

    ``base_steps`` / ``base_lr``: stage 0 (trains ``tasks_a``); ``steps``, ``lrs``,
    ``methods``, ``beta``: the fine-tunes on ``tasks_b``; ``n_train`` / ``n_eval``: rows
    per family; ``hidden_size``: the tiny model's width. Returns the results dict
    (``setup``, ``base``, ``rows``, ``summary``, ``plot``)."""
    import torch
    from transformers.utils import logging as hf_logging

    from minorsft.train.plots import plot_frontier

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    with _repeatable() as threads:
        data = {fam: _write_data(out_dir, fam, tasks, n_train, n_eval, seed + i)
                for i, (fam, tasks) in enumerate((("A", tasks_a), ("B", tasks_b)))}
        recipe = dict(tasks=list(tasks_a), steps=base_steps, lr=base_lr, batch_size=batch_size,
                      warmup_steps=20, max_length=MAX_LENGTH, hidden_size=hidden_size, seed=seed,
                      data_sha256=sha256_file(data["A"]["train"]), code_sha256=_source_sha256(),
                      threads=threads, torch=torch.__version__,
                      device=os.environ.get("MINORSFT_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
        setup = dict(base_recipe=recipe, tasks_b=list(tasks_b), methods=list(methods), lrs=list(lrs),
                     steps=steps, batch_size=batch_size, beta=beta, seed=seed,
                     n_eval={fam: _count(d["eval"]) for fam, d in data.items()})
        print_fn(f"minorsft demo: a tiny Llama (hidden {hidden_size}) learns A = {', '.join(tasks_a)} "
                 f"(stage 0); then SFT and MinorSFT (beta {beta}) fine-tune it on B = "
                 f"{', '.join(tasks_b)}, {steps} steps of {batch_size} at each learning rate of "
                 f"{', '.join(f'{lr:g}' for lr in lrs)}")
        base_dir = _base_model(os.path.join(out_dir, "base"), recipe, data["A"], progress, print_fn)
        base, setup["parameters"] = _scores(base_dir, data)
        scratch = os.path.join(out_dir, "runs")
        shutil.rmtree(scratch, ignore_errors=True)   # the runs' own folders, fresh each time
        rows = [_fine_tune(method, lr, base_dir, data, os.path.join(scratch, f"{method}-lr{lr:g}"),
                           setup, progress)
                for method in methods for lr in lrs]
    results = {"setup": setup, "base": base, "rows": rows,
               "summary": summarise(base, rows, min(setup["n_eval"].values()))}
    atomic_write(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1) + "\n")
    results["plot"] = plot_frontier(results, os.path.join(out_dir, "frontier.png"),
                                    title=f"fine-tuning the base model on {', '.join(tasks_b)}: "
                                          f"learned vs kept, per learning rate")
    for line in report(results):
        print_fn(line)
    print_fn(f"results: {os.path.join(out_dir, 'results.json')}\nplot:    {results['plot']}\n"
             f"time:    {time.perf_counter() - t0:.0f} s")
    return results


@contextlib.contextmanager
def _repeatable():
    """Deterministic algorithms and one CPU thread (unless ``OMP_NUM_THREADS`` says
    otherwise) for the block; yields the thread count; restores both afterwards."""
    import torch

    threads = torch.get_num_threads()
    det, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # a tiny model: more threads add contention and change sums
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=warn)


def _write_data(out_dir, family, tasks, n_train, n_eval, seed) -> dict:
    from minorsft.train.tiny import write_synthetic_dataset
    return write_synthetic_dataset(os.path.join(out_dir, "data", family), n_train=n_train,
                                   n_eval=n_eval, seed=seed, tasks=tuple(tasks))


def _base_model(base: str, recipe: dict, data_a: dict, progress: bool, print_fn) -> str:
    """Stage 0: the base model's folder, ``base/model``, reused when it is a finished model
    (:func:`~minorsft.train.stages.finished_model`: published last, its manifest verifies)
    whose ``info.json`` holds this recipe's key; otherwise ``base`` is emptied and the
    model trained in ``base/train`` (from ``base/init``) and published
    (:func:`~minorsft.train.stages.train_to_model`), so an interrupted stage 0 reruns.
    The key covers more than the training configuration (the package's source, torch,
    threads, device), hence this check and not ``train_to_model``'s own."""
    from minorsft.train import TrainConfig
    from minorsft.train.stages import finished_model, train_to_model
    from minorsft.train.tiny import save_tiny_model

    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    done = finished_model(base)
    if done is not None and _info(done).get("key") == key:
        print_fn(f"stage 0: the base model is cached in {done} (recipe {key})")
        return done
    shutil.rmtree(base, ignore_errors=True)
    print_fn(f"stage 0: training the base model on A, {recipe['steps']} steps (recipe {key})")
    init = save_tiny_model(os.path.join(base, "init"), seed=recipe["seed"],
                           hidden_size=recipe["hidden_size"])
    cfg = TrainConfig(
        loss="sft", model=init, data=data_a["train"], run_name="stage 0 (A)",
        max_steps=recipe["steps"], batch_size=recipe["batch_size"], lr=recipe["lr"],
        warmup_steps=recipe["warmup_steps"], max_length=recipe["max_length"], seed=recipe["seed"],
        progress=progress)
    return train_to_model(cfg, base, info={"key": key, "recipe": recipe}, log=print_fn)["model"]


def _info(model_dir: str) -> dict:
    """The ``info.json`` of a published model (empty when it cannot be read)."""
    from minorsft.train.stages import INFO
    try:
        with open(os.path.join(model_dir, INFO), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _load(model_dir):
    """``(model, tokenizer)`` of a Hugging Face folder: the model in fp32, in eval mode."""
    from minorsft.train.loop import load_model_and_tokenizer
    model, tokenizer = load_model_and_tokenizer(model_dir)
    return model.eval(), tokenizer


def _accuracy(model, tokenizer, path: str) -> float:
    """Held-out exact match (greedy generation, on the CPU) of ``model`` on the rows in ``path``."""
    from minorsft.train.data import load_dataset
    from minorsft.train.evaluate import exact_match

    ds = load_dataset(path, tokenizer, max_length=MAX_LENGTH, kind="sft")
    return exact_match(model, ds, tokenizer, device="cpu", batch_size=64)


def _scores(base_dir: str, data: dict):
    """``({"target_accuracy", "retention_accuracy"}, parameter count)`` of the base model."""
    model, tok = _load(base_dir)
    scores = {"target_accuracy": _accuracy(model, tok, data["B"]["eval"]),
              "retention_accuracy": _accuracy(model, tok, data["A"]["eval"])}
    return scores, sum(p.numel() for p in model.parameters())


def _fine_tune(method: str, lr: float, base_dir: str, data: dict, out_dir: str, setup: dict,
               progress: bool) -> dict:
    """One fine-tune of the base model on B; returns its results row."""
    from minorsft.train import TrainConfig, train

    extra = {"beta": setup["beta"]} if method == "minor_sft" else {"track_deviation": True}
    out = train(TrainConfig(
        loss=method, model=base_dir, data=data["B"]["train"], eval_data=data["B"]["eval"],
        out_dir=out_dir, run_name=f"{method} lr={lr:g}", max_steps=setup["steps"],
        batch_size=setup["batch_size"], lr=lr, warmup_steps=10, max_length=MAX_LENGTH,
        seed=setup["seed"], eval_generate=True, precompute_ref=True,
        ref_cache_dir=os.path.join(os.path.dirname(base_dir), "ref-cache"), progress=progress,
        **extra))
    ev = out["final_eval"]
    model, tok = _load(out["checkpoint"])
    return {"method": method, "lr": lr, "target_accuracy": ev["accuracy"], "target_ce": ev["ce"],
            "retention_accuracy": _accuracy(model, tok, data["A"]["eval"]),
            "deviation": ev["deviation"]}


# ---------------------------------------------------------------- the conclusion

def at_level(base: dict, rows: list, level: float):
    """Retention and deviation where one method's curve (``base``, then ``rows`` by
    learning rate) first reaches target accuracy ``level``, interpolated linearly between
    the two points around it; ``None`` if it never does."""
    pts = [dict(base, deviation=0.0)] + sorted(rows, key=lambda r: r["lr"])
    for p, q in zip(pts, pts[1:]):
        lo, hi = p["target_accuracy"], q["target_accuracy"]
        if min(lo, hi) <= level <= max(lo, hi) and lo != hi:
            w = (level - lo) / (hi - lo)
            return {k: p[k] + w * (q[k] - p[k]) for k in ("retention_accuracy", "deviation")}
    return None


def summarise(base: dict, rows: list, n_eval: int) -> dict:
    """The conclusion's numbers: each method's best run (highest target accuracy, the
    lower learning rate on a tie), each method at the ``LEVELS`` of target accuracy that
    every method reaches (above the base model's), and the noise scale of an accuracy
    measured on ``n_eval`` examples (twice the largest binomial standard error)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {m: [r for r in rows if r["method"] == m] for m in methods}
    best = {m: max(rs, key=lambda r: (r["target_accuracy"], -r["lr"])) for m, rs in by.items()}
    matched = []
    for level in LEVELS:
        points = {m: at_level(base, rs, level) for m, rs in by.items()}
        if level > base["target_accuracy"] and all(points.values()):
            matched.append({"target_accuracy": level, "methods": points})
    return {"best": best, "matched": matched, "matched_how": MATCHED_HOW,
            "noise": 2 * 0.5 / math.sqrt(max(1, n_eval))}


def _compare(name: str, values: dict, noise: float | None = None, *, lower: bool = False) -> str:
    """``"<name>: a 0.700, b 0.430 (a higher by 0.270)"``; ``"(a gap within noise)"`` when
    the gap between the first two is at most ``noise``."""
    ranked = sorted(values.items(), key=lambda kv: kv[1], reverse=not lower)
    text = f"{name}: " + ", ".join(f"{m} {v:.3f}" for m, v in values.items())
    if len(ranked) < 2:
        return text
    (a, va), (_, vb) = ranked[:2]
    if noise is not None and abs(va - vb) <= noise:
        return f"{text} (a gap within noise)"
    return f"{text} ({a} {'lower' if lower else 'higher'} by {abs(va - vb):.3f})"


def report(results: dict) -> list:
    """The printed table and conclusion, as lines, built from the results dict only."""
    base, rows, s = results["base"], results["rows"], results["summary"]
    n = results["setup"]["n_eval"]
    lines = [f"\n=== held-out results ({n['B']} prompts of B, {n['A']} of A) ===",
             f"{'run':<10} {'lr':>7} {'learned: B acc':>15} {'B CE':>7} {'kept: A acc':>12} {'deviation':>10}",
             f"{'base':<10} {'-':>7} {base['target_accuracy']:>15.3f} {'-':>7} "
             f"{base['retention_accuracy']:>12.3f} {0.0:>10.3f}"]
    lines += [f"{r['method']:<10} {r['lr']:>7g} {r['target_accuracy']:>15.3f} {r['target_ce']:>7.3f} "
              f"{r['retention_accuracy']:>12.3f} {r['deviation']:>10.3f}" for r in rows]
    lines.append("\nconclusion (one seed; accuracy gaps under %.2f are within noise):" % s["noise"])
    best = s["best"]
    lines.append("  " + _compare("best B accuracy", {m: r["target_accuracy"] for m, r in best.items()},
                                 s["noise"])
                 + "; at lr " + ", ".join(f"{m} {r['lr']:g}" for m, r in best.items()))
    if not s["matched"]:
        lines.append("  no level of B accuracy above the base model's is reached by every method")
    for m in s["matched"]:
        at = m["methods"]
        lines.append(f"  at B accuracy {m['target_accuracy']:.2f}: "
                     + _compare("A kept", {k: v["retention_accuracy"] for k, v in at.items()}, s["noise"])
                     + "; " + _compare("deviation", {k: v["deviation"] for k, v in at.items()}, lower=True))
    if s["matched"]:
        lines.append(f"  (matched: {s['matched_how']})")
    lines.append("B acc / A acc: exact match by greedy generation; B CE: token cross-entropy of the answers;"
                 "\ndeviation: mean per-token log-ratio to the base model on B's held-out prompts (lower ="
                 "\ncloser to it; measured on the same prompts for every run, so no noise estimate is given).")
    return lines


def _source_sha256() -> str:
    """A hash of the package's Python source (``minorsft/**/*.py``): a change to the code
    that trains stage 0 retrains it."""
    root = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(dirpath, name)
            h.update(f"{os.path.relpath(path, root)} {sha256_file(path)}\n".encode())
    return h.hexdigest()


def _count(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())
