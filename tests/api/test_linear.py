"""Fused linear path: loss, d_hidden, d_weight, d_bias against float64 eager.

The ground truth forms the logits ``hidden @ weight^T + bias`` in float64 from the
upcast inputs and applies the SPEC formulas (tests/ground_truth.py). The error bar is the
eager formula as people run it in the input dtype: logits from a matmul in that
dtype, then an fp32 log-softmax. Shapes are odd on purpose (H not a multiple of 16,
V not a power of two), with masked prompt tokens and a strided ``hidden[:, :-1]``.
Every test runs under two chunk budgets (``plan``): chunks of two sequences (the
gradient-in-forward plan over several chunks) and chunks of a few rows (smaller than a
sequence: the two-pass plan and the per-token plan with many chunks).
"""
import pytest
import torch

import minorsft as ms
from minorsft import linear as L
from minorsft.kernels import linear as linear_driver
from tests import ground_truth as eager
from tests.util import assert_error_bar, chunk_rows

B, T, H, V = 4, 13, 40, 101
ATOL = {torch.float32: 2e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}
# Relative slack: one unit in the last place of the largest value, in the output's own
# dtype (bf16 2^-8, fp16 2^-11 -> 1e-3). The Triton backward rounds its fp32 gradient
# tile to the input dtype as the tl.dot operand, as eager does with its logits
# gradient; the two roundings differ elementwise, so their max errors differ by about
# that much.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -8, torch.float16: 1e-3}

# (loss kind, options, reference kind)
CASES = [
    ("sft", {}, None),
    ("sft", {"reduction": "none"}, None),
    ("sft", {"reduction": "sum", "temperature": 0.7}, None),
    ("minor_sft", {}, "hidden"),
    ("minor_sft", {"length_norm": "inside", "reduction": "none"}, "token"),
    ("minor_sft", {"length_norm": "none", "beta": 0.5}, "seq"),
    ("dpo", {"label_smoothing": 0.1}, "hidden"),
    ("dpo", {"loss_type": "ipo", "reduction": "sum"}, "token"),
    ("dpo", {"loss_type": "hinge", "temperature": 1.3}, "seq"),
    ("dpo", {"loss_type": "robust", "label_smoothing": 0.2, "reduction": "none"}, "hidden"),
    ("minor_dpo", {}, "hidden"),
    ("minor_dpo", {"beta": 1.0, "reduction": "none"}, "token"),
]
FNS = {"sft": L.linear_sft_loss, "minor_sft": L.linear_minor_sft_loss,
       "dpo": L.linear_dpo_loss, "minor_dpo": L.linear_minor_dpo_loss}


@pytest.fixture(autouse=True, params=["sequences", "rows"])
def plan(request, monkeypatch):
    """Chunk budgets smaller than the shapes (the default would hold them in one chunk):
    about two sequences of rows, or 5 rows (less than one sequence), in the test's dtype."""
    rows = 2 * T if request.param == "sequences" else 5
    seen = chunk_rows(monkeypatch, request, rows, V)
    yield request.param
    assert all(per_chunk == rows for _, per_chunk in seen), f"chunks of {rows} rows, got {seen}"


def make_inputs(dtype, device, *, bias=True, b=B, t=T, h=H, v=V):
    """Strided hidden ``[b, t, h]``, weight ``[v, h]``, bias, labels with masked prompts."""
    hidden = (torch.randn(b, t + 1, h, device=device) * 2.0).to(dtype)[:, :-1]
    weight = (torch.randn(v, h, device=device) / h ** 0.5).to(dtype)
    bias_t = (torch.randn(v, device=device) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (b, t), device=device)
    labels[torch.rand(b, t, device=device) < 0.2] = -100
    labels[:, :3] = -100                           # prompt prefix
    return hidden, weight, bias_t, labels


def logits_of(hidden, weight, bias, dtype):
    """``hidden @ weight^T + bias`` computed in ``dtype`` (float64 = ground truth)."""
    z = hidden.to(dtype) @ weight.to(dtype).t()
    return z + bias.to(dtype) if bias is not None else z


