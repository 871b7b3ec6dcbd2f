"""Metrics of a training run: step records kept on the device until a log interval, then
read in one host synchronisation, written to ``metrics.jsonl`` and shown on the progress bar.

That read is also where a non-finite loss or gradient norm is found without a sync of its
own: :meth:`StepLogger.flush` raises :class:`NonFiniteError` naming the step, and the loop
flushes before every checkpoint, so a non-finite state is never saved. ``metrics.jsonl``
stays strict JSON: a non-finite value is written as ``null``. A label that is no token
(the library's label flag, taken after each step) is reported there too, naming its step."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

import minorsft as ms
from minorsft.train.checkpoint import atomic_write


@dataclass
class StepRecord:
    """One optimiser step before it is logged: the summed loss, the gradient norm, the
    loss's progress metrics and the label flag as device tensors (no sync), and the
    learning rate."""

    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    label_errors: Optional[torch.Tensor] = None   # ms.take_label_errors(): count, one value
    skipped: bool = False   # a non-finite step whose optimiser update was skipped (--skip-nonfinite)
    halt: bool = False      # a non-finite step found at once, no skip left: flush now (it stops)


class NonFiniteError(FloatingPointError):
    """A step whose loss or gradient norm is not finite; ``step`` names it. Nothing from
    that step on is saved."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


