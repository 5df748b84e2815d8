"""danet_kernels.kernels.common: the fp32 dot precision follows torch's setting."""

import torch

from danet_kernels.kernels.common import dot_input_precision


def test_fp32_dot_precision_follows_torch() -> None:
    """IEEE fp32 by default (as exact as the reference's matmuls), TF32 where torch allows it,
    through either of torch's setters; 16-bit inputs always take the tensor-core path."""
    assert dot_input_precision(torch.float32) == "ieee"
    assert dot_input_precision(torch.bfloat16) == dot_input_precision(torch.float16) == "tf32"
    previous_precision = torch.get_float32_matmul_precision()
    previous_allow = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.set_float32_matmul_precision("high")
        assert dot_input_precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert dot_input_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_input_precision(torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_allow
        torch.set_float32_matmul_precision(previous_precision)
    assert dot_input_precision(torch.float32) == "ieee"
