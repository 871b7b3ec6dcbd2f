"""benchmarks/long_context.py --tiny: the search, the steps and the JSON on CPU.

The tiny model's numbers measure nothing; this only proves the code path that the GPU
demonstration runs (three training-step variants, doubling + bisection under a memory
limit, tokens/s, loss-only memory, results file).
"""
import json

import pytest

from benchmarks import long_context as LC

pytestmark = pytest.mark.no_interpreter


def test_tiny_run_writes_results(tmp_path):
    out = tmp_path / "long_context.json"
    res = LC.main(["--tiny", "--out", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk["methods"].keys() == set(LC.METHODS)
    assert on_disk["tiny"] is True and on_disk["model"]["gradient_checkpointing"] is True
    for m, r in res["methods"].items():
        assert r["max_len"] is not None and r["tokens_per_s_at_max"] > 0, m
        ok = [t["length"] for t in r["trials"] if t["ok"]]
        failed = [t["length"] for t in r["trials"] if not t["ok"]]
        # the search result is the longest passing trial, shorter than every failure
        assert r["max_len"] == max(ok) and all(f > r["max_len"] for f in failed), m
        assert all(t["peak_mib"] <= on_disk["search"]["mem_limit_mib"]
                   for t in r["trials"] if t["ok"]), m
    # Under the same emulated limit the logits-free loss fits longer sequences.
    assert res["methods"]["linear"]["max_len"] > res["methods"]["eager"]["max_len"]
    lm = res["loss_memory_mib"]
    assert lm["linear"] < lm["eager"]
