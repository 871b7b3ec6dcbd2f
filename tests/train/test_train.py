"""The training loop: every loss trains, accumulation normalises correctly, the fused
linear path matches the logits path, schedules, checkpoints in HF format, bad configs."""
import dataclasses
import json
import math
import os

import pytest
import torch

from minorsft.train import data as D
from minorsft.train import reference as R
from minorsft.train import tiny
from minorsft.train import ConfigError, TrainConfig, train, validate_config
from minorsft.train.data import Sampler
from minorsft.train.optim import lr_lambda
from minorsft.train import step
from minorsft.train.step import LossSetup, compute_loss


# The loop, not the kernels: only the plain (PyTorch backend) pass of `make test`.
pytestmark = pytest.mark.no_interpreter


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    return tiny.write_synthetic_dataset(str(d), n_train=48, n_eval=8, seed=5)


def base(tmp_path, synth, **kw):
    opts = dict(data=synth["train"], eval_data=synth["eval"], out_dir=str(tmp_path / "run"), max_steps=3,
                batch_size=4, lr=3e-3, log_every=2, max_length=32, progress=False, seed=1)
    opts.update(kw)
    return TrainConfig(**opts)


def losses(result):
    return [h["loss"] for h in result["history"]]


@pytest.mark.parametrize("loss", ["dpo", "minor_dpo"])
def test_pair_losses_train_and_report_reward_accuracy(tmp_path, synth, loss):
    r = train(base(tmp_path, synth, loss=loss, max_steps=4, lr=1e-2))
    assert [h["step"] for h in r["history"]] == [1, 2, 3, 4]
    assert all(math.isfinite(h["loss"]) and 0 <= h["rewards/accuracies"] <= 1 for h in r["history"])
    ev = r["final_eval"]
    assert set(ev) >= {"loss", "rewards/accuracies", "rewards/margins"}
    # the policy moved: the preference margin is no longer exactly zero
    assert ev["rewards/margins"] != 0.0
    # the final checkpoint is a loadable HF model directory
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(r["checkpoint"])
    assert isinstance(m, torch.nn.Module)
    with open(os.path.join(r["out_dir"], "metrics.jsonl")) as f:
        recs = [json.loads(l) for l in f]
    assert [x["step"] for x in recs if x["split"] == "train"] == [1, 2, 3, 4]
    assert {"tokens_per_s", "peak_mem_gb", "lr", "grad_norm"} <= set(recs[0])


@pytest.mark.parametrize("loss", ["sft", "minor_sft"])
def test_grad_accumulation_equals_one_big_batch(tmp_path, synth, loss):
    big = train(base(tmp_path / "big", synth, loss=loss, batch_size=8, grad_accum=1, max_steps=2))
    acc = train(base(tmp_path / "acc", synth, loss=loss, batch_size=2, grad_accum=4, max_steps=2))
    torch.testing.assert_close(losses(acc), losses(big), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close([h["grad_norm"] for h in acc["history"]],
                               [h["grad_norm"] for h in big["history"]], rtol=1e-5, atol=1e-6)


def test_sft_normalises_by_tokens_of_the_whole_step(synth):
    """sft: the step loss is total CE / total label tokens of the global batch, not a mean
    of micro-batch means (which differs when micro-batches hold different token counts)."""
    model, tok = tiny.build_tiny_model(seed=0)
    ds = D.load_dataset(synth["train"], tok, max_length=32, kind="sft", limit=6)
    cfg = TrainConfig(loss="sft")
    micro = [ds.examples[:1], ds.examples[1:6]]
    n = sum(sum(l != -100 for l in e.labels[1:]) for e in ds.examples[:6])
    total = sum(compute_loss(LossSetup.from_config(cfg), model, D.collate_sft(mb, 0), num_items=n)[0] for mb in micro)
    b = D.collate_sft(ds.examples[:6], 0)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].double()
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"][:, 1:].flatten(),
                                                 ignore_index=-100)
    torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=1e-6)


