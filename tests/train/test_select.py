"""`minorsft select` (LoBaSS): the learnability of every row equals a float64 computation
from the models' logits, the top fraction is kept verbatim in its original order, the probe
fine-tune is made once, and bad input is refused before any work."""
import json
import os

import pytest
import torch

from minorsft import cli
from minorsft.train import SelectConfig, TrainConfig, select, tiny
from minorsft.train import data as D
from minorsft.train.lobass import response_losses, top_rows
from minorsft.train.loop import load_model_and_tokenizer

pytestmark = pytest.mark.no_interpreter

# Rows as a user writes them: odd spacing, non-ASCII text, a chat row, a blank line and a
# last line without its newline; the kept ones must come back byte for byte.
ROWS = [b'{"prompt": "1+2=", "response": "3"}\n',
        b'{ "prompt":"rev abc=",   "response":"cba" }\n',
        b'{"prompt": "up xyz=", "response": "XYZ", "note": "\xc3\xa9t\xc3\xa9"}\n',
        b'\n',
        b'{"messages": [{"role": "user", "content": "4+4="}, {"role": "assistant", "content": "8"}]}\n',
        b'{"prompt": "9+9=", "response": "18"}\n',
        b'{"prompt": "rev dog=", "response": "god"}\n',
        b'{"prompt": "up cat=", "response": "CAT"}']
