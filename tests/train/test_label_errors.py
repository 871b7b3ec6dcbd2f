"""A label that is no token, reaching the loop (the loss runs with check_labels=False: no
host sync), stops training at the flush with the step named, before any checkpoint of
that step or later is written."""
import os

import pytest
from safetensors.torch import load_file

from minorsft.train import TrainConfig, train
from minorsft.train import data as D
from minorsft.train import tiny

pytestmark = pytest.mark.no_interpreter


def test_bad_label_in_a_row_names_the_step_and_no_checkpoint_holds_nan(tmp_path, monkeypatch):
    paths = tiny.write_synthetic_dataset(str(tmp_path / "data"), n_train=24, n_eval=4, seed=2)
    bad_row, vocab_plus = 5, 10 ** 6
    real_load = D.load_dataset

    def corrupting_load(path, *a, **kw):
        ds = real_load(path, *a, **kw)
        if path == paths["train"]:   # a trained label no tokenizer could produce
            ex = ds.examples[bad_row]
            k = next(i for i, l in enumerate(ex.labels) if l != D.IGNORE_INDEX)
            ex.labels[k] = vocab_plus
        return ds

    monkeypatch.setattr(D, "load_dataset", corrupting_load)
    cfg = TrainConfig(loss="minor_sft", data=paths["train"], out_dir=str(tmp_path / "run"), max_steps=6,
                      batch_size=4, log_every=1, save_every=1, max_length=32, progress=False, seed=3)
    sampler = D.Sampler(24, cfg.seed)
    step = next(s for s in range(1, 7) if bad_row in sampler.indices((s - 1) * 4, 4))
    with pytest.raises(ValueError, match=rf"labels: 1 label\(s\) outside \[0, V=\d+\).* at step {step} "
                                         rf"\(e\.g\. {vocab_plus}\)"):
        train(cfg)
    saved = sorted(n for n in os.listdir(cfg.out_dir) if n.startswith("checkpoint-"))
    assert saved == [f"checkpoint-{s}" for s in range(1, step)]
    for name in saved:
        weights = load_file(os.path.join(cfg.out_dir, name, "model.safetensors"))
        assert all(t.isfinite().all() for t in weights.values()), name