def _both_paths(model, tok, synth, loss, **cfg_kw):
    """Loss, metrics and gradients of one batch through the logits path and through the
    fused linear path (a perturbed copy of the model is the policy)."""
    ref = R.frozen_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kind = "pairs" if "dpo" in loss else "sft"
    ds = D.load_dataset(synth["train"], tok, max_length=32, kind=kind, limit=4)
    b = D.collate(ds.examples, 0, kind)
    n = int((b["labels"][:, 1:] != -100).sum())
    out = []
    for fused in (False, True):
        setup = LossSetup.from_config(TrainConfig(loss=loss, fused_linear=fused, **cfg_kw), model)
        model.zero_grad()
        l, m = compute_loss(setup, model, b, ref_model=ref, num_items=n, denom=4.0)
        l.backward()
        out.append((setup, l.detach(), m, [p.grad.clone() for p in model.parameters()]))
    (_, l0, m0, g0), (setup, l1, m1, g1) = out
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for k in m0:
        torch.testing.assert_close(m1[k], m0[k], rtol=1e-5, atol=1e-6)
    assert sum(float(g.norm()) for g in g0) > 0
    for a, c in zip(g1, g0):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
    return setup


@pytest.mark.parametrize("loss,deviation", [("sft", True), ("sft", False), ("minor_sft", False),
                                            ("dpo", False), ("minor_dpo", False)])
def test_fused_linear_path_matches_logits_path(synth, loss, deviation):
    """sft without the deviation metric takes the library's own call (on the fused linear
    path its gradient-in-forward plan); with it, the per-token route."""
    torch.manual_seed(0)
    model, tok = tiny.build_tiny_model(seed=0)
    _both_paths(model, tok, synth, loss, track_deviation=deviation)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("loss", ["minor_sft", "minor_dpo"])
def test_reference_on_another_device_gives_the_same_step(synth, loss, fused):
    """A reference model on another device sends only its [B] sums across: the same loss,
    metrics and gradients as its logits (or hidden states) in the fused call."""
    torch.manual_seed(0)
    model, tok = tiny.build_tiny_model(seed=0)
    ref = R.frozen_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kind = "pairs" if "dpo" in loss else "sft"
    b = D.collate(D.load_dataset(synth["train"], tok, max_length=32, kind=kind, limit=4).examples, 0, kind)
    setup = LossSetup.from_config(TrainConfig(loss=loss, fused_linear=fused), model)
    fwd = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    sums = step.reference_sums_elsewhere(setup, ref, fwd, b["labels"])
    out = []
    for kw in (dict(ref_model=ref), dict(ref_logps=sums)):
        model.zero_grad()
        l, m = compute_loss(setup, model, b, **kw)
        l.backward()
        out.append((l.detach(), m, [p.grad.clone() for p in model.parameters()]))
    (l0, m0, g0), (l1, m1, g1) = out
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    assert m0 and m0.keys() == m1.keys()
    for k in m0:
        torch.testing.assert_close(m1[k], m0[k], rtol=1e-6, atol=1e-6)
    assert sum(float(g.norm()) for g in g0) > 0
    for a, c in zip(g1, g0):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, synth):
    a = train(base(tmp_path / "a", synth, loss="minor_sft", max_steps=2, eval_data=None))
    b = train(base(tmp_path / "b", synth, loss="minor_sft", max_steps=2, eval_data=None,
                   gradient_checkpointing=True))
    torch.testing.assert_close(losses(b), losses(a), rtol=1e-5, atol=1e-6)


def test_eval_generate_reports_exact_match(tmp_path, synth):
    r = train(base(tmp_path, synth, loss="sft", max_steps=1, eval_generate=True, track_deviation=True))
    ev = r["final_eval"]
    assert 0.0 <= ev["accuracy"] <= 1.0 and math.isfinite(ev["ce"]) and "deviation" in ev


def test_schedule_warmup_then_cosine_and_linear():
    f = lr_lambda("cosine", 4, 14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.5) and f(14) == pytest.approx(0.0)
    g = lr_lambda("linear", 4, 14)
    assert g(9) == pytest.approx(0.5) and g(4) == 1.0


def test_sampler_is_a_permutation_per_epoch_and_deterministic():
    s = Sampler(10, seed=3)
    first, second = s.indices(0, 10), s.indices(10, 10)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert Sampler(10, seed=3).indices(5, 10) == first[5:] + second[:5]


@pytest.mark.parametrize("kw, field", [
    (dict(loss="kto"), "loss"), (dict(beta=0.0), "beta"), (dict(beta=float("nan")), "beta"),
    (dict(beta=True), "beta"), (dict(beta="0.1"), "beta"),
    (dict(batch_size=0), "batch_size"), (dict(grad_accum=1.5), "grad_accum"),
    (dict(loss="sft", loss_type="ipo"), "loss_type"), (dict(loss="dpo", length_norm="inside"), "length_norm"),
    (dict(loss="minor_sft", label_smoothing=0.1), "label_smoothing"),
    (dict(loss="dpo", loss_type="hinge", label_smoothing=0.1), "label_smoothing"), (dict(lr=-1.0), "lr"),
    (dict(data="/nonexistent.jsonl"), "data"), (dict(loss="sft", precompute_ref=True), "precompute_ref"),
    (dict(schedule="step"), "schedule"), (dict(max_length=1), "max_length"),
])
def test_bad_config_is_refused_with_the_field_named(kw, field):
    with pytest.raises(ConfigError, match=f"^{field}: ") as e:
        validate_config(TrainConfig(**kw))
    assert e.value.field == field


