"""Reference log-probs: values against a float64 eager formula, cache hit/miss keyed by
model + data + max length, safetensors on disk, and training with the cache equals
training with a frozen reference model."""
import dataclasses
import os

import pytest
import torch
from safetensors import safe_open

from minorsft.train import data as D
from minorsft.train import reference as R
from minorsft.train import tiny
from minorsft.train import TrainConfig, train


# The loop, not the kernels: only the plain (PyTorch backend) pass of `make test`.
pytestmark = pytest.mark.no_interpreter


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    paths = tiny.write_synthetic_dataset(str(d), n_train=10, n_eval=4, seed=9)
    model, tok = tiny.build_tiny_model(seed=3)
    return paths, model, tok


def precompute(model, ds, cache_dir, max_length=32):
    return R.precompute_reference_logprobs(
        model, ds, collate_fn=lambda exs: D.collate(exs, 0, ds.kind), batch_size=3,
        max_length=max_length, cache_dir=str(cache_dir), log=lambda m: None)


def eager_seq_logps(model, ds):
    out = []
    for ex in ds.examples:
        seqs = [(ex.input_ids, ex.labels)]
        if ds.kind == "pairs":
            seqs.append((ex.rejected_input_ids, ex.rejected_labels))
        row = []
        for ids, labels in seqs:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
            y = torch.tensor(labels[1:])
            lp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[:, None])[:, 0]
            row.append(float(lp[y != -100].sum()))
        out.append(row if ds.kind == "pairs" else row[0])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["sft", "pairs"])
def test_values_match_eager_float64(tmp_path, setup, kind):
    paths, model, tok = setup
    ds = D.load_dataset(paths["train"], tok, max_length=32, kind=kind)
    table, hit = precompute(model, ds, tmp_path)
    assert not hit and table.dtype == torch.float32
    assert table.shape == ((len(ds), 2) if kind == "pairs" else (len(ds),))
    torch.testing.assert_close(table.double(), eager_seq_logps(model, ds), rtol=1e-5, atol=1e-4)


def test_cache_hit_and_miss(tmp_path, setup):
    paths, model, tok = setup
    ds = D.load_dataset(paths["train"], tok, max_length=32, kind="sft")
    first, hit1 = precompute(model, ds, tmp_path)
    files = os.listdir(tmp_path)
    assert not hit1 and len(files) == 1 and files[0].endswith(".safetensors")
    with safe_open(str(tmp_path / files[0]), "pt") as f:  # plain safetensors, no pickle
        assert list(f.keys()) == ["ref_logps"]
    again, hit2 = precompute(model, ds, tmp_path)
    assert hit2 and torch.equal(again, first)
    # another max length -> another key
    ds16 = D.load_dataset(paths["train"], tok, max_length=16, kind="sft")
    _, hit3 = precompute(model, ds16, tmp_path, max_length=16)
    assert not hit3
    # other data -> miss
    ds_eval = D.load_dataset(paths["eval"], tok, max_length=32, kind="sft")
    _, hit4 = precompute(model, ds_eval, tmp_path)
    assert not hit4
    # other weights -> miss, and different values
    other = R.frozen_copy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
    moved, hit5 = precompute(other, ds, tmp_path)
    assert not hit5 and not torch.equal(moved, first)
    assert len(os.listdir(tmp_path)) == 4  # one file per distinct key


def test_frozen_copy_is_frozen_and_independent(setup):
    _, model, _ = setup
    ref = R.frozen_copy(model, dtype=torch.bfloat16)
    assert not ref.training and all(not p.requires_grad for p in ref.parameters())
    assert all(p.dtype == torch.bfloat16 for p in ref.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert R.model_fingerprint(ref) != R.model_fingerprint(model)


def test_training_with_cache_equals_frozen_reference(tmp_path, setup):
    paths, _, _ = setup
    cfg = TrainConfig(loss="minor_sft", data=paths["train"], eval_data=paths["eval"], max_steps=3,
                      batch_size=3, lr=5e-3, log_every=3, max_length=32, progress=False, tiny_seed=3,
                      out_dir=str(tmp_path / "frozen"))
    frozen = train(cfg)
    cached_cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "cached"), precompute_ref=True,
                                     ref_cache_dir=str(tmp_path / "cache"))
    cached = train(cached_cfg)
    for a, b in zip(cached["history"], frozen["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["deviation"] == pytest.approx(b["deviation"], rel=1e-4, abs=1e-6)
    assert cached["final_eval"]["loss"] == pytest.approx(frozen["final_eval"]["loss"], rel=1e-5)
    n_files = len(os.listdir(tmp_path / "cache"))
    assert n_files == 2  # train + eval tables
    again = train(dataclasses.replace(cached_cfg, out_dir=str(tmp_path / "again")))  # cache hit
    assert len(os.listdir(tmp_path / "cache")) == n_files
    assert [h["loss"] for h in again["history"]] == [h["loss"] for h in cached["history"]]


def test_fingerprint_covers_the_config(setup):
    """Same weights, a config change that moves the logits (eps): a different cache key."""
    import copy
    _, model, _ = setup
    other = copy.deepcopy(model)
    other.config.rms_norm_eps = 0.5
    assert R.model_fingerprint(other) != R.model_fingerprint(model)
    other.config.use_cache = not model.config.use_cache   # does not change the numbers
    other.config.rms_norm_eps = model.config.rms_norm_eps
    assert R.model_fingerprint(other) == R.model_fingerprint(model)
