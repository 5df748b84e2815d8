"""The blockwise PyTorch backend (danet_kernels.blockwise) against the float64 reference.

Every case goes through the public functions with ``backend="torch"``, compares the output
and every gradient with danet_kernels.reference computed in float64 on the same (rounded)
inputs, and runs with the default block budget and with a tiny one, so that small N is cut
into many query/column blocks (the budget is what decides the tiling, whatever N is).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import danet_kernels
from danet_kernels import blockwise
from danet_kernels.reference import channel_attention_reference, position_attention_reference

# (B, d, C, N): N = 7*13, N = 1, C > N, N > C, a prime N, C = 3 and C = 40
PAM_SHAPES = [(2, 8, 16, 91), (1, 4, 3, 1), (1, 8, 70, 20), (2, 4, 40, 37), (1, 3, 5, 200)]
# (B, C, N): C = 3, C = 40, N = 1, N = 7*13, C > N, N >> C
CAM_SHAPES = [(2, 3, 91), (1, 40, 37), (2, 5, 1), (1, 24, 7), (1, 4, 300)]


@pytest.fixture(params=["one_block", "many_blocks"])
def block_budget(request, monkeypatch) -> int:
    """The default budget (one block at these sizes) or 64 elements (many blocks, ragged tails)."""
    if request.param == "many_blocks":
        monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", 64)
    return blockwise.BLOCK_ELEMENTS


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute error, relative to the expected tensor's largest magnitude."""
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _pam_inputs(shape, dtype=torch.float32, gamma=True):
    b, d, c, n = shape
    q, k = torch.randn(b, d, n, dtype=dtype), torch.randn(b, d, n, dtype=dtype)
    v, residual = torch.randn(b, c, n, dtype=dtype), torch.randn(b, c, n, dtype=dtype)
    g = torch.tensor([0.75]) if gamma else None
    return q, k, v, g, residual if gamma else None


def _pam_ref64(q, k, v, gamma, residual):
    out = position_attention_reference(q.double(), k.double(), v.double())
    return out if gamma is None else gamma.double() * out + residual.double()


def _cam_ref64(x, gamma):
    out = channel_attention_reference(x.double())
    return out if gamma is None else gamma.double() * out + x.double()


