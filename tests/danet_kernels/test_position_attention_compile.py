"""The fused PAM custom ops under torch.library.opcheck and torch.compile(fullgraph=True).

On a GPU the ops are ``torch.library.triton_op``s and compile with Inductor. Without one, the
kernels run through Triton's interpreter, where the ops are opaque ``custom_op``s (see the note
above ``_define_op`` in the kernel module): opcheck checks the same schema, fake kernels and
autograd registration, and compilation uses ``backend="aot_eager"`` because Inductor cannot
compile user Triton kernels for CPU tensors.
"""

from __future__ import annotations

import pytest
import torch

import danet_kernels
from danet_kernels.kernels import position_attention as pam  # noqa: F401 - registers the ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COMPILE_BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"


def make_inputs(with_gamma: bool, requires_grad: bool) -> tuple[torch.Tensor | None, ...]:
    batch, head_dim, channels, n = 2, 5, 40, 37
    q = torch.randn(batch, head_dim, n, device=DEVICE) * 0.5
    k = torch.randn(batch, n, head_dim, device=DEVICE).transpose(1, 2) * 0.5  # non-contiguous
    v = torch.randn(batch, channels, n, device=DEVICE)
    gamma = torch.full((1,), 0.5, device=DEVICE) if with_gamma else None
    residual = torch.randn(batch, channels, n, device=DEVICE) if with_gamma else None
    return tuple(
        t if t is None else t.requires_grad_(requires_grad) for t in (q, k, v, gamma, residual)
    )


@pytest.mark.parametrize("with_gamma", [True, False])
def test_opcheck_forward(with_gamma: bool) -> None:
    torch.library.opcheck(torch.ops.danet_kernels.pam_forward.default,
                          (*make_inputs(with_gamma, True), 0.5, True))


def test_opcheck_with_fewer_keys_than_queries() -> None:
    """M = 13 keys for N = 37 queries: the fake kernels' shapes follow the real ones."""
    q, k, v, gamma, residual = make_inputs(True, True)
    keys = (k[..., :13].detach().requires_grad_(), v[..., :13].detach().requires_grad_())
    torch.library.opcheck(torch.ops.danet_kernels.pam_forward.default, (q, *keys, gamma, residual, 0.5, True))
    _, out, lse = torch.ops.danet_kernels.pam_forward(q, *keys, gamma, residual, 0.5, True)
    dy = torch.randn_like(residual)
    args = (dy, q.detach(), keys[0].detach(), keys[1].detach(), gamma.detach(), 0.5, out, lse)
    torch.library.opcheck(torch.ops.danet_kernels.pam_backward.default, args)


def test_opcheck_backward() -> None:
    q, k, v, gamma, residual = make_inputs(True, False)
    _, out, lse = torch.ops.danet_kernels.pam_forward(q, k, v, gamma, residual, 0.5, True)
    dy = torch.randn_like(v)
    torch.library.opcheck(torch.ops.danet_kernels.pam_backward.default, (dy, q, k, v, gamma, 0.5, out, lse))


def test_compile_fullgraph_forward_and_backward() -> None:
    """The public API compiles without graph breaks and matches eager, gradients included."""

    def pam_step(q, k, v, gamma, residual):
        y = danet_kernels.position_attention(q, k, v, gamma=gamma, residual=residual, scale=0.5,
                                             backend="triton")
        return (y * y).sum()

    compiled = torch.compile(pam_step, fullgraph=True, backend=COMPILE_BACKEND)
    eager_inputs = make_inputs(True, True)
    compiled_inputs = tuple(t.detach().clone().requires_grad_() for t in eager_inputs)
    eager_loss = pam_step(*eager_inputs)
    eager_loss.backward()
    compiled_loss = compiled(*compiled_inputs)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    for eager, compiled_leaf in zip(eager_inputs, compiled_inputs, strict=True):
        torch.testing.assert_close(compiled_leaf.grad, eager.grad)


def test_compiled_module_matches_reference() -> None:
    """The drop-in PAM_Module compiled with fullgraph=True against the reference module."""
    from danet_kernels.reference import PAM_Module as ReferencePAM

    reference = ReferencePAM(64).to(DEVICE)
    with torch.no_grad():
        reference.gamma.fill_(0.5)
    fused = danet_kernels.PAM_Module(64).to(DEVICE)
    fused.load_state_dict(reference.state_dict())
    compiled = torch.compile(fused, fullgraph=True, backend=COMPILE_BACKEND)
    height, width = (33, 31) if DEVICE == "cuda" else (7, 9)
    x = torch.randn(2, 64, height, width, device=DEVICE)
    torch.testing.assert_close(compiled(x), reference(x), atol=1e-4, rtol=1e-4)
    compiled(x).sum().backward()
    reference(x).sum().backward()
    for (name, p_fused), p_ref in zip(fused.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p_fused.grad, p_ref.grad, atol=1e-3, rtol=1e-3, msg=name)
