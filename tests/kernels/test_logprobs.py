"""token_logprobs: value and gradient against float64, every dtype and backend."""
import pytest
import torch

import minorsft as ms
from tests import ground_truth as eager
from tests.util import assert_error_bar, grad_of, make_batch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# V=5003: not a power of two and larger than one 4096-wide block; V=100: one block.
SHAPES = [(3, 37, 5003), (2, 9, 100)]
ATOL = {torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_value_and_grad(shape, dtype, backend, device):
    B, T, V = shape
    logits, labels = make_batch(B, T, V, dtype, device)
    logits.requires_grad_(True)
    lp = ms.token_logprobs(logits, labels, backend=backend)
    assert lp.dtype == torch.float32 and lp.shape == (B, T)
    ref = eager.token_logprobs(logits, labels)
    same = eager.token_logprobs(logits, labels, dtype=dtype)
    assert_error_bar(lp, same, ref, atol=ATOL[dtype], name="logprob")
    assert (lp[labels == -100] == 0).all()

    g = torch.randn(B, T, device=device)          # random upstream gradient
    (grad,) = torch.autograd.grad(lp, logits, g)
    ref_grad = grad_of(lambda x: eager.token_logprobs(x, labels), logits, g, torch.float64)
    same_grad = grad_of(lambda x: eager.token_logprobs(x, labels, dtype=dtype), logits, g)
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_error_bar(grad, same_grad, ref_grad, atol=ATOL[dtype], name="grad")
    assert (grad[labels == -100] == 0).all()


@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_temperature(temperature, backend, device):
    logits, labels = make_batch(2, 11, 777, torch.float32, device)
    logits.requires_grad_(True)
    lp = ms.token_logprobs(logits, labels, temperature=temperature, backend=backend)
    ref = eager.token_logprobs(logits, labels, temperature=temperature)
    assert_error_bar(lp, ref, ref, atol=2e-5, name="logprob")
    g = torch.randn_like(lp)
    (grad,) = torch.autograd.grad(lp, logits, g)
    ref_grad = grad_of(lambda x: eager.token_logprobs(x, labels, temperature=temperature),
                       logits, g, torch.float64)
    assert_error_bar(grad, ref_grad, ref_grad, atol=2e-6, name="grad")


def test_small_blocks_many_iterations(device, monkeypatch):
    """Force a 64-wide block so the online logsumexp runs over many blocks."""
    if "triton" not in __import__("tests.conftest", fromlist=["BACKENDS"]).BACKENDS:
        pytest.skip("needs the Triton backend (CUDA or TRITON_INTERPRET=1)")
    monkeypatch.setenv("MINORSFT_BLOCK_V", "64")
    logits, labels = make_batch(2, 5, 1001, torch.bfloat16, device)
    logits.requires_grad_(True)
    lp = ms.token_logprobs(logits, labels, backend="triton")
    ref = eager.token_logprobs(logits, labels)
    assert_error_bar(lp, eager.token_logprobs(logits, labels, dtype=torch.bfloat16), ref, atol=1e-4)
    g = torch.randn_like(lp)
    (grad,) = torch.autograd.grad(lp, logits, g)
    ref_grad = grad_of(lambda x: eager.token_logprobs(x, labels), logits, g, torch.float64)
    same_grad = grad_of(lambda x: eager.token_logprobs(x, labels, dtype=torch.bfloat16), logits, g)
    assert_error_bar(grad, same_grad, ref_grad, atol=1e-4, name="grad")


def test_backends_agree(device):
    if "triton" not in __import__("tests.conftest", fromlist=["BACKENDS"]).BACKENDS:
        pytest.skip("needs the Triton backend")
    logits, labels = make_batch(2, 13, 3001, torch.bfloat16, device)
    a = ms.token_logprobs(logits, labels, backend="triton")
    b = ms.token_logprobs(logits, labels, backend="torch")
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-6)


def test_int32_labels_and_contiguous(backend, device):
    logits, labels = make_batch(2, 7, 513, torch.float32, device, stride_view=False)
    lp32 = ms.token_logprobs(logits, labels.to(torch.int32), backend=backend)
    lp64 = ms.token_logprobs(logits, labels, backend=backend)
    torch.testing.assert_close(lp32, lp64, atol=0, rtol=0)


