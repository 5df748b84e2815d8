"""The drop-in PAM_Module / CAM_Module against the reference modules they replace."""

from __future__ import annotations

import copy

import pytest
import torch

import danet_kernels
from danet_kernels import _dispatch, reference

MODULES = {
    "pam": (reference.PAM_Module, danet_kernels.PAM_Module),
    "cam": (reference.CAM_Module, danet_kernels.CAM_Module),
}


def _pair(kind: str, channels: int = 16, gamma: float = 0.7):
    """A reference module with random weights and a non-zero gamma, and ours loaded from its state_dict."""
    ref_cls, our_cls = MODULES[kind]
    ref = ref_cls(channels)
    with torch.no_grad():
        ref.gamma.fill_(gamma)
    ours = our_cls(channels)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _input(kind: str, shape=(2, 16, 5, 7)) -> torch.Tensor:
    # CAM energies grow with N; a 0.3 scale keeps its softmax away from one-hot at these sizes.
    return torch.randn(shape) * (0.3 if kind == "cam" else 1.0)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """Largest error relative to the expected tensor's largest magnitude (or ``floor``, if larger)."""
    scale = max(expected.double().abs().max().item(), floor)
    return (actual.double() - expected.double()).abs().max().item() / scale


@pytest.mark.parametrize("kind", ["pam", "cam"])
def test_state_dict_keys_match_both_ways(kind):
    ref, ours = _pair(kind)
    assert list(ref.state_dict()) == list(ours.state_dict())
    back = MODULES[kind][0](16)
    back.load_state_dict(ours.state_dict(), strict=True)  # and ours loads into the reference
    for (name, a), b in zip(back.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("kind", ["pam", "cam"])
def test_loaded_checkpoint_gives_the_same_output(kind, backend):
    ref, ours = _pair(kind)
    x = _input(kind)
    with danet_kernels.use_backend(backend):
        torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("kind", ["pam", "cam"])
def test_triton_backend_module_tiny(kind):
    """One tiny case through the Triton kernels (the interpreter on a CPU, the kernels on a GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not (_dispatch.triton_importable() and _dispatch.triton_interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 with triton installed")
    ref, ours = (m.to(device) for m in _pair(kind))
    x = _input(kind, (1, 16, 3, 5)).to(device)
    with danet_kernels.use_backend("triton"):
        out = ours(x)
    torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["pam", "cam"])
def test_every_gradient_matches_float64_reference(kind):
    """Input, conv weights and biases, gamma: ours in fp32 (blockwise) against the reference in float64."""
    ref, ours = _pair(kind)
    ref64 = copy.deepcopy(ref).double()
    x = _input(kind)
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    with danet_kernels.use_backend("torch"):
        out = ours(x32)
    out.backward(grad_out.float())
    expected = ref64(x64)
    expected.backward(grad_out)
    assert _rel_err(out, expected) <= 1e-5
    assert _rel_err(x32.grad, x64.grad) <= 1e-5
    ref_params = dict(ref64.named_parameters())
    names = [name for name, _ in ours.named_parameters()]
    assert names == list(ref_params) and "gamma" in names
    # key_conv.bias's true gradient is exactly 0 (it shifts a whole softmax row), so fp32
    # rounding is measured against a floor: a hundredth of the largest parameter gradient.
    floor = 1e-2 * max(p.grad.abs().max().item() for p in ref64.parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert _rel_err(p.grad, ref_params[name].grad, floor) <= 1e-5, name


@pytest.mark.parametrize("kind", ["pam", "cam"])
def test_gamma_zero_at_init_returns_input(kind):
    x = _input(kind)
    with danet_kernels.use_backend("torch"):
        torch.testing.assert_close(MODULES[kind][1](16)(x), x, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["pam", "cam"])
def test_channels_last_input(kind):
    ref, ours = _pair(kind)
    x = _input(kind)
    x_cl = x.clone().to(memory_format=torch.channels_last).requires_grad_()
    x_c = x.clone().requires_grad_()
    with danet_kernels.use_backend("torch"):
        out_cl, out_c = ours(x_cl), ours(x_c)
    torch.testing.assert_close(out_cl, out_c)
    torch.testing.assert_close(out_cl, ref(x))
    grad = torch.randn(x.shape)
    out_cl.backward(grad)
    out_c.backward(grad)
    torch.testing.assert_close(x_cl.grad, x_c.grad)


@pytest.mark.parametrize("kind", ["pam", "cam"])
def test_autocast_bf16_on_cpu(kind):
    """Under CPU autocast the PAM convs give bf16 while x stays fp32 (the unfused-add path), and
    CAM gets fp32 x. Ours must be at least as close to the fp32 result as the reference under
    the same autocast, and backward must run with fp32 parameter gradients."""
    ref, ours = _pair(kind)
    x = _input(kind, (1, 16, 8, 8))
    exact = ref(x)
    with torch.autocast("cpu", dtype=torch.bfloat16), danet_kernels.use_backend("torch"):
        out = ours(x)
        ref_out = ref(x)
    assert out.dtype == ref_out.dtype
    assert _rel_err(out, exact) <= max(2 * _rel_err(ref_out, exact), 1e-5)
    out.float().sum().backward()
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("kind", ["pam", "cam"])
def test_modules_compile_fullgraph(kind, monkeypatch):
    """torch.compile(fullgraph=True) traces the module, dispatch and the blockwise Functions with no
    graph break (aot_eager: AOTAutograd builds the backward graph too, without a C++ compile)."""
    monkeypatch.setattr(_dispatch, "triton_interpreting", lambda: False)  # auto -> blockwise
    torch._dynamo.reset()
    _, ours = _pair(kind)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x = _input(kind)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = compiled(x_compiled)
    expected = ours(x_eager)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), [x_compiled, *ours.parameters()])
    expected_grads = torch.autograd.grad(expected.sum(), [x_eager, *ours.parameters()])
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("kind", ["pam", "cam"])
def test_module_rejects_non_4d_input(kind):
    with pytest.raises(ValueError, match=r"expects \(B, C, H, W\)"):
        MODULES[kind][1](16)(torch.randn(2, 16, 35))


def test_extra_repr_names_in_dim():
    assert "in_dim=32" in repr(danet_kernels.PAM_Module(32))
    assert "in_dim=32" in repr(danet_kernels.CAM_Module(32))
