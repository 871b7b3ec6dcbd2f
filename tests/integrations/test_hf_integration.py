"""The Hugging Face drop-ins (minorsft.integrations.hf) on a tiny Llama built from a config.

- FusedDPOTrainer(loss="dpo") gives TRL's own DPOTrainer loss, gradients and reward
  metrics on the same batch (TRL's code path, not a re-derivation), and MinorDPO trains.
- FusedLossTrainer(loss="minor_sft") gives the same loss as ms.minor_sft_loss called on
  the model outputs and as a float64 eager formula, its sft loss is the model's own
  cross-entropy, and it trains while logging the deviation metric.
No hub download: the tokenizer is character-level, built with the tokenizers library.
"""
import copy
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import minorsft as ms  # noqa: E402
from minorsft.integrations import hf  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Trainers place the models here
# Training runs use the PyTorch backend on CPU: the Triton interpreter is too slow for
# many steps, and the kernel path is checked by the equality tests (backend fixture).
TRAIN_BACKEND = "torch" if DEVICE == "cpu" else None
# ... so the interpreter pass of `make test` skips them rather than repeat them.
backend_independent = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") == "1",
    reason="PyTorch backend on CPU: already run by the plain pass")
VOCAB = 131  # model vocabulary: larger than the tokenizer's, not a power of two
CHARS = "0123456789+-=? abcdefghijklmnopqrstuvwxyz"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.add_special_tokens(SPECIALS)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_llama(seed, tokenizer):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).float()


def sums(seed, n):
    rng = random.Random(seed)
    return [(rng.randint(0, 49), rng.randint(0, 49)) for _ in range(n)]


def preference_set(seed, n):
    """Prompt ``a+b=``, chosen the sum, rejected a wrong sum."""
    rng = random.Random(seed + 1)
    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + rng.choice([-3, -1, 1, 2, 7]))}
            for a, b in sums(seed, n)]
    return datasets.Dataset.from_list(rows)


def dpo_config(tmp_path, **kw):
    from trl import DPOConfig

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-3,
                beta=0.5, logging_steps=1, save_strategy="no", report_to="none", use_cpu=DEVICE == "cpu", bf16=False,
                gradient_checkpointing=False, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    base.update(kw)
    return DPOConfig(**base)


def assert_close(actual, expected, what, **tol):
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}", **tol)


def assert_grad_close(ours, theirs, what, rel=1e-4):
    """Max difference within ``rel`` of the gradient's own scale (fp32 on both sides)."""
    assert torch.isfinite(ours).all(), f"{what}: non-finite gradient"
    err, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    assert err <= rel * scale + 1e-8, f"{what}: max |diff| {err:.3e} vs scale {scale:.3e}"


# ----------------------------------------------------------------------------- TRL path

@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_fused_dpo_matches_trl_loss_grads_and_metrics(tmp_path, tokenizer, loss_type, backend):
    trl = pytest.importorskip("trl")
    policy, ref = tiny_llama(0, tokenizer), tiny_llama(1, tokenizer)  # ref != policy: r != 0
    data = preference_set(0, 8)
    cfg = dpo_config(tmp_path, loss_type=[loss_type])
    theirs = trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=cfg,
                            train_dataset=data, processing_class=tokenizer)
    ours = hf.FusedDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=cfg,
                              train_dataset=data, processing_class=tokenizer, loss="dpo", backend=backend)
    batch = theirs._prepare_inputs(theirs.data_collator([theirs.train_dataset[i] for i in range(6)]))
    assert batch["completion_mask"][:, 0].sum() == 0 and batch["attention_mask"].min() == 0  # prompt + padding

    loss_theirs = theirs.compute_loss(theirs.model, dict(batch))
    loss_ours = ours.compute_loss(ours.model, dict(batch))
    assert abs(theirs._metrics["train"]["rewards/chosen"][-1]) > 1e-3, "policy must differ from reference"
    assert_close(loss_ours, loss_theirs.float(), "loss", rtol=1e-5, atol=1e-6)

    loss_theirs.backward()
    loss_ours.backward()
    for (name, p_t), p_o in zip(theirs.model.named_parameters(), ours.model.parameters()):
        assert_grad_close(p_o.grad, p_t.grad, f"grad {name}")

    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        mine = ours._metrics["train"][key][-1]
        assert torch.is_tensor(mine), f"{key}: kept as a tensor until logging"
        assert_close(mine.float().cpu(), torch.tensor(theirs._metrics["train"][key][-1]), key, rtol=1e-4, atol=1e-5)


