"""Only finite steps become checkpoints: a non-finite loss or gradient norm stops the run
(exit 3, the step named, `latest` still on the last finite checkpoint), or with
--skip-nonfinite N is skipped up to N times; metrics.jsonl stays strict JSON."""
import json
import math
import os

import pytest
from safetensors.torch import load_file

from minorsft import cli
from minorsft.train import TrainConfig, loop, train
from minorsft.train.checkpoint import checkpoints, latest_name
from minorsft.train.metrics import NonFiniteError

pytestmark = pytest.mark.no_interpreter



def _strict(path):
    """The records of a JSONL file parsed as strict JSON (NaN / Infinity are errors)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def test_huge_lr_exits_3_naming_the_step_and_latest_stays_finite(tmp_path, synth, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--data", synth["train"], "--out-dir", str(out), "--lr", "1e9", "--max-steps", "5",
                   "--batch-size", "2", "--max-length", "32", "--no-progress", "--save-every", "1"])
    err = capsys.readouterr().err
    assert rc == 3, err
    recs = [r for r in _strict(out / "metrics.jsonl") if r["split"] == "train"]
    bad = next(r["step"] for r in recs if r["loss"] is None or r["grad_norm"] is None)
    assert bad >= 2 and f"step {bad}: loss" in err and "Traceback" not in err
    assert latest_name(str(out)) == f"checkpoint-{bad - 1}"
    assert [s for s, _ in checkpoints(str(out))] == list(range(bad - 1, 0, -1))   # nothing from `bad` on
    weights = load_file(str(out / f"checkpoint-{bad - 1}" / "model.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values())


@pytest.fixture
def poison(monkeypatch):
    """``poison(steps)``: the loss of those optimiser steps becomes NaN (so do their gradients)."""
    state = {"step": 0, "bad": set()}
    real_step, real_loss = loop.Run._train_step, loop.compute_loss

    def train_step(self, step, keys):
        state["step"] = step
        return real_step(self, step, keys)

    def compute_loss(*a, **k):
        loss, m = real_loss(*a, **k)
        return (loss * float("nan"), m) if state["step"] in state["bad"] else (loss, m)

    monkeypatch.setattr(loop.Run, "_train_step", train_step)
    monkeypatch.setattr(loop, "compute_loss", compute_loss)
    return lambda steps: state["bad"].update(steps)


def _cfg(synth, out, **kw):
    return TrainConfig(**{**dict(loss="minor_sft", data=synth["train"], out_dir=str(out), max_steps=5,
                                 batch_size=2, lr=5e-3, max_length=32, progress=False, save_every=1,
                                 log_every=1), **kw})


def test_found_at_the_flush_before_the_next_checkpoint(tmp_path, synth, poison):
    """No per-step sync without --skip-nonfinite: the NaN of step 3 is found at the flush
    before checkpoint 4 and named; checkpoint 2 stays latest."""
    poison({3})
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"^step 3: loss nan.*latest still names checkpoint-2") as e:
        train(_cfg(synth, out, save_every=2, log_every=10))
    assert e.value.step == 3
    assert latest_name(str(out)) == "checkpoint-2" and [s for s, _ in checkpoints(str(out))] == [2]
    recs = _strict(out / "metrics.jsonl")
    assert [(r["step"], r["loss"] is None) for r in recs] == [(1, False), (2, False), (3, True), (4, True)]


def test_skip_nonfinite_skips_the_update_then_stops_when_spent(tmp_path, synth, poison):
    poison({3})
    out = tmp_path / "skip"
    r = train(_cfg(synth, out, skip_nonfinite=1))
    assert r["step"] == 5
    skipped = [h for h in r["history"] if h.get("skipped")]
    assert [h["step"] for h in skipped] == [3] and skipped[0]["loss"] is None
    assert all(math.isfinite(h["loss"]) for h in r["history"] if h["step"] != 3)
    # the skipped step changed no weight
    w2, w3 = (load_file(str(out / f"checkpoint-{s}" / "model.safetensors")) for s in (2, 3))
    assert all(bool((w2[k] == w3[k]).all()) for k in w2)
    assert [x["step"] for x in _strict(out / "metrics.jsonl") if x.get("skipped")] == [3]
    # a second non-finite step with one skip allowed: stopped at that step
    poison({4})
    out2 = tmp_path / "spent"
    with pytest.raises(NonFiniteError, match="^step 4: "):
        train(_cfg(synth, out2, skip_nonfinite=1))
    assert latest_name(str(out2)) == "checkpoint-3"
    assert not os.path.exists(out2 / "checkpoint-4")
