"""The command line: flags map to TrainConfig, bad flags are refused before any work,
`python -m minorsft train` runs, and `minorsft demo` passes its flags to run_demo."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from minorsft import cli
from minorsft.train import tiny
from minorsft.train import TrainConfig
from tests.util import ROOT, subprocess_env

# The loop, not the kernels: only the plain (PyTorch backend) pass of `make test`.
pytestmark = pytest.mark.no_interpreter




@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny.write_synthetic_dataset(str(tmp_path_factory.mktemp("cli")), n_train=24, n_eval=4, seed=13)


def test_every_config_field_has_a_flag():
    parser = cli.build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train_parser._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= dests
    args = parser.parse_args(["train", "--loss", "dpo", "--loss-type", "ipo", "--beta", "0.3", "--grad-accum", "3",
                              "--no-bf16", "--fsdp", "--clip-grad", "0", "--max-steps", "7"])
    cfg = cli.config_from_args(args)
    assert (cfg.loss, cfg.loss_type, cfg.beta, cfg.grad_accum, cfg.bf16, cfg.fsdp, cfg.clip_grad, cfg.max_steps) == \
        ("dpo", "ipo", 0.3, 3, False, True, None, 7)


@pytest.mark.parametrize("argv, flag", [
    (["--beta", "-1"], "--beta"), (["--batch-size", "0"], "--batch-size"),
    (["--loss", "sft", "--loss-type", "hinge"], "--loss-type"), (["--data", "/no/such.jsonl"], "--data"),
    (["--resume", "latest"], "--resume"),
])
def test_bad_flags_exit_2_before_any_work(tmp_path, capsys, argv, flag):
    out = tmp_path / "out"
    assert cli.main(["train", "--out-dir", str(out), *argv]) == 2
    assert flag in capsys.readouterr().err
    assert not out.exists()


def test_unknown_choice_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--loss", "kto"])
    assert e.value.code == 2 and "--loss" in capsys.readouterr().err


def test_python_dash_m_train_then_incompatible_resume(tmp_path, synth):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "minorsft", "train", "--loss", "minor_dpo", "--data", synth["train"],
           "--eval-data", synth["eval"], "--out-dir", str(out), "--max-steps", "2", "--batch-size", "2",
           "--max-length", "32", "--no-progress", "--log-every", "1"]
    env = subprocess_env(OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["step"] == 2 and 0 <= summary["eval"]["rewards/accuracies"] <= 1
    assert (out / "checkpoint-2" / "model.safetensors").exists()
    assert (out / "latest").read_text().strip() == "checkpoint-2"
    bad = cmd[:-2] + ["--beta", "0.5", "--resume", "latest"]
    p = subprocess.run(bad, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "incompatible configuration: beta" in p.stderr


def test_demo_flags_reach_run_demo(monkeypatch, tmp_path):
    """`minorsft demo` is a thin layer: its few flags (with help and defaults) are passed on;
    the pipeline itself is tested in test_demo.py."""
    import minorsft.demo
    calls = []
    monkeypatch.setattr(minorsft.demo, "run_demo", lambda **kw: calls.append(kw))
    assert cli.main(["demo"]) == 0
    assert cli.main(["demo", "--out-dir", str(tmp_path), "--seed", "3"]) == 0
    assert calls == [{"out_dir": "runs/demo", "seed": 0}, {"out_dir": str(tmp_path), "seed": 3}]
    demo_parser = cli.build_parser()._subparsers._group_actions[0].choices["demo"]
    options = [a for a in demo_parser._actions if a.dest != "help"]
    assert {a.dest for a in options} == {"out_dir", "seed"}
    assert all(a.help and "default" in a.help for a in options)


def test_bad_row_is_a_clean_error_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2="}\n')
    rc = cli.main(["train", "--data", str(bad), "--out-dir", str(tmp_path / "o"), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl:2" in err and "response" in err


@pytest.mark.parametrize("flag", ["--device", "--ref-device"])
def test_bad_device_refused_before_work(tmp_path, capsys, flag):
    rc = cli.main(["train", flag, "gpu0", "--out-dir", str(tmp_path / "o")])
    assert rc == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
