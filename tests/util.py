"""Test helpers: random inputs, a verbose error-bar assertion, fused-linear chunk plans,
the repository root and a subprocess environment that imports this checkout."""
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(**extra) -> dict:
    """This process's environment plus ``extra``, with :data:`ROOT` first on
    ``PYTHONPATH``: a child ``python`` imports this checkout's ``minorsft`` and ``tests``."""
    return dict(os.environ, **extra, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def make_batch(B, T, V, dtype, device, *, scale=3.0, mask_frac=0.2, stride_view=True):
    """Random logits ``[B, T, V]`` (a strided ``[:, :-1]`` view by default) and labels.

    Labels include ignore_index (-100) positions, always masked prompt prefixes.
    """
    full = (torch.randn(B, T + 1, V, device=device) * scale).to(dtype)
    logits = full[:, :-1] if stride_view else full[:, :T].contiguous()
    labels = torch.randint(0, V, (B, T), device=device)
    labels[torch.rand(B, T, device=device) < mask_frac] = -100
    labels[:, :2] = -100
    return logits, labels


def assert_error_bar(ours, eager_same, ref, *, atol, rtol=0.0, name="value"):
    """``max|ours - ref| <= max|eager_same - ref| + atol + rtol * max|ref|``.

    ``ref`` is the float64 ground truth; ``eager_same`` the eager formula in the input
    dtype. NaN in ``ours`` where ``ref`` is finite always fails.
    """
    ours = ours.detach().double().cpu()
    ref = ref.detach().double().cpu()
    eager_same = eager_same.detach().double().cpu()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    bad_nan = torch.isnan(ours) & ~torch.isnan(ref)
    assert not bad_nan.any(), f"{name}: NaN at {bad_nan.nonzero()[:5].tolist()}"
    err = (ours - ref).abs().nan_to_num(0.0)
    err_eager = (eager_same - ref).abs().nan_to_num(0.0).max().item()
    bound = err_eager + atol + rtol * ref.abs().nan_to_num(0.0).max().item()
    if err.numel() and err.max().item() > bound:
        idx = err.flatten().argmax().item()
        raise AssertionError(
            f"{name}: max error {err.max().item():.3e} > bound {bound:.3e} "
            f"(eager same-dtype error {err_eager:.3e}); worst at flat index {idx}: "
            f"ours={ours.flatten()[idx].item():.8g} ref={ref.flatten()[idx].item():.8g}")


def grad_of(fn, x, upstream, dtype=None):
    """Gradient of ``sum(fn(leaf) * upstream)`` w.r.t. a fresh leaf copy of ``x``.

    ``dtype=None`` keeps ``x``'s dtype (eager in the input dtype); ``torch.float64``
    gives the ground truth without rounding the gradient back to ``x``'s dtype.
    """
    leaf = x.detach().to(dtype or x.dtype).requires_grad_(True)
    out = fn(leaf)
    (g,) = torch.autograd.grad(out, leaf, upstream.to(out.dtype))
    return g


def chunk_rows(monkeypatch, request, rows: int, v: int) -> list:
    """Make the fused linear path cut its work into chunks of ``rows`` rows for this test.

    The budget (``MINORSFT_LINEAR_CHUNK_BYTES``) is in bytes and the driver divides it by
    the compute dtype's element size, so it is set for the test's ``dtype`` parameter
    (fp32 without one) and its ``v`` parameter (``v`` without one). Returns the list of
    ``(rows to score, rows a chunk)`` of every call that took the budget from the
    environment, for the caller to check the plan.
    """
    from minorsft.kernels import linear as KL
    params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
    dtype, v = params.get("dtype", torch.float32), params.get("v", v)
    monkeypatch.setenv("MINORSFT_LINEAR_CHUNK_BYTES", str(rows * v * dtype.itemsize))
    seen, prepare = [], KL._prepare

    def spy(*args, **kwargs):
        out = prepare(*args, **kwargs)
        if kwargs.get("memory_budget") is None:   # a call's own budget is not the plan's
            seen.append((out[0].n, out[2]))
        return out

    monkeypatch.setattr(KL, "_prepare", spy)
    return seen
