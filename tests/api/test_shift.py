"""shift=True: full logits (or hidden states) with Hugging Face labels equal the sliced
call exactly, for every function and module, without slicing a vocabulary-sized tensor."""
import json

import pytest
import torch

import minorsft as ms

B, T, V, H = 4, 9, 301, 16


def _inputs(device, dtype=torch.float32):
    logits = (torch.randn(B, T, V, device=device) * 3).to(dtype)
    ref = (logits.float() + torch.randn(B, T, V, device=device)).to(dtype)
    labels = torch.randint(0, V, (B, T), device=device)
    labels[:, :3] = -100                                  # a prompt
    labels[1, -2:] = -100                                 # padding
    return logits, ref, labels


def _grad(fn, leaf):
    leaf = leaf.detach().clone().requires_grad_(True)
    out = fn(leaf)
    out = out[0] if isinstance(out, tuple) else out
    gen = torch.Generator(device="cpu").manual_seed(7)   # the same upstream gradient both calls
    up = torch.randn(out.shape, generator=gen).to(out.device)
    (g,) = torch.autograd.grad(out, leaf, up)
    return out.detach(), g


def _case_kwargs(name, ref, ref_lp):
    return {"sft": {}, "token_logprobs": {},
            "minor_sft": {"ref_logits": ref, "beta": 0.3},
            "minor_dpo": {"ref_logprobs": ref_lp, "beta": 0.3},
            "dpo": {"ref_logits": ref, "loss_type": "ipo", "beta": 0.3}}[name]


FNS = {"token_logprobs": ms.token_logprobs, "sft": ms.sft_loss, "minor_sft": ms.minor_sft_loss,
       "minor_dpo": ms.minor_dpo_loss, "dpo": ms.dpo_loss}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", list(FNS))
def test_logits_path_equals_the_sliced_call(name, reduction, dtype, backend, device):
    logits, ref, labels = _inputs(device, dtype)
    ref_lp = -torch.rand(B, T - 1, device=device) * 5    # per scored position
    kw = _case_kwargs(name, ref, ref_lp)
    if name != "token_logprobs":
        kw["reduction"] = reduction
    fn = FNS[name]
    ref_sliced = {k: (v[:, :-1] if k == "ref_logits" else v) for k, v in kw.items()}
    got, g_got = _grad(lambda x: fn(x, labels, shift=True, backend=backend, **kw), logits)
    want, g_want = _grad(lambda x: fn(x[:, :-1], labels[:, 1:], backend=backend, **ref_sliced), logits)
    if name == "token_logprobs":
        assert got.shape == (B, T - 1)
    assert torch.equal(got, want), (got - want).abs().max()
    assert torch.equal(g_got, g_want), (g_got.float() - g_want.float()).abs().max()
    assert (g_got[:, -1] == 0).all()                      # the last position contributes nothing


def test_modules_fused_loss_and_lobass_take_shift(backend, device):
    logits, ref, labels = _inputs(device)
    got = ms.MinorSFTLoss(beta=0.2, shift=True, backend=backend)(logits, labels, ref_logits=ref)
    want = ms.minor_sft_loss(logits[:, :-1], labels[:, 1:], ref_logits=ref[:, :-1], beta=0.2,
                             backend=backend)
    assert torch.equal(got, want)
    got = ms.fused_loss("dpo", logits, labels, ref_logits=ref, shift=True, backend=backend)
    assert torch.equal(got, ms.dpo_loss(logits[:, :-1], labels[:, 1:], ref_logits=ref[:, :-1],
                                        backend=backend))
    got = ms.lobass_learnability(ref, logits, labels, shift=True, backend=backend)
    assert torch.equal(got, ms.lobass_learnability(ref[:, :-1], logits[:, :-1], labels[:, 1:],
                                                   backend=backend))


@pytest.mark.parametrize("name", ["token_logprobs", "sft", "minor_sft", "dpo"])
def test_linear_path_equals_the_sliced_call(name, backend, device):
    hidden = torch.randn(B, T, H, device=device)
    weight = torch.randn(V, H, device=device) / H ** 0.5
    _, _, labels = _inputs(device)
    fn = {"token_logprobs": ms.linear_token_logprobs, "sft": ms.linear_sft_loss,
          "minor_sft": ms.linear_minor_sft_loss, "dpo": ms.linear_dpo_loss}[name]
    kw = {} if name in ("token_logprobs", "sft") else {"ref_hidden": hidden.flip(0)}
    sliced = {k: v[:, :-1] for k, v in kw.items()}
    got, g_got = _grad(lambda h: fn(h, weight, labels, shift=True, backend=backend, **kw), hidden)
    want, g_want = _grad(lambda h: fn(h[:, :-1], weight, labels[:, 1:], backend=backend, **sliced),
                         hidden)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=0)


def test_shift_errors_name_the_argument(device):
    logits, ref, labels = _inputs(device)
    with pytest.raises(ValueError, match="labels: .*shift=True"):
        ms.sft_loss(logits, labels[:, 1:], shift=True)
    with pytest.raises(ValueError, match="ref_logprobs"):   # per scored position: [B, T - 1]
        ms.minor_sft_loss(logits, labels, ref_logprobs=torch.zeros(B, T, device=device), shift=True)
    with pytest.raises(TypeError, match="shift"):
        ms.sft_loss(logits, labels, shift=1)
    with pytest.raises(TypeError, match="shift"):
        ms.SFTLoss(shift="yes")


@pytest.mark.no_interpreter
@pytest.mark.parametrize("shift", [True, False])
def test_linear_layer_into_sft_loss_allocates_two_vocabulary_sized_buffers(shift, tmp_path):
    """forward + backward of nn.Linear -> sft_loss: with shift=True exactly the logits and
    their gradient are vocabulary-sized; the sliced call adds autograd's zero-filled
    gradient of the slice (the reason shift exists)."""
    from torch.profiler import ProfilerActivity, profile
    Bm, Tm, Vm, Hm = 2, 256, 4000, 16
    layer = torch.nn.Linear(Hm, Vm, bias=False)
    x = torch.randn(Bm, Tm, Hm)
    labels = torch.randint(0, Vm, (Bm, Tm))
    def loss_of(z, y):
        return ms.sft_loss(z, y, shift=True) if shift else ms.sft_loss(z[:, :-1], y[:, 1:])

    loss_of(layer(x[:1, :8]), labels[:1, :8]).backward()  # warm-up: one-time costs first
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss_of(layer(x), labels).backward()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    allocs = [e["args"]["Bytes"] for e in json.loads(trace.read_text())["traceEvents"]
              if e.get("name") == "[memory]" and e["args"].get("Bytes", 0) > 0]
    vocab_sized = Bm * (Tm - 1) * Vm * 4                  # one fp32 [B, T-1, V]
    big = [b for b in allocs if b >= vocab_sized]
    assert len(big) == (2 if shift else 3), sorted(allocs)[-6:]
