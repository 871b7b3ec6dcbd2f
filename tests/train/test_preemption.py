"""Clean preemption: SIGTERM / SIGINT mid-run finish the step, write a checkpoint, print the
command that resumes the run and exit 75 without a traceback; that command reproduces the
uninterrupted run's losses exactly."""
import os
import shlex
import signal

import pytest

from minorsft import cli
from minorsft.train import TrainConfig, train
from minorsft.train.checkpoint import find_resume, latest_name
from minorsft.train.metrics import read_metrics
from minorsft.train.preempt import EXIT_PREEMPTED, Preempted, Preemption
from tests.train.child_run import Child

pytestmark = pytest.mark.no_interpreter

COMMON = dict(loss="minor_sft", max_steps=5, batch_size=3, lr=5e-3, warmup_steps=1, log_every=2,
              max_length=32, seed=3)



@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synth):
    out = tmp_path_factory.mktemp("full") / "run"
    return train(TrainConfig(data=synth["train"], out_dir=str(out), progress=False, **COMMON))


def _argv(synth, out):
    argv = ["--data", synth["train"], "--out-dir", str(out), "--no-progress"]
    for k, v in COMMON.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def _metrics(out):
    return read_metrics(os.path.join(out, "metrics.jsonl"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_checkpoints_and_the_printed_command_resumes_exactly(tmp_path, synth, uninterrupted,
                                                                           capsys, sig):
    out = tmp_path / "run"
    child = Child(_argv(synth, out), tmp_path, pause_at=3)
    child.wait_for_step(3)          # step 3 has begun (it waits for the release)
    child.send(sig)
    child.release()
    rc, stdout, stderr = child.finish()
    assert rc == EXIT_PREEMPTED, stderr
    assert "Traceback" not in stderr and "Traceback" not in stdout
    assert f"received {sig.name}: finishing this step" in stderr
    assert latest_name(str(out)) == "checkpoint-3"          # the step in flight was finished, then saved
    assert find_resume("latest", str(out), log=lambda m: None)[1]["step"] == 3
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]
    # the command it printed, run as printed, continues to the end
    cmd = stderr.strip().splitlines()[-1].strip()
    argv = shlex.split(cmd)
    assert argv[:2] == ["minorsft", "train"] and "--resume latest" in cmd
    capsys.readouterr()
    assert cli.main(argv[1:]) == 0
    assert "resume latest:" in capsys.readouterr().out
    want = {h["step"]: h for h in uninterrupted["history"]}
    got = _metrics(out)
    assert [r["step"] for r in got if r["split"] == "train"] == [1, 2, 3, 4, 5]
    for r in got:
        assert r["loss"] == want[r["step"]]["loss"], r["step"]          # exactly
        assert r["grad_norm"] == want[r["step"]]["grad_norm"], r["step"]


def test_first_signal_is_deferred_in_the_loop_a_second_stops_at_once():
    before = signal.getsignal(signal.SIGINT)   # Python's handler, or SIG_IGN in a background job
    with Preemption(announce=False) as p:
        with pytest.raises(Preempted, match="SIGTERM"):     # setup: nothing to finish, stop now
            os.kill(os.getpid(), signal.SIGTERM)
        p.deferring = True                                   # the step loop
        os.kill(os.getpid(), signal.SIGINT)
        assert p.requested == "SIGINT"
        with pytest.raises(Preempted):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is before                      # restored


def test_signal_before_the_first_step_exits_75_without_traceback(tmp_path, synth, capsys, monkeypatch):
    from minorsft.train import loop
    real = loop.Run.setup

    def setup_then_signal(self, *a):
        real(self, *a)
        os.kill(os.getpid(), signal.SIGTERM)   # arrives before the step loop

    monkeypatch.setattr(loop.Run, "setup", setup_then_signal)
    out = tmp_path / "run"
    assert cli.main(["train", *_argv(synth, out)]) == EXIT_PREEMPTED
    err = capsys.readouterr().err
    assert "SIGTERM: stopped at once" in err and "Traceback" not in err
    assert "--resume" not in err.splitlines()[-1]    # no checkpoint yet: the same command again
    assert not os.path.exists(out / "latest")
