"""Arguments checked before work: each bad path or combination is one clear line naming
the flag before anything is written or loaded; the built-in defaults are announced;
--help shows every flag with its default; --save-total-limit keeps the newest N."""
import dataclasses
import os
import re
import stat

import pytest

from minorsft import cli
from minorsft.train import TrainConfig, train
from minorsft.train.checkpoint import checkpoints, latest_name, prune_checkpoints
from minorsft.train.config import config_from_args, config_to_argv, flag

pytestmark = pytest.mark.no_interpreter



def _refused(argv, capsys, flag_name, text):
    """``minorsft train ARGV`` exits 2 with one error line naming ``flag_name``, containing ``text``."""
    capsys.readouterr()
    assert cli.main(["train", "--max-steps", "1", "--no-progress", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"minorsft train: error: {flag_name}: ") and text in err, err
    assert "no --model" not in captured.out    # refused before the model or data were touched
    return err


def test_out_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    _refused(["--out-dir", str(f)], capsys, "--out-dir", "is a file, not a folder")
    _refused(["--out-dir", str(f / "sub")], capsys, "--out-dir", "is a file")
    assert f.read_text() == "x"


def _read_only_folder(tmp_path):
    """A folder this process cannot write: chmod for a normal user; root ignores modes, so
    a read-only system folder is tried then."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    for candidate in (str(d), "/sys", "/proc"):
        try:
            open(os.path.join(candidate, ".minorsft-probe"), "w").close()
            os.remove(os.path.join(candidate, ".minorsft-probe"))
        except OSError:
            return candidate
    pytest.skip("no read-only folder found for this user")


def test_out_dir_that_is_read_only(tmp_path, capsys):
    ro = _read_only_folder(tmp_path)
    try:
        _refused(["--out-dir", ro], capsys, "--out-dir", "is not writable")
        _refused(["--out-dir", os.path.join(ro, "new", "run")], capsys, "--out-dir", "is not writable")
    finally:
        (tmp_path / "ro").chmod(stat.S_IRWXU)


def test_model_folder_without_a_model(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "o")
    _refused(["--model", str(empty), "--out-dir", out], capsys, "--model", "config.json is missing")
    (empty / "config.json").write_text("{}")
    _refused(["--model", str(empty), "--out-dir", out], capsys, "--model", "holds no model weights")
    _refused(["--model", str(empty / "config.json"), "--out-dir", out], capsys, "--model", "is a file")
    assert not os.path.exists(out)


def test_eval_every_without_eval_data(tmp_path, synth, capsys):
    out = str(tmp_path / "o")
    _refused(["--data", synth["train"], "--eval-every", "5", "--out-dir", out], capsys, "--eval-every",
             "needs --eval-data")
    _refused(["--data", synth["train"], "--eval-generate", "--out-dir", out], capsys, "--eval-generate",
             "needs --eval-data")
    assert not os.path.exists(out)


def test_robust_without_label_smoothing(tmp_path, capsys):
    _refused(["--loss", "dpo", "--loss-type", "robust", "--out-dir", str(tmp_path / "o")], capsys,
             "--loss-type", "with 0 it is the sigmoid loss")
    assert not (tmp_path / "o").exists()


def test_overwrite_with_resume(tmp_path, capsys):
    _refused(["--overwrite", "--resume", "latest", "--out-dir", str(tmp_path)], capsys, "--overwrite",
             "cannot be combined with --resume")


def test_builtin_defaults_are_announced(tmp_path, capsys):
    r = train(TrainConfig(out_dir=str(tmp_path / "o"), max_steps=1, batch_size=2, max_length=32, progress=False))
    said = capsys.readouterr().out
    assert "no --model: training the built-in tiny model" in said
    assert f"no --data: training on the built-in synthetic task set ({tmp_path / 'o' / 'data'})" in said
    assert r["step"] == 1


def test_help_shows_every_flag_with_its_default_and_a_description():
    text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    text = " ".join(text.split("options:", 1)[1].split())       # past the usage line
    for f in dataclasses.fields(TrainConfig):
        m = re.search(re.escape(flag(f.name)) + r"[ ,]", text)
        assert m, f.name
        entry = text[m.start(): m.start() + 400]
        assert "(default: " in entry and f.metadata["help"].split()[0] in entry, f.name


def test_the_resume_command_round_trips_through_the_parser():
    cfg = TrainConfig(loss="dpo", beta=0.3, data="d.jsonl", max_steps=7, clip_grad=None, bf16=False, fsdp=True,
                      skip_nonfinite=2, save_total_limit=3, out_dir="runs/x y", resume="latest")
    args = cli.build_parser().parse_args(["train", *config_to_argv(cfg)])
    assert config_from_args(args) == cfg


def test_save_total_limit_keeps_the_newest(tmp_path, synth):
    out = tmp_path / "o"
    train(TrainConfig(loss="sft", data=synth["train"], out_dir=str(out), max_steps=4, batch_size=2, max_length=32,
                      progress=False, save_every=1, save_total_limit=2))
    assert [s for s, _ in checkpoints(str(out))] == [4, 3] and latest_name(str(out)) == "checkpoint-4"
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_save_total_limit_never_removes_the_one_latest_names(tmp_path):
    for step in (1, 2, 3, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "latest").write_text("checkpoint-1")     # e.g. a newer checkpoint that fails verification
    removed = prune_checkpoints(str(tmp_path), 2)
    assert sorted(os.path.basename(p) for p in removed) == ["checkpoint-2"]
    assert [s for s, _ in checkpoints(str(tmp_path))] == [4, 3, 1]
