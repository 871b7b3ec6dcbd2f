"""Checkpoints: --resume continues exactly, incompatible configs are refused up front,
a crash mid-save never becomes the latest checkpoint, nothing is unpickled."""
import dataclasses
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

from minorsft.train import checkpoint as C
from minorsft.train.manifest import write_manifest
from minorsft.train import tiny
from minorsft.train import ConfigError, TrainConfig, check_config, train


# The loop, not the kernels: only the plain (PyTorch backend) pass of `make test`.
pytestmark = pytest.mark.no_interpreter


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny.write_synthetic_dataset(str(tmp_path_factory.mktemp("synth")), n_train=40, n_eval=4, seed=7)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, synth):
    out = tmp_path_factory.mktemp("full")
    cfg = TrainConfig(loss="minor_sft", data=synth["train"], out_dir=str(out / "run"), max_steps=6,
                      batch_size=3, grad_accum=2, lr=5e-3, warmup_steps=2, log_every=4, save_every=3,
                      max_length=32, progress=False, seed=2)
    return cfg, train(cfg)


def test_resume_gives_the_same_losses_and_weights(tmp_path, full_run):
    cfg, full = full_run
    resumed = train(dataclasses.replace(cfg, out_dir=str(tmp_path / "resumed"),
                                        resume=os.path.join(cfg.out_dir, "checkpoint-3")))
    assert [h["step"] for h in resumed["history"]] == [4, 5, 6]
    want = {h["step"]: h for h in full["history"]}
    for h in resumed["history"]:
        assert h["loss"] == pytest.approx(want[h["step"]]["loss"], rel=1e-6, abs=1e-7)
        assert h["lr"] == pytest.approx(want[h["step"]]["lr"], rel=1e-12)
    a = load_file(os.path.join(full["checkpoint"], "model.safetensors"))
    b = load_file(os.path.join(resumed["checkpoint"], "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)


def test_resume_latest_in_place_keeps_metrics_consistent(tmp_path, synth):
    cfg = TrainConfig(loss="sft", data=synth["train"], eval_data=synth["eval"], out_dir=str(tmp_path / "run"),
                      max_steps=2, batch_size=4, save_every=1, log_every=1, max_length=32, progress=False)
    first = train(cfg)
    with open(os.path.join(cfg.out_dir, "latest")) as f:
        assert f.read().strip() == "checkpoint-2"
    weights = os.path.join(cfg.out_dir, "checkpoint-2", "model.safetensors")
    before = os.stat(weights).st_mtime_ns, open(os.path.join(cfg.out_dir, "metrics.jsonl")).read()
    again = train(dataclasses.replace(cfg, resume="latest"))
    assert again["history"] == [] and again["step"] == 2  # nothing left to do
    assert again["checkpoint"].endswith("checkpoint-2")
    assert again["final_eval"] == pytest.approx(first["final_eval"])   # the logged one, not recomputed
    after = os.stat(weights).st_mtime_ns, open(os.path.join(cfg.out_dir, "metrics.jsonl")).read()
    assert after == before                          # no checkpoint rewritten, no line added


@pytest.mark.parametrize("change", [dict(batch_size=4), dict(loss="sft"), dict(beta=0.2), dict(lr=1e-3),
                                    dict(max_length=16), dict(seed=3)])
def test_incompatible_resume_is_refused_before_any_work(tmp_path, full_run, change):
    cfg, _ = full_run
    new_out = tmp_path / "new"
    bad = dataclasses.replace(cfg, out_dir=str(new_out), resume=os.path.join(cfg.out_dir, "checkpoint-3"),
                              **change)
    with pytest.raises(ValueError, match=r"^resume: incompatible configuration: " + next(iter(change))):
        train(bad)
    assert not new_out.exists()


def test_resume_of_a_missing_or_partial_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match="^resume: latest"):
        check_config(TrainConfig(out_dir=str(tmp_path), resume="latest"))
    (tmp_path / "checkpoint-9").mkdir()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        check_config(TrainConfig(out_dir=str(tmp_path), resume=str(tmp_path / "checkpoint-9")))


def test_crash_while_saving_leaves_the_previous_checkpoint_latest(tmp_path, synth, monkeypatch):
    cfg = TrainConfig(loss="sft", data=synth["train"], out_dir=str(tmp_path / "run"), max_steps=4,
                      batch_size=4, save_every=2, max_length=32, progress=False)
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint dies half-written
                raise KeyboardInterrupt("simulated interrupt")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(torch, "save", real_save)
    with open(os.path.join(cfg.out_dir, "latest")) as f:
        assert f.read().strip() == "checkpoint-2"
    assert not os.path.exists(os.path.join(cfg.out_dir, "checkpoint-4"))
    assert C.find_resume("latest", cfg.out_dir)[0].endswith("checkpoint-2")
    assert any(n.startswith(".tmp-checkpoint-4") for n in os.listdir(cfg.out_dir))
    done = train(dataclasses.replace(cfg, resume="latest"))  # picks up at step 2, cleans the debris
    assert [h["step"] for h in done["history"]] == [3, 4]
    assert sorted(n for n in os.listdir(cfg.out_dir) if "checkpoint" in n) == ["checkpoint-2", "checkpoint-4"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_loading_a_checkpoint_never_unpickles_code(tmp_path, full_run, monkeypatch):
    cfg, _ = full_run
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(os.path.join(cfg.out_dir, "checkpoint-3"), ckpt)
    with open(ckpt / "optimizer.pt", "wb") as f:
        pickle.dump({"state": _Evil()}, f)
    write_manifest(str(ckpt))   # a forged manifest too: verification passes, loading must not run code
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pickle.UnpicklingError):
        train(dataclasses.replace(cfg, out_dir=str(tmp_path / "run"), resume=str(ckpt)))
    assert not (tmp_path / "pwned").exists()


def test_interrupted_same_step_swap_is_repaired(tmp_path):
    """Crash after the old same-step checkpoint was moved aside, before the new one moved
    in: the next start puts the old one back, so `latest` names a real directory."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".old-checkpoint-3-999").mkdir()
    (out / ".old-checkpoint-3-999" / "marker").write_text("x")
    (out / ".tmp-checkpoint-3-999").mkdir()
    (out / "latest").write_text("checkpoint-3")
    C.repair_checkpoint_debris(str(out))   # what train() runs first on rank 0
    assert (out / "checkpoint-3" / "marker").exists()
    assert not (out / ".tmp-checkpoint-3-999").exists()


def test_checkpoint_is_on_disk_before_latest_names_it(tmp_path, synth, monkeypatch):
    """Power-loss safety: every file of the checkpoint and its directory are fsynced before
    the rename, the parent after it, and only then is `latest` rewritten."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("replace", os.path.abspath(src), os.path.abspath(dst)))
        return real_replace(src, dst, *a, **k)

    out = str(tmp_path / "run")
    cfg = TrainConfig(loss="sft", data=synth["train"], out_dir=out, max_steps=1, batch_size=4,
                      max_length=32, progress=False)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    train(cfg)
    monkeypatch.undo()
    final = os.path.join(out, "checkpoint-1")
    rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == final)
    latest = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == os.path.join(out, "latest"))
    tmp = events[rename][1]
    synced = {e[1] for e in events[:rename] if e[0] == "fsync"}
    files = [os.path.join(tmp, os.path.relpath(os.path.join(d, n), final))
             for d, _, ns in os.walk(final) for n in ns]
    assert files and all(f in synced for f in files)
    assert tmp in synced
    assert ("fsync", out) in events[rename:latest]
    assert events[latest + 1:] and events[latest + 1] == ("fsync", out)