def json_safe(rec: dict) -> dict:
    """``rec`` with every non-finite float replaced by None (``null``: strict JSON)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}


def _fmt(value, spec: str = ".4f") -> str:
    return "null" if value is None else format(value, spec)


def peak_memory_gb(device) -> float:
    """Peak device memory (CUDA) or peak resident set size (CPU), GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def read_lines(path: str, on_bad=None) -> List[tuple]:
    """``[(line, record)]`` of a metrics JSONL file in order (``record`` a dict). A line
    that is not a JSON object (a write cut by a kill) is left out and ``on_bad(lineno)``
    called for it."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if isinstance(rec, dict):
                out.append((line, rec))
            elif on_bad is not None:
                on_bad(lineno)
    return out


def read_metrics(path: str, on_bad=None) -> List[dict]:
    """The records of a metrics JSONL file, one dict per line (:func:`read_lines`)."""
    return [rec for _, rec in read_lines(path, on_bad)]


def say(main: bool, msg: str) -> None:
    """Print a line on rank 0 without breaking the progress bar."""
    if main:
        from tqdm.auto import tqdm
        tqdm.write(msg, file=sys.stdout)


class MetricsLog:
    """``out_dir/metrics.jsonl`` (rank 0 writes), plus the in-memory history.

    ``start(resume_step)`` keeps the lines of steps up to a resumed checkpoint (all lines
    are dropped for a fresh run). Train records carry ``split="train"``, ``step``,
    ``loss``, ``grad_norm``, ``lr``, the progress metrics, ``tokens_per_s`` and
    ``peak_mem_gb``; eval records ``split="eval"`` and the evaluation's values.
    """

    def __init__(self, out_dir: str, *, main: bool, run_name: Optional[str] = None):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.main, self.run_name = main, run_name
        self.history: List[dict] = []
        self.evals: List[dict] = []
        self.resumed_eval: Optional[dict] = None   # the kept evaluation at the resume step

    def start(self, resume_step: Optional[int]) -> None:
        """Begin the file: empty for a fresh run; for a resumed one, the lines up to
        ``resume_step`` (the evaluation at that step, if any, in :attr:`resumed_eval`:
        its values only). A line that is not JSON (a write cut by a kill) is dropped and named."""
        if not self.main:
            return
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            cut = lambda n: say(True, f"{self.path}:{n}: not a JSON line (cut by a kill?): dropped")
            for line, rec in read_lines(self.path, cut):
                if rec.get("step", 0) <= resume_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
                    if rec.get("split") == "eval" and rec.get("step") == resume_step:
                        self.resumed_eval = {k: v for k, v in rec.items()
                                             if k not in ("split", "step", "run")}
        atomic_write(self.path, "".join(kept))

    def write(self, rec: dict) -> None:
        """Append ``rec`` (rank 0) as one strict JSON line (non-finite values: ``null``)."""
        if self.run_name:
            rec["run"] = self.run_name
        if self.main:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(json_safe(rec), allow_nan=False) + "\n")

    def add_eval(self, step: int, values: dict) -> dict:
        """Write and keep an evaluation record."""
        rec = json_safe({"split": "eval", "step": step, **values})
        self.write(rec)
        self.evals.append(rec)
        return rec


class StepLogger:
    """Collects :class:`StepRecord` s and flushes them at log intervals: one stacked
    tensor read per flush (summed over ranks for the loss, averaged for the rest)."""

    def __init__(self, log: MetricsLog, metric_keys, *, world: int, device, bar, print_steps=False,
                 vocab: Optional[int] = None):
        self.log, self.keys, self.world, self.device = log, list(metric_keys), world, device
        self.bar, self.print_steps, self.vocab = bar, print_steps, vocab
        self.pending: List[StepRecord] = []
        self.tokens, self.t_last = 0, time.perf_counter()

    def add(self, rec: StepRecord, tokens: int) -> None:
        self.pending.append(rec)
        self.tokens += tokens

    def _read(self) -> list:
        """One host read of every pending value: ``[loss, grad_norm, *metrics, bad labels,
        a bad label]`` per record."""
        zero = torch.zeros(2, dtype=torch.int64, device=self.device)
        vals = torch.stack([torch.cat([torch.stack([p.loss, p.grad_norm] + [p.metrics[k] for k in self.keys]),
                                       (p.label_errors if p.label_errors is not None else zero).to(p.loss)]).double()
                            for p in self.pending])
        if self.world > 1:  # loss parts and label counts sum over ranks; the rest averages
            torch.distributed.all_reduce(vals)
            vals[:, 1:-2] /= self.world
        return vals.tolist()

    def flush(self) -> None:
        """Read, write and show the pending records; then raise :class:`NonFiniteError` for
        the first one (not skipped) whose loss or gradient norm is not finite, or a
        ``ValueError`` for the first whose labels held a value that is no token (only the
        records before that one are written)."""
        if not self.pending:
            return
        records, rows = self.pending, self._read()
        self.pending = []
        cut = next((i for i, row in enumerate(rows) if row[-2]), None)
        bad = self._write(records[:cut], rows[:cut])
        if bad is not None:
            raise bad
        if cut is not None:
            ms.raise_label_errors(rows[cut][-2:], f"step {records[cut].step}", self.vocab)

    def _write(self, records: List[StepRecord], rows: list) -> Optional[NonFiniteError]:
        """Write ``records``; the :class:`NonFiniteError` of the first non-finite one."""
        if not records:
            return None
        now = time.perf_counter()
        tps = self.tokens * self.world / max(now - self.t_last, 1e-9)
        self.tokens, self.t_last = 0, now
        mem = peak_memory_gb(self.device)
        bad = None
        for p, row in zip(records, rows):
            rec = {"split": "train", "step": p.step, "loss": row[0], "grad_norm": row[1], "lr": p.lr}
            rec.update({k: row[2 + i] for i, k in enumerate(self.keys)})
            rec.update({"tokens_per_s": tps, "peak_mem_gb": mem})
            if p.skipped:
                rec["skipped"] = True
            elif bad is None and not (math.isfinite(row[0]) and math.isfinite(row[1])):
                bad = NonFiniteError(p.step, f"step {p.step}: loss {row[0]}, grad_norm {row[1]}: "
                                             f"not finite")
            rec = json_safe(rec)
            self.log.write(rec)
            self.log.history.append(rec)
            if self.print_steps:
                say(self.log.main, "train step %4d  loss=%s" % (rec["step"], _fmt(rec["loss"])) + "".join(
                    f"  {k}={_fmt(rec[k])}" for k in ("deviation", "rewards/accuracies") if k in rec))
        self._postfix(self.log.history[-1], tps, mem)
        return bad

    def _postfix(self, last: dict, tps: float, mem: float) -> None:
        post = {"loss": _fmt(last["loss"])}
        if "deviation" in last:
            post["dev"] = _fmt(last["deviation"])
        if "rewards/accuracies" in last:
            post["acc"] = _fmt(last["rewards/accuracies"], ".3f")
        post["tok/s"] = f"{tps:.0f}"
        post["mem"] = f"{mem:.2f}G"
        self.bar.set_postfix(post, refresh=False)
