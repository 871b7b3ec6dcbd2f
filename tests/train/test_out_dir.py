"""One run owns its output folder: a second concurrent run is refused (the lock dies with
its holder), a rerun without --resume is refused with the old run intact, --overwrite
moves the old run aside, stale temporary files are removed at start."""
import hashlib
import os
import signal

import pytest

from minorsft import cli
from minorsft.train import ConfigError, TrainConfig, train
from minorsft.train.checkpoint import latest_name
from minorsft.train.outdir import OutDirLock, check_out_dir, prepare_out_dir
from tests.train.child_run import Child

pytestmark = pytest.mark.no_interpreter



def _argv(synth, out, *extra):
    return ["train", "--data", synth["train"], "--out-dir", str(out), "--max-steps", "2", "--batch-size", "2",
            "--max-length", "32", "--no-progress", "--log-every", "1", "--save-every", "1", *extra]


def _snapshot(folder):
    """{relative path: sha256} of every file under ``folder``."""
    out = {}
    for d, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture
def finished(tmp_path, synth):
    """A finished 2-step run in tmp_path/run and a snapshot of its outputs."""
    out = tmp_path / "run"
    assert cli.main(_argv(synth, out)) == 0
    return out, {k: v for k, v in _snapshot(out).items() if not k.startswith(("data", ".lock"))}


def test_rerun_without_resume_is_refused_and_the_old_run_is_intact(finished, synth, capsys):
    out, before = finished
    capsys.readouterr()
    assert cli.main(_argv(synth, out, "--max-steps", "3")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("minorsft train: error: --out-dir:")
    assert "holds a previous run" in err and "--resume latest" in err and "--overwrite" in err
    after = _snapshot(out)
    assert {k: after[k] for k in before} == before          # metrics and checkpoints untouched
    assert "metrics.jsonl" in before and "checkpoint-2/model.safetensors" in before


def test_overwrite_moves_the_old_run_aside(finished, synth):
    out, before = finished
    assert cli.main(_argv(synth, out, "--overwrite", "--max-steps", "1")) == 0
    previous = [n for n in os.listdir(out) if n.startswith("previous-")]
    assert len(previous) == 1
    assert _snapshot(out / previous[0]) == before            # every byte of the old run kept
    assert latest_name(str(out)) == "checkpoint-1" and not (out / "checkpoint-2").exists()
    with open(out / "metrics.jsonl") as f:
        assert len(f.readlines()) == 1                       # the new run's metrics only
    with pytest.raises(ConfigError, match="^overwrite: cannot be combined with --resume"):
        check_out_dir(str(out), resume="latest", overwrite=True)


def test_a_folder_with_metrics_only_names_overwrite(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 1.0}\n')
    with pytest.raises(ConfigError, match="no checkpoint to resume.*--overwrite"):
        check_out_dir(str(tmp_path), resume=None, overwrite=False)
    (tmp_path / "metrics.jsonl").write_text("")               # an empty file is no previous run
    check_out_dir(str(tmp_path), resume=None, overwrite=False)


def test_a_second_concurrent_run_is_refused_and_the_lock_dies_with_its_holder(tmp_path, synth, capsys):
    out = tmp_path / "run"
    first = Child(_argv(synth, out, "--max-steps", "3")[1:], tmp_path, pause_at=2)
    try:
        first.wait_for_step(2)                               # checkpoint-1 written, the lock held
        before = _snapshot(out)
        capsys.readouterr()
        # --overwrite passes the previous-run check: the lock is what refuses it
        assert cli.main(_argv(synth, out, "--overwrite")) == 2
        err = capsys.readouterr().err
        assert f"--out-dir: {out} is in use by another run (pid {first.proc.pid}" in err, err
        assert _snapshot(out) == before                      # nothing moved, nothing written
        first.send(signal.SIGKILL)                           # dies holding the lock: the OS drops it
        assert first.finish()[0] == -signal.SIGKILL
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    r = train(TrainConfig(data=synth["train"], out_dir=str(out), max_steps=3, batch_size=2, max_length=32,
                          progress=False, log_every=1, save_every=1, resume="latest"))
    assert [h["step"] for h in r["history"]] == [2, 3]


def test_the_lock_refuses_a_second_holder_in_one_process(tmp_path):
    a = OutDirLock(str(tmp_path)).acquire()
    with pytest.raises(ConfigError, match="in use by another run"):
        OutDirLock(str(tmp_path)).acquire()
    a.release()
    OutDirLock(str(tmp_path)).acquire().release()


def test_stale_temporaries_are_removed_at_start(tmp_path):
    out = tmp_path / "run"
    (out / "ref-cache").mkdir(parents=True)
    stale = [out / "latest.tmp-123", out / "metrics.jsonl.tmp-9", out / "ref-cache" / "ref-ab.safetensors.tmp-77"]
    for p in stale:
        p.write_text("x")
    (out / ".tmp-checkpoint-5-42").mkdir()
    (out / "notes.txt").write_text("a user's file")
    logged = []
    prepare_out_dir(str(out), resume=None, overwrite=False, log=logged.append)
    assert not any(p.exists() for p in stale) and not (out / ".tmp-checkpoint-5-42").exists()
    assert (out / "notes.txt").exists() and len(logged) == 3


def test_resuming_another_folders_checkpoint_into_a_used_folder_is_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 1.0}\n')
    (tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(ConfigError, match="would mix the two runs' metrics"):
        check_out_dir(str(tmp_path), resume=str(tmp_path.parent / "elsewhere" / "checkpoint-4"), overwrite=False)
    check_out_dir(str(tmp_path), resume=str(tmp_path / "checkpoint-1"), overwrite=False)   # its own: fine
