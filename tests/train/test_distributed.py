"""torchrun with 2 CPU ranks (gloo): DDP and FSDP2 give the losses, gradients and weights
of a single-process run on the same global batch."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minorsft.train import tiny
from minorsft.train.metrics import read_metrics
from minorsft.train import TrainConfig, train
from tests.util import ROOT, subprocess_env

pytestmark = [pytest.mark.no_interpreter,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")]



@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    paths = tiny.write_synthetic_dataset(str(d / "data"), n_train=32, n_eval=4, seed=11)
    common = dict(loss="minor_sft", data=paths["train"], eval_data=paths["eval"], max_steps=2, lr=5e-3,
                  log_every=1, max_length=32, grad_accum=2, seed=4)
    cfg = TrainConfig(batch_size=4, out_dir=str(d / "single"), progress=False, eval_generate=True,
                      dump_grads=str(d / "single" / "grads.safetensors"), **common)
    return d, common, train(cfg)


def torchrun(out_dir, common, *extra):
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "minorsft", "train", "--batch-size", "2", "--out-dir", str(out_dir), "--no-progress",
            "--dump-grads", str(out_dir / "grads.safetensors"), "--device", "cpu", "--eval-generate"]
    for k, v in common.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    env = subprocess_env(OMP_NUM_THREADS="1")
    p = subprocess.run(args + list(extra), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out_dir


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_single_process(single, mode):
    d, common, ref = single
    out = torchrun(d / mode, common, *(["--fsdp"] if mode == "fsdp" else []))
    recs = [r for r in read_metrics(str(out / "metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in recs] == [1, 2]
    for r, s in zip(recs, ref["history"]):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-5)
        assert r["deviation"] == pytest.approx(s["deviation"], rel=1e-4, abs=1e-6)
    ev = [r for r in read_metrics(str(out / "metrics.jsonl")) if r["split"] == "eval"][-1]
    for k, v in ref["final_eval"].items():
        assert ev[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    g1, g2 = load_file(str(d / "single" / "grads.safetensors")), load_file(str(out / "grads.safetensors"))
    assert g1.keys() == g2.keys() and len(g1) > 0
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    w1 = load_file(os.path.join(ref["checkpoint"], "model.safetensors"))
    w2 = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    for k in w1:  # Adam divides by sqrt(v): rounding-level gradient differences show up scaled
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")


def test_fused_linear_under_fsdp_matches_single_process(single):
    """--fused-linear with FSDP2: the sharded lm_head weight is gathered (differentiably)
    for the loss; losses and every gradient equal a single-process fused-linear run."""
    d, common, _ = single
    cfg = TrainConfig(batch_size=4, out_dir=str(d / "single_fl"), progress=False, fused_linear=True,
                      dump_grads=str(d / "single_fl" / "grads.safetensors"), **common)
    ref = train(cfg)
    out = torchrun(d / "fsdp_fl", common, "--fsdp", "--fused-linear")
    recs = [r for r in read_metrics(str(out / "metrics.jsonl")) if r["split"] == "train"]
    for r, s in zip(recs, ref["history"]):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-5)
    g1 = load_file(str(d / "single_fl" / "grads.safetensors"))
    g2 = load_file(str(out / "grads.safetensors"))
    assert g1.keys() == g2.keys() and "lm_head.weight" in g1
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


def _agree(rank, store_path, results):
    from minorsft.train.distributed import Dist
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                         world_size=2)
    try:
        d = Dist(rank=rank, world=2)
        results[rank] = [d.any_host(False), d.any_host(rank == 1), d.any_host(rank == 0)]
    finally:
        torch.distributed.destroy_process_group()


def test_host_flags_agree_across_ranks(tmp_path):
    """A stop signal seen by one rank stops both after the same step (the per-step agreement
    runs on a CPU group, never on the device's queue)."""
    import torch.multiprocessing as mp
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_agree, args=(str(tmp_path / "store"), results), nprocs=2)
        assert dict(results) == {0: [False, True, True], 1: [False, True, True]}
