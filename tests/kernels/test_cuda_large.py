"""Real vocabularies at a few thousand tokens, natively on CUDA only."""
import pytest
import torch

import minorsft as ms
from tests import ground_truth as eager
from tests.util import assert_error_bar

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("V", [128256, 262144])
def test_large_vocab_bf16(V):
    B, T = 2, 1024
    full = (torch.randn(B, T + 1, V, device="cuda") * 2).to(torch.bfloat16)
    logits = full[:, :-1]
    ref = (logits.float() + 0.3 * torch.randn(logits.shape, device="cuda")).to(torch.bfloat16)
    labels = torch.randint(0, V, (B, T), device="cuda")
    labels[:, :50] = -100
    x = logits.detach().requires_grad_(True)
    loss = ms.minor_sft_loss(x, labels, ref_logits=ref, beta=0.1)
    (g,) = torch.autograd.grad(loss, x)
    want = eager.loss("minor_sft", logits, labels, ref_logits=ref, beta=0.1)[0]
    same = eager.loss("minor_sft", logits, labels, ref_logits=ref, beta=0.1, dtype=torch.bfloat16)[0]
    assert_error_bar(loss, same, want, atol=1e-4, rtol=1e-5, name="loss")
    # Gradient against fp64 on a few rows (the full fp64 softmax would not fit comfortably).
    rows = slice(60, 64)
    x64 = logits[:, rows].double().requires_grad_(True)
    lp = eager.token_logprobs(x64, labels[:, rows])
    mask = labels != -100
    S = eager.token_logprobs(logits, labels).sum(-1)
    S_ref = eager.token_logprobs(ref, labels).sum(-1)
    m = mask.sum(-1).double()
    coef = -(2 / m) * torch.sigmoid(-0.1 * (S - S_ref)) / B
    (g64,) = torch.autograd.grad((lp * coef[:, None]).sum(), x64)
    err = (g[:, rows].double() - g64).abs().max().item()
    assert err <= 2 ** -8 * g64.abs().max().item() + 1e-7, err


def test_int64_offsets_past_2_31_elements():
    """20000 x 128256 bf16 = 2.57e9 elements: rows past 2^31 must be right."""
    N, V = 20000, 128256
    try:
        logits = torch.randn(1, N, V, device="cuda", dtype=torch.bfloat16)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    labels = torch.randint(0, V, (1, N), device="cuda")
    lp = ms.token_logprobs(logits, labels)
    tail = slice(N - 8, N)   # beyond element 2^31
    want = eager.token_logprobs(logits[:, tail], labels[:, tail])
    torch.testing.assert_close(lp[:, tail].double(), want, atol=1e-4, rtol=0)
    del logits