def test_fused_minor_dpo_live_and_precomputed_reference(tmp_path, tokenizer, backend):
    """MinorDPO through the subclass equals the formula on TRL's own per-sequence log-probs,
    with the reference model run live or TRL's precomputed reference sums."""
    pytest.importorskip("trl")
    policy, ref = tiny_llama(0, tokenizer), tiny_llama(2, tokenizer)
    data = preference_set(3, 8)
    live = hf.FusedDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref),
                              args=dpo_config(tmp_path / "live"), train_dataset=data,
                              processing_class=tokenizer, loss="minor_dpo", backend=backend)
    cached = hf.FusedDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref),
                                args=dpo_config(tmp_path / "cached", precompute_ref_log_probs=True),
                                train_dataset=data, processing_class=tokenizer, loss="minor_dpo",
                                backend=backend)
    rows = [cached.train_dataset[i] for i in range(8)]
    batch = cached._prepare_inputs(cached.data_collator(rows))
    assert "ref_chosen_logps" in batch
    loss_cached = cached.compute_loss(cached.model, dict(batch))
    loss_live = live.compute_loss(live.model, dict(batch))
    assert_close(loss_cached, loss_live, "minor_dpo loss, cached vs live reference", rtol=1e-5, atol=1e-6)

    # TRL's own per-sequence sums (its fused LM head), then -log sig(beta r_w - beta max(0, r_l)).
    s_w, s_l = live.compute_ref_log_probs(live.model, dict(batch))
    ref_w, ref_l = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    r_w, r_l = (s_w - ref_w).double(), (s_l - ref_l).double()
    assert (r_l > 0).any() and (r_l < 0).any(), "both sides of the max(0, r_l) must be exercised"
    beta = live.beta
    expected = -F.logsigmoid(beta * r_w - beta * r_l.clamp(min=0)).mean()
    assert_close(loss_live.double(), expected, "minor_dpo vs formula on TRL log-probs", rtol=1e-5, atol=1e-6)


@backend_independent
def test_fused_minor_dpo_trains(tmp_path, tokenizer):
    pytest.importorskip("trl")
    policy = tiny_llama(0, tokenizer)
    data = preference_set(5, 16)
    trainer = hf.FusedDPOTrainer(model=policy, ref_model=copy.deepcopy(policy),
                                 args=dpo_config(tmp_path, per_device_train_batch_size=8, max_steps=12,
                                                 learning_rate=3e-3, beta=0.5, logging_steps=4),
                                 train_dataset=data, processing_class=tokenizer, loss="minor_dpo",
                                 backend=TRAIN_BACKEND)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(16)]))

    def measure():
        trainer.model.eval()
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        accuracy = trainer._metrics["eval"]["rewards/accuracies"][-1].item()
        trainer._metrics["eval"].clear()
        return loss, accuracy

    loss0, acc0 = measure()
    trainer.train()
    loss1, acc1 = measure()
    assert loss1 < loss0 - 0.05, (loss0, loss1)
    assert acc1 > max(acc0, 0.7), (acc0, acc1)
    logged = [row for row in trainer.state.log_history if "rewards/accuracies" in row]
    assert len(logged) == 3 and all(isinstance(row["rewards/margins"], float) for row in logged)
    assert logged[-1]["rewards/margins"] > 0
    held_out = trainer.evaluate(preference_set(6, 8))  # TRL's eval loop through the same hook
    assert isinstance(held_out["eval_rewards/accuracies"], float) and held_out["eval_rewards/margins"] > 0, held_out


