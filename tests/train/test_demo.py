"""The demo's pipeline at a small size: stage 0 gives a base model that knows task
family A, the fine-tunes write results.json (its shape) and frontier.png, the printed
conclusion is built from the saved dict, a rerun reuses the cached base model and
repeats its numbers exactly, and a change of the base recipe retrains it."""
import json
import math
import shutil

import pytest

from minorsft.demo import report, run_demo

# The loop, not the kernels: only the plain (PyTorch backend) pass of `make test`.
pytestmark = pytest.mark.no_interpreter

SMALL = dict(base_steps=150, base_lr=3e-3, steps=3, lrs=(1e-3, 4e-3), n_train=400, n_eval=30,
             progress=False)
ROW_KEYS = {"method", "lr", "target_accuracy", "target_ce", "retention_accuracy", "deviation"}


def _run(out, **kw):
    lines = []
    res = run_demo(str(out), print_fn=lines.append, **{**SMALL, **kw})
    with open(out / "results.json", encoding="utf-8") as f:
        return res, json.load(f), lines


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return (out, *_run(out))


def test_results_json_shape(demo):
    _, _, saved, _ = demo
    assert set(saved) == {"setup", "base", "rows", "summary"}
    assert set(saved["base"]) == {"target_accuracy", "retention_accuracy"}
    assert [(r["method"], r["lr"]) for r in saved["rows"]] == \
        [(m, lr) for m in ("sft", "minor_sft") for lr in SMALL["lrs"]]
    for r in saved["rows"]:
        assert set(r) == ROW_KEYS
        assert 0 <= r["target_accuracy"] <= 1 and 0 <= r["retention_accuracy"] <= 1
        assert math.isfinite(r["target_ce"]) and math.isfinite(r["deviation"])
    assert saved["setup"]["n_eval"] == {"A": 30, "B": 30}
    assert set(saved["summary"]["best"]) == {"sft", "minor_sft"}


def test_frontier_plot_is_a_png(demo):
    out, res, _, _ = demo
    assert res["plot"] == str(out / "frontier.png")
    with open(res["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_base_model_knows_task_a(demo):
    _, _, saved, _ = demo
    # A's answers are three letters: guessing one exactly has a chance of 26**-3.
    assert saved["base"]["retention_accuracy"] > 0.3
    assert saved["base"]["target_accuracy"] < 0.1   # B is new to it


def test_printed_conclusion_is_built_from_the_saved_dict(demo):
    _, _, saved, lines = demo
    printed = "\n".join(lines)
    assert "\n".join(report(saved)) in printed
    for r in saved["rows"]:
        assert f"{r['target_accuracy']:.3f}" in printed and f"{r['deviation']:.3f}" in printed


def test_rerun_reuses_the_base_model_and_repeats_exactly(demo):
    out, _, saved, _ = demo
    (out / "runs" / "stale-run").mkdir()
    _, again, lines = _run(out)
    assert any("cached" in line for line in lines)
    assert again == saved
    assert not (out / "runs" / "stale-run").exists()   # the runs' folders start fresh


def test_a_new_base_recipe_retrains_the_base_model(tmp_path, demo):
    shutil.copytree(demo[0] / "base", tmp_path / "base")
    info = tmp_path / "base" / "model" / "info.json"   # the published base model's record
    key = json.loads(info.read_text())["key"]
    _, other, lines = _run(tmp_path, base_steps=20, lrs=(1e-3,), methods=("sft",))
    assert any("training the base model" in line for line in lines)
    assert json.loads(info.read_text())["key"] != key
    assert other["setup"]["base_recipe"]["steps"] == 20