LINES = [i + 1 for i, r in enumerate(ROWS) if r.strip()]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base and a "fine-tuned" tiny model, both saved with save_pretrained."""
    d = tmp_path_factory.mktemp("select-models")
    return tiny.save_tiny_model(str(d / "base"), seed=0), tiny.save_tiny_model(str(d / "ft"), seed=1)


@pytest.fixture
def rows_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"".join(ROWS))
    return str(path)


def _ground_truth(model_dir, path, max_length):
    """Token-mean CE of each row's response tokens, float64 log_softmax of the model's logits."""
    model, tok = load_model_and_tokenizer(model_dir)
    model = model.double().eval()
    ds = D.load_dataset(path, tok, max_length=max_length, kind="sft")
    out = []
    with torch.no_grad():
        for ex in ds.examples:
            ids, labels = torch.tensor([ex.input_ids]), torch.tensor(ex.labels)
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
            target = labels[1:]
            mask = target != D.IGNORE_INDEX
            out.append(-logp[mask].gather(1, target[mask, None]).sum().item() / int(mask.sum()))
    return out


def test_learnability_equals_float64_ground_truth(models, rows_file, tmp_path, capsys):
    base, ft = models
    out, scores = tmp_path / "kept.jsonl", tmp_path / "scores.jsonl"
    rc = cli.main(["select", "--model", base, "--finetuned", ft, "--data", rows_file, "--keep", "0.5",
                   "--out", str(out), "--scores", str(scores), "--batch-size", "3", "--max-length", "16",
                   "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    l0, l1 = _ground_truth(base, rows_file, 16), _ground_truth(ft, rows_file, 16)
    want = [(a - b) / a for a, b in zip(l0, l1)]
    recs = [json.loads(line) for line in scores.read_text().splitlines()]
    assert [r["line"] for r in recs] == LINES
    for r, a, b, w in zip(recs, l0, l1, want):
        assert r["loss_base"] == pytest.approx(a, rel=1e-5)
        assert r["loss_finetuned"] == pytest.approx(b, rel=1e-5)
        assert r["learnability"] == pytest.approx(w, rel=2e-5, abs=1e-6)
    # the top ceil(0.5 x 7) = 4 by the float64 values, ties by row order, kept in file order
    top = sorted(sorted(range(len(want)), key=lambda i: (-want[i], i))[:4])
    assert [r["kept"] for r in recs] == [i in top for i in range(len(want))]
    kept = [ROWS[LINES[i] - 1] for i in top]
    assert out.read_bytes() == b"".join(k if k.endswith(b"\n") else k + b"\n" for k in kept)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kept"] == 4


def test_top_rows_breaks_ties_by_row_order():
    assert top_rows([0.5, 0.9, 0.5, 0.5, 0.1], 0.6) == [0, 1, 2]   # ceil(3.0), not 4
    assert top_rows([0.2] * 10, 0.3) == [0, 1, 2]                  # 0.3 x 10 = 3.0000000000000004
    assert top_rows([0.1, 0.2], 1.0) == [0, 1] and top_rows([0.1, 0.2], 0.01) == [1]


def test_a_row_without_a_response_token_gets_learnability_zero(models):
    model, tok = load_model_and_tokenizer(models[0])
    ids = tok("1+1=2")["input_ids"]
    exs = [D.Example(0, ids, [D.IGNORE_INDEX] * len(ids)), D.Example(1, ids, [D.IGNORE_INDEX] * 4 + ids[4:])]
    losses, counts = response_losses(model, exs, pad_id=0, batch_size=2, device="cpu", progress=False)
    assert counts.tolist() == [0, len(ids) - 4] and losses[0] == 0 and losses[1] > 0
    import minorsft as ms
    assert ms.losses.learnability(losses.float(), losses.float() / 2).tolist()[0] == 0


def test_probe_fine_tune_is_made_once_from_a_copy(models, tmp_path, synth, capsys):
    base = models[0]
    before = {n: os.path.getmtime(os.path.join(base, n)) for n in os.listdir(base)}
    cfg = SelectConfig(model=base, data=synth["train"], keep=0.25, out=str(tmp_path / "sel.jsonl"),
                       probe_steps=3, lr=5e-3, batch_size=8, max_length=32, progress=False)
    res = select(cfg)
    assert res["finetuned"] == str(tmp_path / "sel.probe" / "model") and res["kept"] == 8   # ceil(0.25 x 30)
    info = json.loads((tmp_path / "sel.probe" / "model" / "info.json").read_text())
    assert info["step"] == 3 and info["config"]["loss"] == "sft"
    assert sum(res["learnability"]) > 0          # the fine-tune lowered the loss of its own data
    assert {n: os.path.getmtime(os.path.join(base, n)) for n in os.listdir(base)} == before
    capsys.readouterr()
    again = select(cfg)
    assert "finished earlier, not trained again" in capsys.readouterr().out
    assert again["learnability"] == res["learnability"]
    with pytest.raises(ValueError, match="work_dir: .* was trained with another configuration .*max_steps"):
        select(SelectConfig(**{**cfg.__dict__, "probe_steps": 4}))


def test_bad_rows_follow_train(models, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(ROWS[0] + b'{"prompt": "2+2="}\n' + b"not json\n" + ROWS[1])
    out = tmp_path / "o.jsonl"
    argv = ["select", "--model", models[0], "--data", str(bad), "--keep", "1", "--out", str(out),
            "--probe-steps", "2", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: field 'response' is missing" in err and not out.exists()
    assert not (tmp_path / "o.probe").exists()            # refused before the probe fine-tune
    scores = tmp_path / "s.jsonl"
    argv = ["select", "--model", models[0], "--finetuned", models[1], "--data", str(bad), "--keep", "1",
            "--out", str(out), "--scores", str(scores), "--skip-bad-rows", "--no-progress"]
    assert cli.main(argv) == 0
    recs = [json.loads(line) for line in scores.read_text().splitlines()]
    assert [(r["line"], r["kept"], "error" in r) for r in recs] == [(1, True, False), (2, False, True),
                                                                    (3, False, True), (4, True, False)]
    assert out.read_bytes() == ROWS[0] + ROWS[1]


@pytest.mark.parametrize("argv, flag, text", [
    (["--keep", "0"], "--keep", "must be a positive number"),
    (["--keep", "1.5"], "--keep", "must be in (0, 1]"),
    (["--keep", "-0.1"], "--keep", "must be a positive number"),
    (["--keep", "0.5", "--finetuned", "FT", "--probe-steps", "3"], "--probe-steps", "not both"),
    (["--keep", "0.5"], "--finetuned", "--probe-steps N"),
    (["--finetuned", "FT"], "--keep", "is required"),
    (["--keep", "0.5", "--finetuned", "FT", "--out", "DATA"], "--out", "is the input --data"),
])
def test_bad_arguments_are_refused_before_any_work(models, rows_file, tmp_path, capsys, argv, flag, text):
    out = str(tmp_path / "out" / "kept.jsonl")
    argv = [{"FT": models[1], "DATA": rows_file}.get(a, a) for a in argv]
    base = ["select", "--model", models[0], "--data", rows_file, "--no-progress"]
    if "--out" not in argv:
        base += ["--out", out]
    assert cli.main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"minorsft select: error: {flag}: ") and text in err, err
    assert not (tmp_path / "out").exists()


def test_python_api_default_work_dir_and_train_options_reused():
    cfg = SelectConfig(data="d.jsonl", keep=0.5, out="runs/sel/kept.jsonl", probe_steps=2)
    assert cfg.probe_dir() == "runs/sel/kept.probe"
    probe = cfg.probe_config()
    assert isinstance(probe, TrainConfig) and probe.loss == "sft" and probe.max_steps == 2
    assert probe.out_dir == os.path.join("runs/sel/kept.probe", "train")
    # declared once: select's shared options are TrainConfig's fields (same default and help)
    for name in ("model", "max_length", "batch_size", "lr", "skip_bad_rows", "device", "backend"):
        a, b = SelectConfig.__dataclass_fields__[name], TrainConfig.__dataclass_fields__[name]
        assert a.default == b.default and a.metadata["help"] == b.metadata["help"]
