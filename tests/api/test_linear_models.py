"""The fused linear path on real-model inputs: an fp32 lm_head under bf16 autocast,
Gemma's logit soft-capping, Cohere's logit scale, Hugging Face labels; and determinism.

Ground truth: the logits formed in float64 from the upcast inputs, transformed in
float64, then the SPEC formulas (tests/ground_truth.py). Error bar: the same computation
as an eager user would run it in the compute dtype."""
import pytest
import torch

import minorsft as ms
from tests import ground_truth as gt
from tests.util import assert_error_bar, chunk_rows

B, T, H, V = 4, 11, 24, 97
FNS = {"sft": ms.linear_sft_loss, "minor_sft": ms.linear_minor_sft_loss,
       "dpo": ms.linear_dpo_loss, "minor_dpo": ms.linear_minor_dpo_loss}


@pytest.fixture(autouse=True, params=["sequences", "rows", "every-position"])
def plan(request, monkeypatch):
    """Two sequences of rows a chunk (gradient in the forward) or 4 rows (two passes), in
    the test's compute dtype; "every-position": two sequences a chunk with the masked rows
    kept (``MINORSFT_LINEAR_SKIP_MASKED=0``, the layout with no host read)."""
    rows = 4 if request.param == "rows" else 2 * T
    every = request.param == "every-position"
    if every:
        monkeypatch.setenv("MINORSFT_LINEAR_SKIP_MASKED", "0")
    seen = chunk_rows(monkeypatch, request, rows, V)
    yield
    assert all(per_chunk == rows for _, per_chunk in seen), f"chunks of {rows} rows, got {seen}"
    # the masked prompt rows are dropped, or (every position) kept: B x T or B x (T - 1) rows
    assert all((n in (B * T, B * (T - 1))) == every for n, _ in seen), seen


def inputs(device, hdt, wdt):
    hidden = (torch.randn(B, T, H) * 1.5).to(device, hdt)      # fresh: conftest seeds per test
    weight = (torch.randn(V, H) / H ** 0.5).to(device, wdt)
    bias = (torch.randn(V) * 0.3).to(device, wdt)
    labels = torch.randint(0, V, (B, T)).to(device)
    labels[:, :3] = -100
    return hidden, weight, bias, labels


def logits(h, w, b, dtype, *, softcap=None, logit_scale=1.0, compute=None):
    """The logits a model would produce: ``hidden @ W^T + b`` in ``compute`` (the
    autocast dtype) or ``dtype``, then the transforms, in ``dtype``."""
    c = compute or dtype
    z = (h.to(c) @ w.to(c).t() + b.to(c)).to(dtype) * logit_scale
    return softcap * torch.tanh(z / softcap) if softcap else z


def loss_and_grads(kind, tensors, labels, ref_lp, dtype, compute=None, temperature=1.0, **tf):
    """Eager loss and gradients of ``(hidden, weight, bias)`` upcast to ``dtype`` (float64:
    the ground truth; fp32 with ``compute``: the error bar of a model under autocast)."""
    leaves = [x.detach().to(dtype).requires_grad_(True) for x in tensors]
    kw = {} if kind == "sft" else {"ref_logprobs": ref_lp.to(dtype)}
    sm = torch.float64 if dtype == torch.float64 else torch.float32
    loss, _ = gt.loss(kind, logits(*leaves, sm, compute=compute, **tf), labels, dtype=sm,
                      temperature=temperature, **kw)
    return loss, torch.autograd.grad(loss, leaves)


def ours(kind, tensors, labels, ref_lp, backend, **kw):
    leaves = [x.detach().clone().requires_grad_(True) for x in tensors]
    extra = {} if kind == "sft" else {"ref_logprobs": ref_lp}
    out = FNS[kind](leaves[0], leaves[1], labels, bias=leaves[2], backend=backend, **extra, **kw)
    return out, torch.autograd.grad(out, leaves)


