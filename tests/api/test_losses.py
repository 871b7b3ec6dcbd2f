"""Every loss, reduction and metric against the float64 formulas of SPEC.md."""
import pytest
import torch

import minorsft as ms
from tests import ground_truth as eager
from tests.util import assert_error_bar, grad_of, make_batch

CASES = [
    ("sft", {}),
    ("minor_sft", {"length_norm": "outside"}),
    ("minor_sft", {"length_norm": "inside"}),
    ("minor_sft", {"length_norm": "none"}),
    ("dpo", {"loss_type": "sigmoid"}),
    ("dpo", {"loss_type": "sigmoid", "label_smoothing": 0.1}),
    ("dpo", {"loss_type": "ipo"}),
    ("dpo", {"loss_type": "hinge"}),
    ("dpo", {"loss_type": "robust", "label_smoothing": 0.1}),
    ("minor_dpo", {}),
]
FNS = {"sft": ms.sft_loss, "minor_sft": ms.minor_sft_loss, "dpo": ms.dpo_loss,
       "minor_dpo": ms.minor_dpo_loss}
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def _inputs(kind, dtype, device, B=4, T=13, V=1031):
    logits, labels = make_batch(B, T, V, dtype, device)
    ref_logits = (logits.float() + 0.5 * torch.randn(logits.shape, device=device)).to(dtype)
    return logits, labels, (None if kind == "sft" else ref_logits)


def _call(kind, opts, logits, labels, ref_logits, reduction, backend, beta=0.5):
    kw = dict(opts, reduction=reduction, backend=backend)
    if kind != "sft":
        kw.update(ref_logits=ref_logits, beta=beta)
    return FNS[kind](logits, labels, **kw)


def _eager(kind, opts, logits, labels, ref_logits, reduction, dtype=torch.float64, beta=0.5):
    kw = dict(opts, reduction=reduction, dtype=dtype)
    if kind != "sft":
        kw.update(ref_logits=ref_logits, beta=beta)
    return eager.loss(kind, logits, labels, **kw)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind,opts", CASES, ids=[f"{k}-{'-'.join(map(str, o.values()))}" for k, o in CASES])
def test_loss_and_grad(kind, opts, reduction, dtype, backend, device):
    logits, labels, ref_logits = _inputs(kind, dtype, device)
    logits.requires_grad_(True)
    loss = _call(kind, opts, logits, labels, ref_logits, reduction, backend)
    ref = _eager(kind, opts, logits, labels, ref_logits, reduction)
    same = _eager(kind, opts, logits, labels, ref_logits, reduction, dtype=dtype)
    assert loss.dtype == torch.float32
    assert_error_bar(loss, same, ref, atol=ATOL[dtype], rtol=1e-5, name=f"{kind} loss")

    up = torch.randn(loss.shape, device=device)   # any upstream gradient, also for "none"
    (grad,) = torch.autograd.grad(loss, logits, up)
    ref_grad = grad_of(lambda x: _eager(kind, opts, x, labels, ref_logits, reduction), logits, up,
                       torch.float64)
    same_grad = grad_of(lambda x: _eager(kind, opts, x, labels, ref_logits, reduction, dtype=dtype),
                        logits, up)
    assert_error_bar(grad, same_grad, ref_grad, atol=ATOL[dtype], rtol=1e-3, name=f"{kind} grad")


@pytest.mark.parametrize("kind,opts", CASES, ids=[f"{k}-{'-'.join(map(str, o.values()))}" for k, o in CASES])
def test_loss_and_grad_fp16(kind, opts, backend, device):
    test_loss_and_grad(kind, opts, "mean", torch.float16, backend, device)


@pytest.mark.parametrize("kind,opts", [c for c in CASES if c[0] != "sft"],
                         ids=[c[0] + "-" + "-".join(map(str, c[1].values())) for c in CASES if c[0] != "sft"])