def run_eager(kind, hidden, weight, bias, labels, ref, opts, dtype, upstream):
    """Loss and grads of the eager formula with the logits formed in ``dtype``.

    ``dtype=float64``: ground truth. Otherwise the matmul runs in the inputs' dtype and
    the log-softmax in fp32 (the usual eager practice), grads in the inputs' dtypes.
    """
    hi = torch.float64 if dtype == torch.float64 else hidden.dtype
    sm = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [x.detach().to(hi).requires_grad_(True) if x is not None else None
              for x in (hidden, weight, bias)]
    kw = {}
    if ref is not None and ref[0] == "hidden":
        _, rh, rw, rb = ref
        kw["ref_logits"] = logits_of(rh, rw, rb, hi)
    elif ref is not None:
        kw["ref_logprobs"] = ref[1]
    loss, _ = eager.loss(kind, logits_of(*leaves, hi), labels, dtype=sm, **opts, **kw)
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None],
                                upstream.to(loss.dtype) if upstream is not None else None)
    return loss, list(grads)


def make_ref(kind_ref, dtype, device, labels, hidden):
    if kind_ref is None:
        return None
    if kind_ref == "hidden":          # a reference with its own lm_head and hidden size
        rh = (torch.randn(B, T, H + 3, device=device) * 2.0).to(dtype).requires_grad_(True)
        rw = (torch.randn(V, H + 3, device=device) / H ** 0.5).to(dtype).requires_grad_(True)
        rb = (torch.randn(V, device=device) * 0.5).to(dtype)
        return ("hidden", rh, rw, rb)
    if kind_ref == "token":
        return ("token", -torch.rand(B, T, device=device) * 6)
    return ("seq", -torch.rand(B, device=device) * 40)


def ours_kwargs(ref):
    if ref is None:
        return {}
    if ref[0] == "hidden":
        return {"ref_hidden": ref[1], "ref_weight": ref[2], "ref_bias": ref[3]}
    return {"ref_logprobs": ref[1]}


# bf16 for the cases whose kernels differ (no reference / reference hidden states); the
# precomputed-reference cases differ only in the shared fp32 epilogue.
PARAMS = [pytest.param(k, o, r, dt, id=f"{k}-{'-'.join(f'{a}={b}' for a, b in o.items())}-{r}-"
                       f"{str(dt)[6:]}")
          for k, o, r in CASES for dt in (torch.float32, torch.bfloat16)
          if dt == torch.float32 or r in (None, "hidden")]


@pytest.mark.parametrize("kind,opts,ref_kind,dtype", PARAMS)
def test_loss_and_grads(kind, opts, ref_kind, dtype, backend, device):
    hidden, weight, bias, labels = make_inputs(dtype, device)
    ref = make_ref(ref_kind, dtype, device, labels, hidden)
    leaves = [x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias)]
    out = FNS[kind](*leaves[:2], labels, bias=leaves[2], backend=backend, **ours_kwargs(ref),
                    **opts)
    upstream = torch.randn_like(out) if out.dim() > 0 else None
    grads = torch.autograd.grad(out, leaves, upstream)

    ref_loss, ref_grads = run_eager(kind, hidden, weight, bias, labels, ref, opts,
                                    torch.float64, upstream)
    same_loss, same_grads = run_eager(kind, hidden, weight, bias, labels, ref, opts, dtype,
                                      upstream)
    assert out.dtype == torch.float32
    assert_error_bar(out, same_loss, ref_loss, atol=ATOL[dtype], rtol=RTOL[dtype], name="loss")
    for name, g, s, r, x in zip(("d_hidden", "d_weight", "d_bias"), grads, same_grads, ref_grads,
                                leaves):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert_error_bar(g, s, r, atol=ATOL[dtype], rtol=RTOL[dtype], name=name)
    masked = labels == -100
    assert (grads[0][masked] == 0).all(), "masked tokens must get exactly zero d_hidden"
    if ref is not None and ref[0] == "hidden":
        assert ref[1].grad is None and ref[2].grad is None, "the reference must stay frozen"


