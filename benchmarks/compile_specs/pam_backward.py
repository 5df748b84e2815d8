"""Compile-report entries of the PAM backward (danet_kernels/kernels/position_attention.py).

Both paths: the default one (dQ by fp32 atomics in the key-side kernel) and the deterministic
one (``torch.use_deterministic_algorithms(True)``: a dQ kernel of its own). The work models
follow the kernel module's docstring (FLOPs executed from the grid and the tiles, padded blocks
included).
"""

from __future__ import annotations

from typing import Any

import torch
import triton

from benchmarks import compile_targets as targets
from benchmarks.compile_specs.pam_forward import score_tile
from benchmarks.compile_types import PLAIN_CALL, PRECISIONS, KernelSpec, OpSpec, Problem, Work
from danet_kernels.kernels import position_attention as pam


def launch(problem: Problem, deterministic: bool = False) -> None:
    """The backward of a training call with gamma (dq, dk, dv and dgamma; the plain variant:
    without gamma), on the default path or the deterministic one."""
    b, d, c, n, dtype = problem.batch, problem.head_dim, problem.channels, problem.n, problem.dtype
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        q, k = torch.empty(b, d, n, dtype=dtype), torch.empty(b, d, n, dtype=dtype)
        v, out, dy = (torch.empty(b, c, n, dtype=dtype) for _ in range(3))
        gamma = None if problem.variant == PLAIN_CALL else torch.empty(1)
        pam.pam_backward(dy, q, k, v, gamma, 1.0, out, torch.empty(b, n))
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def preprocess_work(meta: dict[str, Any], programs: int) -> tuple[Work, Work]:
    """delta = rowsum(dY * O): BLOCK_M columns of all C per program."""
    bm, c = meta["BLOCK_M"], meta["C"]
    element = meta["DY"].element_size()
    return Work(), Work(flops=programs * 2 * bm * c, bytes=programs * 2 * bm * c * element)


def dv_work(meta: dict[str, Any], programs: int) -> tuple[Work, Work]:
    """Per program (BLOCK_N keys, BLOCK_C channels, one query split): S^T recomputed (score) and
    dV^T += P^T dO^T per query block, re-reading q and the dY chunk."""
    bm, bn, bc, bd = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_C"], meta["BLOCK_D"]
    blocks = programs * meta["blocks_per_split"]
    element = meta["Q"].element_size()
    score = Work(flops=blocks * 2 * bm * bn * bd, exp2=blocks * bm * bn)
    rest = Work(flops=blocks * 2 * bm * bn * bc, bytes=blocks * bm * (bd + bc) * element)
    return score, rest


def dsdk_work(meta: dict[str, Any], programs: int) -> tuple[Work, Work]:
    """Key-side (dK, and dQ by atomics) or dQ kernel: per streamed block, dP over all of C in
    num_c_blocks chunks, S (score), dS and its products (dK; dQ too with ATOMIC_DQ). The key side
    streams q and dY per query block, the dQ kernel k and v per key block, each the other side's
    C-wide operand too unless it stays resident (loaded once per program); atomics add d x BLOCK_M
    fp32 values per query block."""
    bm, bn, bc, bd = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_C"], meta["BLOCK_D"]
    blocks = programs * meta["blocks_per_split"]
    products = 2 if meta.get("ATOMIC_DQ") else 1
    c_padded = meta["num_c_blocks"] * bc
    key_side = "DK" in meta
    streamed, resident = (bm, bn) if key_side else (bn, bm)
    stays = meta.get("RESIDENT_V" if key_side else "RESIDENT_DY", False)
    element = meta["Q"].element_size()
    per_block = streamed * (bd + c_padded) * element + (0 if stays else resident * c_padded * element)
    atomics = bm * bd * 4 if meta.get("ATOMIC_DQ") else 0
    score = Work(flops=blocks * 2 * bm * bn * bd, exp2=blocks * bm * bn)
    once = programs * resident * c_padded * element if stays else 0
    rest = Work(flops=blocks * 2 * bm * bn * (c_padded + products * bd),
                bytes=blocks * (per_block + atomics) + once)
    return score, rest


