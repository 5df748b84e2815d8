"""Fused Triton position attention (PAM) against the float64 bmm reference.

On machines without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set
by tests/conftest.py), which executes programs one at a time in numpy: the CPU shapes are small
but always span several 32-wide tiles (the interpreter's tile size) with ragged tails, so every
masked path runs. Every test poisons fresh allocations with NaN (see ``_poison_new_memory``) so
an element the kernels fail to write shows up as a mismatch.
"""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch
import triton
import triton.language as tl

import danet_kernels
from benchmarks.compile_report import Launch, recorded_launches
from danet_kernels.kernels import position_attention as pam
from danet_kernels.kernels.common import is_aligned, size_bucket
from danet_kernels.reference import position_attention_reference
from tests.danet_kernels.hopper_compile import run_without_interpreter

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("q", "k", "v", "gamma", "residual")


@pytest.fixture(autouse=True)
def _poison_new_memory():
    """torch.empty & co. return NaN-filled memory: unwritten outputs cannot pass as correct."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.fixture(params=["atomic", "deterministic"])
def backward_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both backward paths: the default one (dQ by fp32 atomics) and the one that
    ``torch.use_deterministic_algorithms(True)`` selects. The poison fixture has torch's switch
    on (its NaN fill needs it), so the atomic path is reached by hiding the switch from the
    launcher only: fresh memory is still poisoned."""
    if request.param == "atomic":
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    return request.param


def make_inputs(
    batch: int, head_dim: int, channels: int, n: int, dtype: torch.dtype = torch.float32,
    gamma: float | None = 0.7, scale: float = 1.0, keys: int | None = None,
) -> dict[str, torch.Tensor | None]:
    """Fresh random operands, ``keys`` keys and values (default: n); q and k scaled so energies
    are O(scale)."""
    qk_scale = scale / head_dim**0.5
    keys = n if keys is None else keys
    inputs: dict[str, torch.Tensor | None] = {
        "q": (torch.randn(batch, head_dim, n, device=DEVICE) * qk_scale).to(dtype),
        "k": (torch.randn(batch, head_dim, keys, device=DEVICE) * qk_scale).to(dtype),
        "v": torch.randn(batch, channels, keys, device=DEVICE).to(dtype),
        "gamma": None,
        "residual": None,
    }
    if gamma is not None:
        inputs["gamma"] = torch.full((1,), gamma, device=DEVICE)
        inputs["residual"] = torch.randn(batch, channels, n, device=DEVICE).to(dtype)
    return inputs


def run(
    inputs: dict[str, torch.Tensor | None], dy: torch.Tensor, fn=None, scale: float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward through ``fn`` (default: the public API with backend="triton") at the
    softmax ``scale``."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items() if t is not None}
    if fn is None:
        y = danet_kernels.position_attention(
            leaves["q"], leaves["k"], leaves["v"], gamma=leaves.get("gamma"),
            residual=leaves.get("residual"), scale=scale, backend="triton",
        )
    else:
        y = fn(leaves["q"], leaves["k"], leaves["v"], leaves.get("gamma"), leaves.get("residual"),
               scale or 1.0)
    y.backward(dy)
    return y.detach(), {name: t.grad for name, t in leaves.items()}


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor | None,
    residual: torch.Tensor | None,
    scale: float = 1.0,
) -> torch.Tensor:
    """The oracle, including the residual epilogue, in the operands' own dtype."""
    out = position_attention_reference(q, k, v, scale)
    return out if gamma is None else gamma.to(out.dtype) * out + residual


