"""The training loop on a GPU (bf16 autocast, Triton kernels): a smoke test."""
import math

import pytest
import torch

from minorsft.train import tiny
from minorsft.train import TrainConfig, train

pytestmark = [pytest.mark.no_interpreter,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("loss,fused_linear", [("minor_sft", False), ("minor_sft", True),
                                               ("minor_dpo", False)])
def test_loop_runs_on_cuda(tmp_path, loss, fused_linear):
    paths = tiny.write_synthetic_dataset(str(tmp_path / "data"), n_train=32, n_eval=8, seed=1)
    cfg = TrainConfig(loss=loss, data=paths["train"], eval_data=paths["eval"], device="cuda",
                      max_steps=4, batch_size=4, lr=3e-3, out_dir=str(tmp_path / "run"),
                      progress=False, log_every=1, fused_linear=fused_linear)
    result = train(cfg)
    losses = [r["loss"] for r in result["history"]]
    assert losses and all(math.isfinite(v) for v in losses)
