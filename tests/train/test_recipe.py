"""`minorsft recipe`: stages chain through their outputs (train -> select -> train -> spin,
from a model saved with save_pretrained), finished stages are skipped on a rerun, an
interrupted stage resumes from its checkpoint, a finished stage that no longer fits the
recipe is refused, and a bad recipe is refused before any work. The shipped recipes plan."""
import copy
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from minorsft import cli
from minorsft.train import RecipeError, plan_recipe, run_recipe, tiny
from minorsft.train.data import write_jsonl
from minorsft.train.recipe import load_recipe
from tests.util import ROOT

pytestmark = pytest.mark.no_interpreter

SMALL = {"batch_size": 4, "max_length": 32, "progress": False}


def _recipe(out_dir, base, data):
    return {"out_dir": out_dir, "stages": [
        {"name": "base", "kind": "train", "model": base, "data": data, "loss": "sft", "max_steps": 2,
         "lr": 0.005, **SMALL},
        {"name": "pick", "kind": "select", "data": "@base", "keep": 0.5, "probe_steps": 2, "lr": 0.005, **SMALL},
        {"name": "tune", "kind": "train", "data": "@pick", "loss": "minor_sft", "max_steps": 2,
         "save_every": 1, **SMALL},
        {"name": "play", "kind": "spin", "data": "@pick", "rounds": 1, "temperature": 1.0, "max_new_tokens": 3,
         "max_steps": 1, **SMALL}]}


@pytest.fixture(scope="module")
def chained(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe")
    base = tiny.save_tiny_model(str(d / "tiny-model"), seed=0)
    data = write_jsonl(str(d / "rows.jsonl"), tiny.synthetic_rows(12, seed=4))
    recipe = _recipe(str(d / "out"), base, data)
    return recipe, run_recipe(recipe, log=lambda m: None)


def _info(path):
    with open(os.path.join(path, "info.json"), encoding="utf-8") as f:
        return json.load(f)


def test_stages_chain_through_their_outputs(chained):
    recipe, res = chained
    out = recipe["out_dir"]
    at = lambda *p: os.path.join(out, *p)   # noqa: E731
    assert [s["status"] for s in res["stages"]] == ["run"] * 4
    assert all(os.path.isfile(at(n, "stage.json")) for n in ("base", "pick", "tune", "play"))
    # select scored with base's model (the probe started from it) and kept ceil(0.5 x 12) rows
    data_lines = open(recipe["stages"][0]["data"], encoding="utf-8").read().splitlines()
    kept = open(at("pick", "selected.jsonl"), encoding="utf-8").read().splitlines()
    assert len(kept) == 6 and set(kept) <= set(data_lines)
    assert _info(at("pick", "probe", "model"))["config"]["model"] == at("base", "model")
    # tune: the kept rows, from the model select passed on (base's)
    tune = _info(at("tune", "model"))["config"]
    assert tune["data"] == at("pick", "selected.jsonl") and tune["model"] == at("base", "model")
    assert tune["loss"] == "minor_sft"
    # play: round 1 starts from tune's model, answers the kept prompts
    r1 = _info(at("play", "round-1", "model"))
    assert r1["reference"] == at("tune", "model") and r1["config"]["model"] == at("tune", "model")
    prompts = {json.loads(line)["prompt"] for line in kept}
    with open(at("play", "round-1", "pairs.jsonl"), encoding="utf-8") as f:
        assert {json.loads(line)["prompt"] for line in f} <= prompts


def _mtimes(out):
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
            for d, _, files in os.walk(out) for f in files if not f.startswith(".lock")}


def test_rerun_skips_finished_stages_and_refuses_changed_ones(chained):
    recipe, _ = chained
    before = _mtimes(recipe["out_dir"])
    said = []
    res = run_recipe(recipe, log=said.append)
    assert [s["status"] for s in res["stages"]] == ["finished"] * 4
    assert sum("finished earlier, skipped" in m for m in said) == 4
    assert _mtimes(recipe["out_dir"]) == before
    changed = copy.deepcopy(recipe)
    changed["stages"][1]["keep"] = 0.75
    with pytest.raises(RecipeError, match=r"stage 'pick': finished earlier with other options \(keep: then 0.5, "
                                          r"now 0.75\): remove .*pick to run it again"):
        run_recipe(changed, log=lambda m: None)
    assert _mtimes(recipe["out_dir"]) == before


def test_an_interrupted_stage_resumes_from_its_checkpoint(chained, capsys):
    """The last test on the shared run: it interrupts stage 'tune' after its first step."""
    recipe, _ = chained
    at = lambda *p: os.path.join(recipe["out_dir"], *p)   # noqa: E731
    first = load_file(at("tune", "model", "model.safetensors"))
    for p in (at("tune", "stage.json"), at("tune", "model"), at("tune", "train", "checkpoint-2")):
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    # 'play' finished from the 'tune' that is gone: refused before any work, saying what to do
    with pytest.raises(RecipeError, match=r"stage 'play': finished earlier from stage 'tune', which is not "
                                          r"finished now .*: remove .*play to run it again"):
        run_recipe(recipe, log=lambda m: None)
    assert not os.path.exists(at("tune", "model"))
    shutil.rmtree(at("play"))
    capsys.readouterr()
    res = run_recipe(recipe)
    said = capsys.readouterr().out
    assert [s["status"] for s in res["stages"]] == ["finished", "finished", "resume", "run"]
    assert "2. pick (select): finished: skipped" in said and "3. tune (train): to resume" in said
    assert "tune/train/checkpoint-1, the newest checkpoint that verifies" in said
    second = load_file(at("tune", "model", "model.safetensors"))
    for k in first:   # the resumed stage ends where the uninterrupted one did
        torch.testing.assert_close(second[k], first[k], rtol=1e-6, atol=1e-7)
    assert os.path.isfile(at("play", "stage.json"))


