"""Seeded, device-aware fixtures shared by the suite.

The suite runs the Triton kernels under TRITON_INTERPRET=1 on CPU tensors and
natively on CUDA when a GPU is present; the PyTorch backend runs everywhere.
Kernel outputs are NaN-poisoned before the kernels write them.
"""
import os
import zlib

os.environ.setdefault("MINORSFT_DEBUG_POISON", "1")
# The training-loop tests check loop logic (exact resume, DDP == one process) in fp32
# on the CPU, also on a GPU machine (subprocesses inherit this); test_train_cuda.py
# runs the loop on the GPU on purpose.
os.environ.setdefault("MINORSFT_DEVICE", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# CUDA: both backends natively. CPU: the Triton kernels under the interpreter run,
# the PyTorch backend in the plain run (`make test` does both runs).
if DEVICE == "cuda":
    BACKENDS = ["triton", "torch"]
elif INTERPRETING:
    BACKENDS = ["triton"]
else:
    BACKENDS = ["torch"]


@pytest.fixture(autouse=True)
def _seed(request):
    """A fresh, reproducible seed per test (derived from its id), and a clean label flag
    (a test that feeds bad labels on purpose must not leak them into the next one)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    import minorsft as ms
    ms.take_label_errors(DEVICE)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def pytest_report_header(config):
    return (f"minorsft tests: device={DEVICE} backends={BACKENDS} "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
