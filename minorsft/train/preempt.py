"""Clean preemption: SIGTERM (what SLURM, Kubernetes and cloud schedulers send before they
kill a job) and SIGINT (Ctrl-C) end a run without losing work and without a traceback.

During the step loop the first signal only sets a flag: the loop finishes the current
optimiser step, writes a checkpoint and returns (``result["preempted"]``); ``minorsft
train`` then prints the exact command that resumes it and exits with
:data:`EXIT_PREEMPTED`. Before the loop (setup: nothing new to save) and on a second
signal, :class:`Preempted` is raised at once.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import threading

from minorsft.train.config import config_to_argv

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry later" (with
# --resume latest). Not 128 + signal (143 for SIGTERM), which reads as "killed, nothing saved".
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(KeyboardInterrupt):
    """A stop signal where no step could be finished first; ``signame`` names it."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


class Preemption:
    """A context that handles :data:`SIGNALS` (the main thread only: elsewhere Python cannot
    install handlers, and it does nothing). While ``deferring`` is true the first signal
    sets ``requested`` (its name) for the loop to act on after the current step, and says
    so on stderr when ``announce``; otherwise, and for a second signal, the handler raises
    :class:`Preempted`. The previous handlers are restored on exit."""

    def __init__(self, announce: bool = True):
        self.announce, self.requested, self.deferring, self._old = announce, None, False, {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.deferring and self.requested is None:
            self.requested = name
            if self.announce:   # os.write: a print here could re-enter an interrupted print
                os.write(2, f"received {name}: finishing this step, then writing a checkpoint "
                            f"(send it again to stop at once, without one)\n".encode())
            return
        raise Preempted(name)


def resume_command(cfg, *, has_checkpoint: bool) -> str:
    """The shell command that continues the run of ``cfg``: the same flags with
    ``--resume latest`` (without ``--overwrite``, whose work is done), or when the folder
    holds no checkpoint yet the same command without ``--overwrite``."""
    again = dataclasses.replace(cfg, overwrite=False,
                                resume="latest" if has_checkpoint else cfg.resume)
    cmd = shlex.join(["minorsft", "train", *config_to_argv(again)])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cmd += "  (under torchrun: your torchrun line with these arguments)"
    return cmd