def _forward_and_grads(fn, inputs, grad_out):
    """Run fn on leaf copies of inputs (None stays None); return the output and the input gradients."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out.to(out.dtype))
    return out, grads


def _pam_torch(q, k, v, gamma, residual):
    return danet_kernels.position_attention(q, k, v, gamma=gamma, residual=residual, backend="torch")


def _cam_torch(x, gamma):
    return danet_kernels.channel_attention(x, gamma=gamma, backend="torch")


def _check_against_ref64(fn, ref64, inputs, tol):
    inputs = tuple(inputs)
    # PAM's output is (B, C, N): v's channels at q's positions (v has M, the keys')
    shape = (*inputs[2].shape[:2], inputs[0].shape[2]) if len(inputs) == 5 else inputs[0].shape
    grad_out = torch.randn(shape, dtype=torch.float64)
    out, grads = _forward_and_grads(fn, inputs, grad_out)
    ref, ref_grads = _forward_and_grads(ref64, [None if t is None else t.double() for t in inputs], grad_out)
    assert out.dtype == inputs[0].dtype and out.shape == ref.shape
    assert _rel_err(out, ref) <= tol, "output"
    leaves = [t for t in inputs if t is not None]
    for i, (t, g, rg) in enumerate(zip(leaves, grads, ref_grads, strict=True)):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert _rel_err(g, rg) <= tol, f"gradient of input {i}"


# ---------------------------------------------------------------- PAM: fp32 / float64 exactness


@pytest.mark.parametrize("shape", PAM_SHAPES, ids=str)
@pytest.mark.parametrize("with_gamma", [True, False], ids=["gamma_residual", "plain"])
def test_pam_fp32_forward_and_gradients(shape, with_gamma, block_budget):
    _check_against_ref64(_pam_torch, _pam_ref64, _pam_inputs(shape, gamma=with_gamma), tol=2e-5)


# (B, d, C, N, M): keys and values pooled below N (a non-local block's sub_sample), more keys
# than queries, two keys, a single query; d = C / 2 as non-local blocks have it (one key: dq = dk = 0
# exactly, which a relative error cannot judge; the Triton tests have it).
@pytest.mark.parametrize(
    "shape", [(2, 8, 16, 91, 23), (1, 3, 40, 20, 45), (1, 4, 8, 13, 2), (2, 5, 10, 1, 7)], ids=str)
@pytest.mark.parametrize("scale", [0.125, 2.0])
def test_pam_scale_and_key_length_match_float64(shape, scale, block_budget):
    b, d, c, n, m = shape
    q, k, v = torch.randn(b, d, n), torch.randn(b, d, m), torch.randn(b, c, m)
    inputs = (q, k, v, torch.tensor([0.75]), torch.randn(b, c, n))

    def pam_torch(q, k, v, gamma, residual):
        return danet_kernels.position_attention(q, k, v, gamma=gamma, residual=residual, scale=scale,
                                                backend="torch")

    def ref64(q, k, v, gamma, residual):
        return gamma * position_attention_reference(q, k, v, scale) + residual

    _check_against_ref64(pam_torch, ref64, inputs, tol=2e-5)


@pytest.mark.parametrize("shape", PAM_SHAPES[:2], ids=str)
def test_pam_float64_stays_float64(shape, block_budget):
    q, k, v, g, r = _pam_inputs(shape, torch.float64)
    _check_against_ref64(_pam_torch, _pam_ref64, (q, k, v, g.double(), r), tol=1e-12)


def test_pam_gradient_dtypes_follow_inputs():
    q, k, v, _, r = _pam_inputs((1, 4, 6, 10), torch.float16)
    gamma = torch.tensor([0.5], dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, gamma, r)]
    out = _pam_torch(*leaves)
    assert out.dtype == torch.float16 and out.is_contiguous()
    out.sum().backward()
    assert [t.grad.dtype for t in leaves] == [torch.float16] * 3 + [torch.float64, torch.float16]
    assert leaves[3].grad.shape == gamma.shape


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_pam_non_contiguous_inputs(layout, block_budget):
    b, d, c, n = 2, 8, 24, 45
    if layout == "transposed":  # (B, N, ch) storage seen as (B, ch, N), as channels_last gives
        q, k, v, r = (torch.randn(b, n, ch).transpose(1, 2) for ch in (d, d, c, c))
    else:  # every other column of a wider tensor
        q, k, v, r = (torch.randn(b, ch, 2 * n)[:, :, ::2] for ch in (d, d, c, c))
    assert not any(t.is_contiguous() for t in (q, k, v, r))
    _check_against_ref64(_pam_torch, _pam_ref64, (q, k, v, torch.tensor([1.3]), r), tol=2e-5)


def test_pam_gamma_zero_still_has_gradients():
    """gamma starts at 0 in the module: dgamma must still be sum(dY * O), and dq, dk, dv zero."""
    q, k, v, _, r = _pam_inputs((1, 4, 6, 30))
    _check_against_ref64(_pam_torch, _pam_ref64, (q, k, v, torch.zeros(1), r), tol=2e-5)


@pytest.mark.parametrize(
    "wanted", [(3,), (2,), (4,), (0, 1), (0, 3)], ids=["gamma", "v", "residual", "qk", "q_gamma"]
)
def test_pam_partial_gradients(wanted, block_budget):
    """Only some inputs require grad (frozen features, a trained gamma): those match, the rest stay None."""
    inputs = _pam_inputs((2, 4, 6, 29))
    leaves = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
    refs = [t.double().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
    grad_out = torch.randn(inputs[2].shape, dtype=torch.float64)
    _pam_torch(*leaves).backward(grad_out.float())
    _pam_ref64(*refs).backward(grad_out)
    for i, (t, r) in enumerate(zip(leaves, refs, strict=True)):
        if i in wanted:
            assert _rel_err(t.grad, r.grad) <= 2e-5, i
        else:
            assert t.grad is None, i


# ---------------------------------------------------------------- PAM: fp16 / bf16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 8, 16, 91), (1, 16, 40, 300)], ids=str)
def test_pam_low_precision_within_reference_error(dtype, shape, block_budget):
    """flash-attn style: the error against float64 is at most that of the reference run in dtype.

    Both see the same rounded inputs; the reference computes in dtype (as an autocast model
    would), the blockwise backend in fp32 and rounds once, so it is usually far better.
    """
    q, k, v, g, r = _pam_inputs(shape, dtype)
    grad_out = torch.randn(v.shape, dtype=torch.float64)
    inputs = (q, k, v, g, r)
    out, grads = _forward_and_grads(_pam_torch, inputs, grad_out)
    ref, ref_grads = _forward_and_grads(_pam_ref64, [t.double() for t in inputs], grad_out)
    low, low_grads = _forward_and_grads(
        lambda q, k, v, g, r: g * position_attention_reference(q, k, v) + r, inputs, grad_out
    )
    eps = torch.finfo(dtype).eps
    assert out.dtype == dtype
    assert _rel_err(out, ref) <= 2 * _rel_err(low, ref) + eps
    for g, rg, lg in zip(grads, ref_grads, low_grads, strict=True):
        assert _rel_err(g, rg) <= 3 * _rel_err(lg, rg) + eps


# ---------------------------------------------------------------- PAM: extremes


def test_pam_huge_energies_finite_like_reference(block_budget):
    """q, k scaled by 30: the softmax saturates; no NaN wherever the reference is finite."""
    q, k, v, g, r = _pam_inputs((2, 8, 12, 64))
    q, k = 30 * q, 30 * k
    out, grads = _forward_and_grads(_pam_torch, (q, k, v, g, r), torch.ones(v.shape))
    ref32 = g * position_attention_reference(q, k, v) + r
    assert torch.isfinite(ref32).all() and torch.isfinite(out).all()
    assert all(torch.isfinite(t).all() for t in grads)
    assert _rel_err(out, _pam_ref64(q, k, v, g, r)) <= 1e-4


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_pam_nan_inf_propagate_like_reference(where, value):
    q, k, v, _, _ = _pam_inputs((1, 4, 5, 12), gamma=False)
    {"q": q, "k": k, "v": v}[where][0, 1, 3] = value
    out = _pam_torch(q, k, v, None, None)
    ref = position_attention_reference(q, k, v)
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isinf(), ref.isinf())


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled float tensors: an element a backend forgets to write shows."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


@pytest.mark.parametrize("shape", [(2, 4, 6, 37), (3, 3, 5, 8)], ids=str)
def test_every_element_is_written(shape, block_budget, poisoned_empty):
    """Outputs and gradients are allocated uninitialised and filled block by block: none left out."""
    _check_against_ref64(_pam_torch, _pam_ref64, _pam_inputs(shape), tol=2e-5)
    _check_against_ref64(_pam_torch, _pam_ref64, _pam_inputs(shape, gamma=False), tol=2e-5)
    x = 0.3 * torch.randn(shape[0], shape[2], shape[3])
    _check_against_ref64(_cam_torch, _cam_ref64, (x, torch.tensor([0.6])), tol=2e-5)
    _check_against_ref64(_cam_torch, _cam_ref64, (x, None), tol=2e-5)


# ---------------------------------------------------------------- PAM: memory


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("batch", [1, 3])
def test_pam_never_materialises_n_by_n(batch, monkeypatch):
    """No op in forward or backward produces a tensor with N*N elements; saved tensors are O(N*C).

    N = 400 > C + d, with a budget of N*N/4 elements: a full (B, N, N) energy would show.
    The same probe on the reference sees it, so the probe can fail.
    """
    n, d, c = 400, 8, 32
    monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", n * n // 4)
    q, k, v, g, r = (t.requires_grad_() for t in _pam_inputs((batch, d, c, n)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        with _LargestTensor() as probe:
            out = _pam_torch(q, k, v, g, r)
            out.backward(torch.ones_like(out))
    assert probe.largest < n * n, probe.largest
    assert max(saved) <= batch * c * n
    assert sum(saved) <= 4 * batch * c * n  # q, k, v, gamma, O and the (B, N) log-sum-exp

    with _LargestTensor() as probe:
        position_attention_reference(q, k, v)
    assert probe.largest >= n * n


# ---------------------------------------------------------------- CAM


@pytest.mark.parametrize("shape", CAM_SHAPES, ids=str)
@pytest.mark.parametrize("with_gamma", [True, False], ids=["gamma_residual", "plain"])
def test_cam_fp32_forward_and_gradients(shape, with_gamma, block_budget):
    x = 0.3 * torch.randn(shape)
    _check_against_ref64(_cam_torch, _cam_ref64, (x, torch.tensor([0.6]) if with_gamma else None), tol=2e-5)


@pytest.mark.parametrize("wanted", ["x", "gamma"])
def test_cam_partial_gradients(wanted, block_budget):
    x, g = 0.3 * torch.randn(2, 5, 33), torch.tensor([0.6])
    leaves = [x.clone().requires_grad_(wanted == "x"), g.clone().requires_grad_(wanted == "gamma")]
    refs = [x.double().requires_grad_(wanted == "x"), g.double().requires_grad_(wanted == "gamma")]
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    _cam_torch(*leaves).backward(grad_out.float())
    _cam_ref64(*refs).backward(grad_out)
    for name, t, r in zip(("x", "gamma"), leaves, refs, strict=True):
        if name == wanted:
            assert _rel_err(t.grad, r.grad) <= 2e-5
        else:
            assert t.grad is None


def test_cam_float64_and_non_contiguous(block_budget):
    x64 = torch.randn(2, 30, 7, dtype=torch.float64).transpose(1, 2)  # (2, 7, 30), C=7 N=30, strided
    _check_against_ref64(_cam_torch, _cam_ref64, (x64, torch.tensor([0.4], dtype=torch.float64)), tol=1e-12)
    x = torch.randn(2, 9, 40)[:, :, ::2]
    _check_against_ref64(_cam_torch, _cam_ref64, (x, torch.tensor([1.1])), tol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cam_low_precision_energy_in_fp32(dtype, block_budget):
    """Issue 3, point 5: where the reference in dtype is badly off, the fp32 energy is within 1e-2.

    C = 64, N = 1024 unit-variance features: energies of ~1000 that bf16 rounds by several
    units, which scrambles the reference's softmax (relative error ~0.3) but not one
    computed in fp32. fp16 rounds less coarsely (the reference is off by ~0.03 there).
    """
    x = torch.randn(1, 64, 1024).to(dtype)
    ref = channel_attention_reference(x.double())

    def norm_err(a: torch.Tensor) -> float:
        return ((a.double() - ref).norm() / ref.norm()).item()

    out, low = _cam_torch(x, None), channel_attention_reference(x)
    assert out.dtype == dtype
    assert norm_err(out) <= 1e-2
    assert norm_err(out) * 10 <= norm_err(low)
    if dtype == torch.bfloat16:
        assert norm_err(low) >= 0.2  # the claim is about a case where the reference is bad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cam_low_precision_gradients_within_reference_error(dtype, block_budget):
    x = (0.3 * torch.randn(2, 12, 50)).to(dtype)
    g = torch.tensor([0.8])
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    out, grads = _forward_and_grads(_cam_torch, (x, g), grad_out)
    ref, ref_grads = _forward_and_grads(_cam_ref64, (x.double(), g.double()), grad_out)
    low, low_grads = _forward_and_grads(lambda x, g: g * channel_attention_reference(x) + x, (x, g), grad_out)
    eps = torch.finfo(dtype).eps
    assert _rel_err(out, ref) <= 2 * _rel_err(low, ref) + eps
    for gr, rg, lg in zip(grads, ref_grads, low_grads, strict=True):
        assert _rel_err(gr, rg) <= 3 * _rel_err(lg, rg) + eps


def test_cam_huge_energies_one_hot_not_nan():
    """x scaled so the energies are ~1e6: the reference saturates to one-hot; so must we."""
    x = 300 * torch.randn(2, 6, 40)
    out = _cam_torch(x, None)
    ref = channel_attention_reference(x)
    assert torch.isfinite(ref).all() and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * x.abs().max().item())
    attention = torch.softmax(-(x @ x.transpose(1, 2)).double(), dim=-1)
    assert ((attention.amax(-1) - 1).abs() < 1e-6).all()  # one-hot indeed


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_cam_nan_inf_propagate_like_reference(value):
    x = torch.randn(1, 5, 12)
    x[0, 2, 7] = value
    out, ref = _cam_torch(x, None), channel_attention_reference(x)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    assert not torch.isfinite(out).all()


def test_cam_saves_no_n_by_n_and_no_output_copy():
    """CAM saves x, gamma and the C x C attention only."""
    x, g = torch.randn(2, 6, 50, requires_grad=True), torch.tensor([0.5], requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        _cam_torch(x, g)
    assert sorted(saved) == sorted([(2, 6, 50), (1,), (2, 6, 6)])


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("op", ["pam", "cam"])
def test_blockwise_compiles_fullgraph(op):
    """The autograd.Functions trace into one graph, forward and backward (aot_eager keeps it fast)."""
    torch._dynamo.reset()
    if op == "pam":
        inputs = _pam_inputs((2, 4, 6, 33))
        fn = _pam_torch
    else:
        inputs = (torch.randn(2, 6, 33), torch.tensor([0.5]))
        fn = _cam_torch
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    grad_out = torch.randn(inputs[-1].shape if op == "pam" else inputs[0].shape)
    out, grads = _forward_and_grads(compiled, inputs, grad_out)
    ref, ref_grads = _forward_and_grads(fn, inputs, grad_out)
    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg)


# ---------------------------------------------------------------- double backward, export


@pytest.mark.parametrize("op", ["pam", "cam"])
def test_double_backward_is_refused_with_a_clear_error(op):
    """create_graph=True still gives correct first-order gradients; differentiating them raises."""
    if op == "pam":
        inputs, fn = _pam_inputs((1, 4, 6, 21)), _pam_torch
    else:
        inputs, fn = (torch.randn(1, 6, 21), torch.tensor([0.5])), _cam_torch
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
    _, expected = _forward_and_grads(fn, inputs, 2 * out.detach())
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e)
    name = "position" if op == "pam" else "channel"
    with pytest.raises(RuntimeError, match=f"double backward through the blockwise {name} attention is not"):
        sum(g.sum() for g in grads).backward()


class _BothAttentions(torch.nn.Module):
    """PAM and CAM with a learnable gamma, as DANet's head calls them."""

    def __init__(self):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.tensor([0.75]))

    def forward(self, q, k, v):
        pam = _pam_torch(q, k, v, self.gamma, v)
        return pam + _cam_torch(pam, self.gamma)


