"""Compile-report entries of CAM, forward and backward (danet_kernels/kernels/channel_attention.py)."""

from __future__ import annotations

from typing import Any

import torch
import triton

from benchmarks import compile_targets as targets
from benchmarks.compile_types import PLAIN_CALL, KernelSpec, OpSpec, Problem, Work
from danet_kernels.kernels import channel_attention as cam


def launch_forward(problem: Problem) -> None:
    x = torch.empty(problem.batch, problem.channels, problem.n, dtype=problem.dtype)
    cam.cam_forward(x, None if problem.variant == PLAIN_CALL else torch.empty(1))  # plain: no gamma


def launch_backward(problem: Problem) -> None:
    b, c, n = problem.batch, problem.channels, problem.n
    x, grad_y = (torch.empty(b, c, n, dtype=problem.dtype) for _ in range(2))
    gamma = None if problem.variant == PLAIN_CALL else torch.empty(1)
    cam.cam_backward(grad_y, x, torch.empty(b, c, c), gamma)


def gram_work(meta: dict[str, Any], programs: int) -> tuple[Work, Work]:
    """Each (tile pair, split) program accumulates BLOCK_C x BLOCK_C over its split of N."""
    bc, bn, n, n_per_split = meta["BLOCK_C"], meta["BLOCK_N"], meta["N"], meta["n_per_split"]
    splits = meta["num_splits"]
    blocks_per_split = [triton.cdiv(min(n_per_split, n - s * n_per_split), bn) for s in range(splits)]
    per_split_programs = programs // splits
    blocks = per_split_programs * sum(blocks_per_split)
    element = meta["L"].element_size()
    return Work(), Work(flops=blocks * 2 * bc * bc * bn, bytes=blocks * 2 * bc * bn * element)


def softmax_work(meta: dict[str, Any], programs: int) -> tuple[Work, Work]:
    """BLOCK_R rows: pass 1 sums the split partials, pass 2 rewrites A; an exp2 per element each."""
    rows, c, splits = meta["BLOCK_R"], meta["C"], meta["num_splits"]
    elements = programs * rows * triton.cdiv(c, meta["BLOCK_K"]) * meta["BLOCK_K"]
    return Work(exp2=2 * elements), Work(bytes=elements * 4 * (splits + 2))


def apply_work(meta: dict[str, Any], programs: int) -> tuple[Work, Work]:
    """Y tile BLOCK_R x BLOCK_N with a K-loop over C (twice with HAS_V: K = 2C)."""
    br, bn, bk, c = meta["BLOCK_R"], meta["BLOCK_N"], meta["BLOCK_K"], meta["C"]
    steps = programs * triton.cdiv(c, bk) * (2 if meta["HAS_V"] else 1)
    element = meta["U"].element_size()
    return Work(), Work(flops=steps * 2 * br * bn * bk, bytes=steps * (br + bn) * bk * element)


def rows_work(meta: dict[str, Any], programs: int) -> tuple[Work, Work]:
    """Row kernels over C x C fp32 matrices: traffic only."""
    rows, c = meta.get("BLOCK_R", meta.get("BLOCK", 1)), meta["C"]
    return Work(), Work(bytes=programs * rows * c * 4 * 3)


def _row_steps(meta: dict[str, Any]) -> int:
    return triton.cdiv(meta["C"], meta.get("BLOCK_K", meta.get("BLOCK", 1)))


GRAM = KernelSpec("_cam_gram_kernel", gram_work,
                  lambda meta: triton.cdiv(meta["n_per_split"], meta["BLOCK_N"]))
APPLY = KernelSpec("_cam_apply_kernel", apply_work,
                   lambda meta: triton.cdiv(meta["C"], meta["BLOCK_K"]) * (2 if meta["HAS_V"] else 1))
FORWARD_KERNELS = (GRAM, KernelSpec("_cam_softmax_kernel", softmax_work, _row_steps,
                                    exp2_tile=lambda meta: meta["BLOCK_R"] * meta["BLOCK_K"]), APPLY)
BACKWARD_KERNELS = (GRAM, KernelSpec("_cam_softmax_bwd_kernel", rows_work, _row_steps),
                    KernelSpec("_cam_bwd_weights_kernel", rows_work, _row_steps), APPLY)


def _per_c2n(p: Problem) -> float:
    return p.batch * p.channels**2 * p.n


GEMM_KERNELS = ("_cam_gram_kernel", "_cam_apply_kernel")
# What every config of CAM's tile lists must keep, forward and backward (each list is what
# compiles clean for its operand class; the launcher copies unaligned rows into 16-aligned ones).
TARGETS = (
    targets.compiles(),
    targets.no_spills(text="no kept config spills registers"),
    targets.fits_shared_memory(),
    # At C = 1 the K loop has one step and is unrolled: nothing to pipeline there.
    targets.pipelined(GEMM_KERNELS, applies=lambda r: r.channels > 1,
                      text="the GEMMs' main loops stream both operands by cp.async (software-pipelined), at "
                           "N = 9409 as at aligned N"),
    targets.tensor_cores(GEMM_KERNELS),
    targets.same_binary_when_padded(("_cam_gram_kernel", "_cam_softmax_kernel", "_cam_softmax_bwd_kernel",
                                     "_cam_bwd_weights_kernel")),
)


# The symmetric Gram x x^T (half of 2 C^2 N) and out = A x (2 C^2 N), an exp2 per energy; backward
# P = dY x^T (2 C^2 N) and dx = W [dY; x] with K = 2 C (4 C^2 N).
FORWARD = OpSpec(name="cam_forward", title="CAM forward", launch=launch_forward, kernels=FORWARD_KERNELS,
                 minimal=lambda p: Work(flops=3 * _per_c2n(p), exp2=p.batch * p.channels**2),
                 unit=("C^2 N", _per_c2n), targets=TARGETS, variants=(PLAIN_CALL,))
BACKWARD = OpSpec(name="cam_backward", title="CAM backward", launch=launch_backward, kernels=BACKWARD_KERNELS,
                  minimal=lambda p: Work(flops=6 * _per_c2n(p)), unit=("C^2 N", _per_c2n), targets=TARGETS,
                  variants=(PLAIN_CALL,))
