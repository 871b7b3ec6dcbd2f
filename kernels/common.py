"""Launcher helpers shared by the kernel files (no Triton import: the PyTorch
backends use them too)."""
import os

import torch

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def alloc_output(shape, dtype, device) -> torch.Tensor:
    """An output buffer the kernel must fill entirely.

    NaN-poisoned when ``MINORSFT_DEBUG_POISON=1`` (the test suite sets it), so an
    element a kernel forgets to write shows up as NaN instead of stale memory.
    """
    if os.environ.get("MINORSFT_DEBUG_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