def test_torch_export_captures_plain_ops_that_run_with_grad():
    """torch.export (parameters requiring grad) records no out= op and replays exactly, with gradients."""
    module = _BothAttentions()
    q, k, v = torch.randn(1, 4, 30), torch.randn(1, 4, 30), torch.randn(1, 6, 30)
    exported = torch.export.export(module, (q, k, v))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "aten.bmm.default" in targets and not any(".out" in t for t in targets)
    replay = exported.module()
    q2, k2, v2 = (t.clone().requires_grad_() for t in (torch.randn(1, 4, 30), torch.randn(1, 4, 30),
                                                        torch.randn(1, 6, 30)))
    out = replay(q2, k2, v2)
    torch.testing.assert_close(out, module(q2, k2, v2))
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q2, k2, v2))


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_jit_trace_records_the_computation_not_a_constant():
    """The legacy tracer (torch.onnx.export(dynamo=False)) records plain ops, not an opaque Function.

    An autograd.Function is recorded as a prim::PythonOp, which the legacy ONNX exporter cannot
    translate: it exported a model without inputs that returned a constant.
    """
    module = _BothAttentions()
    example = (torch.randn(1, 4, 30), torch.randn(1, 4, 30), torch.randn(1, 6, 30))
    with torch.no_grad():
        traced = torch.jit.trace(module, example)
        kinds = {node.kind() for node in traced.graph.nodes()}
        assert "aten::bmm" in kinds and "prim::PythonOp" not in kinds
        other = (torch.randn(1, 4, 30), torch.randn(1, 4, 30), torch.randn(1, 6, 30))
        torch.testing.assert_close(traced(*other), module(*other))
