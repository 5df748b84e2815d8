"""danet_kernels.kernels.common: the fp32 dot precision rule, and what each precision costs."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import danet_kernels
from danet_kernels.kernels.common import (
    CALIBRATION,
    DOT_PRECISIONS,
    OPERAND_CLASSES,
    LoopCost,
    dot_input_precision,
    launch_clocks,
    offsets_2d,
    operand_class,
    resident_programs,
)
from danet_kernels.reference import channel_attention_reference, position_attention_reference
from scripts.fp32_precision_errors import channel_attention_errors, position_attention_errors

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def float32_matmul_precision(level: str) -> Iterator[None]:
    """torch.set_float32_matmul_precision(level) inside, torch's unset default after."""
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        _reset_matmul_precision()


def _reset_matmul_precision() -> None:
    """Back to the state of a fresh process: legacy level "highest", the new API unset ("none").

    In this order: the legacy level survives a reset of the new API alone (a stale "medium"
    would then make ``allow_tf32`` raise)."""
    torch.set_float32_matmul_precision("highest")
    torch.backends.fp32_precision = "none"
    torch.backends.cuda.matmul.fp32_precision = "none"


@pytest.fixture
def clean_precision() -> Iterator[None]:
    _reset_matmul_precision()
    yield
    _reset_matmul_precision()


# (what a user runs, what the kernels must use). Each starts from a fresh process's state.
SETTINGS = [
    ("", "ieee"),
    ('torch.set_float32_matmul_precision("highest")', "ieee"),
    ('torch.set_float32_matmul_precision("high")', "tf32x3"),
    ('torch.set_float32_matmul_precision("medium")', "tf32"),
    ("torch.backends.cuda.matmul.allow_tf32 = True", "tf32x3"),  # torch counts it as "high"
    ("torch.backends.cuda.matmul.allow_tf32 = False", "ieee"),
    ('torch.backends.cuda.matmul.fp32_precision = "tf32"', "tf32"),  # the new API names TF32
    ('torch.backends.cuda.matmul.fp32_precision = "ieee"', "ieee"),
    ('torch.backends.fp32_precision = "tf32"', "tf32"),
    ('torch.backends.fp32_precision = "ieee"', "ieee"),
    ('torch.set_float32_matmul_precision("high"); torch.backends.cuda.matmul.fp32_precision = "ieee"',
     "ieee"),
    ('torch.backends.fp32_precision = "ieee"; torch.backends.cuda.matmul.fp32_precision = "tf32"', "tf32"),
    ('torch.backends.fp32_precision = "tf32"; torch.set_float32_matmul_precision("medium")', "tf32"),
    ('torch.backends.fp32_precision = "tf32"; torch.set_float32_matmul_precision("high")', "tf32x3"),
]


@pytest.mark.parametrize("setting, expected", SETTINGS, ids=[s or "default" for s, _ in SETTINGS])
def test_fp32_dot_precision_follows_torch(setting: str, expected: str, clean_precision) -> None:
    """"highest" (the default) stays IEEE, "high" is 3xTF32, "medium" TF32, through every setter
    of both torch APIs and their mixes; 16-bit operands always take the tensor cores."""
    exec(setting, {"torch": torch})
    assert dot_input_precision(torch.float32) == expected
    assert dot_input_precision(torch.bfloat16) == dot_input_precision(torch.float16) == "tf32"
    assert expected in DOT_PRECISIONS


def test_operand_classes() -> None:
    """16-bit operands ignore the precision; fp32 is classed by it (any but "ieee" on the tensor
    cores); every precision the kernels can be given has a class, and PAM's tile lists cover them."""
    from danet_kernels.kernels import position_attention as pam

    assert operand_class(torch.bfloat16, "tf32") == operand_class(torch.float16, "ieee") == "16-bit"
    assert operand_class(torch.float32, "ieee") == "ieee"
    assert operand_class(torch.float32, "tf32x3") == "tf32x3"
    assert operand_class(torch.float32, "tf32") == "tf32"
    assert {operand_class(torch.float32, p) for p in DOT_PRECISIONS} | {"16-bit"} == set(OPERAND_CLASSES)
    assert set(pam._FWD_TILES) == set(OPERAND_CLASSES)