def test_no_grad_forward(backend, device):
    logits, labels = make_batch(2, 6, 300, torch.float16, device)
    with torch.no_grad():
        lp = ms.token_logprobs(logits.requires_grad_(True), labels, backend=backend)
    assert not lp.requires_grad
    assert_error_bar(lp, eager.token_logprobs(logits, labels, dtype=torch.float16),
                     eager.token_logprobs(logits, labels), atol=1e-4)


@pytest.mark.parametrize("splits", [2, 3])
def test_split_vocabulary_grid(splits, device, monkeypatch):
    """Few-row grid: the vocabulary split over programs, partials merged after."""
    if "triton" not in __import__("tests.conftest", fromlist=["BACKENDS"]).BACKENDS:
        pytest.skip("needs the Triton backend (CUDA or TRITON_INTERPRET=1)")
    monkeypatch.setenv("MINORSFT_SPLIT_V", str(splits))
    monkeypatch.setenv("MINORSFT_BLOCK_V", "128")
    logits, labels = make_batch(4, 5, 1001, torch.bfloat16, device)
    ref_logits = (logits.float() + torch.randn(logits.shape, device=device)).to(torch.bfloat16)
    labels[1, 3] = 1000            # last column, in the last chunk
    logits.requires_grad_(True)
    loss, metrics = ms.minor_dpo_loss(logits, labels, ref_logits=ref_logits, beta=0.5,
                                      backend="triton", return_metrics=True)
    want, want_metrics = eager.loss("minor_dpo", logits, labels, ref_logits=ref_logits, beta=0.5)
    same, _ = eager.loss("minor_dpo", logits, labels, ref_logits=ref_logits, beta=0.5,
                         dtype=torch.bfloat16)
    assert_error_bar(loss, same, want, atol=1e-4, rtol=1e-5, name="loss")
    torch.testing.assert_close(metrics["logps/chosen"].double(), want_metrics["logps/chosen"],
                               atol=1e-4, rtol=1e-5)
    (grad,) = torch.autograd.grad(loss, logits)
    ref_grad = grad_of(lambda x: eager.loss("minor_dpo", x, labels, ref_logits=ref_logits,
                                            beta=0.5)[0], logits, torch.ones(()), torch.float64)
    assert_error_bar(grad, ref_grad.to(torch.bfloat16), ref_grad, atol=1e-4, rtol=1e-3, name="grad")
    labels[0, 4] = 5000            # out of range, unchecked: NaN, not an out-of-bounds read
    lp = ms.token_logprobs(logits, labels, backend="triton", check_labels=False)
    assert torch.isnan(lp[0, 4]) and torch.isfinite(lp[1:]).all()


@pytest.mark.parametrize("splits", ["1", "3"])
def test_blocks_of_minus_inf(splits, backend, device, monkeypatch):
    """Whole blocks / chunks of -inf logits (padded or banned vocabulary entries)."""
    monkeypatch.setenv("MINORSFT_SPLIT_V", splits)
    monkeypatch.setenv("MINORSFT_BLOCK_V", "64")
    logits, labels = make_batch(2, 5, 1001, torch.float32, device)
    logits = logits.detach().clone()
    logits[..., :130] = float("-inf")     # the first blocks
    logits[..., 600:] = float("-inf")     # the last chunk when split in three
    labels = labels.clamp(max=599).where(labels == -100, labels.clamp(130, 599))
    logits.requires_grad_(True)
    lp = ms.token_logprobs(logits, labels, backend=backend)
    ref = eager.token_logprobs(logits, labels)
    assert_error_bar(lp, ref, ref, atol=2e-5, name="logprob")
    g = torch.randn_like(lp)
    (grad,) = torch.autograd.grad(lp, logits, g)
    ref_grad = grad_of(lambda x: eager.token_logprobs(x, labels), logits, g, torch.float64)
    assert_error_bar(grad, ref_grad, ref_grad, atol=2e-6, name="grad")
