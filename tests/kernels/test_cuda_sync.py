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



@pytest.mark.parametrize("name,kw", [("sft", {}), ("sft", {"reduction": "sum"}),
                                     ("sft", {"num_items_in_batch": 1000}), ("minor_sft", {}), ("dpo", {})])
def test_linear_path_without_compaction_never_syncs(name, kw, monkeypatch):
    """By default the fused linear path reads its scored-row counts on the host once per
    call (the compaction that spares prompt and padding rows their GEMMs); with
    ``MINORSFT_LINEAR_SKIP_MASKED=0`` every position is a row and nothing is read."""
    monkeypatch.setenv("MINORSFT_LINEAR_SKIP_MASKED", "0")
    B, T, H, V = 4, 33, 256, 32000
    hidden = torch.randn(B, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, H, device="cuda") / H ** 0.5).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), device="cuda")
    labels[:, :5] = -100
    ref_kw = {} if name == "sft" else {"ref_logprobs": -torch.rand(B, device="cuda") * 30}

    def step():
        out = ms.linear_fused_loss(name, hidden, weight, labels, shift=True, **ref_kw, **kw)
        out.backward()

    _no_sync(step)


def test_linear_path_is_captured_by_a_cuda_graph():
    """While a CUDA graph is being captured the fused linear path keeps every position
    (no host read): a captured forward + backward replays to the eager call's numbers."""
    B, T, H, V = 2, 17, 128, 4096
    hidden = torch.randn(B, T, H, device="cuda", requires_grad=True)
    weight = (torch.randn(V, H, device="cuda") / H ** 0.5).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), device="cuda")
    labels[:, :4] = -100
    ref = -torch.rand(B, device="cuda") * 30

    def step():
        hidden.grad = weight.grad = None
        loss = ms.linear_fused_loss("minor_sft", hidden, weight, labels, ref_logprobs=ref, shift=True)
        loss.backward()
        return loss

    want = step().detach().clone()
    want_grads = hidden.grad.clone(), weight.grad.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                 # warm-up off the default stream, as torch asks
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    hidden.grad = weight.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    for out in (got, hidden.grad, weight.grad):   # poisoned: the replay must write them all
        out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip((hidden.grad, weight.grad), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
