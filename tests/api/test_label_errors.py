"""Labels that are no token: an eager error where reading them is free, otherwise a NaN
log-prob plus the device's label flag, read where the caller synchronises anyway."""
import pytest
import torch

import minorsft as ms

B, T, V = 2, 6, 50


def _batch(device):
    logits = torch.randn(B, T, V, device=device)
    labels = torch.randint(0, V, (B, T), device=device)
    return logits, labels


def test_unchecked_bad_label_is_nan_and_raises_the_flag(backend, device):
    logits, labels = _batch(device)
    labels[1, 3] = V + 7
    lp = ms.token_logprobs(logits, labels, backend=backend, check_labels=False)
    assert torch.isnan(lp[1, 3]) and torch.isfinite(lp[0]).all()
    errors = ms.take_label_errors(device)
    assert errors.tolist() == [1, V + 7]
    assert ms.take_label_errors(device).tolist() == [0, 0]      # taking it resets it
    ms.raise_label_errors(torch.zeros(2, dtype=torch.long))      # nothing to report
    with pytest.raises(ValueError, match=rf"labels: 1 label\(s\) outside \[0, V={V}\).*step 12.*{V + 7}"):
        ms.raise_label_errors(errors, "step 12", vocab=V)


def test_check_label_errors_reads_and_resets(backend, device):
    logits, labels = _batch(device)
    labels[0, 0] = -5
    ms.sft_loss(logits, labels, backend=backend, check_labels=False)
    with pytest.raises(ValueError, match="-5"):
        ms.check_label_errors(device)
    ms.check_label_errors(device)                                # reset: no error now


def test_cpu_default_checks_eagerly(device):
    if device != "cpu":
        pytest.skip("the default is the flag on a GPU")
    logits, labels = _batch(device)
    labels[1, 2] = V
    with pytest.raises(ValueError, match=r"labels: 1 entries outside \[0, V=50\)"):
        ms.sft_loss(logits, labels)


def test_shift_scores_only_labels_one_to_t(backend, device):
    logits, labels = _batch(device)
    labels[:, 0] = 10 ** 6                                       # never scored with shift
    ms.sft_loss(logits, labels, shift=True, backend=backend, check_labels=True)
    assert ms.take_label_errors(device).tolist() == [0, 0]


def test_linear_path_raises_the_flag(backend, device):
    hidden, weight = torch.randn(B, T, 8, device=device), torch.randn(V, 8, device=device)
    _, labels = _batch(device)
    labels[0, 1] = V
    lp = ms.linear_token_logprobs(hidden, weight, labels, backend=backend, check_labels=False)
    assert torch.isnan(lp[0, 1])
    assert ms.take_label_errors(device).tolist() == [1, V]
