"""No host synchronisation in a loss forward + backward on the GPU (the default label
check included: a bad label raises the device's label flag instead of reading the labels)."""
import pytest
import torch

import minorsft as ms

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _no_sync(fn):
    fn()                                          # warm-up: kernels compiled, caches filled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("name", ["sft", "minor_sft", "minor_dpo", "dpo"])
def test_logits_path_loss_forward_backward_never_syncs(name):
    B, T, V = 4, 33, 32000
    logits = torch.randn(B, T, V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ref = torch.randn(B, T, V, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, V, (B, T), device="cuda")
    labels[:, :5] = -100
    ref_kw = {} if name == "sft" else {"ref_logits": ref}

    def step():
        out = ms.fused_loss(name, logits, labels, shift=True, **ref_kw)
        out.backward()

    _no_sync(step)


# The fused linear path reads its scored-row counts on the host once per call (the
# compaction that spares prompt and padding rows their GEMMs): it is not in this test.
