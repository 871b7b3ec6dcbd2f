"""torch.compile(fullgraph=True) traces the custom ops (PyTorch backend on CPU;
natively with Triton on CUDA)."""
import pytest
import torch

import minorsft as ms
from tests.util import make_batch

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.no_interpreter]


def _backend_for_compile():
    return "triton" if torch.cuda.is_available() else "torch"


@pytest.mark.parametrize("kind", ["sft", "minor_sft", "minor_dpo"])
def test_fullgraph_compile_matches_eager(kind, device):
    torch._dynamo.reset()
    be = _backend_for_compile()
    logits, labels = make_batch(4, 8, 515, torch.float32, device)
    ref = logits + 0.5 * torch.randn_like(logits)

    def step(x, y, r):
        if kind == "sft":
            return ms.sft_loss(x, y, backend=be)
        if kind == "minor_sft":
            return ms.minor_sft_loss(x, y, ref_logits=r, beta=0.4, backend=be, return_metrics=True)
        return ms.minor_dpo_loss(x, y, ref_logprobs=r, beta=0.4, backend=be)

    ref_in = ref if kind != "minor_dpo" else ms.token_logprobs(ref, labels, backend=be).sum(-1)
    compiled = torch.compile(step, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    out_c = compiled(x1, labels, ref_in)
    out_e = step(x2, labels, ref_in)
    loss_c = out_c[0] if isinstance(out_c, tuple) else out_c
    loss_e = out_e[0] if isinstance(out_e, tuple) else out_e
    torch.testing.assert_close(loss_c, loss_e, atol=1e-6, rtol=1e-6)
    (g_c,) = torch.autograd.grad(loss_c, x1)
    (g_e,) = torch.autograd.grad(loss_e, x2)
    torch.testing.assert_close(g_c, g_e, atol=1e-6, rtol=1e-6)
    if isinstance(out_c, tuple):
        for k in out_e[1]:
            torch.testing.assert_close(out_c[1][k], out_e[1][k], atol=1e-6, rtol=1e-6)


def test_inductor_compile_cpu(device):
    """The full inductor path (C++ codegen on CPU) around the opaque op."""
    torch._dynamo.reset()
    be = _backend_for_compile()
    logits, labels = make_batch(2, 6, 257, torch.float32, device)
    ref = logits + 0.5 * torch.randn_like(logits)
    f = torch.compile(lambda x, y, r: ms.minor_sft_loss(x * 2.0, y, ref_logits=r, backend=be),
                      fullgraph=True)
    x = logits.clone().requires_grad_(True)
    loss = f(x, labels, ref)
    x2 = logits.clone().requires_grad_(True)
    loss2 = ms.minor_sft_loss(x2 * 2.0, labels, ref_logits=ref, backend=be)
    torch.testing.assert_close(loss, loss2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(loss2, x2)[0],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", [False, True])
def test_opcheck(device, shift):
    be = _backend_for_compile()
    logits, labels = make_batch(2, 5, 130, torch.float32, device)
    logits.requires_grad_(True)
    torch.library.opcheck(torch.ops.minorsft.token_logprobs.default,
                          (logits, labels, None, -100, 1.0, be, False, shift))
