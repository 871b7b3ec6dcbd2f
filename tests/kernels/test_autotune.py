"""MINORSFT_AUTOTUNE=1: the launch configuration is timed once per shape bucket, the
numbers stay the default's, the label flag is not inflated by the timing runs, an
in-place backward is never timed, and explicit overrides win."""
import pytest
import torch

import minorsft as ms
from minorsft.kernels import tuning
from tests.util import make_batch

V = 3000        # candidates with BLOCK_V up to 4096 apply


@pytest.fixture(autouse=True)
def autotune(backend, monkeypatch):
    if backend != "triton":
        pytest.skip("the Triton kernels' launch configuration")
    monkeypatch.setenv("MINORSFT_AUTOTUNE", "1")
    monkeypatch.delenv("MINORSFT_BLOCK_V", raising=False)
    monkeypatch.delenv("MINORSFT_NUM_WARPS", raising=False)
    tuning.reset()
    timed = []
    real = tuning._time_ms

    def spy(fn, device):
        timed.append(1)
        return real(fn, device)

    monkeypatch.setattr(tuning, "_time_ms", spy)
    yield timed
    tuning.reset()


def _loss_and_grad(logits, labels, ref, **kw):
    x = logits.clone().requires_grad_(True)
    loss = ms.minor_sft_loss(x, labels, ref_logits=ref, beta=0.5, backend="triton", **kw)
    (g,) = torch.autograd.grad(loss, x)
    return loss, g


def test_tuned_launch_gives_the_default_numbers_and_tunes_once_per_bucket(autotune, device, monkeypatch):
    logits, labels = make_batch(3, 7, V, torch.float32, device)
    ref = torch.randn_like(logits)
    loss, g = _loss_and_grad(logits, labels, ref)
    kinds = {key[0] for key in tuning._chosen}
    assert kinds == {"fwd", "bwd"}, tuning._chosen
    n_candidates = len(autotune) // 2
    assert n_candidates == sum(1 for b, _ in tuning.CANDIDATES if b <= 4096) > 1
    # another batch in the same bucket (rows 21 -> 18, both round up to 32): no timing
    again = len(autotune)
    logits2, labels2 = make_batch(3, 6, V, torch.float32, device)
    _loss_and_grad(logits2, labels2, torch.randn_like(logits2))
    assert len(autotune) == again
    monkeypatch.setenv("MINORSFT_AUTOTUNE", "0")
    want, want_g = _loss_and_grad(logits, labels, ref)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, want_g, rtol=1e-5, atol=1e-7)


def test_timing_runs_leave_the_label_flag_alone(autotune, device):
    logits, labels = make_batch(2, 9, V, torch.float32, device)
    labels[0, 4], labels[1, 6] = V + 5, -7
    ms.take_label_errors(device)
    lp = ms.token_logprobs(logits, labels, backend="triton", check_labels=False)
    assert len(autotune) > 1                     # the forward was tuned on this call
    count = int(ms.take_label_errors(device)[0])
    assert count == 2 and lp[0, 4].isnan() and lp[1, 6].isnan()


def test_in_place_backward_is_never_timed(autotune, device):
    logits, labels = make_batch(2, 8, V, torch.float32, device, stride_view=False)
    ref = torch.randn_like(logits)
    x = logits.clone().requires_grad_(True)
    h = x * 1.0                                  # a layer's output: the gradient goes in place
    loss = ms.minor_sft_loss(h, labels, ref_logits=ref, beta=0.5, backend="triton", inplace_backward=True)
    (g,) = torch.autograd.grad(loss, h)
    assert {key[0] for key in tuning._chosen} == {"fwd"}
    _, want = _loss_and_grad(logits, labels, ref)
    torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)


def test_explicit_launch_settings_turn_tuning_off(autotune, device, monkeypatch):
    monkeypatch.setenv("MINORSFT_BLOCK_V", "1024")
    logits, labels = make_batch(2, 5, V, torch.float32, device)
    ms.token_logprobs(logits, labels, backend="triton")
    assert autotune == [] and not tuning._chosen