def test_resume_refuses_changed_data_at_the_same_path(tmp_path, full_run, synth):
    """Same --data path, different content: refused before any model is built."""
    cfg, _ = full_run
    edited = tmp_path / "train.jsonl"
    lines = open(synth["train"], encoding="utf-8").read().splitlines()
    edited.write_text("\n".join(lines[1:] + lines[:1]) + "\n", encoding="utf-8")   # reordered
    ckpt = os.path.join(cfg.out_dir, "checkpoint-3")
    state = os.path.join(ckpt, "trainer_state.json")
    import json
    saved = json.load(open(state))
    saved["config"]["data"] = str(edited)           # as if the file had been regenerated in place
    saved["resolved"]["data"] = os.path.realpath(edited)
    other = tmp_path / "ckpt"
    import shutil
    shutil.copytree(ckpt, other)
    json.dump(saved, open(other / "trainer_state.json", "w"))
    write_manifest(str(other))
    with pytest.raises(ValueError, match="training data changed"):
        train(dataclasses.replace(cfg, data=str(edited), out_dir=str(tmp_path / "r"), resume=str(other)))


def test_resume_accepts_the_same_data_file_by_another_path(tmp_path, full_run, monkeypatch, capsys):
    """A relative path to the checkpoint's (absolute) data file is the same file; a copy
    with the same content elsewhere is accepted too (the content is what the run saw)."""
    cfg, full = full_run
    ckpt = os.path.join(cfg.out_dir, "checkpoint-3")
    monkeypatch.chdir(os.path.dirname(cfg.data))
    rel = train(dataclasses.replace(cfg, data=os.path.basename(cfg.data), out_dir=str(tmp_path / "rel"),
                                    resume=ckpt, max_steps=4))
    assert rel["history"][0]["loss"] == full["history"][3]["loss"]
    import shutil
    copy = tmp_path / "copy.jsonl"
    shutil.copy(cfg.data, copy)
    capsys.readouterr()
    train(dataclasses.replace(cfg, data=str(copy), out_dir=str(tmp_path / "copy"), resume=ckpt, max_steps=4))
    assert "same tokenised content, accepted" in capsys.readouterr().out


def test_resume_may_extend_max_steps_and_follows_the_new_schedule(tmp_path, full_run):
    cfg, full = full_run
    longer = train(dataclasses.replace(cfg, out_dir=str(tmp_path / "longer"), max_steps=8,
                                       resume=os.path.join(cfg.out_dir, "checkpoint-6")))
    assert [h["step"] for h in longer["history"]] == [7, 8]
    from minorsft.train.optim import lr_lambda
    f = lr_lambda(cfg.schedule, cfg.warmup_steps, 8)
    for h in longer["history"]:            # the rate of the 8-step schedule, from the first resumed step
        assert h["lr"] == pytest.approx(cfg.lr * f(h["step"] - 1), rel=1e-12)
    with pytest.raises(ConfigError, match="^max_steps: 2 ends before the step of the checkpoint"):
        train(dataclasses.replace(cfg, out_dir=str(tmp_path / "shorter"), max_steps=2,
                                  resume=os.path.join(cfg.out_dir, "checkpoint-3")))
    assert not (tmp_path / "shorter").exists()
    with pytest.raises(ConfigError, match="^epochs: the run would end at step 1, before"):
        train(dataclasses.replace(cfg, out_dir=str(tmp_path / "epochs"), max_steps=None, epochs=0.05,
                                  resume=os.path.join(cfg.out_dir, "checkpoint-3")))
