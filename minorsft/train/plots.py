"""Plots of training metrics (matplotlib, headless): loss and deviation vs step per run."""
from __future__ import annotations

import json
import os


def read_metrics(path: str) -> list:
    """The records of a metrics JSONL file (one dict per line)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


PANELS = (("loss", "training objective (each run's own loss)"),
          ("ce", "held-out cross-entropy of the responses"),
          ("accuracy", "held-out exact match (greedy generation)"),
          ("deviation", "deviation: per-token log-ratio to the initial model"))


def plot_runs(records: list, path: str, *, panels=PANELS, title: str | None = None) -> str:
    """Write a PNG with one panel per ``(metric, caption)`` in ``panels``, one colour per
    run; training records are drawn as lines and eval records as markers. ``records``:
    dicts with ``run``, ``split`` ("train" or "eval"), ``step`` and metric keys (as
    :func:`minorsft.train.train` writes them). Panels without data are left out.
    Returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r.get("run", "run") for r in records))
    panels = [(k, c) for k, c in panels if any(k in r for r in records)]
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
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(caption, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
