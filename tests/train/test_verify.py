"""Every checkpoint and cache file is verified: a manifest (size + SHA-256 of every file)
written last; --resume latest takes the newest checkpoint that verifies and says why it
skipped newer ones; an explicit checkpoint that fails is an error naming the file; a
changed reference-cache file is recomputed."""
import dataclasses
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minorsft.train import ConfigError, TrainConfig, tiny, train
from minorsft.train import data as D
from minorsft.train import reference as R
from minorsft.train.checkpoint import find_resume
from minorsft.train.manifest import VerifyError, verify_manifest, write_manifest
from minorsft.train.outdir import prepare_out_dir

pytestmark = pytest.mark.no_interpreter



@pytest.fixture(scope="module")
def full_run(tmp_path_factory, synth):
    out = tmp_path_factory.mktemp("full") / "run"
    cfg = TrainConfig(loss="minor_sft", data=synth["train"], out_dir=str(out), max_steps=6, batch_size=3,
                      lr=5e-3, warmup_steps=1, log_every=2, save_every=2, max_length=32, progress=False, seed=5)
    return cfg, train(cfg)


def _flip(path, offset_from_end=1000, n=16):
    """Flip ``n`` bytes inside the file (past a safetensors header: the tensor data)."""
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        data = f.read(n)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes(b ^ 0xFF for b in data))


def test_every_checkpoint_has_a_manifest_that_verifies(full_run):
    cfg, _ = full_run
    for step in (2, 4, 6):
        ckpt = os.path.join(cfg.out_dir, f"checkpoint-{step}")
        verify_manifest(ckpt)
        with open(os.path.join(ckpt, "manifest.json")) as f:
            files = json.load(f)["files"]
        assert set(files) >= {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json",
                              "config.json"}


def test_flipped_weights_fall_back_to_the_previous_checkpoint_and_reproduce(tmp_path, full_run, capsys):
    cfg, full = full_run
    out = tmp_path / "run"
    shutil.copytree(cfg.out_dir, out)
    _flip(out / "checkpoint-6" / "model.safetensors")
    load_file(str(out / "checkpoint-6" / "model.safetensors"))     # still a valid safetensors file
    capsys.readouterr()
    resumed = train(dataclasses.replace(cfg, out_dir=str(out), resume="latest"))
    said = capsys.readouterr().out
    assert f"resume latest: {out / 'checkpoint-4'}, the newest checkpoint that verifies" in said
    assert "skipped checkpoint-6" in said and "model.safetensors: its SHA-256 differs" in said
    assert "latest names checkpoint-6" in said
    want = {h["step"]: h for h in full["history"]}
    assert [h["step"] for h in resumed["history"]] == [5, 6]
    for h in resumed["history"]:
        assert h["loss"] == want[h["step"]]["loss"] and h["grad_norm"] == want[h["step"]]["grad_norm"]
    a = load_file(os.path.join(cfg.out_dir, "checkpoint-6", "model.safetensors"))
    b = load_file(str(out / "checkpoint-6" / "model.safetensors"))   # rewritten by the resumed run
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_explicit_checkpoint_that_fails_is_an_error_naming_the_file(tmp_path, full_run):
    cfg, _ = full_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(os.path.join(cfg.out_dir, "checkpoint-4"), ckpt)
    with open(ckpt / "optimizer.pt", "r+b") as f:
        f.truncate(100)
    new_out = tmp_path / "new"
    with pytest.raises(ConfigError, match=r"^resume: .*ckpt is not a complete checkpoint: .*optimizer\.pt: 100 bytes"):
        train(dataclasses.replace(cfg, out_dir=str(new_out), resume=str(ckpt)))
    assert not new_out.exists()     # refused before any work


def _fake_checkpoint(out, step):
    """A checkpoint folder as find_resume sees it: trainer_state.json, a weights file, a manifest."""
    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "config": {}}))
    (d / "model.safetensors").write_bytes(os.urandom(64))
    write_manifest(str(d))
    return d


@pytest.mark.parametrize("latest, note", [(None, "latest is missing"),
                                          ("checkpoint-9", "latest names checkpoint-9, which does not exist")])
