"""The output folder of a training run: one run owns it, and a run never loses another's work.

- :func:`check_out_dir` (before any work, changes nothing): the folder is a folder and
  writable, and a start without ``--resume`` into a folder holding a previous run's
  metrics or checkpoints is refused, naming ``--resume latest`` and ``--overwrite``.
- :class:`OutDirLock`: an exclusive ``flock`` on ``OUT_DIR/.lock``, held for the run's
  life; a second run into the same folder is refused. The kernel drops the lock when the
  process dies (also ``kill -9``), so a crash never leaves a stale lock behind.
- :func:`prepare_out_dir` (under the lock): removes stale temporary files, repairs an
  interrupted checkpoint save and, with ``--overwrite``, moves the previous run's outputs
  into ``OUT_DIR/previous-<time>/`` (nothing is deleted).
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import tempfile
import time

from minorsft.train.checkpoint import CHECKPOINT_RE, fsync_dir, repair_checkpoint_debris
from minorsft.train.config import ConfigError

LOCK = ".lock"
# What a run writes into OUT_DIR that is *its* work. The caches next to them (ref-cache/,
# the synthetic data/) are keyed or seeded, reusable by the next run, and stay in place.
METRICS, LATEST = "metrics.jsonl", "latest"
# `atomic_write` and friends write `NAME.tmp-PID[.ext]`; an interrupted one leaves it behind.
_TEMPORARY = re.compile(r"\.tmp-\d+(\.\w+)?$")
CACHE_DIRS = ("ref-cache", "data")


def _is_run_output(name: str) -> bool:
    return name in (METRICS, LATEST) or bool(CHECKPOINT_RE.match(name)) or name.startswith(".old-checkpoint-")


def previous_run(out_dir: str):
    """A short description of the previous run's outputs in ``out_dir`` (non-empty
    ``metrics.jsonl``, ``latest``, ``checkpoint-N`` folders), or None when it holds none."""
    if not os.path.isdir(out_dir):
        return None
    names = os.listdir(out_dir)
    found = []
    ckpts = sorted((n for n in names if CHECKPOINT_RE.match(n) or n.startswith(".old-checkpoint-")),
                   key=lambda n: int(re.findall(r"\d+", n)[0]))
    if ckpts:
        found.append(f"{len(ckpts)} checkpoint(s), the newest {ckpts[-1]}")
    metrics = os.path.join(out_dir, METRICS)
    if os.path.isfile(metrics):
        with open(metrics, "rb") as f:
            lines = sum(1 for line in f if line.strip())
        if lines:
            found.append(f"{METRICS} with {lines} line(s)")
    if LATEST in names and not ckpts:
        found.append(LATEST)
    return "; ".join(found) or None


def check_writable(folder: str, field_name: str = "out_dir") -> None:
    """Create and remove a probe file in ``folder`` (``os.access`` says yes to root on a
    read-only mount); ConfigError ``field_name`` when it cannot."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(field_name, f"{folder} is not writable ({e.strerror})") from None


def check_creatable(path: str, field_name: str) -> None:
    """``path`` can be created: its nearest existing ancestor is a writable folder
    (ConfigError ``field_name`` otherwise)."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(field_name, f"cannot create {path}: {parent} is a file")
    check_writable(parent, field_name)


def check_out_dir(out_dir: str, *, resume, overwrite: bool) -> None:
    """Refuse, before any work and without changing anything: an ``out_dir`` that is a file
    or cannot be written (nor created), ``overwrite`` together with ``resume``, and a start
    without ``resume`` into a folder holding a previous run (:class:`ConfigError`)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError("out_dir", f"{out_dir} is a file, not a folder")
    check_creatable(out_dir, "out_dir")
    if overwrite and resume is not None:
        raise ConfigError("overwrite", "cannot be combined with --resume (it moves the checkpoints "
                                       "that --resume would continue from aside)")
    found = None if overwrite else previous_run(out_dir)
    if found and resume not in (None, "latest") and \
            os.path.realpath(os.path.dirname(os.path.abspath(resume))) != os.path.realpath(out_dir):
        raise ConfigError("out_dir", f"{out_dir} holds a previous run ({found}); resuming from a "
                                     f"checkpoint of another folder ({resume}) would mix the two "
                                     f"runs' metrics: choose another --out-dir")
    if found and resume is None:
        has_ckpt = "checkpoint" in found or LATEST in found
        cont = "continue it with --resume latest, or " if has_ckpt else "it has no checkpoint to resume; "
        raise ConfigError("out_dir", f"{out_dir} holds a previous run ({found}): {cont}start afresh "
                                     f"with --overwrite (moves it to {out_dir}/previous-<time>/), or "
                                     f"choose another --out-dir")


class OutDirLock:
    """An exclusive, non-blocking ``flock`` on ``OUT_DIR/.lock`` (created with the folder).

    ``acquire()`` raises :class:`ConfigError` (``out_dir``) naming the holder (pid, host,
    start time) when another run holds it; ``release()`` closes it. The OS releases it
    when the process ends, however it ends."""

    def __init__(self, out_dir: str):
        self.out_dir, self.path, self.fd = out_dir, os.path.join(out_dir, LOCK), None

    def acquire(self) -> "OutDirLock":
        os.makedirs(self.out_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise ConfigError("out_dir", f"{self.out_dir} is in use by another run ({holder}); wait "
                                         f"for it to end or choose another --out-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)   # closing the descriptor drops the lock
            self.fd = None


def remove_stale_temporaries(out_dir: str) -> list:
    """Remove ``*.tmp-PID`` files left by interrupted atomic writes (``latest.tmp-*``,
    ``metrics.jsonl.tmp-*``, cache files) and stray ``.write-probe-*`` files in
    ``out_dir`` and its cache folders. Only under the lock: no other run writes there.
    Returns the removed paths."""
    removed = []
    for folder in (out_dir, *(os.path.join(out_dir, c) for c in CACHE_DIRS)):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if (_TEMPORARY.search(name) or name.startswith(".write-probe-")) and os.path.isfile(path):
                os.remove(path)
                removed.append(path)
    return removed


def move_aside(out_dir: str) -> str | None:
    """Move the previous run's outputs (``metrics.jsonl``, ``latest``, ``checkpoint-N``)
    into a new ``out_dir/previous-<time>/``; returns it (None when there was nothing)."""
    names = sorted(n for n in os.listdir(out_dir) if _is_run_output(n))
    if not names:
        return None
    base = os.path.join(out_dir, "previous-" + time.strftime("%Y%m%d-%H%M%S"))
    dest, k = base, 1
    while os.path.exists(dest):
        dest, k = f"{base}-{k}", k + 1
    os.makedirs(dest)
    for name in names:
        os.replace(os.path.join(out_dir, name), os.path.join(dest, name))
    fsync_dir(out_dir)
    return dest


def prepare_out_dir(out_dir: str, *, resume, overwrite: bool, log) -> None:
    """Under the lock, before the run reads anything from ``out_dir``: check again that no
    previous run would be overwritten (another run may have ended since the first check),
    remove stale temporary files, repair an interrupted checkpoint save, and with
    ``overwrite`` move the previous run aside. ``log(message)`` reports what was done."""
    check_out_dir(out_dir, resume=resume, overwrite=overwrite)
    for path in remove_stale_temporaries(out_dir):
        log(f"removed a stale temporary file: {path}")
    repair_checkpoint_debris(out_dir)
    if overwrite:
        moved = move_aside(out_dir)
        if moved:
            log(f"--overwrite: the previous run's metrics and checkpoints moved to {moved}")