# v=53 > N=21 tokens and v=17 < N: the two fp32-accumulation layouts of the Triton
# backward for low-precision inputs (vocabulary slices / token chunks).
@pytest.mark.parametrize("v", [53, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_token_logprobs_no_bias(dtype, v, backend, device):
    hidden, weight, _, labels = make_inputs(dtype, device, bias=False, b=3, t=7, h=19, v=v)
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    lp = L.linear_token_logprobs(h, w, labels, backend=backend)
    assert lp.shape == labels.shape and lp.dtype == torch.float32
    assert (lp[labels == -100] == 0).all()
    ref = eager.token_logprobs(logits_of(hidden, weight, None, torch.float64), labels)
    same = eager.token_logprobs(logits_of(hidden, weight, None, dtype), labels, dtype=torch.float32)
    assert_error_bar(lp, same, ref, atol=ATOL[dtype], rtol=RTOL[dtype], name="logprob")
    g = torch.randn_like(lp)
    dh, dw = torch.autograd.grad(lp, (h, w), g)
    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    rh, rw = torch.autograd.grad(eager.token_logprobs(h64 @ w64.t(), labels), (h64, w64),
                                 g.double())
    hs = hidden.detach().clone().requires_grad_(True)
    ws = weight.detach().clone().requires_grad_(True)
    sh, sw = torch.autograd.grad(eager.token_logprobs(hs @ ws.t(), labels, dtype=torch.float32),
                                 (hs, ws), g)
    assert_error_bar(dh, sh, rh, atol=ATOL[dtype], rtol=RTOL[dtype], name="d_hidden")
    assert_error_bar(dw, sw, rw, atol=ATOL[dtype], rtol=RTOL[dtype], name="d_weight")


@pytest.mark.parametrize("which", ["hidden", "weight", "bias"])
def test_single_requires_grad(which, backend, device):
    """Only one input needs a gradient (frozen lm_head, frozen backbone, ...)."""
    hidden, weight, bias, labels = make_inputs(torch.float32, device)
    xs = {"hidden": hidden.detach().clone(), "weight": weight.detach().clone(),
          "bias": bias.detach().clone()}
    xs[which].requires_grad_(True)
    loss = L.linear_sft_loss(xs["hidden"], xs["weight"], labels, bias=xs["bias"], backend=backend)
    loss.backward()
    for k, x in xs.items():
        assert (x.grad is not None) == (k == which), k
    _, ref = run_eager("sft", hidden, weight, bias, labels, None, {}, torch.float64, None)
    idx = ["hidden", "weight", "bias"].index(which)
    assert_error_bar(xs[which].grad, ref[idx], ref[idx], atol=2e-5, rtol=1e-5, name=which)


def test_all_masked_and_zero_coefficients(backend, device):
    """No unmasked token: loss 0 and exactly-zero (not NaN) gradients."""
    hidden, weight, bias, labels = make_inputs(torch.float32, device)
    labels = torch.full_like(labels, -100)
    leaves = [x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias)]
    loss = L.linear_minor_sft_loss(*leaves[:2], labels, bias=leaves[2],
                                   ref_logprobs=torch.zeros(B, device=device), backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    for x in leaves:
        assert torch.equal(x.grad, torch.zeros_like(x)), "gradient must be exactly zero"


def test_out_of_range_label_never_read(backend, device):
    """With the range check off, a bad label gives a NaN log-prob, not a crash or a read."""
    hidden, weight, bias, labels = make_inputs(torch.float32, device)
    labels[1, 5] = V + 7
    labels[2, 6] = -3
    lp = L.linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend,
                                 check_labels=False)
    bad = torch.zeros_like(labels, dtype=torch.bool)
    bad[1, 5] = bad[2, 6] = True
    assert lp[bad].isnan().all() and not lp[~bad].isnan().any()


@pytest.mark.no_interpreter
@pytest.mark.parametrize("budget", [1, 17 * V * 4])
def test_torch_backend_chunking(budget, device):
    """Chunks of 1 row and of 17 rows (crossing sequence boundaries of a strided
    hidden, which cannot be flattened without a copy) give the default's numbers."""
    hidden, weight, bias, labels = make_inputs(torch.float32, device)
    leaves = [x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias)]
    a = L.linear_sft_loss(*leaves[:2], labels, bias=leaves[2], backend="torch",
                          memory_budget=budget)
    ga = torch.autograd.grad(a, leaves)
    b = L.linear_sft_loss(*leaves[:2], labels, bias=leaves[2], backend="torch",
                          memory_budget=linear_driver.DEFAULT_MEMORY_BUDGET)   # not the fixture's
    gb = torch.autograd.grad(b, leaves)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.no_interpreter
