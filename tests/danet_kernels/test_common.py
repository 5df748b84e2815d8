"""danet_kernels.kernels.common: the fp32 dot precision follows torch's setting."""

import torch
import triton
import triton.language as tl

from danet_kernels.kernels.common import dot_input_precision

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


@triton.jit
def _count_kernel(Out, n):
    pid = tl.program_id(0)
    total = pid * 0
    for _ in range(pid, n):  # one bound computed from program_id, one a kernel argument
        total += 1
    tl.store(Out + pid, total)


def test_loops_over_runtime_bounds() -> None:
    """Kernel loops whose bounds are runtime scalars: triton 3.6's interpreter converts them with
    int() on a one-element array, which numpy 2.4 refuses, unless kernels/common.py's fix is in
    (run this file with triton 3.6 to see it: /work/venv-triton36/bin/python -m pytest ...)."""
    out = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    _count_kernel[(3,)](out, 5)
    assert out.tolist() == [5, 4, 3]