def test_bad_data_row_stops_before_training(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2="}\n')
    cfg = TrainConfig(loss="sft", data=str(p), out_dir=str(tmp_path / "run"), max_steps=1, progress=False)
    with pytest.raises(D.DataError, match=rf"{p}:2: field 'response'"):
        train(cfg)
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
    r = train(dataclasses.replace(cfg, skip_bad_rows=True, batch_size=1))
    assert r["skipped_rows"] == 1 and len(r["history"]) == 1


def test_chat_messages_data_trains_and_generates(tmp_path, synth):
    r = train(base(tmp_path, synth, loss="minor_sft", data=synth["train_chat"], eval_data=synth["train_chat"],
                   eval_limit=4, max_steps=2, eval_generate=True))
    assert len(r["history"]) == 2 and 0.0 <= r["final_eval"]["accuracy"] <= 1.0


def test_local_hf_model_directory_equals_the_builtin_tiny_model(tmp_path, synth):
    model_dir = tiny.save_tiny_model(str(tmp_path / "tiny-model"), seed=0)
    from_dir = train(base(tmp_path / "dir", synth, loss="sft", model=model_dir, max_steps=2, eval_data=None))
    builtin = train(base(tmp_path / "builtin", synth, loss="sft", model=None, tiny_seed=0, max_steps=2,
                         eval_data=None))
    assert losses(from_dir) == pytest.approx(losses(builtin), rel=1e-6)


def test_progress_bar_shows_loss_deviation_throughput_memory(tmp_path, synth, capsys):
    train(base(tmp_path, synth, loss="minor_sft", max_steps=2, log_every=1, eval_data=None, progress=True))
    err = capsys.readouterr().err
    for key in ("loss=", "dev=", "tok/s=", "mem="):
        assert key in err, err[-500:]


def test_reference_in_another_dtype(tmp_path, synth):
    fp32 = train(base(tmp_path / "a", synth, loss="minor_sft", max_steps=2, eval_data=None))
    bf16 = train(base(tmp_path / "b", synth, loss="minor_sft", max_steps=2, eval_data=None, ref_dtype="bfloat16"))
    assert losses(bf16) != losses(fp32)  # the reference really ran in bf16
    torch.testing.assert_close(losses(bf16), losses(fp32), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("loss", ["sft", "minor_dpo"])
def test_fused_linear_applies_the_models_logit_softcapping(synth, loss):
    """A Gemma 2 model soft-caps its logits (final_logit_softcapping): the fused linear
    path reads that from the config and gives the logits path's loss and gradients."""
    transformers = pytest.importorskip("transformers")
    tok = tiny.build_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        final_logit_softcapping=3.0, attn_logit_softcapping=None, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    setup = _both_paths(transformers.Gemma2ForCausalLM(cfg).float(), tok, synth, loss)
    assert setup.transform == {"softcap": 3.0, "logit_scale": 1.0}


def test_held_out_ce_is_the_same_for_every_sft_loss(synth):
    """minor_sft's held-out ce (from its mean sequence log-prob, no second forward) is the
    token-level cross-entropy that sft reports on the same model and data (batches of
    unequal lengths, with a last partial batch)."""
    from minorsft.train.evaluate import evaluate
    model, tok = tiny.build_tiny_model(seed=0)
    ref = R.frozen_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ds = D.load_dataset(synth["eval"], tok, max_length=32, kind="sft")
    kw = dict(batch_size=3, pad_id=D.pad_token_id(tok), device=torch.device("cpu"))
    sft = evaluate(LossSetup("sft"), model, ds, **kw)
    minor = evaluate(LossSetup("minor_sft", {"beta": 0.1, "length_norm": "outside"}), model, ds,
                     ref_model=ref, **kw)
    assert len(ds) % 3 and sft["ce"] == pytest.approx(sft["loss"], rel=1e-6)
    assert minor["ce"] == pytest.approx(sft["ce"], rel=1e-5)
