"""Masked rows, empty sequences, NaN propagation and requires_grad combinations."""
import pytest
import torch

import minorsft as ms
from tests.util import make_batch

REF_FNS = [ms.minor_sft_loss, ms.minor_dpo_loss, ms.dpo_loss]


@pytest.mark.parametrize("fn", REF_FNS + [ms.sft_loss], ids=lambda f: f.__name__)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_masked_batch_is_zero_not_nan(fn, reduction, backend, device):
    logits, labels = make_batch(2, 5, 300, torch.bfloat16, device)
    labels[:] = -100
    logits.requires_grad_(True)
    kw = {} if fn is ms.sft_loss else {"ref_logits": logits.detach().clone()}
    loss = fn(logits, labels, reduction=reduction, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0
    assert (grad == 0).all()


def test_empty_sequence_left_out_of_mean(backend, device):
    logits, labels = make_batch(3, 6, 257, torch.float32, device)
    ref = logits + 0.3 * torch.randn_like(logits)
    labels[1] = -100
    logits.requires_grad_(True)
    per = ms.minor_sft_loss(logits, labels, ref_logits=ref, reduction="none", backend=backend)
    mean = ms.minor_sft_loss(logits, labels, ref_logits=ref, reduction="mean", backend=backend)
    assert per[1].item() == 0.0
    torch.testing.assert_close(mean, (per[0] + per[2]) / 2)
    (grad,) = torch.autograd.grad(mean, logits)
    assert (grad[1] == 0).all()


def test_empty_pair_left_out_of_mean(backend, device):
    logits, labels = make_batch(4, 6, 257, torch.float32, device)
    ref = logits + 0.3 * torch.randn_like(logits)
    labels[2] = -100   # rejected row of pair 0
    per = ms.dpo_loss(logits, labels, ref_logits=ref, reduction="none", backend=backend)
    mean = ms.dpo_loss(logits, labels, ref_logits=ref, backend=backend)
    assert per[0].item() == 0.0
    torch.testing.assert_close(mean, per[1])


@pytest.mark.parametrize("fn", REF_FNS + [ms.sft_loss], ids=lambda f: f.__name__)
def test_nan_in_logits_propagates(fn, backend, device):
    logits, labels = make_batch(2, 5, 300, torch.float32, device)
    t = 3
    labels[0, t] = 7
    logits[0, t, 123] = float("nan")
    kw = {} if fn is ms.sft_loss else {"ref_logits": logits.detach().nan_to_num(0.0)}
    loss = fn(logits, labels, backend=backend, **kw)
    assert torch.isnan(loss).all()


@pytest.mark.parametrize("policy_grad", [True, False])
@pytest.mark.parametrize("ref_grad", [True, False])
def test_requires_grad_combinations(policy_grad, ref_grad, backend, device):
    logits, labels = make_batch(2, 5, 300, torch.float32, device)
    ref = (logits + torch.randn_like(logits)).requires_grad_(ref_grad)
    logits.requires_grad_(policy_grad)
    loss = ms.minor_sft_loss(logits, labels, ref_logits=ref, backend=backend)
    assert loss.requires_grad == policy_grad   # the reference is frozen
    if policy_grad:
        (g,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    with torch.no_grad():
        again = ms.minor_sft_loss(logits, labels, ref_logits=ref, backend=backend)
    torch.testing.assert_close(again, loss.detach())


def test_out_of_range_label_without_check_is_nan_not_oob(backend, device):
    logits, labels = make_batch(2, 4, 100, torch.float32, device)
    labels[0, 3] = 100_000
    labels[1, 3] = -7
    lp = ms.token_logprobs(logits, labels, backend=backend, check_labels=False)
    assert torch.isnan(lp[0, 3]) and torch.isnan(lp[1, 3])
    assert torch.isfinite(lp[:, :3]).all()


def test_masked_rows_are_not_read(backend, device):
    """NaN/inf in masked rows (e.g. padding) must not reach the loss or the gradient."""
    logits, labels = make_batch(4, 6, 300, torch.bfloat16, device)
    logits = logits.detach().clone()
    masked = labels == -100
    logits[masked] = float("nan")
    ref = torch.randn(logits.shape, device=device).to(logits.dtype)
    ref[masked] = float("inf")
    logits.requires_grad_(True)
    loss = ms.minor_dpo_loss(logits, labels, ref_logits=ref, backend=backend)
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss)
    assert torch.isfinite(g).all() and (g[masked] == 0).all()