def run_float64(
    inputs: dict[str, torch.Tensor | None], dy: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    inputs64 = {n: None if t is None else t.double() for n, t in inputs.items()}
    return run(inputs64, dy.double(), reference, scale)


def output_like(inputs: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """A random (B, C, N) tensor: the output's shape (v's channels at q's positions)."""
    q, v = inputs["q"], inputs["v"]
    return torch.randn(q.shape[0], v.shape[1], q.shape[2], device=v.device, dtype=v.dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual.double() - expected.double()).abs()
    assert not error.isnan().any(), f"{what}: NaN where the reference is finite"
    bound = atol + rtol * expected.double().abs()
    worst = (error - bound).argmax()
    assert (error <= bound).all(), (
        f"{what}: max error {error.max().item():.3e} (bound at worst element "
        f"{bound.flatten()[worst].item():.3e})"
    )


def check_against_float64(
    inputs: dict[str, torch.Tensor | None], atol: float = 2e-5, rtol: float = 2e-5,
    scale: float | None = None,
) -> None:
    """Output and every gradient within atol + rtol * |expected| of float64, at softmax ``scale``."""
    dy = output_like(inputs)
    y, grads = run(inputs, dy, scale=scale)
    y_ref, grads_ref = run_float64(inputs, dy, scale)
    assert y.dtype == inputs["v"].dtype
    assert_close(y, y_ref, atol, rtol, "output")
    for name, grad_ref in grads_ref.items():
        assert grads[name].dtype == inputs[name].dtype, f"d{name} has dtype {grads[name].dtype}"
        assert_close(grads[name], grad_ref, atol, rtol, f"d{name}")

def check_error_within_reference_error(inputs: dict[str, torch.Tensor | None], factor: float) -> None:
    """flash-attn's bound for low precision: our max error against float64 is at most ``factor``
    times the reference's own error in the same dtype, plus a floor of 1e-3 of the values' scale."""
    dy = output_like(inputs)
    y, grads = run(inputs, dy)
    y_low, grads_low = run(inputs, dy, reference)
    y_ref, grads_ref = run_float64(inputs, dy)
    pairs = [("output", y, y_low, y_ref)] + [
        (f"d{name}", grads[name], grads_low[name], grads_ref[name]) for name in grads_ref
    ]
    for what, ours, theirs, truth in pairs:
        assert ours.dtype == theirs.dtype, what
        ours_err = (ours.double() - truth).abs().max().item()
        theirs_err = (theirs.double() - truth).abs().max().item()
        floor = 1e-3 * max(truth.abs().max().item(), 1.0)
        print(f"{what}: error {ours_err:.3e}, reference's {theirs_err:.3e}")
        assert ours_err <= factor * theirs_err + floor, f"{what}: {ours_err:.3e} vs {theirs_err:.3e}"



# (B, d, C, N): N = 7*13 with a ragged tail, N = 1 (a 1x1 map), N below one tile, N an exact
# multiple of the tile; d odd (padded to the 16-wide dot); C above one 32-wide C tile and ragged.
@pytest.mark.parametrize(
    "batch, head_dim, channels, n, with_residual",
    [(2, 5, 48, 91, True), (2, 5, 48, 91, False), (1, 16, 64, 64, True), (1, 16, 64, 64, False),
     (1, 3, 8, 1, True), (1, 3, 8, 1, False), (3, 8, 33, 7, True), (1, 16, 16, 300, True)],
)
def test_fp32_matches_float64(
    batch: int, head_dim: int, channels: int, n: int, with_residual: bool, backward_path: str
) -> None:
    inputs = make_inputs(batch, head_dim, channels, n, gamma=0.7 if with_residual else None, scale=3.0)
    check_against_float64(inputs)


# (B, d, C, N, M, softmax scale): non-local blocks' calls, keys and values pooled to M < N
# (sub_sample: ceil(H/2) ceil(W/2)) with scale d^-1/2, and more keys than queries, a single
# key (dq = dk = 0 exactly), a single query; odd N, M and d (padded to the 16-wide dot).
@pytest.mark.parametrize(
    "batch, head_dim, channels, n, m, scale",
    [(2, 5, 48, 91, 28, 5**-0.5), (1, 16, 40, 33, 70, 0.125), (1, 3, 8, 45, 1, 2.0), (2, 8, 33, 1, 37, 0.5)],
)
@pytest.mark.parametrize("with_residual", [True, False])
def test_scale_and_key_length_match_float64(
    batch: int, head_dim: int, channels: int, n: int, m: int, scale: float, with_residual: bool,
    backward_path: str,
) -> None:
    gamma = 0.7 if with_residual else None
    inputs = make_inputs(batch, head_dim, channels, n, gamma=gamma, scale=3.0, keys=m)
    check_against_float64(inputs, scale=scale)


def test_scale_reaches_every_kernel() -> None:
    """A scale of 1 is DANet's attention, bit for bit the same as none; another scale changes
    the output and every gradient (so no kernel ignores it)."""
    inputs = make_inputs(1, 8, 40, 45, gamma=0.6)
    dy = output_like(inputs)
    y_none, grads_none = run(inputs, dy)
    y_one, grads_one = run(inputs, dy, scale=1.0)
    y_half, grads_half = run(inputs, dy, scale=0.5)
    assert torch.equal(y_none, y_one) and not torch.allclose(y_none, y_half)
    for name in NAMES:
        assert torch.equal(grads_none[name], grads_one[name]), name
        if name != "residual":
            assert not torch.allclose(grads_none[name], grads_half[name]), name


def test_batches_beyond_the_grid_limit_launch_in_chunks(
    monkeypatch: pytest.MonkeyPatch, backward_path: str
) -> None:
    """Grid axes are capped at 65535 batches; shrink the cap to 2 so 5 batches take 3 launches."""
    monkeypatch.setattr(pam, "_MAX_GRID_BATCH", 2)
    assert pam._batch_chunks(5) == [(0, 2), (2, 4), (4, 5)]
    check_against_float64(make_inputs(5, 4, 20, 19, gamma=0.4))


def test_gamma_zero_at_initialisation() -> None:
    """gamma = 0 (DANet's init): the result is the residual, dgamma = sum(dY * O) is not zero."""
    inputs = make_inputs(1, 8, 40, 45, gamma=0.0)
    check_against_float64(inputs)
    y, grads = run(inputs, torch.ones_like(inputs["residual"]))
    assert torch.equal(y, inputs["residual"])
    assert grads["gamma"].abs().item() > 0


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "strided"])
def test_non_contiguous_inputs(layout: str, backward_path: str) -> None:
    batch, head_dim, channels, height, width = 2, 6, 40, 7, 9
    n = height * width
    # Scaling happens before the view: an elementwise op on a strided slice would make it contiguous.
    if layout == "transposed":  # (B, N, d) storage read as (B, d, N)
        make = lambda rows, scale=1.0: (torch.randn(batch, n, rows, device=DEVICE) * scale).transpose(1, 2)
    elif layout == "channels_last":  # a channels_last feature map flattened: stride 1 on channels
        make = lambda rows, scale=1.0: (torch.randn(batch, rows, height, width, device=DEVICE) * scale).to(
            memory_format=torch.channels_last).view(batch, rows, n)
    else:  # every other channel and position of a larger tensor
        make = lambda rows, scale=1.0: (torch.randn(batch, 2 * rows, 2 * n, device=DEVICE) * scale)[
            :, ::2, ::2
        ]
    inputs = {"q": make(head_dim, 0.5), "k": make(head_dim, 0.5), "v": make(channels),
              "gamma": torch.full((1,), -0.4, device=DEVICE), "residual": make(channels)}
    assert not any(t.is_contiguous() for name, t in inputs.items() if name != "gamma")
    dy = torch.randn(batch, n, channels, device=DEVICE).transpose(1, 2)  # a strided gradient too
    y, grads = run(inputs, dy)
    y_ref, grads_ref = run_float64(inputs, dy)
    assert_close(y, y_ref, 2e-5, 2e-5, "output")
    for name in NAMES:
        assert_close(grads[name], grads_ref[name], 2e-5, 2e-5, f"d{name}")


def test_fp16_error_bounded_by_reference_error() -> None:
    """flash-attn style: the kernel's fp16 error is within a small multiple of the fp16 reference's."""
    inputs = make_inputs(2, 16, 48, 91, dtype=torch.float16, gamma=0.5, scale=3.0)
    inputs["gamma"] = inputs["gamma"].float()  # a fp32 parameter driving fp16 activations
    check_error_within_reference_error(inputs, factor=3.0)


