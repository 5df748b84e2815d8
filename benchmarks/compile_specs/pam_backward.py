"""Compile-report entries of the PAM backward (danet_kernels/kernels/position_attention.py).

Both paths: the default one (dQ by fp32 atomics in the key-side kernel) and the deterministic
one (``torch.use_deterministic_algorithms(True)``: a dQ kernel of its own). The work models
follow the kernel module's docstring (FLOPs executed from the grid and the tiles, padded blocks
included).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from benchmarks.compile_report import H100_SMS, KernelSpec, OpSpec, Problem, Work


@contextlib.contextmanager
def _h100() -> Iterator[Any]:
    """The launcher splits small grids by the device's SMs; on the CPU, an H100's."""
    from danet_kernels.kernels import position_attention as pam

    saved = pam._sm_count
    pam._sm_count = lambda device: H100_SMS
    try:
        yield pam
    finally:
        pam._sm_count = saved


def launch(problem: Problem, deterministic: bool = False) -> None:
    """The backward of a training call with gamma (dq, dk, dv and dgamma)."""
    import torch

    b, d, c, n, dtype = problem.batch, problem.head_dim, problem.channels, problem.n, problem.dtype
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        with _h100() as pam:
            q, k = torch.empty(b, d, n, dtype=dtype), torch.empty(b, d, n, dtype=dtype)
            v, out, dy = (torch.empty(b, c, n, dtype=dtype) for _ in range(3))
            pam.pam_backward(dy, q, k, v, torch.empty(1), out, torch.empty(b, n))
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
    num_c_blocks chunks, S (score), dS and its products (dK; dQ too with ATOMIC_DQ)."""
    bm, bn, bc, bd = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_C"], meta["BLOCK_D"]
    blocks = programs * meta["blocks_per_split"]
    products = 2 if meta.get("ATOMIC_DQ") else 1
    c_padded = meta["num_c_blocks"] * bc
    streamed = bm if "DK" in meta else bn  # key side streams query blocks, the dQ kernel key blocks
    element = meta["Q"].element_size()
    score = Work(flops=blocks * 2 * bm * bn * bd, exp2=blocks * bm * bn)
    rest = Work(flops=blocks * 2 * bm * bn * (c_padded + products * bd),
                bytes=blocks * (streamed * bd + (bm + bn) * c_padded) * element)
    return score, rest


def _exp2_tile(meta: dict[str, Any]) -> int:
    return meta["BLOCK_M"] * meta["BLOCK_N"]


KERNELS = (
    KernelSpec("_pam_bwd_preprocess", preprocess_work),
    KernelSpec("_pam_bwd_dv_kernel", dv_work, exp2_tile=_exp2_tile),
    KernelSpec("_pam_bwd_dkdq_kernel", dsdk_work, exp2_tile=_exp2_tile),
    KernelSpec("_pam_bwd_dq_kernel", dsdk_work, exp2_tile=_exp2_tile),
)


def _minimal(p: Problem) -> Work:
    """dV and dP (2 N^2 C each), dQ, dK and the recomputed S (2 N^2 d each); P once."""
    return Work(flops=2 * p.batch * p.n**2 * (2 * p.channels + 3 * p.head_dim), exp2=p.batch * p.n**2)


SPEC = OpSpec(
    name="pam_backward",
    title="PAM backward (default path: dQ by atomics)",
    launch=launch,
    kernels=KERNELS,
    minimal=_minimal,
    unit=("N^2", lambda p: p.batch * p.n**2),
)
DETERMINISTIC = OpSpec(
    name="pam_backward_deterministic",
    title="PAM backward (deterministic path: a dQ kernel, no atomics)",
    launch=lambda problem: launch(problem, deterministic=True),
    kernels=KERNELS,
    minimal=_minimal,
    unit=("N^2", lambda p: p.batch * p.n**2),
)
