"""inplace_backward=True writes the same gradient into the logits buffer."""
import pytest
import torch

import minorsft as ms
from tests.util import make_batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_matches_out_of_place(dtype, backend, device):
    logits, labels = make_batch(4, 7, 1031, dtype, device, stride_view=False)
    ref = (logits.float() + torch.randn(logits.shape, device=device)).to(dtype)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    la = ms.minor_dpo_loss(a, labels, ref_logits=ref, beta=0.3, backend=backend)
    (ga,) = torch.autograd.grad(la, a)
    # A non-leaf holding the logits, as a model's lm_head output would be.
    b_out = b * 1.0
    buf_ptr = b_out.data_ptr()
    lb = ms.minor_dpo_loss(b_out, labels, ref_logits=ref, beta=0.3, backend=backend,
                           inplace_backward=True)
    (gb_out,) = torch.autograd.grad(lb, b_out)
    assert gb_out.data_ptr() == buf_ptr, "gradient was not written into the logits buffer"
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(gb_out, ga, atol=0, rtol=0)


def test_inplace_strided_view(backend, device):
    logits, labels = make_batch(2, 6, 300, torch.float32, device)   # logits is full[:, :-1]
    full = logits._base.clone().requires_grad_(True)
    h = full * 1.0
    loss = ms.sft_loss(h[:, :-1], labels, backend=backend, inplace_backward=True)
    (g_ip,) = torch.autograd.grad(loss, full)
    full2 = logits._base.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ms.sft_loss(full2[:, :-1], labels, backend=backend), full2)
    torch.testing.assert_close(g_ip, g, atol=0, rtol=0)
    assert (g_ip[:, -1] == 0).all()