def test_modules_match_functions(device):
    hidden, weight, bias, labels = make_inputs(torch.float32, device)
    ref_lp = -torch.rand(B, T, device=device)
    pairs = [
        (ms.LinearSFTLoss(), L.linear_sft_loss, {}),
        (ms.LinearMinorSFTLoss(beta=0.2, return_metrics=True), L.linear_minor_sft_loss,
         {"beta": 0.2, "return_metrics": True, "ref_logprobs": ref_lp}),
        (ms.LinearMinorDPOLoss(), L.linear_minor_dpo_loss, {"ref_logprobs": ref_lp}),
        (ms.LinearDPOLoss(loss_type="ipo"), L.linear_dpo_loss,
         {"loss_type": "ipo", "ref_logprobs": ref_lp}),
    ]
    for mod, fn, kw in pairs:
        extra = {"ref_logprobs": kw["ref_logprobs"]} if "ref_logprobs" in kw else {}
        got = mod(hidden, weight, labels, bias=bias, **extra)
        want = fn(hidden, weight, labels, bias=bias, **kw)
        if isinstance(want, tuple):
            torch.testing.assert_close(got[0], want[0])
            assert got[1].keys() == want[1].keys() == {"deviation", "logps", "ref_logps"}
        else:
            torch.testing.assert_close(got, want)


