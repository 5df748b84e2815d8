"""Channel attention (CAM): the bmm reference against danet_kernels, side by side.

Run ``pytest benchmarks/test_channel_attention.py --benchmark-only``. Each group is one
problem (pass, variant, shape); its rows are the implementations:

* ``reference``: ``danet_kernels.reference.channel_attention_reference``, the original
  module's bmm / softmax(rowmax - energy) / bmm;
* ``triton`` (CUDA only): ``channel_attention(x, backend="triton")``;
* ``blockwise``: ``channel_attention(x, backend="torch")``.

The input is random normal (B, C, N) as in the peer baseline; every implementation computes
the plain attention output, without DANet's ``gamma * out + x`` epilogue. The float64 check
uses the reference (its C x C matrix is small at any N).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from benchmarks.harness import (
    ON_CUDA,
    PASSES,
    VARIANTS,
    AttentionShape,
    Variant,
    attention_shapes,
    cam_inputs,
    describe_case,
    error_vs_float64,
    make_step,
    run_benchmark,
)
from danet_kernels import channel_attention
from danet_kernels.reference import channel_attention_reference

IMPLS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "reference": channel_attention_reference,
    **({"triton": lambda x: channel_attention(x, backend="triton")} if ON_CUDA else {}),
    "blockwise": lambda x: channel_attention(x, backend="torch"),
}


# Shapes outermost, implementations innermost: a run cut short by --bench-deadline keeps whole
# groups (every implementation of a problem) of the shapes it reached.
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("shape", attention_shapes(), ids=lambda s: s.id)
def test_cam(benchmark, impl: str, pass_: str, variant: Variant, shape: AttentionShape) -> None:
    """Time one CAM forward or forward+backward; record peak memory, FLOPs and the float64 error."""
    describe_case(benchmark, "cam", impl, pass_, variant, shape)
    torch.manual_seed(0)
    x, grad_out = cam_inputs(shape, variant.dtype)
    inputs = [x.requires_grad_(pass_ != "forward")]
    fn = IMPLS[impl]
    with variant.active():
        run_benchmark(
            benchmark,
            make_step(fn, inputs, pass_, grad_out),
            check=lambda: error_vs_float64(fn, inputs, grad_out, pass_, channel_attention_reference, [x],
                                           grad_out),
        )
