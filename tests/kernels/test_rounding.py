"""The backward kernel rounds fp32 -> bf16 to nearest even: with the hardware conversion on
the GPU, by hand under the interpreter (which truncates); both give the same bits."""
import pytest
import torch

from tests.conftest import BACKENDS


def _grads(device, monkeypatch=None, hand=False):
    from minorsft.kernels import logprobs as K
    if monkeypatch is not None:
        monkeypatch.setenv("MINORSFT_HAND_ROUND", "1" if hand else "0")
    g = torch.Generator(device="cpu").manual_seed(3)
    logits = (torch.randn(3, 7, 5003, generator=g) * 4).to(torch.bfloat16).to(device)
    labels = torch.randint(0, 5003, (3, 7), generator=g).to(device)
    labels[0, :2] = -100
    fwd_lp, lse, _ = K.logprobs_forward(logits, labels)
    up = torch.randn(3, 7, generator=g).to(device)
    g16 = K.logprobs_backward(logits, labels, lse, up)
    g32 = K.logprobs_backward(logits, labels, lse, up,
                              out=torch.empty(logits.shape, dtype=torch.float32, device=device))
    return g16, g32


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton kernels run in the interpreter pass")
def test_bf16_gradient_is_the_nearest_even_rounding_of_the_fp32_gradient(device):
    g16, g32 = _grads(device)
    assert torch.equal(g16, g32.to(torch.bfloat16))      # torch's conversion rounds to nearest even


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the hardware conversion needs a GPU")
def test_native_and_hand_rounding_give_identical_bits(monkeypatch):
    native, _ = _grads("cuda", monkeypatch, hand=False)
    by_hand, _ = _grads("cuda", monkeypatch, hand=True)
    assert torch.equal(native.view(torch.int16), by_hand.view(torch.int16))