@pytest.mark.no_interpreter
def test_metrics_match_logits_path(device):
    """Same epilogue as the logits path: identical metrics from the same log-probs."""
    import minorsft.functional as F
    hidden, weight, bias, labels = make_inputs(torch.float32, device)
    ref_lp = -torch.rand(B, device=device) * 30
    _, m_lin = L.linear_dpo_loss(hidden, weight, labels, bias=bias, ref_logprobs=ref_lp,
                                 return_metrics=True)
    logits = logits_of(hidden, weight, bias, torch.float32)
    _, m_log = F.dpo_loss(logits, labels, ref_logprobs=ref_lp, return_metrics=True,
                          backend="torch")
    assert m_lin.keys() == m_log.keys()
    for k in m_lin:
        torch.testing.assert_close(m_lin[k], m_log[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.no_interpreter
def test_torch_compile_fullgraph(device):
    """The custom ops trace as single nodes: no graph break, same numbers."""
    hidden, weight, bias, labels = make_inputs(torch.float32, device)
    ref_lp = -torch.rand(B, T, device=device)

    def f(h, w, c):
        return L.linear_minor_dpo_loss(h, w, labels, bias=c, ref_logprobs=ref_lp)

    leaves = [x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias)]
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(*leaves)
    g_got = torch.autograd.grad(got, leaves)
    want = f(*leaves)
    g_want = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


@pytest.mark.no_interpreter
def test_bad_input(device):
    hidden, weight, bias, labels = make_inputs(torch.float32, device)
    ref_lp = torch.zeros(B, device=device)
    with pytest.raises(ValueError, match="weight: hidden size"):
        L.linear_sft_loss(hidden, weight[:, :-1], labels)
    with pytest.raises(TypeError, match="weight: dtype"):
        L.linear_sft_loss(hidden, weight.half(), labels)
    with pytest.raises(ValueError, match=r"bias: expected shape \[V\]"):
        L.linear_sft_loss(hidden, weight, labels, bias=bias[:-1])
    with pytest.raises(TypeError, match="bias: dtype"):
        L.linear_sft_loss(hidden, weight, labels, bias=bias.double())
    with pytest.raises(ValueError, match=r"hidden: expected shape \[B, T, H\]"):
        L.linear_sft_loss(hidden[0], weight, labels)
    with pytest.raises(TypeError, match="hidden: dtype"):
        L.linear_sft_loss(hidden.long(), weight, labels)
    with pytest.raises(ValueError, match="labels: shape"):
        L.linear_sft_loss(hidden, weight, labels[:, 1:])
    with pytest.raises(ValueError, match="labels: .* outside"):
        L.linear_sft_loss(hidden, weight, torch.full_like(labels, V))
    with pytest.raises(ValueError, match="exactly one of ref_hidden or ref_logprobs"):
        L.linear_minor_sft_loss(hidden, weight, labels)
    with pytest.raises(ValueError, match="not both"):
        L.linear_minor_sft_loss(hidden, weight, labels, ref_hidden=hidden, ref_logprobs=ref_lp)
    with pytest.raises(ValueError, match="ref_weight: vocabulary size"):
        L.linear_minor_sft_loss(hidden, weight, labels, ref_hidden=hidden, ref_weight=weight[:-1])
    with pytest.raises(ValueError, match="ref_weight: hidden size"):
        L.linear_minor_sft_loss(hidden, weight, labels, ref_hidden=hidden,
                                ref_weight=weight[:, :-1])
    with pytest.raises(ValueError, match="ref_hidden: batch shape"):
        L.linear_minor_sft_loss(hidden, weight, labels, ref_hidden=hidden[:, 1:])
    with pytest.raises(ValueError, match="ref_weight/ref_bias"):
        L.linear_minor_sft_loss(hidden, weight, labels, ref_weight=weight, ref_logprobs=ref_lp)
    with pytest.raises(ValueError, match="ref_logprobs"):
        L.linear_minor_sft_loss(hidden, weight, labels, ref_logprobs=ref_lp[:-1])
    with pytest.raises(ValueError, match="even"):
        L.linear_dpo_loss(hidden[:3], weight, labels[:3], ref_logprobs=ref_lp[:3])
    with pytest.raises(ValueError, match="beta"):
        L.linear_minor_dpo_loss(hidden, weight, labels, ref_logprobs=ref_lp, beta=0.0)
    with pytest.raises(ValueError, match="memory_budget"):
        L.linear_token_logprobs(hidden, weight, labels, memory_budget=-1)
    with pytest.raises(ValueError, match="backend"):
        L.linear_token_logprobs(hidden, weight, labels, backend="cuda")


@pytest.mark.no_interpreter
def test_shared_lm_head_default(device):
    """``ref_hidden`` without ``ref_weight`` uses the policy's (frozen, shared) lm_head."""
    hidden, weight, bias, labels = make_inputs(torch.float32, device)
    ref_h = torch.randn(B, T, H, device=device)
    a = L.linear_minor_sft_loss(hidden, weight, labels, bias=bias, ref_hidden=ref_h)
    b = L.linear_minor_sft_loss(hidden, weight, labels, bias=bias, ref_hidden=ref_h,
                                ref_weight=weight, ref_bias=bias)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_strides_and_ignore_index(backend, device):
    """A transposed-view weight, a non-contiguous bias, strided labels, another
    ignore_index: no copies needed, same numbers as the float64 formula."""
    hidden, weight, _, labels = make_inputs(torch.float32, device)
    w_t = weight.t().contiguous().t()                     # [V, H] with strides (1, V)
    bias = torch.randn(V, 2, device=device)[:, 0]         # stride 2
    lab = torch.randint(0, V, (B, 2 * T), device=device)[:, ::2]
    lab[:, :3] = 7
    assert w_t.stride() == (1, V) and bias.stride() == (2,) and lab.stride(1) == 2
    leaves = [x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias)]
    lp = L.linear_token_logprobs(leaves[0], w_t.detach().requires_grad_(True), lab,
                                 bias=bias, ignore_index=7, backend=backend)
    ref = eager.token_logprobs(logits_of(hidden, weight, bias, torch.float64), lab,
                               ignore_index=7)
    assert_error_bar(lp, ref, ref, atol=2e-5, rtol=1e-5, name="logprob")
    assert (lp[lab == 7] == 0).all() and (lp[lab != 7] != 0).all()
    g = torch.randn_like(lp)
    (dh,) = torch.autograd.grad(lp, leaves[0], g)
    h64 = hidden.detach().double().requires_grad_(True)
    (rh,) = torch.autograd.grad(
        eager.token_logprobs(logits_of(h64, weight, bias, torch.float64), lab, ignore_index=7),
        h64, g.double())
    assert_error_bar(dh, rh, rh, atol=2e-5, rtol=1e-5, name="d_hidden")