@backend_independent
def test_fused_dpo_refuses_unsupported_trl_options(tmp_path, tokenizer):
    trl = pytest.importorskip("trl")
    policy = tiny_llama(0, tokenizer)
    data = preference_set(0, 4)
    with pytest.raises(ValueError, match="loss_type"):
        hf.FusedDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(policy),
                           args=dpo_config(tmp_path, loss_type=["sigmoid", "sft"]), train_dataset=data,
                           processing_class=tokenizer, loss="dpo")
    with pytest.raises(ValueError, match="loss"):
        hf.FusedDPOTrainer(model=policy, args=dpo_config(tmp_path), train_dataset=data,
                           processing_class=tokenizer, loss="kto")

    class OldDPOTrainer:  # a TRL without the hook FusedDPOTrainer overrides
        pass

    with pytest.raises(RuntimeError, match=f"trl {trl.__version__}.*_compute_loss"):
        hf._check_trl_hook(OldDPOTrainer)

    with pytest.MonkeyPatch.context() as mp:  # without TRL: a clear ImportError, only on access
        mp.setitem(sys.modules, "trl", None)
        with pytest.raises(ImportError, match="needs the optional dependency trl"):
            hf._build_fused_dpo_trainer()


# ------------------------------------------------------------------------ Trainer path

def sft_rows(tokenizer, seed, n):
    """Tokenised ``a+b=`` -> sum, labels only on the answer (and the end token)."""
    rows = []
    for a, b in sums(seed, n):
        prompt = tokenizer(f"{a}+{b}=")["input_ids"]
        answer = tokenizer(f"{a + b}</s>")["input_ids"]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return datasets.Dataset.from_list(rows)