# Padded keys of the dK/dV kernels' resident block may hold inf (never stored): numpy warns.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("energies", ["mixed", "all_negative"])
def test_huge_energies_stay_finite(energies: str, backward_path: str) -> None:
    """q, k scaled by 30: the softmax saturates to near one-hot; no NaN where the reference is finite.

    "all_negative" makes every energy of every row about -1e3, so log-sum-exp is hugely negative
    and a padded key (energy 0) would get P = exp(+1e3) = inf unless the tail is masked.
    """
    inputs = make_inputs(1, 8, 24, 70, gamma=0.9)
    inputs["q"] *= 30
    inputs["k"] *= 30
    if energies == "all_negative":
        inputs["q"] = inputs["q"].abs() + 1.0
        inputs["k"] = -inputs["k"].abs() - 1.0
    # Energies of ~1e3 carry fp32 rounding errors of ~1e-4 into exp: bound by the fp32 reference's error.
    check_error_within_reference_error(inputs, factor=3.0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on NaN/inf
def test_row_with_leading_minus_inf_energies() -> None:
    """Energies of -inf over the whole first key tile: -inf - -inf must not turn into NaN."""
    n = 70
    q = torch.ones(1, 1, n, device=DEVICE)
    k = torch.randn(1, 1, n, device=DEVICE)
    k[..., :40] = float("-inf")
    v = torch.randn(1, 20, n, device=DEVICE)
    expected = position_attention_reference(q.double(), k.double(), v.double())
    assert expected.isfinite().all()
    actual = danet_kernels.position_attention(q, k, v, backend="triton")
    assert_close(actual, expected, 1e-5, 1e-5, "output")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on NaN/inf
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_propagates_like_the_reference(where: str) -> None:
    inputs = make_inputs(2, 4, 20, 40, gamma=None)
    inputs[where][1, 2, 17] = float("nan")
    actual = danet_kernels.position_attention(inputs["q"], inputs["k"], inputs["v"], backend="triton")
    expected = position_attention_reference(*(inputs[name].double() for name in ("q", "k", "v")))
    assert torch.equal(actual.isnan(), expected.isnan())
    assert expected.isnan().any() and not expected.isnan().all()
    finite = ~expected.isnan()
    assert_close(actual[finite], expected[finite], 2e-5, 2e-5, "finite part")


def test_gradient_of_a_sum_and_partial_requires_grad(backward_path: str) -> None:
    """y.sum() hands the backward an expanded (zero-stride) gradient; only some inputs need grads."""
    inputs = make_inputs(2, 4, 36, 50, gamma=0.3)
    q, k, v, gamma, residual = (inputs[name] for name in NAMES)
    v = v.clone().requires_grad_()
    residual = residual.clone().requires_grad_()
    y = danet_kernels.position_attention(q, k, v, gamma=gamma, residual=residual, backend="triton")
    y.sum().backward()
    v64 = v.detach().double().requires_grad_()
    reference(q.double(), k.double(), v64, gamma.double(), residual.detach().double()).sum().backward()
    assert_close(v.grad, v64.grad, 2e-5, 2e-5, "dv")
    assert torch.equal(residual.grad, torch.ones_like(residual))


def test_inference_skips_saving_o_and_matches() -> None:
    """Under no_grad the residual epilogue writes the result only (O is not kept)."""
    inputs = make_inputs(1, 8, 40, 45, gamma=0.6)
    with torch.no_grad():
        result, out, lse = torch.ops.danet_kernels.pam_forward(*(inputs[name] for name in NAMES), 1.0, False)
        y = pam.position_attention_triton(*(inputs[name] for name in NAMES), 1.0)
    assert out.numel() == 0
    assert torch.equal(result, y)
    expected = reference(*(None if inputs[name] is None else inputs[name].double() for name in NAMES))
    assert_close(y, expected, 2e-5, 2e-5, "output")
    assert lse.shape == (1, 45) and lse.dtype == torch.float32


def test_autograd_function_matches_entry_point() -> None:
    """PositionAttentionFunction.apply and the registered op share one autograd formula."""
    inputs = make_inputs(1, 4, 24, 33)
    dy = torch.randn_like(inputs["v"])
    via_function = lambda q, k, v, g, r, s: pam.PositionAttentionFunction.apply(q, k, v, g, r, s, True)[0]
    y_function, grads_function = run(inputs, dy, via_function, scale=0.5)
    y_entry, grads_entry = run(inputs, dy, pam.position_attention_triton, scale=0.5)
    assert torch.equal(y_function, y_entry)
    for name in NAMES:
        assert torch.equal(grads_function[name], grads_entry[name]), name


def test_backward_without_saved_o_is_a_clear_error() -> None:
    """Calling the op with store_out=False and then differentiating names the problem."""
    inputs = make_inputs(1, 4, 8, 9)
    leaves = [t.clone().requires_grad_() for t in (inputs[name] for name in NAMES)]
    result = pam.PositionAttentionFunction.apply(*leaves, 1.0, False)[0]
    with pytest.raises(RuntimeError, match="store_out=False"):
        result.sum().backward()


# ---------------------------------------------------------------------------------------------
# Backward: the two paths, splits, determinism, int64 offsets, the launches a Hopper GPU gets
# ---------------------------------------------------------------------------------------------


def meta_backward_operands(
    batch: int, head_dim: int, channels: int, n: int, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """pam_backward's (dy, q, k, v, gamma, out, lse) on the "meta" device: the launcher runs,
    nothing is allocated (the launches are recorded, not run)."""
    q = torch.empty(batch, head_dim, n, device="meta", dtype=dtype)
    v = torch.empty(batch, channels, n, device="meta", dtype=dtype)
    gamma = torch.empty(1, device="meta")
    lse = torch.empty(batch, n, device="meta")
    return torch.empty_like(v), q, torch.empty_like(q), v, gamma, 1.0, torch.empty_like(v), lse


def hopper_backward_launches(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, precision: str, deterministic: bool,
    n: int, batch: int = 1, head_dim: int = 64, channels: int = 512, sm_count: int = 132,
) -> list[Launch]:
    """The launches pam_backward makes on a Hopper GPU with ``sm_count`` SMs (the compiled
    tiles, not the interpreter's), recorded on meta tensors."""
    monkeypatch.setattr(pam, "INTERPRETING", False)
    monkeypatch.setattr(pam, "device_sms", lambda device, interpreter_sms=None: sm_count)
    monkeypatch.setattr(pam, "dot_input_precision", lambda dtype: precision)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    with recorded_launches() as launches:
        pam.pam_backward(*meta_backward_operands(batch, head_dim, channels, n, dtype))
    return launches


def executed_flops_per_pair(launches: list[Launch], n: int) -> float:
    """Matmul FLOPs that the recorded backward launches execute, per (query, key) pair, by the
    compile report's work model of each kernel (benchmarks/compile_specs/pam_backward.py: grid
    x tiles, padded blocks and the padded head dim included, as the GPU runs them); the
    preprocess' row sum is no matmul."""
    from benchmarks.compile_specs import pam_backward as spec

    total = 0.0
    for launch in launches:
        name = launch.jit_function.__name__
        if name == "_pam_bwd_preprocess":
            continue
        kernel = next(k for k in spec.KERNELS if k.name == name)
        score, rest = kernel.work(launch.named(), launch.programs())
        total += score.flops + rest.flops
    return total / n**2


def test_backward_splits_small_grids(monkeypatch: pytest.MonkeyPatch, backward_path: str) -> None:
    """With more SMs than programs the loops split into partials (reduced in a fixed order)."""
    monkeypatch.setattr(pam, "device_sms", lambda device, interpreter_sms=None: 64)
    # At the interpreter's 32-wide tiles, N = 91 has 3 key (and query) blocks: 3 splits.
    assert pam._split(2 * 3, 3, 64) == (1, 3)
    check_against_float64(make_inputs(2, 5, 48, 91, scale=3.0))
    check_against_float64(make_inputs(1, 3, 8, 1))


def test_split_count_finishes_soonest() -> None:
    assert pam._split(256, 512, 132) == (512, 1)  # B = 1, N = 32768: two waves already
    assert pam._split(32, 64, 132) == (16, 4)  # N = 4096: 32 key blocks -> 128 programs
    assert pam._split(64, 64, 132) == (32, 2)
    assert pam._split(74, 148, 132) == (50, 3)  # N = 9409: 222 programs in 2 waves, not 74 in 1
    assert pam._split(148, 148, 132) == (37, 4)  # 1.12 waves: 4 splits finish in 5 quarter-waves
    assert pam._split(2048, 2048, 132) == (2048, 1)  # 3 splits would save only 2%
    assert pam._split(5, 2, 132) == (1, 2)  # never more splits than blocks
    assert pam._split(7, 9, 1) == (9, 1)  # the interpreter: one "SM"


@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_path_follows_torch_switch(monkeypatch: pytest.MonkeyPatch, deterministic: bool) -> None:
    """torch.use_deterministic_algorithms(True) selects the atomics-free dQ kernel."""
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    with recorded_launches() as launches:
        pam.pam_backward(*meta_backward_operands(2, 8, 40, 50, torch.float32))
    names = [launch.jit_function.__name__ for launch in launches]
    key_side = launches[names.index("_pam_bwd_dkdq_kernel")]
    assert key_side.kwargs["ATOMIC_DQ"] is not deterministic
    assert ("_pam_bwd_dq_kernel" in names) is deterministic


def test_deterministic_backward_is_bitwise_repeatable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Twice the same gradients, bit for bit, with split loops (their partials reduced in order).

    The interpreter runs programs one at a time, so atomics would repeat here too; what this
    checks on the CPU is that the deterministic launches are reproducible end to end (the GPU
    test below repeats it where atomics would not)."""
    monkeypatch.setattr(pam, "device_sms", lambda device, interpreter_sms=None: 64)
    assert torch.are_deterministic_algorithms_enabled()
    inputs = make_inputs(2, 5, 48, 91, scale=3.0)
    dy = torch.randn_like(inputs["v"])
    first = run(inputs, dy)[1]
    second = run(inputs, dy)[1]
    for name in NAMES:
        assert torch.equal(first[name], second[name]), name


@triton.jit
def _offsets_probe(
    Out, row_start, stride_rows, col_start, stride_cols, ROWS: tl.constexpr, COLS: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
):
    """The in-image offsets of a ROWS x COLS tile as the forward (``_pam_fwd_offsets``, int32 or
    int64 by its switch) forms them (the backward's, kernels/common.py's ``offsets_2d``, have
    their probe in test_common.py)."""
    rows, cols = row_start + tl.arange(0, ROWS), col_start + tl.arange(0, COLS)
    offsets = pam._pam_fwd_offsets(rows, stride_rows, cols, stride_cols, INT64_OFFSETS)
    tl.store(Out + tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :], offsets)


def probe_offsets(channels: int, n: int, layout: str, int64: bool) -> tuple[torch.Tensor, ...]:
    """The forward's offsets of the last 16 channels x 8 positions of a (channels, n) image, and
    the exact ones."""
    row_start, col_start = channels - 16, n - 8
    stride_rows, stride_cols = (n, 1) if layout == "contiguous" else (1, channels)
    out = torch.empty(16, 8, dtype=torch.int64)
    _offsets_probe[(1,)](out, row_start, stride_rows, col_start, stride_cols, ROWS=16, COLS=8,
                         INT64_OFFSETS=int64)
    rows = torch.arange(row_start, row_start + 16, dtype=torch.int64)[:, None]
    cols = torch.arange(col_start, col_start + 8, dtype=torch.int64)[None, :]
    return out, rows * stride_rows + cols * stride_cols


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_forward_in_image_offsets_are_int64_with_the_switch_on(layout: str) -> None:
    """The forward's in-image offset arithmetic at an image of C * N > 2^31 elements, run by the
    interpreter on the index arithmetic alone (no such tensor is allocated): channels near
    C = 2^19 of an N = 2^13 map, i.e. offsets near 2^32 that int32 would wrap."""
    out, expected = probe_offsets(2**19, 2**13, layout, int64=True)
    assert expected.max() > 2**31
    assert torch.equal(out, expected)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_forward_int32_offsets_exact_below_the_switch(layout: str) -> None:
    """Where the switch is off the forward's int32 offsets are exact, up to the largest image the
    launcher leaves on them (C * N = 2^31 - 2^22: C = 512, N = 2^22 - 2^13)."""
    channels, n = 512, 2**22 - 2**13
    out, expected = probe_offsets(channels, n, layout, int64=False)
    assert expected.max() < 2**31 and torch.equal(out, expected)
    v = torch.empty(1, channels, n, device="meta")
    assert not pam._needs_int64_offsets(v if layout == "contiguous" else v.transpose(1, 2).contiguous().mT)


def test_forward_switches_to_int64_offsets_where_an_image_passes_int32() -> None:
    """The launcher's switch, on the tensors it is given (meta tensors: nothing allocated): on
    from C * N ~ 2^31 in either layout (masked lanes rounded up to the widest tile), off below;
    the batch axis never counts (its offset is int64 in the kernel)."""
    def image(channels: int, n: int, layout: str, batch: int = 1) -> torch.Tensor:
        t = torch.empty(batch, n, channels, device="meta").mT if layout == "channels_last" else torch.empty(
            batch, channels, n, device="meta")
        return t

    for layout in ("contiguous", "channels_last"):
        assert not pam._needs_int64_offsets(image(512, 2**22 - 256, layout))
        assert pam._needs_int64_offsets(image(512, 2**22 + 16, layout))
        assert pam._needs_int64_offsets(image(2**21 + 64, 1024, layout))
        assert not pam._needs_int64_offsets(image(64, 2**16, layout, batch=2**16))  # B C N = 2^38
    assert pam._needs_int64_offsets(image(16, 1024, "contiguous"), image(2**21 + 64, 1024, "channels_last"))


@pytest.mark.parametrize("channels, n, expected", [(40, 50, False), (2**21 + 64, 1024, True)])
def test_forward_launch_takes_the_switch(channels: int, n: int, expected: bool) -> None:
    """pam_forward passes the switch to its kernel (recorded on meta tensors, channels_last v)."""
    q = torch.empty(1, 16, n, device="meta")
    v = torch.empty(1, n, channels, device="meta").mT
    with recorded_launches() as launches:
        pam.pam_forward(q, torch.empty_like(q), v, torch.empty(1, device="meta"), v, 1.0, False)
    assert [launch.kwargs["INT64_OFFSETS"] for launch in launches] == [expected]


def test_forward_kernel_forms_every_in_image_offset_through_the_switch() -> None:
    """Every ``index * stride`` product of the forward kernel goes through ``_pam_fwd_offsets``
    or has an int64 left side (the batch index, the C block's start)."""
    for function in (pam._pam_fwd_kernel.fn, pam._pam_fwd_inner, pam._pam_fwd_store):
        source = inspect.getsource(getattr(function, "fn", function))
        for left in re.findall(r"(\S+) \* stride_", source):
            assert left in ("pid_b", "start_c"), f"{left} * stride in {source.splitlines()[1]}"


def test_backward_kernels_compute_every_offset_in_int64() -> None:
    """Every ``index * stride`` product of a backward kernel goes through ``offsets_2d`` or has
    an int64 left side (the batch index), so no offset inside an image is formed in int32."""
    for kernel in (pam._pam_bwd_preprocess, pam._pam_bwd_dv_kernel, pam._pam_bwd_dkdq_kernel,
                   pam._pam_bwd_dq_kernel):
        source = inspect.getsource(kernel.fn)
        for left in re.findall(r"(\S+) \* stride_", source):
            assert left == "pid_b" or left.endswith(".to(tl.int64)"), f"{kernel.fn.__name__}: {left} * stride"


@pytest.mark.parametrize("operands, precision", [
    (torch.bfloat16, "tf32"), (torch.float32, "tf32"), (torch.float32, "tf32x3"), (torch.float32, "ieee"),
])
@pytest.mark.parametrize("deterministic", [False, True])
def test_small_maps_fill_the_gpu(
    monkeypatch: pytest.MonkeyPatch, operands: torch.dtype, precision: str, deterministic: bool
) -> None:
    """B = 1, N = 4096 (a 64 x 64 map) on 132 SMs: every matmul kernel finishes within 10% of the
    time a perfectly balanced grid would take (one program per SM at a time)."""
    sms = 132
    for launch in hopper_backward_launches(monkeypatch, operands, precision, deterministic, n=4096):
        name, programs = launch.jit_function.__name__, launch.programs()
        if name == "_pam_bwd_preprocess":
            continue  # a row sum over C: bandwidth-bound, microseconds
        waves = math.ceil(programs / sms)
        assert programs / (waves * sms) >= 0.9, (name, launch.grid)


@pytest.mark.parametrize("operands, precision, default, deterministic", [
    (torch.bfloat16, "tf32", 2688, 3840), (torch.float16, "tf32", 2688, 3840),
    (torch.float32, "tf32", 2944, 4096), (torch.float32, "tf32x3", 4096, 4096),
    (torch.float32, "ieee", 2688, 3840),
])
def test_backward_executed_flops(
    monkeypatch: pytest.MonkeyPatch, operands: torch.dtype, precision: str, default: int, deterministic: int
) -> None:
    """Executed matmul FLOPs / N^2 at DANet's d = 64, C = 512, N = 32768 (the minimum is 2432):
    <= 3000 by default for 16-bit and tf32 operands (each product once, dV split over C in
    256- or 128-wide blocks); the deterministic split computes dP twice, >= 3584 whatever its
    tiles. The figures are the module docstring's."""
    n = 32768
    for is_deterministic, expected in ((False, default), (True, deterministic)):
        launches = hopper_backward_launches(monkeypatch, operands, precision, is_deterministic, n=n)
        assert executed_flops_per_pair(launches, n) == pytest.approx(expected)
    if precision == "tf32" or operands != torch.float32:
        assert default <= 3000


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("n", [63, 64])
def test_operands_padded_only_when_misaligned(layout: str, n: int) -> None:
    """Contiguous maps with N % 16 != 0 are copied into zero-tailed buffers of N rounded up to 16;
    aligned ones (N % 16 == 0, or channels_last with C and d multiples of 16) are read in place.
    result and O are views of buffers whose rows start 16-aligned."""
    batch, head_dim, channels = 2, 16, 48
    height, width = {63: (7, 9), 64: (8, 8)}[n]
    if layout == "contiguous":
        make = lambda rows: torch.randn(batch, rows, n, device=DEVICE)
    else:  # a channels_last map flattened: stride 1 on the rows, stride `rows` on N
        make = lambda rows: torch.randn(batch, rows, height, width, device=DEVICE).to(
            memory_format=torch.channels_last).flatten(2)
    q, k, v, residual = make(head_dim), make(head_dim), make(channels), make(channels)
    q_in, k_in, v_in, residual_in, n_loaded, m_loaded = pam._kernel_operands(q, k, v, residual)
    padded = layout == "contiguous" and n % 16 != 0
    assert n_loaded == m_loaded == (64 if padded else n)
    for original, given in ((q, q_in), (k, k_in), (v, v_in), (residual, residual_in)):
        assert (given.data_ptr() != original.data_ptr()) == padded
        assert given.shape[-1] == n_loaded and is_aligned(given)
        assert torch.equal(given[..., :n], original) and not given[..., n:].any()
    result, out, lse = pam._forward_outputs(q, k, v, torch.ones(1), residual, 1.0, True)
    for view in (result, out):
        assert view.shape == (batch, channels, n) and view.stride() == (channels * 64, 64, 1)
    assert lse.shape == (batch, n) and lse.is_contiguous()


def test_aligned_channels_last_inputs_read_in_place_match_float64() -> None:
    """channels_last maps with d, C multiples of 16 and N = 63: no copy, masks at N itself."""
    batch, head_dim, channels, height, width = 2, 16, 48, 7, 9
    make = lambda rows, scale=1.0: (torch.randn(batch, rows, height, width, device=DEVICE) * scale).to(
        memory_format=torch.channels_last).view(batch, rows, height * width)
    inputs = {"q": make(head_dim, 0.5), "k": make(head_dim, 0.5), "v": make(channels),
              "gamma": torch.full((1,), 0.6, device=DEVICE), "residual": make(channels)}
    assert pam._kernel_operands(inputs["q"], inputs["k"], inputs["v"], inputs["residual"])[-2:] == (63, 63)
    check_against_float64(inputs)


def _named_args(n: int, c: int = 512, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> dict:
    """What the forward's prune and perf model receive: the launch's named arguments that they
    read, and its constexprs."""
    v = torch.empty(batch, 1, 1, dtype=dtype)
    return {"N": n, "M": n, "B": batch, "C": c, "V": v, "BLOCK_D": 64, "INPUT_PRECISION": "tf32"}


def _tiles(configs: list) -> list[tuple]:
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_C"], c.num_warps, c.num_stages)
            for c in configs]


def _prune(configs: list, n: int, c: int = 512, dtype: torch.dtype = torch.bfloat16, block_d: int = 64
           ) -> list:
    return pam._prune_fwd_configs(configs, _named_args(n, c, dtype=dtype), BLOCK_D=block_d)


def test_forward_prune_caps_tiles_and_keeps_one_pipeline_depth_per_tile() -> None:
    """Tiles are capped at N and C, duplicates dropped; a 128-row tile capped to 64 rows runs on one
    warpgroup (8 warps would replicate S); big d and fp32 drop what does not fit. Of configs that
    differ only in num_stages the prune keeps the shallowest unless the perf model says a deeper
    one pays (issue 18: the model had no term for num_stages, so s2 and s3 tied and both took a
    slot of the benchmark)."""
    configs = pam._fwd_configs(pam._FWD_TILES["16-bit"])
    kept = _tiles(_prune(configs, 32768))
    assert len({tile[:4] for tile in kept}) == len(kept) < len(configs)
    assert {tile[:4] for tile in kept} == {tile[:4] for tile in pam._FWD_TILES["16-bit"]}
    assert (128, 64, 256, 8, 2) in kept and (128, 64, 256, 8, 3) not in kept
    small = _tiles(_prune(configs, 40, c=20))
    assert {tile[:3] for tile in small} == {(64, 64, 32)} and all(tile[3] == 4 for tile in small)
    for config in _prune(configs, 7, c=5):
        assert (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_C"]) == (16, 16, 16)
    fp32 = pam._fwd_configs(pam._FWD_TILES["tf32"])
    big_d = _prune(fp32, 32768, dtype=torch.float32, block_d=256)
    for bm, bn, bc, _, stages in _tiles(big_d):
        assert 4 * (bm * 256 + stages * bn * (256 + bc)) <= pam.MAX_SHARED_BYTES
    assert 0 < len(big_d) < len(fp32)
    # Flags torch.compile puts into the configs before the prune survive it.
    flagged = [triton.Config({**c.kwargs, "EVEN_C": True}, num_warps=c.num_warps, num_stages=c.num_stages)
               for c in configs]
    assert all(c.kwargs["EVEN_C"] for c in _prune(flagged, 4096))


def test_forward_perf_model_sees_the_real_grid() -> None:
    """The forward is tuned per N, M and B (issue 18: a power-of-two bucket hid the waves). At
    N = 9409, B = 1, 128 x 64 x 256 tiles make 148 programs on 132 SMs (one each): two waves,
    the second 12% full, which the model charges in full; N = 8448 (one wave) takes about half
    as long although it has 90% of the work, and both sizes share the old bucket."""
    tile = pam._fwd_configs(((128, 64, 256, 8, 2),))[0]

    def clocks(n: int, batch: int = 1) -> float:
        return pam._fwd_time_estimate(**_named_args(n, batch=batch), **tile.all_kwargs())

    assert size_bucket(9409) == size_bucket(8448)
    assert clocks(9409) > 1.8 * clocks(8448)
    # B = 2: 296 programs, three waves (the last 24% full): twice the work in 1.5 times the time
    assert 1.4 < clocks(9409, batch=2) / clocks(9409) < 1.6
    for tuner in pam._FWD_KERNELS.values():
        assert tuner.keys == ["N", "M", "B", "BLOCK_D", "C", "INPUT_PRECISION", "INT64_OFFSETS"]


def test_forward_autotuners_bench_a_handful_ranked_by_the_perf_model() -> None:
    for tuner in pam._FWD_KERNELS.values():
        assert tuner.early_config_prune is pam._prune_fwd_configs
        assert tuner.perf_model is pam._fwd_time_estimate and tuner.configs_top_k == pam._FWD_TOP_K <= 4
    # The GPU's tuners (built without TRITON_INTERPRET) keep their choice across processes.
    check_script = (
        "import danet_kernels.kernels.position_attention as pam\n"
        "assert not pam.INTERPRETING\n"
        "assert all(t.cache_results for t in pam._FWD_KERNELS.values())\n"
        "tiles = lambda t: [(c.kwargs['BLOCK_M'], c.kwargs['BLOCK_N'], c.kwargs['BLOCK_C'], c.num_warps,"
        " c.num_stages) for c in t.configs]\n"
        "assert {k: tiles(t) for k, t in pam._FWD_KERNELS.items()} == {\n"
        "    k: list(v) for k, v in pam._FWD_TILES.items()}\n"
        "print('checked')\n"
    )
    result = run_without_interpreter(check_script, timeout=300)
    assert "checked" in result.stdout, result.stderr[-3000:]


def test_backward_copies_misaligned_operands() -> None:
    """An operand whose rows are not 16-byte aligned although N % 16 == 0 (here a storage offset of
    one element) is copied into an aligned buffer before the backward's launches, as the forward
    does (issue 18: the backward read it in place and lost the fast path). Launches recorded."""
    batch, head_dim, channels, n = 1, 16, 32, 64
    storage = torch.randn(batch, head_dim, n + 1)
    q = storage[..., 1:]
    assert q.shape[-1] % 16 == 0 and not is_aligned(q)
    k, v = torch.randn(batch, head_dim, n), torch.randn(batch, channels, n)
    dy, out, lse = torch.randn_like(v), torch.randn_like(v), torch.randn(batch, n)
    with recorded_launches() as launches:
        pam.pam_backward(dy, q, k, v, torch.ones(1), 1.0, out, lse)
    operands = [(launch.jit_function.__name__, name, arg) for launch in launches
                for name, arg in launch.named().items() if name in ("Q", "K", "V", "DY", "Out")]
    assert any(name == "Q" for _, name, _ in operands)
    misaligned = [(kernel, name) for kernel, name, arg in operands if not is_aligned(arg)]
    assert not misaligned, misaligned


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf
def test_padded_keys_add_nothing_to_dv(backward_path: str) -> None:
    """With every energy hugely negative (lse << -128) a padded key (k = 0, score 0) would get
    P = exp2(-lse) = inf; the dV kernel biases padded keys to -inf as the key-side kernels do, so
    the padded rows of its (B, C, 80) buffer (N = 70) hold zeros, not inf or NaN (issue 18)."""
    inputs = make_inputs(1, 8, 24, 70, gamma=0.9)
    q, k = inputs["q"].abs() * 30 + 1.0, -inputs["k"].abs() * 30 - 1.0
    v, residual, gamma = inputs["v"], inputs["residual"], inputs["gamma"]
    _, out, lse = pam.pam_forward(q, k, v, gamma, residual, 1.0, True)
    assert lse.max() < -128
    _, _, dv, _ = pam.pam_backward(torch.randn_like(v), q, k, v, gamma, 1.0, out, lse)
    assert dv._base.shape[-1] == 80 and torch.equal(dv._base[..., 70:], torch.zeros_like(dv._base[..., 70:]))


def test_lazy_rescale_exact_when_the_running_max_grows_by_any_amount() -> None:
    """Energies that grow along the keys, some key blocks past the running max by less than the
    lazy rescale's threshold (2^8, no rescale: p up to 256) and some by far more (rescaled), match
    float64 (issue 18: the forward rescales its accumulator only past the threshold)."""
    n, head_dim = 160, 4
    q = torch.ones(1, head_dim, n) * 0.25
    # energies per 32-key block (natural units; the threshold is 8 / log2(e) = 5.5): up 1 (kept),
    # up 6 (rescaled), up 1 (kept), up 92 (rescaled; kept, 2^133 would overflow fp32)
    growth = torch.tensor([0.0, 1.0, 7.0, 8.0, 100.0])
    k = (growth.repeat_interleave(32) + torch.rand(n))[None, None, :].expand(1, head_dim, n).clone()
    inputs = {"q": q, "k": k, "v": torch.randn(1, 24, n), "gamma": None, "residual": None}
    check_error_within_reference_error(inputs, factor=3.0)
    inputs["k"] = torch.minimum(inputs["k"], torch.tensor(30.0))  # energies small enough for fp32's
    check_against_float64(inputs)                                  # absolute bound: every block's


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch, head_dim, channels, n", [(2, 64, 512, 97 * 97), (1, 256, 2048, 1000)])
def test_gpu_low_precision_error_bounded_by_reference_error(
    dtype: torch.dtype, batch: int, head_dim: int, channels: int, n: int, backward_path: str
) -> None:
    inputs = make_inputs(batch, head_dim, channels, n, dtype=dtype, gamma=0.5, scale=3.0)
    check_error_within_reference_error(inputs, factor=4.0)


@pytest.mark.gpu
@requires_cuda
def test_gpu_tf32_when_torch_allows_it() -> None:
    """With torch's fp32 matmuls on TF32 the kernels use TF32 too, within the reference's error."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        check_error_within_reference_error(make_inputs(1, 64, 512, 97 * 97, gamma=0.5, scale=3.0), factor=4.0)
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.gpu
@requires_cuda
def test_gpu_danet_shape_fp32_matches_float64(backward_path: str) -> None:
    """DANet's shape: B=1, C=512 (d=64), a 64x64 map; exact fp32 (TF32 off by default)."""
    check_against_float64(make_inputs(1, 64, 512, 4096, gamma=0.7, scale=3.0), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.slow
@requires_cuda
def test_gpu_offsets_beyond_int32() -> None:
    """B * C * N > 2^31 elements (and B above the 65535 grid limit): int64 offsets, batch chunks."""
    batch, head_dim, channels, n = 65537 + 3, 16, 16, 2048
    q = torch.randn(batch, head_dim, n, device="cuda", dtype=torch.float16) * 0.25
    k = torch.randn(batch, head_dim, n, device="cuda", dtype=torch.float16) * 0.25
    v = torch.randn(batch, channels, n, device="cuda", dtype=torch.float16)
    assert v.numel() > 2**31
    with torch.no_grad():
        y = danet_kernels.position_attention(q, k, v, backend="triton")
    for b in (0, 65535, 65536, batch - 1):
        one = slice(b, b + 1)
        expected = position_attention_reference(q[one].double(), k[one].double(), v[one].double())
        assert_close(y[b : b + 1], expected, 2e-2, 2e-2, f"batch element {b}")


@pytest.mark.gpu
@pytest.mark.slow
@requires_cuda
def test_gpu_forward_offsets_beyond_int32_inside_one_image() -> None:
    """ONE image whose in-image offsets pass 2^31: v and the residual channels_last (read in
    place, stride C on the N axis), C = 2^21 + 4096 channels of N = 1024 positions (4.3 GB in
    fp16), so that the last keys' offsets (N - 1) * C pass 2^31 even within one C block; the
    launcher switches the forward to int64 offsets. The first and last channels of the result
    against an fp32 reference."""
    head_dim, channels, n, gamma = 16, 2**21 + 4096, 1024, 0.5
    q = torch.randn(1, head_dim, n, device="cuda", dtype=torch.float16) * 0.5
    k = torch.randn(1, head_dim, n, device="cuda", dtype=torch.float16) * 0.5
    v = torch.randn(1, n, channels, device="cuda", dtype=torch.float16).mT  # channels_last, flattened
    assert v.stride() == (n * channels, 1, channels) and (n - 1) * channels > 2**31
    assert pam._needs_int64_offsets(v)
    with torch.no_grad():
        y = danet_kernels.position_attention(q, k, v, gamma=torch.full((1,), gamma, device="cuda"),
                                             residual=v, backend="triton")
    p = (q[0].float().T @ k[0].float()).softmax(-1)
    for c in (0, channels - 4096):  # the first channels and those whose offsets pass 2^31
        rows = v[0, c : c + 4096].float()
        assert_close(y[0, c : c + 4096], gamma * rows @ p.T + rows, 2e-2, 2e-2, f"y from channel {c}")


@pytest.mark.gpu
@requires_cuda
def test_gpu_deterministic_backward_is_bitwise_repeatable(monkeypatch: pytest.MonkeyPatch) -> None:
    """DANet's shape at B = 1, N = 4096 (split loops): under torch's deterministic switch two
    backward passes agree bit for bit; the default path (atomic dQ) agrees within rounding."""
    inputs = make_inputs(1, 64, 512, 4096, dtype=torch.bfloat16, gamma=0.5, scale=3.0)
    dy = torch.randn_like(inputs["v"])
    assert torch.are_deterministic_algorithms_enabled()
    first, second = run(inputs, dy)[1], run(inputs, dy)[1]
    for name in NAMES:
        assert torch.equal(first[name], second[name]), name
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    atomic = run(inputs, dy)[1]
    for name in NAMES:
        assert_close(atomic[name], first[name], 2e-2, 2e-2, f"d{name}, atomic against deterministic")


@pytest.mark.gpu
@pytest.mark.slow
@requires_cuda
@pytest.mark.parametrize("deterministic", [True, False])
def test_gpu_backward_offsets_beyond_int32_inside_one_image(
    monkeypatch: pytest.MonkeyPatch, deterministic: bool
) -> None:
    """One image of C * N > 2^31 elements (C = 2^23 + 256 channels of N = 256 positions, 4.3 GB
    per fp16 tensor): every gradient, the last channels' dV included, against an fp32 reference
    computed in chunks of C."""
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    head_dim, n = 16, 256
    channels = 2**31 // n + n
    q = torch.randn(1, head_dim, n, device="cuda", dtype=torch.float16) * 0.5
    k = torch.randn(1, head_dim, n, device="cuda", dtype=torch.float16) * 0.5
    v = torch.randn(1, channels, n, device="cuda", dtype=torch.float16)
    dy = torch.randn_like(v)
    gamma = torch.full((1,), 0.5, device="cuda")
    assert v.numel() > 2**31
    scores = q[0].float().T @ k[0].float()
    p = scores.softmax(-1)
    lse = (torch.logsumexp(scores, -1) / math.log(2)).unsqueeze(0)
    out = torch.empty_like(v)
    dp = torch.zeros(n, n, device="cuda")
    delta = torch.zeros(n, device="cuda")
    step = 2**20
    for c in range(0, channels, step):
        o = v[0, c : c + step].float() @ p.T
        out[0, c : c + step] = o.half()
        d_o = 0.5 * dy[0, c : c + step].float()
        dp += d_o.T @ v[0, c : c + step].float()
        delta += (d_o * out[0, c : c + step].float()).sum(0)
    ds = p * (dp - delta[:, None])
    dq, dk, dv, _ = pam.pam_backward(dy, q, k, v, gamma, 1.0, out, lse)
    assert_close(dq[0], k[0].float() @ ds.T, 2e-2, 2e-2, "dq")
    assert_close(dk[0], q[0].float() @ ds, 2e-2, 2e-2, "dk")
    for c in (0, channels - step):  # the first channels and those beyond 2^31 elements
        expected = 0.5 * dy[0, c : c + step].float() @ p
        assert_close(dv[0, c : c + step], expected, 2e-2, 2e-2, f"dv from channel {c}")
