"""Tests run on the CPU: Triton kernels through its interpreter, which must be switched on
before triton is first imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from harness.check.bounds import checked_bounds  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _bounds_checked():
    """Every interpreted load and store must stay inside its launch's tensors (harness.check.bounds):
    a stray access raises instead of reading a neighbour's memory."""
    with checked_bounds(os.environ.get("TRITON_INTERPRET") == "1"):
        yield
