"""torch.compile and torch.library checks for the fused channel attention ops.

On a GPU the ops are ``triton_op``s that Inductor traces into. Under the Triton interpreter (CPU
CI) the kernels cannot run on fake tensors, so the ops are opaque ``custom_op``s with fake
implementations, and the CPU tests compile with ``backend="aot_eager"`` (Dynamo + AOTAutograd,
no code generation); Inductor with user Triton kernels needs a GPU and is tested there.
"""

from __future__ import annotations

import pytest
import torch

import danet_kernels
import danet_kernels.kernels.channel_attention  # registers the danet_kernels::cam_* ops

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(requires_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = (torch.randn(2, 5, 19, device=DEVICE) * 0.3).requires_grad_(requires_grad)
    gamma = torch.full((1,), 0.6, device=DEVICE, requires_grad=requires_grad)
    return x, gamma


def test_opcheck_forward() -> None:
    """Schema, fake tensor, autograd registration and AOT dispatch of ``cam_forward``."""
    x, gamma = make_inputs(requires_grad=True)
    torch.library.opcheck(torch.ops.danet_kernels.cam_forward.default, (x, gamma))
    torch.library.opcheck(torch.ops.danet_kernels.cam_forward.default, (x.detach(), None))


def test_opcheck_backward() -> None:
    x, gamma = make_inputs(requires_grad=False)
    _, attention = torch.ops.danet_kernels.cam_forward(x, gamma)
    grad_y = torch.randn_like(x)
    for needs_grad_x in (True, False):  # False: dgamma only, an empty dx
        torch.library.opcheck(torch.ops.danet_kernels.cam_backward.default,
                              (grad_y, x, attention, gamma, needs_grad_x))


def compile_and_compare(backend: str) -> None:
    """fullgraph=True (a graph break is an error): forward and both gradients equal eager's."""

    def cam(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return danet_kernels.channel_attention(x, gamma=gamma, backend="triton")

    compiled = torch.compile(cam, fullgraph=True, backend=backend)
    inputs = make_inputs(requires_grad=False)
    results = []
    for fn in (cam, compiled):
        x, gamma = (t.clone().requires_grad_() for t in inputs)
        y = fn(x, gamma)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), x.grad, gamma.grad))
    for eager, traced in zip(*results, strict=True):
        torch.testing.assert_close(traced, eager, atol=0, rtol=0)


def test_compile_fullgraph_aot_eager() -> None:
    torch._dynamo.reset()
    compile_and_compare("aot_eager")


def test_compile_cam_module_fullgraph() -> None:
    """The drop-in module compiles without a graph break; output and gamma's gradient match eager."""
    torch._dynamo.reset()
    module = danet_kernels.CAM_Module(6).to(DEVICE)
    with torch.no_grad():
        module.gamma.fill_(0.5)
    x = torch.randn(2, 6, 3, 5, device=DEVICE) * 0.3
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with danet_kernels.use_backend("triton"):
        eager = module(x)
        eager.sum().backward()
        eager_grad = module.gamma.grad.clone()
        module.gamma.grad = None
        traced = compiled(x)
        traced.sum().backward()
    torch.testing.assert_close(traced, eager, atol=0, rtol=0)
    torch.testing.assert_close(module.gamma.grad, eager_grad, atol=0, rtol=0)


@pytest.mark.gpu
@requires_cuda
def test_compile_fullgraph_inductor() -> None:
    torch._dynamo.reset()
    compile_and_compare("inductor")