@pytest.mark.parametrize("dtype", [torch.bfloat16])   # the hidden states' (compute) dtype
@pytest.mark.parametrize("kind", list(FNS))
def test_bf16_hidden_with_an_fp32_lm_head(kind, dtype, backend, device):
    """Autocast's layout: the GEMMs run in bf16, each gradient comes back in its input's dtype."""
    tensors = inputs(device, dtype, torch.float32)
    labels = tensors[3]
    ref_lp = -torch.rand(B, device=device) * 30
    out, grads = ours(kind, tensors[:3], labels, ref_lp, backend)
    truth, g64 = loss_and_grads(kind, tensors[:3], labels, ref_lp, torch.float64)
    same, gsame = loss_and_grads(kind, tensors[:3], labels, ref_lp, torch.float32, compute=dtype)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    assert_error_bar(out, same, truth, atol=1e-3, rtol=2 ** -8, name="loss")
    for name, g, s, r in zip(("d_hidden", "d_weight", "d_bias"), grads, gsame, g64):
        assert_error_bar(g, s, r, atol=1e-3, rtol=2 ** -7, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,tf", [
    ("sft", {"softcap": 3.0}), ("minor_sft", {"softcap": 2.5, "logit_scale": 0.7}),
    ("dpo", {"logit_scale": 1.9}), ("minor_dpo", {"softcap": 4.0, "temperature": 1.3}),
])
def test_softcap_and_logit_scale(kind, tf, dtype, backend, device):
    tensors = inputs(device, dtype, dtype)
    labels = tensors[3]
    ref_lp = -torch.rand(B, device=device) * 30
    out, grads = ours(kind, tensors[:3], labels, ref_lp, backend, **tf)
    truth, g64 = loss_and_grads(kind, tensors[:3], labels, ref_lp, torch.float64, **tf)
    same, gsame = loss_and_grads(kind, tensors[:3], labels, ref_lp, torch.float32, compute=dtype, **tf)
    atol, rtol = (2e-5, 1e-5) if dtype == torch.float32 else (1e-3, 2 ** -7)
    assert_error_bar(out, same, truth, atol=atol, rtol=rtol, name="loss")
    for name, g, s, r in zip(("d_hidden", "d_weight", "d_bias"), grads, gsame, g64):
        assert_error_bar(g, s, r, atol=atol, rtol=rtol, name=name)


def test_token_logprobs_with_transforms_and_shift(backend, device):
    """Per-token log-probs (the statistics plan, reduction none) with every option at once."""
    hidden, weight, bias, labels = inputs(device, torch.float32, torch.float32)
    lp = ms.linear_token_logprobs(hidden, weight, labels, bias=bias, softcap=2.0, logit_scale=1.5,
                                  temperature=0.8, shift=True, backend=backend)
    z = logits(hidden.double(), weight.double(), bias.double(), torch.float64, softcap=2.0,
               logit_scale=1.5)
    truth = gt.token_logprobs(z[:, :-1], labels[:, 1:], temperature=0.8)
    assert lp.shape == (B, T - 1)
    assert_error_bar(lp, truth, truth, atol=2e-5, rtol=1e-5, name="logprob")


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("kind", ["minor_sft", "dpo"])
def test_two_runs_give_bitwise_identical_gradients(kind, dtype, backend, device):
    """Several chunks accumulate dW in a fixed order: no atomics, the same bits every run."""
    tensors = inputs(device, dtype, dtype)
    ref_lp = -torch.rand(B, device=device) * 30
    (a, ga), (b, gb) = (ours(kind, tensors[:3], tensors[3], ref_lp, backend) for _ in range(2))
    assert torch.equal(a, b)
    for x, y in zip(ga, gb):
        assert torch.equal(x, y)


def test_reduction_none_and_no_grad_use_the_statistics_plan(backend, device):
    """reduction='none' (any upstream gradient) and no-grad calls give the same per-item
    values as the gradient-in-forward plan's scalar."""
    hidden, weight, bias, labels = inputs(device, torch.float32, torch.float32)
    ref_lp = -torch.rand(B, device=device) * 30
    kw = dict(bias=bias, ref_logprobs=ref_lp, backend=backend)
    per = ms.linear_minor_sft_loss(hidden, weight, labels, reduction="none", **kw)
    with torch.no_grad():
        total = ms.linear_minor_sft_loss(hidden, weight, labels, reduction="sum", **kw)
    h = hidden.clone().requires_grad_(True)
    fused = ms.linear_minor_sft_loss(h, weight, labels, reduction="sum", **kw)
    torch.testing.assert_close(per.sum(), total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused.detach(), total, rtol=1e-6, atol=1e-6)


def test_bad_transform_arguments(device):
    hidden, weight, bias, labels = inputs(device, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="softcap"):
        ms.linear_sft_loss(hidden, weight, labels, softcap=-1.0)
    with pytest.raises(ValueError, match="logit_scale"):
        ms.linear_sft_loss(hidden, weight, labels, logit_scale=0.0)
    with pytest.raises(TypeError, match="weight: dtype"):     # fp16 weight, fp32 hidden
        ms.linear_sft_loss(hidden, weight.half(), labels)
