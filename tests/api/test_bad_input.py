"""Bad input gets a ValueError / TypeError naming the argument (SPEC.md section 5)."""
import pytest
import torch

import minorsft as ms
from tests.util import make_batch


@pytest.fixture
def batch(device):
    logits, labels = make_batch(4, 6, 50, torch.float32, device)
    return logits, labels, logits.detach() + 0.1


def test_shape_and_dtype(batch):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match="logits"):
        ms.sft_loss(logits[0], labels)
    with pytest.raises(ValueError, match="labels"):
        ms.sft_loss(logits, labels[:, :-1])
    with pytest.raises(TypeError, match="labels"):
        ms.sft_loss(logits, labels.float())
    with pytest.raises(TypeError, match="logits"):
        ms.sft_loss(logits.double(), labels)
    with pytest.raises(TypeError, match="logits"):
        ms.sft_loss(logits.long(), labels)
    with pytest.raises(ValueError, match="ref_logits"):
        ms.minor_sft_loss(logits, labels, ref_logits=ref[:, :, :-1])
    with pytest.raises(ValueError, match="ref_logprobs"):
        ms.minor_sft_loss(logits, labels, ref_logprobs=torch.zeros(3))
    with pytest.raises(TypeError, match="ref_logprobs"):
        ms.minor_sft_loss(logits, labels, ref_logprobs=torch.zeros(4, dtype=torch.long))


def test_labels_out_of_range(batch):
    logits, labels, ref = batch
    labels[1, 4] = 50
    with pytest.raises(ValueError, match=r"labels: 1 entries outside \[0, V=50\)"):
        ms.token_logprobs(logits, labels)
    labels[1, 4] = -1
    with pytest.raises(ValueError, match="labels"):
        ms.minor_sft_loss(logits, labels, ref_logits=ref)


def test_reference_both_or_neither(batch):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match="ref_logits or ref_logprobs"):
        ms.minor_sft_loss(logits, labels)
    with pytest.raises(ValueError, match="not both"):
        ms.dpo_loss(logits, labels, ref_logits=ref, ref_logprobs=torch.zeros(4))


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_beta(batch, beta):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match="beta"):
        ms.minor_dpo_loss(logits, labels, ref_logits=ref, beta=beta)


def test_odd_dpo_batch(batch):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match="B=3"):
        ms.dpo_loss(logits[:3], labels[:3], ref_logits=ref[:3])
    with pytest.raises(ValueError, match="B=3"):
        ms.minor_dpo_loss(logits[:3], labels[:3], ref_logits=ref[:3])


def test_unknown_options(batch):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match="loss_type"):
        ms.dpo_loss(logits, labels, ref_logits=ref, loss_type="kto")
    with pytest.raises(ValueError, match="length_norm"):
        ms.minor_sft_loss(logits, labels, ref_logits=ref, length_norm="both")
    with pytest.raises(ValueError, match="reduction"):
        ms.sft_loss(logits, labels, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        ms.sft_loss(logits, labels, backend="cuda")
    with pytest.raises(ValueError, match="temperature"):
        ms.sft_loss(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        ms.dpo_loss(logits, labels, ref_logits=ref, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        ms.dpo_loss(logits, labels, ref_logits=ref, label_smoothing=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_device_mismatch(batch):
    logits, labels, ref = batch
    with pytest.raises(ValueError, match="labels"):
        ms.sft_loss(logits.cuda(), labels.cpu())
    with pytest.raises(ValueError, match="ref_logits"):
        ms.minor_sft_loss(logits.cuda(), labels.cuda(), ref_logits=ref.cpu())


def test_triton_backend_on_plain_cpu_is_refused(batch, monkeypatch):
    logits, labels, _ = batch
    if logits.is_cuda:
        pytest.skip("CPU-only check")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton'"):
        ms.sft_loss(logits, labels, backend="triton")
