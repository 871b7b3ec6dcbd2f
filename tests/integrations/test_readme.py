"""Every Python example of the README runs as written, in order, on the built-in tiny
model (the names an example takes from the reader's code are made here)."""
import os
import re

import pytest
import torch

from tests.util import ROOT

pytestmark = pytest.mark.no_interpreter


def _blocks():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.fixture
def reader_code(tmp_path, monkeypatch):
    """What the README's examples assume the reader has: models, batches, datasets, files."""
    datasets = pytest.importorskip("datasets")
    from transformers import DataCollatorForSeq2Seq

    from minorsft.train import tiny
    from minorsft.train.data import write_jsonl
    monkeypatch.chdir(tmp_path)
    os.environ.setdefault("WANDB_DISABLED", "true")
    model, tokenizer = tiny.build_tiny_model(seed=0)
    tiny.save_tiny_model(str(tmp_path / "path" / "to" / "hf-model"), seed=0)
    rows = tiny.synthetic_rows(16, seed=1)
    write_jsonl(str(tmp_path / "train.jsonl"), rows)
    sft = []
    for r in rows:
        prompt = tokenizer(r["prompt"])["input_ids"]
        answer = tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sft.append({"input_ids": prompt + answer, "attention_mask": [1] * (len(prompt) + len(answer)),
                    "labels": [-100] * len(prompt) + answer})
    B, T, V = 4, 12, len(tokenizer)
    ids = torch.randint(4, V, (B, T))
    labels = ids.masked_fill(torch.arange(T) < 5, -100)
    ref_model, _ = tiny.build_tiny_model(seed=1)
    return dict(
        policy=model, reference=ref_model.eval(), ids=ids, attn=torch.ones_like(ids), labels=labels,
        logits=torch.randn(B, T, V, requires_grad=True), ref_logits=torch.randn(B, T, V),
        r=torch.randn(B, T, V), ref_seq_sums=-torch.rand(B) * 20,
        model=model, tokenizer=tokenizer, train_ds=datasets.Dataset.from_list(sft),
        collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
        prefs=datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]),
    )


def test_every_python_example_runs_as_written(reader_code, monkeypatch):
    if not torch.cuda.is_available():   # TRL's DPOConfig defaults to bf16, which needs a GPU
        import dataclasses

        import trl
        cpu_config = dataclasses.make_dataclass("DPOConfig", [("bf16", bool, False)], bases=(trl.DPOConfig,))
        cpu_config.__module__ = "trl"   # picklable (the Trainer saves its arguments) as trl.DPOConfig
        monkeypatch.setattr(trl, "DPOConfig", cpu_config)
    blocks = _blocks()
    assert len(blocks) >= 5
    namespace = dict(reader_code)
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"README.md python example {i + 1}", "exec"), namespace)
        except Exception as e:   # the example's number and its first line, for the reader
            raise AssertionError(f"README example {i + 1} ({code.splitlines()[0]!r}) failed: {e!r}") from e