def test_fp32_dot_precision_default_in_a_fresh_process() -> None:
    """The test process may have touched the settings; a fresh one is at the default."""
    code = ("import torch\nfrom danet_kernels.kernels.common import dot_input_precision\n"
            "print(dot_input_precision(torch.float32))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ieee"


@pytest.mark.parametrize("level", ["highest", "high", "medium"])
def test_both_ops_run_at_every_precision(level: str) -> None:
    """PAM and CAM, forward and every gradient, at each fp32 precision: the kernels accept it
    (under the interpreter, which computes dots in full fp32 whatever the precision, so all three
    must match float64 to fp32 accuracy)."""
    q, k = (torch.randn(2, 8, 70, device=DEVICE) * 0.5 for _ in range(2))
    v, x = (torch.randn(2, 24, 70, device=DEVICE) for _ in range(2))
    gamma = torch.full((1,), 0.6, device=DEVICE)
    cases = {
        "pam": (lambda q, k, v, gamma, residual: danet_kernels.position_attention(
            q, k, v, gamma=gamma, residual=residual, backend="triton"),
                lambda q, k, v, gamma, residual: gamma * position_attention_reference(q, k, v) + residual,
                {"q": q, "k": k, "v": v, "gamma": gamma, "residual": x}),
        "cam": (lambda x, gamma: danet_kernels.channel_attention(x, gamma=gamma, backend="triton"),
                lambda x, gamma: gamma * channel_attention_reference(x) + x,
                {"x": x * (2.0 / 70) ** 0.5, "gamma": gamma}),
    }
    with float32_matmul_precision(level):
        for name, (fused, oracle, inputs) in cases.items():
            results = []
            for fn, dtype in ((fused, torch.float32), (oracle, torch.float64)):
                leaves = {key: t.detach().to(dtype).requires_grad_() for key, t in inputs.items()}
                out = fn(**leaves)
                out.backward(torch.cos(torch.arange(out.numel(), device=DEVICE, dtype=dtype)).view_as(out))
                results.append([out, *(t.grad for t in leaves.values())])
            for got, want in zip(*results, strict=True):
                err = ((got.double() - want).norm() / want.norm()).item()
                assert err < 2e-5, f"{name} at {level!r}: relative error {err:.1e}"


@triton.jit
def _offsets_probe(Out, row0, stride_rows, col0, stride_cols, BLOCK: tl.constexpr):
    """Out[0] = the kernels' offsets of a BLOCK x BLOCK tile, Out[1] = the same in plain int32."""
    rows = row0 + tl.arange(0, BLOCK)
    cols = col0 + tl.arange(0, BLOCK)
    index = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    tl.store(Out + index, offsets_2d(rows, stride_rows, cols, stride_cols))
    int32_offsets = rows[:, None] * stride_rows + cols[None, :] * stride_cols
    tl.store(Out + BLOCK * BLOCK + index, int32_offsets.to(tl.int64))


def test_offsets_inside_one_image_pass_int32() -> None:
    """The last tile of an image with C * N > 2^31 (C = 512, N = 2^22 + 9: 4 GiB in fp16), as
    CAM's apply kernel and PAM's backward address a contiguous (C, N) map (rows of C, stride N),
    and with stride 1 on the rows, as CAM's Gram kernel's mirrored store addresses a C x C tile
    and PAM's a channels_last map: int64 offsets are exact where int32 arithmetic wraps (the
    second half shows the interpreter wraps like the GPU, so the check can fail)."""
    block = 16
    for row0, stride_rows, col0, stride_cols in [(512 - block, 2**22 + 9, 2**22 + 9 - block, 1),
                                                 (2**16 - block, 1, 2**16 - block, 2**16)]:
        out = torch.empty(2, block, block, dtype=torch.int64, device=DEVICE)
        _offsets_probe[(1,)](out, row0, stride_rows, col0, stride_cols, BLOCK=block)
        rows = torch.arange(row0, row0 + block, dtype=torch.int64)[:, None]
        cols = torch.arange(col0, col0 + block, dtype=torch.int64)[None, :]
        expected = rows * stride_rows + cols * stride_cols
        assert expected.max() > 2**31
        assert torch.equal(out[0].cpu(), expected)
        assert not torch.equal(out[1].cpu(), expected), "int32 did not wrap: the check above proves nothing"


def test_expected_gpu_errors_of_each_precision() -> None:
    """The CPU emulation behind docs/performance.md's precision table (small shapes): 3xTF32
    is as accurate as IEEE fp32, plain TF32 two to three orders of magnitude less, for both ops,
    in the output and every gradient."""
    emulated = {
        "cam": channel_attention_errors(64, 1024),
        "pam": position_attention_errors(16, 32, 512),
    }
    for op, errors in emulated.items():
        for name, ieee in errors["ieee"].items():
            assert ieee < 1e-4, (op, name, errors)
            assert errors["tf32x3"][name] < 2 * ieee, (op, name, errors)
            assert errors["tf32"][name] > 30 * ieee, (op, name, errors)


def test_perf_model_phases_residency_and_waves() -> None:
    """kernels/common.py's model: a serial loop pays its MMA phase, the wait and its other work in
    turn, an overlapped one the longer of them; co-resident programs fill each other's gaps (two
    per SM finish in the time of one where the serial chain is the bound); the busiest SM's
    programs count, so one program more than the SMs costs a second wave in full."""
    calibration = dataclasses.replace(CALIBRATION, program_clocks=0.0)
    loop = LoopCost(flops=4096 * 1000 * calibration.mma_efficiency, instructions=500, exp2=0, bytes=0)
    issue = 500 * calibration.clocks_per_instruction

    def clocks(programs: int, loop: LoopCost = loop, resident: int = 1) -> float:
        return launch_clocks(programs, 10, loop, 4, 3, resident, "16-bit", sms=132, calibration=calibration)

    assert clocks(132) == pytest.approx(10 * (1000 + calibration.mma_wait_clocks + issue))
    assert clocks(132, dataclasses.replace(loop, serial=False)) == pytest.approx(10 * 1000)
    assert clocks(133) == pytest.approx(2 * clocks(132))
    assert clocks(264, resident=2) == pytest.approx(clocks(132))
    assert clocks(4 * 132, resident=2) == pytest.approx(2 * clocks(132))
    assert resident_programs(238, 8, 99328) == 1 and resident_programs(164, 4, 82944) == 2
