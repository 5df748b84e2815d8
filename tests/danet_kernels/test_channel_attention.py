"""Fused Triton channel attention (CAM) against the float64 bmm reference.

On machines without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set
by tests/conftest.py), which executes every program in numpy: shapes here are small, but the
interpreter's tiles are 16 channels x 32 positions and the Gram reduction splits N across
programs from 32 positions on, so the shapes below cover several tiles, ragged tails and the
split-N reduction; N not a multiple of 16 goes through the zero-tailed row copy, N = 64 and
N = 96 read the input in place. Every test poisons fresh allocations with NaN (``_poison_new_memory``) so an
element the kernels fail to write shows up as a mismatch. The interpreter computes bf16 dots
wrongly, so bf16 through the kernels is GPU-only; the bf16 accuracy claim is shown on the CPU
through the kernels' numerics written in torch.
"""

from __future__ import annotations

import pytest
import torch

import danet_kernels
from danet_kernels.kernels import channel_attention as cam
from danet_kernels.kernels import common
from danet_kernels.reference import channel_attention_reference
from tests.danet_kernels.hopper_compile import run_without_interpreter
from tests.danet_kernels.test_common import float32_matmul_precision

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison_new_memory():
    """torch.empty & co. return NaN-filled memory: unwritten outputs cannot pass as correct."""
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.utils.deterministic.fill_uninitialized_memory = previous[1]


def make_x(batch: int, channels: int, n: int, dtype: torch.dtype = torch.float32, energy: float = 2.0):
    """Fresh random features whose energies x_i . x_j are O(energy), whatever N."""
    return (torch.randn(batch, channels, n, device=DEVICE) * (energy / n) ** 0.5).to(dtype)


def run(x: torch.Tensor, gamma: torch.Tensor | None, dy: torch.Tensor, fn=None):
    """Forward and backward through ``fn`` (default: the public API with backend="triton")."""
    x = x.detach().clone().requires_grad_()
    gamma = None if gamma is None else gamma.detach().clone().requires_grad_()
    if fn is None:
        y = danet_kernels.channel_attention(x, gamma=gamma, backend="triton")
    else:
        y = fn(x, gamma)
    y.backward(dy)
    return y.detach(), x.grad, None if gamma is None else gamma.grad


