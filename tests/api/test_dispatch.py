"""Backend selection and the nn.Module forms."""
import pytest
import torch

import minorsft as ms
from minorsft.ops import select_backend
from tests.util import make_batch


def test_select_backend(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert select_backend(None, cpu) == "torch"
    assert select_backend("auto", cpu) == "torch"
    assert select_backend("torch", torch.device("cuda")) == "torch"
    assert select_backend(None, torch.device("cuda")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend(None, cpu) == "triton"
    with pytest.raises(ValueError, match="backend"):
        select_backend("jax", cpu)


@pytest.mark.parametrize("cls,fn,kw", [
    (ms.SFTLoss, ms.sft_loss, {}),
    (ms.MinorSFTLoss, ms.minor_sft_loss, {"beta": 0.3, "length_norm": "inside"}),
    (ms.MinorDPOLoss, ms.minor_dpo_loss, {"beta": 0.3}),
    (ms.DPOLoss, ms.dpo_loss, {"beta": 0.3, "loss_type": "ipo"}),
])
def test_modules_match_functions(cls, fn, kw, backend, device):
    logits, labels = make_batch(4, 6, 300, torch.bfloat16, device)
    mod = cls(backend=backend, **kw)
    if cls is ms.SFTLoss:
        torch.testing.assert_close(mod(logits, labels), fn(logits, labels, backend=backend, **kw))
    else:
        ref = (logits.float() + torch.randn(logits.shape, device=device)).to(logits.dtype)
        torch.testing.assert_close(mod(logits, labels, ref_logits=ref),
                                   fn(logits, labels, ref_logits=ref, backend=backend, **kw))
    assert repr(mod)