KERNELS = (
    KernelSpec("_pam_bwd_preprocess", preprocess_work, lambda meta: triton.cdiv(meta["C"], meta["BLOCK_C"])),
    KernelSpec("_pam_bwd_dv_kernel", dv_work, lambda meta: meta["blocks_per_split"], exp2_tile=score_tile),
    KernelSpec("_pam_bwd_dkdq_kernel", dsdk_work, lambda meta: meta["num_steps"], exp2_tile=score_tile),
    KernelSpec("_pam_bwd_dq_kernel", dsdk_work, lambda meta: meta["num_steps"], exp2_tile=score_tile),
)


def _minimal(p: Problem) -> Work:
    """dV and dP (2 N^2 C each), dQ, dK and the recomputed S (2 N^2 d each); P once."""
    return Work(flops=2 * p.batch * p.n**2 * (2 * p.channels + 3 * p.head_dim), exp2=p.batch * p.n**2)


# Beyond N = 32768 and 9409: N = 4096 (B = 1 splits the loops), C = 1024 at 16 bits (v^T too wide to
# stay resident: the streamed tiles), a wide head (d = 256, C = 2048: only 16-bit and tf32 compile).
EXTRA_PROBLEMS = (*(Problem(4096, p) for p in PRECISIONS), Problem(4096, "bf16", channels=1024),
                  *(Problem(1024, p, head_dim=256, channels=2048) for p in ("bf16", "fp32-tf32")))
MATMUL_KERNELS = ("_pam_bwd_dv_kernel", "_pam_bwd_dkdq_kernel", "_pam_bwd_dq_kernel")


def backward_targets(flops: tuple[str, float, tuple[str, ...]]) -> tuple[targets.Target, ...]:
    """What every backward launch must keep (both paths), and the path's FLOPs bound ``(what, N^2
    FLOPs, precisions)`` at d = 64, C = 512, N = 32768."""
    what, bound, precisions = flops
    return (
        targets.compiles(),
        targets.no_spills(text="no launch spills registers, at every N and head of the report"),
        targets.exp2_once(MATMUL_KERNELS),
        targets.pipelined(MATMUL_KERNELS),
        targets.tensor_cores(MATMUL_KERNELS),
        targets.preferred_total(f"{what}: <= {bound:g} N^2 FLOPs at d = 64, C = 512, N = 32768 "
                                f"({', '.join(precisions)})", precisions, 32768, flops=bound),
        targets.each_row("the key-side kernel streams <= 12 bytes per (query, key) pair from L2 (16-bit, "
                         "d = 64, C = 512, N = 32768)", lambda r: r.bytes <= 12, lambda r: f"{r.bytes:.3g} B",
                         lambda r: r.error is None and r.kernel == "_pam_bwd_dkdq_kernel" and r.n == 32768
                         and r.precision in ("bf16", "fp16") and (r.head_dim, r.channels) == (64, 512)),
    )


def _spec(name: str, title: str, deterministic: bool, flops: tuple[str, float, tuple[str, ...]]) -> OpSpec:
    return OpSpec(name=name, title=title, launch=lambda problem: launch(problem, deterministic),
                  kernels=KERNELS, minimal=_minimal, unit=("N^2", lambda p: p.batch * p.n**2),
                  extra_problems=EXTRA_PROBLEMS, targets=backward_targets(flops), variants=(PLAIN_CALL,))


# The bound by default (3xTF32 takes the atomics-free pair always: its atomic dQ spills); the
# deterministic path's own figure, not the 3600, which no design without inter-program
# ordering or N^2 memory reaches on sm_90 (the kernel module's docstring), so that it cannot grow.
SPEC = _spec("pam_backward", "PAM backward (default path: dQ by atomics)", False,
             ("default path", 3000, ("bf16", "fp16", "fp32-tf32", "fp32-ieee")))
DETERMINISTIC = _spec("pam_backward_deterministic",
                      "PAM backward (deterministic path: a dQ kernel, no atomics)", True,
                      ("deterministic path, as the docstring counts it", 3840, ("bf16", "fp16", "fp32-ieee")))
