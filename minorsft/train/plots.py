"""Plots (matplotlib, headless, written atomically): training metrics vs step of one or
more runs (:func:`plot_metrics` reads their ``metrics.jsonl``, ``minorsft plot``;
:func:`plot_runs` draws records), and the demo's frontier of what fine-tuning learned
against what it kept (:func:`plot_frontier`)."""
from __future__ import annotations

import io
import os

from minorsft.train.checkpoint import atomic_write
from minorsft.train.metrics import read_metrics
from minorsft.train.outdir import METRICS


def plot_metrics(runs, path: str | None = None, *, title: str | None = None) -> str:
    """Draw the ``metrics.jsonl`` of each run in ``runs`` (a list of str: a training run's
    output folder, or the file itself) into one PNG with :func:`plot_runs`, one colour per
    run, named by its ``--run-name`` or else its folder (with the folder added where two
    names are the same). ``path``: the PNG, by default ``metrics.png`` beside the first
    run's ``metrics.jsonl``. Returns ``path``; ``ValueError`` naming a run without
    metrics, or when no run holds a metric :func:`plot_runs` draws."""
    files = [os.path.join(r, METRICS) if os.path.isdir(r) else r for r in runs]
    found = []
    for file in files:
        if not os.path.isfile(file):
            raise ValueError(f"{file}: no such file (a run's output folder holds {METRICS})")
        recs = read_metrics(file, lambda n, f=file: _refuse(f"{f}: line {n} is not JSON (cut by a kill?)"))
        folder = os.path.basename(os.path.dirname(os.path.abspath(file)))
        found.append((next((r["run"] for r in recs if r.get("run")), folder), file, recs))
    names = [name for name, _, _ in found]
    records = [dict(r, run=name if names.count(name) == 1 else f"{name} ({_folder(file)})")
               for name, file, recs in found for r in recs]
    path = path or os.path.join(os.path.dirname(os.path.abspath(files[0])), "metrics.png")
    return plot_runs(records, path, title=title)


def _refuse(message: str):
    raise ValueError(message)


def _folder(file: str) -> str:
    """The folder of ``file``, relative to the current one (a label)."""
    return os.path.relpath(os.path.dirname(os.path.abspath(file)))


PANELS = (("loss", "training objective (each run's own loss)"),
          ("ce", "held-out cross-entropy of the responses"),
          ("accuracy", "held-out exact match (greedy generation)"),
          ("deviation", "deviation: per-token log-ratio to the initial model"))


def plot_runs(records: list, path: str, *, panels=PANELS, title: str | None = None) -> str:
    """Write a PNG with one panel per ``(metric, caption)`` in ``panels``, one colour per
    run; training records are drawn as lines and eval records as markers. ``records``:
    dicts with ``run``, ``split`` ("train" or "eval"), ``step`` and metric keys (as
    :func:`minorsft.train.train` writes them; ``null`` values are gaps). Panels without
    data are left out; ``ValueError`` when none has any. Returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r.get("run", "run") for r in records))
    keys = [k for k, _ in panels]
    panels = [(k, c) for k, c in panels if any(k in r for r in records)]
    if not panels:
        raise ValueError(f"no metric to plot: the records hold none of {keys}")
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (key, caption) in zip(axes.flat, panels):
        for i, run in enumerate(runs):
            for split, style in (("train", dict(lw=1.1, alpha=0.8)), ("eval", dict(marker="o", ls="--", lw=1.2))):
                pts = [(r["step"], r[key]) for r in records
                       if r.get("run", "run") == run and r.get("split") == split and key in r]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, color=f"C{i}", label=f"{run} ({split})", **style)
        _label(ax, "step", key, caption)
    return _save(fig, path, title)


def _label(ax, xlabel: str, ylabel: str, caption: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(caption, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: str, title: str | None) -> str:
    """Write ``fig`` (with ``title`` above it) to ``path`` as a PNG with
    :func:`~minorsft.train.checkpoint.atomic_write`, creating its folder; close it."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, png.getvalue())
    return path


FRONTIER_PANELS = (("retention_accuracy", "kept: held-out exact match on the base model's tasks (A)"),
                   ("deviation", "deviation: per-token log-ratio to the base model on B"))


def plot_frontier(results: dict, path: str, *, title: str | None = None) -> str:
    """Write a PNG of target accuracy (held-out exact match on the new tasks) against
    retention and against deviation: one curve per method through its learning rates
    (each point labelled with its rate), starting at the base model (a star: nothing
    learned, nothing lost, deviation 0). ``results``: the demo's results dict
    (``base`` and ``rows`` of ``method``, ``lr``, ``target_accuracy``,
    ``retention_accuracy``, ``deviation``). Returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = dict(results["base"], deviation=0.0)
    methods = list(dict.fromkeys(r["method"] for r in results["rows"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), squeeze=False)
    for ax, (key, caption) in zip(axes.flat, FRONTIER_PANELS):
        ax.plot([base[key]], [base["target_accuracy"]], marker="*", ms=14, color="k", ls="",
                label="base model")
        for i, method in enumerate(methods):
            rows = sorted((r for r in results["rows"] if r["method"] == method), key=lambda r: r["lr"])
            xs = [base[key]] + [r[key] for r in rows]
            ys = [base["target_accuracy"]] + [r["target_accuracy"] for r in rows]
            ax.plot(xs, ys, color=f"C{i}", marker="o", lw=1.4, label=method)
            for r in rows:
                ax.annotate(f"{r['lr']:g}", (r[key], r["target_accuracy"]), fontsize=7,
                            color=f"C{i}", xytext=(4, -9 if i else 4), textcoords="offset points")
        _label(ax, key, "target_accuracy (learned: held-out exact match on B)", caption)
    return _save(fig, path, title)
