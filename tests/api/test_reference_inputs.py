"""Reference given three ways gives one loss; MinorSFT/MinorDPO special cases."""
import pytest
import torch

import minorsft as ms
from tests import ground_truth as eager
from tests.util import make_batch

FNS = [ms.minor_sft_loss, ms.minor_dpo_loss, ms.dpo_loss]


@pytest.mark.parametrize("fn", FNS, ids=lambda f: f.__name__)
def test_ref_logprobs_equal_ref_logits(fn, backend, device):
    logits, labels = make_batch(4, 10, 777, torch.bfloat16, device)
    ref_logits = (logits.float() + torch.randn(logits.shape, device=device)).to(torch.bfloat16)
    logits.requires_grad_(True)
    out = {}
    ref_tok = ms.token_logprobs(ref_logits, labels, backend=backend)
    ref_tok = torch.where(labels != -100, ref_tok, torch.full_like(ref_tok, float("nan")))  # masked: garbage
    for name, kw in [("logits", dict(ref_logits=ref_logits)),
                     ("token", dict(ref_logprobs=ref_tok)),
                     ("seq", dict(ref_logprobs=ref_tok.nan_to_num(0.0).sum(-1)))]:
        loss, metrics = fn(logits, labels, beta=0.3, backend=backend, return_metrics=True, **kw)
        (grad,) = torch.autograd.grad(loss, logits)
        out[name] = (loss, grad, metrics)
    for name in ("token", "seq"):
        torch.testing.assert_close(out[name][0], out["logits"][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[name][1].float(), out["logits"][1].float(), atol=1e-5, rtol=1e-3)
        for k, v in out["logits"][2].items():
            torch.testing.assert_close(out[name][2][k], v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minor_sft_equals_token_mean_sft_when_policy_is_reference(dtype, backend, device):
    """Paper property: at r = 0 the MinorSFT gradient is per-sample token-mean SFT."""
    logits, labels = make_batch(3, 12, 901, dtype, device)
    logits.requires_grad_(True)
    loss = ms.minor_sft_loss(logits, labels, ref_logits=logits.detach(), beta=0.2,
                             reduction="sum", backend=backend)
    (grad,) = torch.autograd.grad(loss, logits)
    mask = labels != -100
    lp = eager.token_logprobs(logits, labels)
    per_sample_sft = -(lp.sum(-1) / mask.sum(-1))
    (ref_grad,) = torch.autograd.grad(per_sample_sft.sum(), logits)
    torch.testing.assert_close(grad.float(), ref_grad.float(), atol=2e-3 if dtype == torch.bfloat16 else 1e-6,
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_minor_dpo_no_rejected_gradient_below_zero(backend, device):
    """Rejected rows with r_l < 0 get exactly zero gradient; r_l >= 0 rows do not."""
    logits, labels = make_batch(4, 8, 513, torch.float32, device)
    logits.requires_grad_(True)
    P = 2
    S_ref = ms.token_logprobs(logits.detach(), labels, backend=backend).sum(-1)
    shift = torch.tensor([0.0, 0.0, 5.0, -5.0], device=device)  # rejected 0: r_l=-5 (<0), 1: r_l=+5
    loss = ms.minor_dpo_loss(logits, labels, ref_logprobs=S_ref + shift, beta=0.5, backend=backend)
    (grad,) = torch.autograd.grad(loss, logits)
    assert (grad[P + 0] == 0).all()
    assert grad[P + 1].abs().sum() > 0
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0


def test_minor_dpo_tie_at_zero_passes_gradient(backend, device):
    logits, labels = make_batch(2, 6, 300, torch.float32, device)
    logits.requires_grad_(True)
    S_ref = ms.token_logprobs(logits.detach(), labels, backend=backend).sum(-1)  # r = 0 exactly
    loss = ms.minor_dpo_loss(logits, labels, ref_logprobs=S_ref, beta=1.0, backend=backend)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad[1].abs().sum() > 0


def test_lobass_learnability(backend, device):
    l0, labels = make_batch(3, 9, 400, torch.float32, device)
    l1 = l0 + torch.randn_like(l0)
    got = ms.lobass_learnability(l0, l1, labels, backend=backend)
    mask = labels != -100
    L0 = -eager.token_logprobs(l0, labels).sum(-1) / mask.sum(-1)
    L1 = -eager.token_logprobs(l1, labels).sum(-1) / mask.sum(-1)
    torch.testing.assert_close(got.double(), (L0 - L1) / L0, atol=1e-5, rtol=1e-5)