def reference(x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    """The oracle with the residual epilogue, in x's dtype."""
    out = channel_attention_reference(x)
    return out if gamma is None else gamma.to(out.dtype) * out + x


def run_float64(x: torch.Tensor, gamma: torch.Tensor | None, dy: torch.Tensor):
    """The reference forward and backward in float64 on the same inputs."""
    return run(x.double(), None if gamma is None else gamma.double(), dy.double(), reference)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error in the Frobenius norm (what the baseline's rel_err column reports)."""
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def check_against_float64(x: torch.Tensor, gamma: torch.Tensor | None, tol: float, fn=None) -> None:
    """Output, x's gradient and gamma's gradient within ``tol`` relative error of float64."""
    dy = torch.randn(x.shape, device=x.device).to(x.dtype)
    y, dx, dgamma = run(x, gamma, dy, fn)
    y64, dx64, dgamma64 = run_float64(x, gamma, dy)
    assert y.dtype == x.dtype and dx.dtype == x.dtype and y.shape == x.shape
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert rel_err(y, y64) < tol, f"output rel err {rel_err(y, y64):.2e}"
    assert rel_err(dx, dx64) < tol, f"dx rel err {rel_err(dx, dx64):.2e}"
    if gamma is not None:
        assert dgamma.dtype == gamma.dtype and dgamma.shape == gamma.shape
        assert rel_err(dgamma, dgamma64) < tol, f"dgamma {dgamma.item()} vs {dgamma64.item()}"


def shape_id(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


# (B, C, N): C = 3 and C = 1 (one padded tile), C = 40 (three 16-channel tiles, ragged), N = 1,
# N = 7 * 13 (ragged), C > N, N >> C. With the interpreter's 8-program "wave", (2, 3, 91) and
# (1, 40, 91) split the Gram reduction over N, and (1, 20, 300) splits both the symmetric forward
# Gram (3 tile pairs, 3 splits) and the backward's dY x^T (4 tiles, 2 splits) with ragged tails.
# N = 96 and N = 64 (multiples of 16) are read in place, every other N through the padded copy.
SHAPES = [(2, 3, 91), (1, 40, 91), (1, 1, 1), (2, 16, 1), (1, 40, 7), (1, 20, 300), (1, 20, 96), (2, 24, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_matches_float64_with_gamma(shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    gamma = torch.full((1,), 0.7, device=DEVICE)
    check_against_float64(make_x(*shape, dtype), gamma, TOLERANCE[dtype])


@pytest.mark.parametrize("shape", [(2, 3, 91), (1, 40, 7)], ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_matches_float64_without_gamma(shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    check_against_float64(make_x(*shape, dtype), None, TOLERANCE[dtype])


def test_gamma_dtype_and_shape_are_kept() -> None:
    """A float64 gamma of shape (1, 1) with fp16 features: result fp16, gamma's grad float64 (1, 1)."""
    gamma = torch.full((1, 1), -0.3, dtype=torch.float64, device=DEVICE)
    check_against_float64(make_x(2, 20, 45, torch.float16), gamma, TOLERANCE[torch.float16])


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_non_contiguous_input(layout: str) -> None:
    """Flattened channels_last maps (channel stride 1) and a stepped slice are read in place."""
    if layout == "channels_last":
        x = make_x(2, 8, 35).transpose(1, 2).contiguous().transpose(1, 2)
        assert x.stride(1) == 1
    else:
        x = make_x(2, 24, 90)[:, ::2, ::2]
    assert not x.is_contiguous()
    check_against_float64(x, torch.full((1,), 0.5, device=DEVICE), TOLERANCE[torch.float32])


def test_expanded_upstream_gradient() -> None:
    """The gradient of y.sum() arrives expanded (all strides 0): the backward reads it in place."""
    x = make_x(1, 18, 40).requires_grad_()
    gamma = torch.full((1,), 0.9, device=DEVICE, requires_grad=True)
    danet_kernels.channel_attention(x, gamma=gamma, backend="triton").sum().backward()
    x64 = x.detach().double().requires_grad_()
    gamma64 = gamma.detach().double().requires_grad_()
    reference(x64, gamma64).sum().backward()
    assert rel_err(x.grad, x64.grad) < TOLERANCE[torch.float32]
    assert rel_err(gamma.grad, gamma64.grad) < TOLERANCE[torch.float32]


def test_saturated_energies_give_the_reference_one_hot() -> None:
    """Energies ~1e6: the fp32 reference's softmax saturates to one-hot rows (at the row minimum of
    the energy); the kernels give exactly the same one-hot rows, never NaN."""
    x = make_x(2, 20, 70, energy=1e6)
    attention = torch.ops.danet_kernels.cam_forward(x, None)[1]
    energy = torch.bmm(x, x.transpose(1, 2))
    expected = torch.softmax(energy.amax(-1, keepdim=True) - energy, dim=-1)
    assert ((expected == 0) | (expected == 1)).all(), "the reference must saturate for this test to mean much"
    torch.testing.assert_close(attention, expected, atol=0, rtol=0)
    check_against_float64(x, torch.full((1,), 0.7, device=DEVICE), TOLERANCE[torch.float32])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_propagates_like_the_reference() -> None:
    """A NaN anywhere in x makes every energy row, hence every output element, NaN (as in the
    reference): the kernels' row minimum must not swallow it."""
    x = make_x(1, 20, 40)
    x[0, 7, 13] = float("nan")
    assert torch.isnan(reference(x, None)).all()
    assert torch.isnan(danet_kernels.channel_attention(x, backend="triton")).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on inf - inf
@pytest.mark.parametrize("gamma", [None, 0.7])
def test_infinities_propagate_like_the_reference(gamma: float | None) -> None:
    """An infinite feature makes every energy row of its image hold +-inf (x_i . x_j with one
    infinite term), which the reference turns into NaN rows (rowmax - energy gives inf - inf),
    so the whole image's output is NaN; the kernels' row minimum alone would skip a +inf and
    return finite rows. Image 0 stays finite, image 1 holds +inf, image 2 -inf, image 3 both:
    the NaN pattern must be the reference's, the finite image must match it."""
    x = make_x(4, 20, 45)
    x[1, 3, 10] = float("inf")
    x[2, 17, 44] = float("-inf")
    x[3, 0, 0], x[3, 19, 30] = float("inf"), float("-inf")
    gamma_t = None if gamma is None else torch.full((1,), gamma, device=DEVICE)
    expected = reference(x.double(), None if gamma_t is None else gamma_t.double())
    y = danet_kernels.channel_attention(x, gamma=gamma_t, backend="triton")
    assert torch.isnan(expected[1:]).all() and not torch.isnan(expected[0]).any()
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    assert rel_err(y[0], expected[0]) < TOLERANCE[torch.float32]


def test_fp16_energy_stays_fp32_where_the_fp16_reference_is_wrong() -> None:
    """Unit-variance fp16 features, N = 4096: energies in the hundreds, which fp16 rounds by up to
    0.25, enough to move the softmax visibly. The reference in fp16 is off by far more than 1e-2;
    the kernels, whose energy never leaves fp32, are within 1e-2 of float64."""
    x = torch.randn(1, 16, 4096, device=DEVICE).half()
    y64 = reference(x.double(), None)
    reference_err = rel_err(reference(x, None), y64)
    ours_err = rel_err(danet_kernels.channel_attention(x, backend="triton"), y64)
    assert reference_err > 0.05, f"the fp16 reference is unexpectedly accurate here ({reference_err:.2e})"
    assert ours_err < 1e-2, f"ours {ours_err:.2e}, reference {reference_err:.2e}"
    assert ours_err < reference_err / 20, f"ours {ours_err:.2e}, reference {reference_err:.2e}"


def kernel_numerics_in_torch(x: torch.Tensor) -> torch.Tensor:
    """The forward as the kernels evaluate it, written in torch: fp32 energy and softmax, then A
    rounded to x's dtype multiplies x with fp32 accumulation, the result rounded to x's dtype."""
    xf = x.float()
    attention = torch.softmax(-(xf @ xf.transpose(1, 2)), dim=-1)
    return (attention.to(x.dtype).float() @ xf).to(x.dtype)


def test_bf16_accuracy_claim_on_the_cpu() -> None:
    """bf16, N = 4096 at the baseline's energy scale: the bf16 reference is at the baseline's
    0.5-level error, the kernels' numerics within 1e-2 of float64 (the kernels themselves run
    bf16 in the GPU test below; the interpreter's bf16 dots are wrong)."""
    x = torch.randn(1, 32, 4096).bfloat16()
    y64 = reference(x.double(), None)
    reference_err = rel_err(reference(x, None), y64)
    ours_err = rel_err(kernel_numerics_in_torch(x), y64)
    assert reference_err > 0.3, f"bf16 reference error {reference_err:.2e}"
    assert ours_err < 1e-2, f"ours {ours_err:.2e}"


def test_aligned_rows_copies_only_what_the_pipelined_loads_cannot_read() -> None:
    """Unit-stride rows whose length and strides are multiples of 16 and whose first element is
    16-byte aligned are read in place (also a view of a wider buffer, or at an offset of 8 fp32);
    anything else becomes a (B, C, round_up(N, 16)) copy with the input in its first N columns and
    zeros after (kernels/common.py's aligned_rows, as CAM's launchers call it)."""
    aligned = torch.randn(2, 3, 32)
    assert common.aligned_rows(aligned, unit_stride=True) is aligned
    view = torch.randn(2, 6, 64)[:, ::2, :48]
    assert common.aligned_rows(view, unit_stride=True) is view
    unaligned = {
        "N = 41": torch.randn(2, 3, 41),
        "N-stride 2": torch.randn(2, 3, 64)[:, :, ::2],
        "channels last": torch.randn(2, 32, 3).transpose(1, 2),
        "offset 3": torch.randn(2 * 3 * 32 + 3)[3:].view(2, 3, 32),
        "row stride 40": torch.randn(2, 3, 40)[:, :, :32],
    }
    for name, t in unaligned.items():
        rows = common.aligned_rows(t, unit_stride=True)
        n = t.shape[2]
        assert rows.shape == (*t.shape[:2], -(-n // 16) * 16), name
        assert torch.equal(rows[:, :, :n], t) and not rows[:, :, n:].any(), name
        assert common.aligned_rows(rows, unit_stride=True) is rows, name
    in_place = torch.randn(2 * 3 * 32 + 8)[8:].view(2, 3, 32)  # 32 bytes in: aligned
    assert common.aligned_rows(in_place, unit_stride=True) is in_place


@pytest.mark.parametrize("level, precision", [("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")])
def test_fp32_dots_follow_the_matmul_precision(level: str, precision: str, monkeypatch) -> None:
    """Every GEMM launch of the forward and the backward gets the precision of torch's setting,
    and the kernels accept it (the interpreter then computes in full fp32, hence the fp32
    tolerance; the GPU errors of each mode are in docs/performance.md)."""
    seen = []

    def recording(dtype: torch.dtype) -> str:
        seen.append(common.dot_input_precision(dtype))
        return seen[-1]

    monkeypatch.setattr(cam, "dot_input_precision", recording)
    with float32_matmul_precision(level):
        check_against_float64(make_x(1, 20, 75), torch.full((1,), 0.6, device=DEVICE),
                              TOLERANCE[torch.float32])
    assert len(seen) == 4 and set(seen) == {precision}  # Gram and apply, forward and backward


@pytest.mark.parametrize("needs_x, needs_gamma", [(True, False), (False, True), (True, True)])
def test_gradients_of_what_requires_them(needs_x: bool, needs_gamma: bool, monkeypatch) -> None:
    """Only the requested gradients come back, each matching float64; with only gamma's, the
    backward computes no dx (no dE, no weights, no apply GEMM)."""
    x = make_x(2, 20, 75)
    gamma = torch.full((1,), 0.6, device=DEVICE)
    dy = torch.randn_like(x)
    _, dx64, dgamma64 = run_float64(x, gamma, dy)
    x.requires_grad_(needs_x)
    gamma.requires_grad_(needs_gamma)
    y = danet_kernels.channel_attention(x, gamma=gamma, backend="triton")
    applied = []
    original_apply = cam._apply

    def recording_apply(*args, **kwargs):
        applied.append(1)
        return original_apply(*args, **kwargs)

    monkeypatch.setattr(cam, "_apply", recording_apply)
    y.backward(dy)
    assert bool(applied) == needs_x
    assert (x.grad is not None) == needs_x and (gamma.grad is not None) == needs_gamma
    if needs_x:
        assert rel_err(x.grad, dx64) < TOLERANCE[torch.float32]
    if needs_gamma:
        assert rel_err(gamma.grad, dgamma64) < TOLERANCE[torch.float32]


def test_backward_op_without_dx_returns_an_empty_dx() -> None:
    x = make_x(1, 20, 40)
    gamma = torch.full((1,), 0.6, device=DEVICE)
    _, attention = torch.ops.danet_kernels.cam_forward(x, gamma)
    dy = torch.randn_like(x)
    dx_full, dgamma_full = torch.ops.danet_kernels.cam_backward(dy, x, attention, gamma, True)
    dx, dgamma = torch.ops.danet_kernels.cam_backward(dy, x, attention, gamma, False)
    assert dx.numel() == 0 and dx_full.shape == x.shape
    torch.testing.assert_close(dgamma, dgamma_full, atol=0, rtol=0)


def test_deterministic() -> None:
    """The split-N reduction sums partials in a fixed order: two runs agree bit for bit."""
    x = make_x(1, 16, 200)
    gamma = torch.full((1,), 0.7, device=DEVICE)
    dy = torch.randn_like(x)
    first = run(x, gamma, dy)
    second = run(x, gamma, dy)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_split_plan_covers_n_exactly() -> None:
    """Splits are contiguous, aligned, non-empty and cover [0, N)."""
    for batch, channels, n in [(1, 512, 32768), (1, 512, 4096), (8, 512, 9409), (1, 3, 1), (1, 16, 300)]:
        for symmetric in (True, False):
            splits, per_split = cam._split_plan(batch, channels, n, symmetric, 132)
            assert 1 <= splits <= cam._MAX_SPLITS
            assert per_split % cam._N_SPLIT_ALIGN == 0
            assert (splits - 1) * per_split < n <= splits * per_split


def test_autograd_function_apply_matches_the_op() -> None:
    """ChannelAttentionFunction.apply and the registered op share one autograd formula."""
    gamma = torch.full((1,), 0.4, device=DEVICE)

    def via_function(x, gamma):
        return cam.ChannelAttentionFunction.apply(x, gamma)[0]

    x = make_x(1, 10, 33)
    dy = torch.randn_like(x)
    for got, want in zip(run(x, gamma, dy, via_function), run(x, gamma, dy), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


CAM_TUNING_CHECK = """
import torch
import triton
import danet_kernels.kernels.channel_attention as cam
from danet_kernels.kernels.common import OPERAND_CLASSES, size_bucket

assert not cam.INTERPRETING
tuners = {**{("gram", k): t for k, t in cam._GRAM_KERNELS.items()},
          **{("apply", k): t for k, t in cam._APPLY_KERNELS.items()}}
for (kernel, operands), tuner in tuners.items():
    assert tuner.cache_results, (kernel, operands)
    assert tuner.configs_top_k == cam._TOP_K <= 4 and cam._TOP_K < len(tuner.configs), (kernel, operands)
    assert tuner.perf_model is (cam._gram_time_estimate if kernel == "gram" else cam._apply_time_estimate)
    assert "N_BUCKET" in tuner.keys and "B_BUCKET" in tuner.keys and "N" not in tuner.keys


def ranked(kernel, operands, n, batch, **flags):
    dtype = torch.bfloat16 if operands == "16-bit" else torch.float32
    x = torch.empty(1, 1, 1, dtype=dtype)
    precision = "tf32" if operands == "16-bit" else operands
    named = {"C": 512, "N_BUCKET": size_bucket(n), "B_BUCKET": size_bucket(batch),
             "INPUT_PRECISION": precision,
             **({"L": x, "SYMMETRIC": flags["symmetric"]} if kernel == "gram" else
                {"W": x, "U": x, "HAS_V": flags["has_v"], "HAS_RESIDUAL": True})}
    model = cam._gram_time_estimate if kernel == "gram" else cam._apply_time_estimate
    configs = tuners[kernel, operands].configs
    times = [model(**named, **c.all_kwargs()) for c in configs]
    return [str(configs[i]) for i in sorted(range(len(configs)), key=times.__getitem__)]


reordered = 0
for operands in OPERAND_CLASSES:
    for kernel, flags in (("gram", {"symmetric": True}), ("gram", {"symmetric": False}),
                          ("apply", {"has_v": False}), ("apply", {"has_v": True})):
        assert ranked(kernel, operands, 5000, 3, **flags) == ranked(kernel, operands, 8192, 4, **flags)
        assert ranked(kernel, operands, 9409, 1, **flags) == ranked(kernel, operands, 16384, 1, **flags)
        first = ranked(kernel, operands, 32768, 1, **flags)
        reordered += first != [str(c) for c in tuners[kernel, operands].configs]
assert reordered, "the perf model ranks every list in its own order"
print("checked")
"""


def test_cam_autotuners_rank_by_bucket_and_bench_a_handful() -> None:
    """The GPU's CAM autotuners (built without TRITON_INTERPRET, in a fresh process): keyed on C
    and the (N, B) buckets, a perf model from tiles, waves and bytes that ranks every size of a
    bucket alike and keeps the best _TOP_K for a first call to benchmark, the choice kept across
    processes (cache_results)."""
    result = run_without_interpreter(CAM_TUNING_CHECK, timeout=300)
    assert "checked" in result.stdout, result.stderr[-3000:]


def test_cam_module_uses_the_kernels() -> None:
    """The drop-in module with the Triton backend matches the reference module on a 4-D map."""
    reference_module = danet_kernels.reference.CAM_Module(12)
    module = danet_kernels.CAM_Module(12)
    module.load_state_dict({"gamma": torch.tensor([0.6])})
    reference_module.load_state_dict(module.state_dict())
    x = torch.randn(2, 12, 5, 7) * 0.3
    with danet_kernels.use_backend("triton"):
        y = module.to(DEVICE)(x.to(DEVICE))
    y64 = reference_module.double()(x.double())
    assert rel_err(y, y64) < TOLERANCE[torch.float32]


# ----------------------------------------------------------------------------------------------
# GPU only: bf16 through the kernels, the DANet shape, offsets beyond int32
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 512, 4096), (2, 40, 97 * 97), (1, 3, 7)], ids=shape_id)
def test_gpu_matches_float64(shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    check_against_float64(make_x(*shape, dtype), torch.full((1,), 0.7, device=DEVICE), TOLERANCE[dtype])


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_16bit_accuracy_where_the_reference_fails(dtype: torch.dtype) -> None:
    """DANet's C = 512 at 64 x 64, unit-variance features: the 16-bit reference is at ~0.5 relative
    error (the baseline measured 0.53 in bf16), the kernels within 1e-2 of float64."""
    x = torch.randn(1, 512, 4096, device=DEVICE).to(dtype)
    y64 = reference(x.double(), None)
    reference_err = rel_err(reference(x, None), y64)
    ours_err = rel_err(danet_kernels.channel_attention(x, backend="triton"), y64)
    assert ours_err < 1e-2, f"ours {ours_err:.2e}, reference {reference_err:.2e}"
    assert ours_err < reference_err / 10


@pytest.mark.gpu
@pytest.mark.slow
@requires_cuda
def test_gpu_offsets_beyond_int32() -> None:
    """B * C * N = 2^31 + 2^20 fp16 elements (4 GiB): batch offsets must be computed in int64."""
    batch, channels, n = 2**14 + 2**3, 256, 512
    x = (torch.randn(batch, channels, n, device=DEVICE) * (2.0 / n) ** 0.5).half()
    assert x.numel() > 2**31
    y = danet_kernels.channel_attention(x, backend="triton")
    for b in (0, batch - 1):
        expected = reference(x[b : b + 1].double(), None)
        assert rel_err(y[b : b + 1], expected) < TOLERANCE[torch.float16]


@pytest.mark.gpu
@pytest.mark.slow
@requires_cuda
def test_gpu_offsets_beyond_int32_inside_one_image() -> None:
    """ONE image of C * N = 16 * (2^27 + 9) > 2^31 fp16 elements (4 GiB; N not a multiple of 16,
    so through the padded rows too): every offset inside the image must be int64. Forward and
    backward; the first and last columns of y and dx and dgamma against float64, which is
    formed by chunks of N from the backward's formulas (module docstring)."""
    channels, n, gamma_value = 16, 2**27 + 9, 0.7
    assert channels * n > 2**31
    x = (torch.randn(1, channels, n, device=DEVICE) * (2.0 / n) ** 0.5).half().requires_grad_()
    gamma = torch.full((1,), gamma_value, device=DEVICE, requires_grad=True)
    y = danet_kernels.channel_attention(x, gamma=gamma, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)

    def gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sum(u.double() @ v.double().T for u, v in zip(a.split(2**24, dim=1), b.split(2**24, dim=1),
                                                             strict=True))

    features, grad = x.detach()[0], dy[0]
    energy = gram(features, features)
    attention = torch.softmax(energy.amax(-1, keepdim=True) - energy, dim=-1)
    p = gram(grad, features)
    row_dot = (p * attention).sum(1, keepdim=True)
    grad_energy = -gamma_value * attention * (p - row_dot)
    for cols in (slice(0, 4096), slice(n - 4096, n)):
        xs, dys = features[:, cols].double(), grad[:, cols].double()
        expected_y = gamma_value * attention @ xs + xs
        expected_dx = dys + gamma_value * attention.T @ dys + (grad_energy + grad_energy.T) @ xs
        assert rel_err(y[0, :, cols], expected_y) < TOLERANCE[torch.float16]
        assert rel_err(x.grad[0, :, cols], expected_dx) < TOLERANCE[torch.float16]
    assert rel_err(gamma.grad, row_dot.sum()) < TOLERANCE[torch.float16]
