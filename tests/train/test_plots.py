"""``minorsft plot`` (plots.plot_metrics -> plot_runs) on the records of real tiny runs:
one panel per metric the runs recorded, one colour per run, named by run name or folder;
a run without metrics is refused in one line."""
import shutil
import struct

import pytest

from minorsft import cli
from minorsft.train import TrainConfig, train
from minorsft.train import plots
from minorsft.train.metrics import read_metrics

# The loop, not the kernels: only the plain (PyTorch backend) pass of `make test`.
pytestmark = pytest.mark.no_interpreter

PNG = b"\x89PNG\r\n\x1a\n"


def _size(path):
    """(width, height) in pixels of a PNG (its IHDR chunk)."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synth):
    """Two real runs: minor_sft evaluated with generation (loss, ce, accuracy, deviation),
    and a plain sft run evaluated at the end (loss, ce)."""
    root = tmp_path_factory.mktemp("plots")
    opts = dict(data=synth["train"], eval_data=synth["eval"], max_steps=4, batch_size=4, lr=3e-3,
                log_every=1, max_length=32, progress=False, seed=1)
    train(TrainConfig(loss="minor_sft", out_dir=str(root / "minor"), eval_every=2, eval_generate=True,
                      **opts))
    train(TrainConfig(loss="sft", out_dir=str(root / "sft"), run_name="plain sft", **opts))
    return root


def test_plot_command_draws_every_recorded_metric(runs, capsys):
    recs = read_metrics(str(runs / "minor" / "metrics.jsonl"))
    assert {"loss", "deviation"} <= set(recs[0]) and any("accuracy" in r for r in recs)
    assert cli.main(["plot", str(runs / "minor")]) == 0
    out = runs / "minor" / "metrics.png"
    assert capsys.readouterr().out.strip() == str(out)
    assert _size(out) == (1320, 792)   # 2 x 2 panels: loss, ce, accuracy, deviation


def test_panels_follow_the_metrics_a_run_has(runs, tmp_path):
    out = plots.plot_metrics([str(runs / "sft" / "metrics.jsonl")], str(tmp_path / "sft.png"))
    assert _size(out) == (1320, 396)   # one row: loss and ce (no generation, no deviation)


def test_runs_are_named_by_run_name_or_folder(runs, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "plot_runs", lambda records, path, **kw: drawn.append(records) or path)
    for twin in ("x", "y"):   # two runs of the same name: the folder tells them apart
        shutil.copytree(runs / "sft", tmp_path / twin)
    plots.plot_metrics([str(runs / "minor"), str(runs / "sft")], str(tmp_path / "a.png"))
    plots.plot_metrics([str(tmp_path / "x"), str(tmp_path / "y")], str(tmp_path / "b.png"))
    assert [sorted({r["run"] for r in records}) for records in drawn] == [
        ["minor", "plain sft"],
        sorted(f"plain sft ({plots._folder(str(tmp_path / t / 'metrics.jsonl'))})" for t in "xy")]


@pytest.mark.parametrize("content, message", [
    (None, "metrics.jsonl: no such file"),
    ("", "no metric to plot"),
    ('{"split": "train", "step": 1, "loss": 1.0}\n{"split": "tr', "metrics.jsonl: "),
])
def test_a_run_without_metrics_is_refused_in_one_line(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    assert cli.main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minorsft plot: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "metrics.png").exists()
