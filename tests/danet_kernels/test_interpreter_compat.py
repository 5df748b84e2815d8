"""danet_kernels.kernels.interpreter_compat: kernel loops over runtime bounds in the interpreter."""

import torch
import triton
import triton.language as tl

from danet_kernels.kernels.interpreter_compat import squeeze_scalar_index

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _count_kernel(Out, n):
    pid = tl.program_id(0)
    total = pid * 0
    for _ in range(pid, n):  # one bound computed from program_id, one a kernel argument
        total += 1
    tl.store(Out + pid, total)


def test_loops_over_runtime_bounds() -> None:
    """Kernel loops whose bounds are runtime scalars: triton 3.6's interpreter converts them with
    int() on a one-element array, which numpy 2.4 refuses, unless interpreter_compat's fix is in
    (run this file with triton 3.6 to see it: /work/venv-triton36/bin/python -m pytest ...)."""
    squeeze_scalar_index()  # what the kernel modules do at import under the interpreter
    out = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    _count_kernel[(3,)](out, 5)
    assert out.tolist() == [5, 4, 3]
