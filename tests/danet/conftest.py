"""danet tests run the model with the blockwise PyTorch backend.

The root conftest sets TRITON_INTERPRET=1 on machines without a GPU, which would make
backend="auto" run the Triton kernels through the (slow) interpreter inside every model
test. The kernels have their own interpreter tests in tests/danet_kernels; here the model,
data and trainer are under test, so the switch is set to the blockwise backend.
"""

import pytest
import torch

import danet_kernels


@pytest.fixture(autouse=True)
def _blockwise_attention_on_cpu():
    if torch.cuda.is_available():
        yield
        return
    with danet_kernels.use_backend("torch"):
        yield
