"""`minorsft spin` (SPIN): each round's rejected responses are the previous round's greedy
generations, its reference is the previous round's model (checked on the reference
log-probs the round trained with), finished rounds are skipped, an interrupted one resumes
exactly, and bad input is refused before any work. The tests of this file share one
2-round run; the last one interrupts and resumes it."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from minorsft import cli
from minorsft.train import ConfigError, SpinConfig, spin, tiny
from minorsft.train import data as D
from minorsft.train.data import write_jsonl
from minorsft.train.loop import load_model_and_tokenizer
from minorsft.train.selfplay import generate_responses

pytestmark = pytest.mark.no_interpreter


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("spin")
    base = tiny.save_tiny_model(str(d / "sft-model"), seed=0)
    rows = [{"prompt": r["prompt"], "response": r["response"]} for r in tiny.synthetic_rows(8, seed=5)]
    data = write_jsonl(str(d / "sft.jsonl"), rows)
    cfg = SpinConfig(model=base, data=data, rounds=2, out_dir=str(d / "spin"), temperature=0.0,
                     max_new_tokens=4, max_steps=2, batch_size=4, lr=1e-2, max_length=32,
                     precompute_ref=True, save_every=1, progress=False)
    return cfg, rows, spin(cfg)


def _greedy(model_dir, prompts, n):
    """Greedy decoding, one token at a time from the full logits, no cache, no padding."""
    model, tok = load_model_and_tokenizer(model_dir)
    model.eval()
    out = []
    for prompt in prompts:
        ids, new = tok(prompt)["input_ids"], []
        with torch.no_grad():
            for _ in range(n):
                nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        out.append(tok.decode(new, skip_special_tokens=True))
    return out


def _pairs(cfg, k):
    with open(os.path.join(cfg.round_dir(k), "pairs.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_each_round_answers_with_the_previous_rounds_model(run):
    cfg, rows, res = run
    assert [r["reference"] for r in res["rounds"]] == [cfg.model, os.path.join(cfg.round_dir(1), "model")]
    for k, played_by in ((1, cfg.model), (2, res["rounds"][0]["model"])):
        texts = _greedy(played_by, [r["prompt"] for r in rows], 4)
        want = [(r["prompt"], r["response"], t) for r, t in zip(rows, texts)]
        assert [(p["prompt"], p["chosen"], p["rejected"]) for p in _pairs(cfg, k)] == \
            [w for w in want if w[2].strip()]
    assert _pairs(cfg, 1) != _pairs(cfg, 2)       # round 1 trained the model that played round 2
    for r in res["rounds"]:
        assert {"config.json", "info.json", "manifest.json", "metrics.jsonl", "model.safetensors",
                "tokenizer.json"} <= set(os.listdir(r["model"]))


def _sequence_logps(model_dir, pairs_file):
    """float64 log-prob sums of the chosen and rejected responses, [N, 2], from the logits of
    the pairs tokenised as `minorsft train` tokenises them."""
    model, tok = load_model_and_tokenizer(model_dir)
    model = model.double().eval()
    out = []
    with torch.no_grad():
        for ex in D.load_dataset(pairs_file, tok, max_length=32, kind="pairs").examples:
            row = []
            for ids, labels in ((ex.input_ids, ex.labels), (ex.rejected_input_ids, ex.rejected_labels)):
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
                target = torch.tensor(labels[1:])
                mask = target != D.IGNORE_INDEX
                row.append(logp[mask].gather(1, target[mask, None]).sum().item())
            out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def test_round_2s_reference_is_round_1s_model(run):
    cfg, _, res = run
    cache = os.path.join(cfg.round_dir(2), "train", "ref-cache")
    (name,) = os.listdir(cache)
    used = load_file(os.path.join(cache, name))["ref_logps"].double()   # what round 2 trained against
    pairs = os.path.join(cfg.round_dir(2), "pairs.jsonl")
    round1 = _sequence_logps(res["rounds"][0]["model"], pairs)
    torch.testing.assert_close(used, round1, rtol=1e-5, atol=1e-4)
    assert (used - _sequence_logps(cfg.model, pairs)).abs().max() > 1e-2    # not the SFT model's
    info = json.loads(open(os.path.join(res["rounds"][1]["model"], "info.json")).read())
    assert info["round"] == 2 and info["reference"] == res["rounds"][0]["model"]


def test_greedy_generation_is_reproducible_and_sampling_is_seeded(run):
    cfg, rows, _ = run
    model, tok = load_model_and_tokenizer(cfg.model)
    prompts = [tok(r["prompt"])["input_ids"] for r in rows]
    kw = dict(max_new_tokens=4, batch_size=3, progress=False)
    greedy = generate_responses(model, tok, prompts, temperature=0.0, seed=1, **kw)
    assert generate_responses(model, tok, prompts, temperature=0.0, seed=2, **kw) == greedy
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate_responses(model, tok, prompts, temperature=1.0, seed=7, **kw)
    assert torch.equal(torch.get_rng_state(), state)         # the caller's RNG is left alone
    assert generate_responses(model, tok, prompts, temperature=1.0, seed=7, **kw) == a
    assert generate_responses(model, tok, prompts, temperature=1.0, seed=8, **kw) != a


@pytest.mark.parametrize("argv, flag, text", [
    (["--rounds", "0"], "--rounds", "must be a positive integer"),
    ([], "--rounds", "is required"),
    (["--rounds", "1", "--temperature", "-1"], "--temperature", "non-negative"),
    (["--rounds", "1", "--top-p", "0"], "--top-p", "positive"),
    (["--rounds", "1", "--eval-every", "5"], "--eval-every", "needs --eval-data"),
    (["--rounds", "1", "--beta", "0"], "--beta", "beta"),
])
def test_bad_arguments_are_refused_before_any_work(run, tmp_path, capsys, argv, flag, text):
    cfg = run[0]
    out = tmp_path / "spin"
    assert cli.main(["spin", "--data", cfg.data, "--out-dir", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"minorsft spin: error: {flag}: ") and text in err, err
    assert not out.exists()


def test_flags_spin_sets_itself_are_refused(run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["spin", "--rounds", "1", "--resume", "latest"])      # no such flag
    with pytest.raises(SystemExit):
        cli.main(["spin", "--rounds", "1", "--loss", "sft"])            # not a DPO-family loss
    assert "--loss" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="resume"):
        spin(SpinConfig(data=run[0].data, rounds=1, out_dir=str(tmp_path / "s"), resume="latest"))
    assert not (tmp_path / "s").exists()


def test_rerun_skips_finished_rounds_and_resumes_an_interrupted_one(run, capsys):
    cfg, _, res = run
    weights = os.path.join(res["rounds"][1]["model"], "model.safetensors")
    first = load_file(weights)
    mtimes = {r["model"]: os.path.getmtime(os.path.join(r["model"], "model.safetensors")) for r in res["rounds"]}
    capsys.readouterr()
    again = spin(cfg)
    said = capsys.readouterr().out
    assert said.count("finished earlier, not trained again") == 2 and all(r["skipped"] for r in again["rounds"])
    assert {m: os.path.getmtime(os.path.join(m, "model.safetensors")) for m in mtimes} == mtimes
    # Interrupt round 2 after its first step: no model, only checkpoint-1.
    import shutil
    shutil.rmtree(res["rounds"][1]["model"])
    shutil.rmtree(os.path.join(cfg.round_dir(2), "train", "checkpoint-2"))
    resumed = spin(cfg)
    said = capsys.readouterr().out
    assert "round 2: " in said and "pairs.jsonl was written by an earlier attempt: kept" in said
    assert "checkpoint-1, the newest checkpoint that verifies" in said
    assert [r["skipped"] for r in resumed["rounds"]] == [True, False]
    second = load_file(weights)
    for k in first:
        torch.testing.assert_close(second[k], first[k], rtol=1e-6, atol=1e-7)