def test_metrics(kind, opts, backend, device):
    logits, labels, ref_logits = _inputs(kind, torch.float32, device)
    loss, metrics = _call(kind, dict(opts, return_metrics=True), logits, labels, ref_logits,
                          "mean", backend)
    _, ref_metrics = eager.loss(kind, logits, labels, ref_logits=ref_logits, beta=0.5, **opts)
    assert set(metrics) == set(ref_metrics)
    for name, value in metrics.items():
        assert not value.requires_grad and value.dim() == 0, name
        torch.testing.assert_close(value.double().cpu(), ref_metrics[name].double().cpu(),
                                   atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_sft_num_items_in_batch(backend, device):
    logits, labels, _ = _inputs("sft", torch.float32, device)
    logits.requires_grad_(True)
    n = int((labels != -100).sum()) * 3   # e.g. three accumulation micro-batches
    for n_arg in (n, torch.tensor(n, device=device)):
        loss = ms.sft_loss(logits, labels, num_items_in_batch=n_arg, backend=backend)
        ref = eager.loss("sft", logits, labels, num_items_in_batch=n)[0]
        torch.testing.assert_close(loss.double(), ref.double(), atol=1e-6, rtol=1e-6)


def test_minor_sft_coefficient_matches_paper(backend, device):
    """dL/dS_i = -(2/m_i) sigmoid(-beta r_i) for length_norm='outside' (sum reduction)."""
    beta = 0.7
    logits, labels, ref_logits = _inputs("minor_sft", torch.float32, device)
    logits.requires_grad_(True)
    lp = ms.token_logprobs(logits, labels, backend=backend)
    mask = labels != -100
    ref_lp = ms.token_logprobs(ref_logits, labels, backend=backend)
    loss = ms.loss_from_token_logprobs("minor_sft", lp, mask, ref_token_logps=ref_lp, beta=beta,
                                       reduction="sum")
    (g_tok,) = torch.autograd.grad(loss, lp)
    r = (lp - ref_lp).sum(-1).detach()
    m = mask.sum(-1).float()
    coef = -(2.0 / m) * torch.sigmoid(-beta * r)
    # Masked positions get the same coefficient from autograd; the backward kernel
    # zeroes those rows, so only unmasked tokens matter.
    expected = coef[:, None].expand_as(lp)
    torch.testing.assert_close(g_tok[mask], expected[mask], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind,opts", [c for c in CASES if c[0] != "sft"],
                         ids=[c[0] + "-" + "-".join(map(str, c[1].values())) for c in CASES if c[0] != "sft"])
def test_closed_form_coefficients_match_autograd(kind, opts):
    """The fused linear path forms gradients with the closed-form dL/dS of each loss
    (losses.LOSSES item_grad, inside a custom op where autograd is off): they must equal
    autograd through the per-item formula, ties (r_l = 0, the hinge's kink) included."""
    from minorsft import losses
    g = torch.Generator().manual_seed(5)
    B = 8
    S = (-torch.rand(B, generator=g, dtype=torch.float64) * 40).requires_grad_(True)
    S_ref = -torch.rand(B, generator=g, dtype=torch.float64) * 40
    S_ref[B // 2] = S[B // 2].detach()                    # r_l = 0 exactly (minor_dpo's tie)
    m = torch.randint(1, 30, (B,), generator=g)
    m[1] = 0                                              # an empty sequence
    spec = ms.LOSSES[kind]
    full = losses.check_options(kind, dict(opts, beta=0.5))
    stats = losses.SequenceStats(S, S_ref, m, m > 0)
    per, ok = spec.per_item(stats, **full)
    (auto,) = torch.autograd.grad(torch.where(ok, per, torch.zeros_like(per)).sum(), S)
    closed = spec.item_grad(losses.SequenceStats(S.detach(), S_ref, m, m > 0), **full)
    ok_seq = ok.repeat(2) if spec.pairs else ok
    torch.testing.assert_close(torch.where(ok_seq, closed, torch.zeros_like(closed)), auto,
                               rtol=1e-12, atol=1e-12)
