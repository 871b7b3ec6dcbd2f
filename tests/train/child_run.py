"""``python tests/train/child_run.py ARGS``: ``minorsft train ARGS`` with the step loop
instrumented, for the tests that need a run in flight (a second run into its folder, a
signal mid-run). Each optimiser step prints ``STEP k`` (flushed) as it starts; with
``MINORSFT_TEST_PAUSE_AT=k`` step k first waits until the file named by
``MINORSFT_TEST_RELEASE`` exists (at most 120 s). :class:`Child` runs it from a test."""
import os
import queue
import subprocess
import sys
import threading
import time

from tests.util import ROOT, subprocess_env



class Child:
    """This script in a subprocess: ``Child(args, tmp_path, pause_at=k)``, then
    ``wait_for_step(k)``, ``release()``, ``send(signal)``, ``finish()`` -> ``(rc, stdout, stderr)``."""

    def __init__(self, args, tmp_path, *, pause_at=0):
        import torch
        self.release_file = str(tmp_path / f"release-{time.monotonic_ns()}")
        env = subprocess_env(MINORSFT_TEST_PAUSE_AT=str(pause_at), MINORSFT_TEST_RELEASE=self.release_file,
                             # the same thread count as this process: the same float results
                             OMP_NUM_THREADS=str(torch.get_num_threads()))
        self.stderr = open(tmp_path / f"child-stderr-{time.monotonic_ns()}.txt", "w+")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *map(str, args)],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True)
        self.lines, self.out = queue.Queue(), []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.out.append(line)
            self.lines.put(line.strip())
        self.lines.put(None)

    def wait_for_step(self, step, timeout=180):
        """Block until the child prints ``STEP step`` (AssertionError if it ends first)."""
        deadline = time.time() + timeout
        while True:
            line = self.lines.get(timeout=max(0.1, deadline - time.time()))
            if line is None:
                raise AssertionError(f"the child ended before step {step}: {self.finish()}")
            if line == f"STEP {step}":
                return

    def release(self):
        open(self.release_file, "w").close()

    def send(self, sig):
        self.proc.send_signal(sig)

    def finish(self, timeout=180):
        """Wait for the child; ``(returncode, stdout, stderr)``."""
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=30)
        self.stderr.seek(0)
        return rc, "".join(self.out), self.stderr.read()


def _instrument():
    from minorsft.train import loop
    pause = int(os.environ.get("MINORSFT_TEST_PAUSE_AT", "0"))
    release = os.environ.get("MINORSFT_TEST_RELEASE", "")
    real = loop.Run._train_step

    def train_step(self, step, keys):
        print(f"STEP {step}", flush=True)
        if step == pause:
            deadline = time.time() + 120
            while not os.path.exists(release) and time.time() < deadline:
                time.sleep(0.02)
        return real(self, step, keys)

    loop.Run._train_step = train_step


if __name__ == "__main__":
    _instrument()
    from minorsft import cli
    sys.exit(cli.main(["train", *sys.argv[1:]]))