def _bad(base, data, change):
    recipe = _recipe("OUT", base, data)
    change(recipe)
    return recipe


BAD = [
    ("missing stage option", lambda r: r["stages"][1].pop("keep"), r"stage 'pick': keep: is required"),
    ("unknown previous stage", lambda r: r["stages"][2].update(data="@nope"),
     r"stage 'tune': data: '@nope' names no earlier stage \(earlier: base, pick\)"),
    ("a later stage", lambda r: r["stages"][1].update(data="@tune"), r"stage 'pick': data: '@tune' names a later"),
    ("an output it lacks", lambda r: r["stages"][2].update(data="@base.scores"),
     r"stage 'base' \(train\) has no 'scores' output"),
    ("keep outside (0, 1]", lambda r: r["stages"][1].update(keep=1.5), r"stage 'pick': keep: must be in \(0, 1\]"),
    ("rounds 0", lambda r: r["stages"][3].update(rounds=0), r"stage 'play': rounds: must be a positive integer"),
    ("missing kind", lambda r: r["stages"][0].pop("kind"), r"stage 'base': kind: is required"),
    ("unknown kind", lambda r: r["stages"][0].update(kind="dpo"),
     r"kind: 'dpo' is not a kind \(kinds: train, select, spin\)"),
    ("missing name", lambda r: r["stages"][0].pop("name"), r"stages\[0\]: name: is required"),
    ("duplicate name", lambda r: r["stages"][1].update(name="base"), r"name: another stage is called 'base'"),
    ("misspelt option", lambda r: r["stages"][0].update(max_step=3),
     r"stage 'base': max_step: not an option of a train stage \(did you mean max_steps\?\)"),
    ("an option the recipe sets", lambda r: r["stages"][1].update(out="x.jsonl"), r"pick': out: set by the recipe"),
    ("a value of the wrong type", lambda r: r["stages"][0].update(max_steps="5"),
     r"max_steps: expected an integer, got \"5\""),
    ("a switch that is no bool", lambda r: r["stages"][0].update(progress="no"), r"progress: expected true or false"),
    ("a train option's own check", lambda r: r["stages"][2].update(loss="sft", beta=0.5),
     r"stage 'tune': beta: 0.5: not an option of the 'sft' loss"),
    ("no out_dir", lambda r: r.pop("out_dir"), r"out_dir: is required"),
    ("no stages", lambda r: r.update(stages=[]), r"stages: is required"),
    ("unknown key", lambda r: r.update(stage=[]), r"stage: not a recipe key"),
]


@pytest.mark.parametrize("what, change, message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_recipe_is_refused_before_any_work(tmp_path, monkeypatch, what, change, message):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(str(tmp_path / "rows.jsonl"), tiny.synthetic_rows(4, seed=1))
    base = tiny.save_tiny_model(str(tmp_path / "m"), seed=0) if what == "missing stage option" else "tiny"
    with pytest.raises(RecipeError, match=message):
        run_recipe(_bad(base, data, change), log=lambda m: None)
    assert not os.path.exists("OUT")


def test_cli_dry_run_plans_and_bad_files_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl("rows.jsonl", tiny.synthetic_rows(4, seed=1))
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_recipe("OUT", "tiny", data)))
    assert cli.main(["recipe", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 stages into OUT" in out and "1. base (train): to run" in out and not os.path.exists("OUT")
    assert "minorsft select --model OUT/base/model --data rows.jsonl --keep 0.5" in out
    assert "minorsft spin --model OUT/tune/model" in out and "--data OUT/pick/selected.jsonl" in out
    path.write_text('{"out_dir": "OUT",\n "stages": [}')
    assert cli.main(["recipe", str(path)]) == 2
    assert f"minorsft recipe: error: {path}:2: invalid JSON" in capsys.readouterr().err
    assert cli.main(["recipe", "no-such.json"]) == 2
    assert "minorsft recipe: error: FILE: no such file or directory: no-such.json" in capsys.readouterr().err


def test_yaml_needs_pyyaml(tmp_path, monkeypatch):
    path = tmp_path / "r.yaml"
    path.write_text("out_dir: OUT\nstages:\n  - {name: a, kind: train, max_steps: 1}\n")
    monkeypatch.setitem(sys.modules, "yaml", None)     # as if PyYAML were not installed
    with pytest.raises(RecipeError, match="a YAML recipe needs PyYAML, which is not installed"):
        load_recipe(str(path))
    monkeypatch.undo()
    pytest.importorskip("yaml")
    assert load_recipe(str(path))["stages"][0] == {"name": "a", "kind": "train", "max_steps": 1}


@pytest.mark.parametrize("name, losses", [("openbezoar_tiny.json", ["sft", "sft", "dpo"]),
                                          ("openbezoar_minor_tiny.json", ["minor_sft", "minor_sft", "minor_dpo"])])
def test_shipped_recipes_plan_the_openbezoar_shape(tmp_path, monkeypatch, name, losses):
    recipe = load_recipe(os.path.join(ROOT, "recipes", name))
    monkeypatch.chdir(tmp_path)
    _, stages = plan_recipe(recipe, source=name)
    assert [(s.kind, s.config.loss) for s in stages] == [("train", loss) for loss in losses]
    sft, chosen, pref = stages
    assert chosen.config.model == sft.outputs["model"] and pref.config.model == chosen.outputs["model"]
    assert pref.config.data == chosen.outputs["data"]         # the preference set stage 2 trained on
