"""Compile-report entry of the PAM forward (danet_kernels/kernels/position_attention.py)."""

from __future__ import annotations

import contextlib
from typing import Any
from unittest import mock

import torch
import triton

from benchmarks import compile_targets as targets
from benchmarks.compile_types import PLAIN_CALL, PRECISIONS, KernelSpec, OpSpec, Problem, Row, Work
from danet_kernels.kernels import position_attention as pam

INT64_OFFSETS = "int64 offsets"  # the variant with the launcher's int64 switch forced on


def launch(problem: Problem) -> None:
    """A training call: gamma, the residual epilogue and O stored for the backward (the plain
    variant: none of them). For the int64 variant the launcher's in-image offset switch is forced
    on: its cost measured at DANet's sizes (a real launch takes it from C * N ~ 2^31 on, N > 4.2M
    at C = 512)."""
    b, d, c, n, dtype = problem.batch, problem.head_dim, problem.channels, problem.n, problem.dtype
    offsets = (mock.patch.object(pam, "_needs_int64_offsets", lambda *tensors: True)
               if problem.variant == INT64_OFFSETS else contextlib.nullcontext())
    with offsets:
        q, k = torch.empty(b, d, n, dtype=dtype), torch.empty(b, d, n, dtype=dtype)
        v, residual = torch.empty(b, c, n, dtype=dtype), torch.empty(b, c, n, dtype=dtype)
        plain = problem.variant == PLAIN_CALL
        gamma, residual = (None, None) if plain else (torch.empty(1), residual)
        pam.pam_forward(q, k, v, gamma, residual, 1.0, not plain)


def score_tile(meta: dict[str, Any]) -> int:
    """The exp2 tile of the PAM kernels (forward and backward): BLOCK_M queries x BLOCK_N keys."""
    return meta["BLOCK_M"] * meta["BLOCK_N"]


def forward_work(meta: dict[str, Any], programs: int) -> tuple[Work, Work]:
    """Every program sweeps all cdiv(N, BLOCK_N) key blocks: S = q^T k on its BLOCK_M x BLOCK_N
    tile (the score part) and its BLOCK_C channels of P v, streaming a k and a v tile per block."""
    bm, bn, bc, bd = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_C"], meta["BLOCK_D"]
    blocks = programs * triton.cdiv(meta["M"], bn)
    element = meta["V"].element_size()
    score = Work(flops=blocks * 2 * bm * bn * bd, exp2=blocks * bm * bn)
    rest = Work(flops=blocks * 2 * bm * bn * bc, bytes=blocks * bn * (bd + bc) * element)
    return score, rest


def _estimate(row: Row) -> float:
    """The forward perf model's instruction estimate for a row's config (``BMxBNxBC wW sS``)."""
    tiles, warps, _ = row.config.split()
    return pam.forward_loop_instructions(*map(int, tiles.split("x")), int(warps[1:]))


KERNELS = (
    KernelSpec("_pam_fwd_kernel", forward_work, lambda meta: triton.cdiv(meta["M"], meta["BLOCK_N"]),
               exp2_tile=score_tile),
)
_KERNEL = ("_pam_fwd_kernel",)

# What the targets and the forward's design ask of every config the prune keeps, and of
# the preferred one (docs/compile_report.md shows each against every row).
TARGETS = (
    targets.compiles(),
    targets.no_spills(text="no kept config spills registers (int64 offsets included)"),
    targets.exp2_once(_KERNEL),
    targets.tensor_cores(_KERNEL),
    targets.pipelined(_KERNEL, text="k and v tiles by cp.async in the main loop (software-pipelined), at "
                                    "N = 9409 as at 32768"),
    targets.same_configs((32768, 9409)),
    targets.each_row("the autotuner's estimate of the main loop's instructions within 15% of the compiled "
                     "loop's (16-bit)", lambda r: abs(_estimate(r) / r.loop_instructions - 1) <= 0.15,
                     lambda r: f"estimate {_estimate(r):.0f}, compiled {r.loop_instructions}",
                     lambda r: r.error is None and r.precision in ("bf16", "fp16")
                     and r.config.count("x") == 2),
    targets.preferred_total("preferred config at d = 64, C = 512, N = 32768, 16-bit: <= 1280 N^2 FLOPs and "
                            "<= 2 N^2 exp2 (minimal 1152 and 1)", ("bf16", "fp16"), 32768,
                            flops=1280, exp2=2),
)

SPEC = OpSpec(
    name="pam_forward", title="PAM forward", launch=launch, kernels=KERNELS, targets=TARGETS,
    minimal=lambda p: Work(flops=2 * p.batch * p.n**2 * (p.head_dim + p.channels), exp2=p.batch * p.n**2),
    unit=("N^2", lambda p: p.batch * p.n**2), variants=(INT64_OFFSETS, PLAIN_CALL),
    extra_problems=tuple(Problem(32768, precision, variant=INT64_OFFSETS) for precision in PRECISIONS),
    notes=(f"*[{INT64_OFFSETS}]*: the launcher's switch to int64 in-image offsets forced on (a real "
           "launch takes it where an image's offsets can pass 2^31: C * N ~ 2^31, N > 4.2M at C = 512), "
           "to show its cost at an ordinary size.",),
)
