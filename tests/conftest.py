"""Test-wide setup: run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is imported, so this happens at the top of the
root conftest, before any test module imports danet_kernels' kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

# pytest -n 2 on a 2-core machine: one thread per worker. Several intra-op threads per
# process spin against each other there and run 10 to 50 times slower.
torch.set_num_threads(1)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Fresh but reproducible random inputs in every test."""
    torch.manual_seed(0)