def test_latest_missing_or_dangling_still_finds_a_complete_checkpoint(tmp_path, latest, note):
    _fake_checkpoint(tmp_path, 1)
    (tmp_path / "checkpoint-2").mkdir()                     # a save killed before its manifest
    (tmp_path / "checkpoint-2" / "model.safetensors").write_bytes(b"x")
    if latest:
        (tmp_path / "latest").write_text(latest)
    said = []
    path, state = find_resume("latest", str(tmp_path), log=said.append)
    assert path.endswith("checkpoint-1") and state["step"] == 1
    assert "skipped checkpoint-2" in said[0] and "manifest.json: missing" in said[0] and note in said[0]


def test_no_checkpoint_that_verifies_is_an_error_listing_why(tmp_path):
    d = _fake_checkpoint(tmp_path, 3)
    os.remove(d / "model.safetensors")
    with pytest.raises(ConfigError, match=r"^resume: latest: no checkpoint in .* verifies: checkpoint-3 "
                                          r"\(.*model\.safetensors: missing\)"):
        find_resume("latest", str(tmp_path))


def test_an_interrupted_swap_is_repaired_before_latest_is_searched(tmp_path):
    """Crash after the old checkpoint-3 was moved aside for a new one: the start repairs it,
    then --resume latest finds it."""
    old = _fake_checkpoint(tmp_path, 3)
    os.replace(old, tmp_path / ".old-checkpoint-3-999")
    (tmp_path / "latest").write_text("checkpoint-3")
    prepare_out_dir(str(tmp_path), resume="latest", overwrite=False, log=lambda m: None)
    assert find_resume("latest", str(tmp_path), log=lambda m: None)[0].endswith("checkpoint-3")


def test_a_manifest_names_the_first_bad_file(tmp_path):
    d = _fake_checkpoint(tmp_path, 1)
    with open(d / "trainer_state.json", "a") as f:
        f.write(" ")
    with pytest.raises(VerifyError, match=r"trainer_state\.json: .* bytes, the manifest says"):
        verify_manifest(str(d))


@pytest.fixture(scope="module")
def cache_setup(synth):
    model, tok = tiny.build_tiny_model(seed=1)
    ds = D.load_dataset(synth["train"], tok, max_length=32, kind="sft")
    return model, ds


def _precompute(model, ds, cache_dir, log):
    return R.precompute_reference_logprobs(model, ds, collate_fn=lambda exs: D.collate(exs, 0, ds.kind),
                                           batch_size=8, max_length=32, cache_dir=str(cache_dir), log=log)


def test_a_changed_ref_cache_file_is_detected_and_recomputed(tmp_path, cache_setup):
    model, ds = cache_setup
    table, hit = _precompute(model, ds, tmp_path, log=lambda m: None)
    (path,) = [tmp_path / n for n in os.listdir(tmp_path)]
    with safe_open(str(path), "pt") as f:             # keep its header metadata, change the values
        meta = f.metadata()
    save_file({"ref_logps": table + 1.0}, str(path), metadata=meta)    # a valid file, wrong numbers
    said = []
    again, hit = _precompute(model, ds, tmp_path, log=said.append)
    assert not hit and torch.equal(again, table)
    assert any("fails verification" in m and "recomputing" in m for m in said), said
    _, hit = _precompute(model, ds, tmp_path, log=lambda m: None)       # rewritten: a hit again
    assert hit
    with open(path, "r+b") as f:                       # truncated
        f.truncate(os.path.getsize(path) - 8)
    said.clear()
    again, hit = _precompute(model, ds, tmp_path, log=said.append)
    assert not hit and torch.equal(again, table) and any("unreadable" in m for m in said), said


def test_a_metrics_line_cut_by_a_kill_is_dropped_and_named(tmp_path, full_run, capsys):
    cfg, _ = full_run
    out = tmp_path / "run"
    shutil.copytree(cfg.out_dir, out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "step": 7, "lo')          # the last write, cut short
    n = len(open(out / "metrics.jsonl").read().splitlines())
    capsys.readouterr()
    train(dataclasses.replace(cfg, out_dir=str(out), resume="latest"))   # at step 6: nothing left to train
    assert f"{out / 'metrics.jsonl'}:{n}: not a JSON line" in capsys.readouterr().out
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5, 6]