def collate(pad_id):
    def fn(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return fn


def training_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, per_device_eval_batch_size=16,
                max_steps=1, learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to="none",
                use_cpu=DEVICE == "cpu", seed=0, dataloader_num_workers=0, disable_tqdm=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_trainer_minor_sft_matches_direct_call(tmp_path, tokenizer, backend):
    policy, ref = tiny_llama(0, tokenizer), tiny_llama(3, tokenizer)
    beta = 0.5
    trainer = hf.FusedLossTrainer(model=policy, ref_model=ref, loss="minor_sft", beta=beta, backend=backend,
                                  args=training_args(tmp_path), train_dataset=sft_rows(tokenizer, 0, 8),
                                  data_collator=collate(tokenizer.pad_token_id))
    batch = trainer._prepare_inputs(collate(tokenizer.pad_token_id)([trainer.train_dataset[i] for i in range(6)]))
    loss = trainer.compute_loss(policy, dict(batch))

    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    logits = policy(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        ref_logits = ref(input_ids=ids, attention_mask=mask).logits
    direct = ms.minor_sft_loss(logits[:, :-1], labels[:, 1:], ref_logits=ref_logits[:, :-1], beta=beta,
                               backend=backend)
    assert_close(loss, direct, "trainer vs ms.minor_sft_loss", rtol=1e-6, atol=1e-7)

    # float64 eager formula: position t predicts labels[t + 1], -(2/(beta m)) log sigmoid(beta r)
    target, keep = labels[:, 1:], labels[:, 1:] != -100
    def seq_logps(z):
        lp = torch.log_softmax(z[:, :-1].double(), -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        return (lp * keep).sum(1)
    r, m = seq_logps(logits.detach()) - seq_logps(ref_logits), keep.sum(1).double()
    eager = (-(2.0 / (beta * m)) * F.logsigmoid(beta * r)).mean()
    assert abs(r).min() > 1e-3, "policy and reference must differ for the test to bite"
    assert_close(loss.double(), eager, "trainer vs float64 eager MinorSFT", rtol=1e-5, atol=1e-6)
    deviation = trainer._fused_metrics["train"]["deviation"][-1]
    assert_close(deviation.double(), (r / m).mean(), "deviation metric", rtol=1e-5, atol=1e-6)

    # Precomputed per-sequence reference sums in the batch give the same loss without ref logits.
    with_sums = dict(batch, **{hf.REF_LOGPS_KEY: seq_logps(ref_logits).float()})
    assert_close(trainer.compute_loss(policy, with_sums), loss, "ref_logps column", rtol=1e-5, atol=1e-6)


def test_trainer_sft_equals_model_cross_entropy(tmp_path, tokenizer):
    policy = tiny_llama(4, tokenizer)
    trainer = hf.FusedLossTrainer(model=policy, loss="sft", args=training_args(tmp_path),
                                  train_dataset=sft_rows(tokenizer, 1, 8),
                                  data_collator=collate(tokenizer.pad_token_id))
    batch = trainer._prepare_inputs(collate(tokenizer.pad_token_id)([trainer.train_dataset[i] for i in range(5)]))
    count = int((batch["labels"][:, 1:] != -100).sum()) + 7  # as if more tokens were accumulated
    with torch.no_grad():
        ours = trainer.compute_loss(policy, dict(batch), num_items_in_batch=count)
        theirs = policy(**batch, num_items_in_batch=count).loss
    assert_close(ours, theirs, "sft vs the model's own loss", rtol=1e-5, atol=1e-6)
    assert trainer.loss_is_scaled_for_ga is True


@backend_independent
def test_trainer_minor_sft_trains_and_logs_deviation(tmp_path, tokenizer):
    policy = tiny_llama(0, tokenizer)
    train, held_out = sft_rows(tokenizer, 10, 32), sft_rows(tokenizer, 11, 16)
    trainer = hf.FusedLossTrainer(model=policy, ref_model=copy.deepcopy(policy), loss="minor_sft", beta=0.5,
                                  backend=TRAIN_BACKEND, args=training_args(tmp_path, max_steps=12, logging_steps=4),
                                  train_dataset=train, eval_dataset=held_out,
                                  data_collator=collate(tokenizer.pad_token_id))
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"] - 0.05, (before, after)
    assert abs(before["eval_deviation"]) < 1e-6 and after["eval_deviation"] > 0.05, (before, after)
    logged = [row for row in trainer.state.log_history if "deviation" in row and "loss" in row]
    assert len(logged) == 3 and logged[-1]["deviation"] > logged[0]["deviation"]


@backend_independent
def test_trainer_requires_a_reference(tmp_path, tokenizer):
    policy = tiny_llama(0, tokenizer)
    trainer = hf.FusedLossTrainer(model=policy, loss="minor_sft", args=training_args(tmp_path),
                                  train_dataset=sft_rows(tokenizer, 0, 4),
                                  data_collator=collate(tokenizer.pad_token_id))
    batch = trainer._prepare_inputs(collate(tokenizer.pad_token_id)([trainer.train_dataset[i] for i in range(2)]))
    with pytest.raises(ValueError, match="ref_model"):
        trainer.compute_loss(policy, batch)
    with pytest.raises(ValueError, match="loss"):
        hf.FusedLossTrainer(model=policy, loss="orpo", args=training_args(tmp_path))
    with pytest.raises(ValueError, match="beta"):
        hf.FusedLossTrainer(model=policy, loss="minor_sft", beta=0.0, args=training_args(tmp_path))
    with pytest.raises(ValueError, match="length_norm"):
        hf.FusedLossTrainer(model=policy, loss="minor_sft", length_norm="both", args=training_args(tmp_path))


@pytest.mark.parametrize("split,dispatch,iterable,refused", [
    (True, None, False, True), (False, True, False, True), (False, None, True, True),
    (False, None, False, False), (False, False, True, False)])
def test_dpo_batches_are_never_split_by_rows_across_processes(split, dispatch, iterable, refused):
    """[chosen; rejected] must reach each process whole (accelerate split/dispatch)."""
    from types import SimpleNamespace
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([0])

    ds = Stream() if iterable else [0]
    fake = SimpleNamespace(
        accelerator=SimpleNamespace(num_processes=2, dataloader_config=SimpleNamespace(
            split_batches=split, dispatch_batches=dispatch)),
        train_dataset=ds)
    if refused:
        with pytest.raises(ValueError, match="chosen; rejected"):
            hf.FusedLossTrainer._refuse_row_splitting(fake)
    else:
        hf.FusedLossTrainer._refuse_row_splitting(fake)
    fake.accelerator.num_processes = 1
    hf.FusedLossTrainer._refuse_row_splitting(fake)   # one process: nothing to split


def test_trl_logits_are_not_sliced_when_nothing_is_prepended():
    """The TRL hook keeps the model's logits as they are when no virtual tokens were
    prepended: a slice (even a full one) gives a SliceBackward that allocates a second
    [B, T, V] gradient buffer; with prepended tokens it keeps the last positions."""
    logits = torch.randn(2, 5, 7).requires_grad_(True)
    assert hf._last_positions(logits, 5) is logits
    assert type(logits[:, -5:].grad_fn).__name__ == "SliceBackward0"   # what it avoids
    tail = hf._last_positions(logits, 3)
    assert tail.shape == (2, 3, 7) and torch.equal(tail, logits[:, 2:])
