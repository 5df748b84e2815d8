"""Compile-report entry of the PAM backward (danet_kernels/kernels/position_attention.py)."""

from __future__ import annotations

from typing import Any

from benchmarks.compile_report import KernelSpec, OpSpec, Problem, Work


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def launch(problem: Problem) -> None:
    """The backward of a training call with gamma (dq, dk, dv and dgamma)."""
    import torch

    from danet_kernels.kernels import position_attention as pam

    b, d, c, n, dtype = problem.batch, problem.head_dim, problem.channels, problem.n, problem.dtype
    q, k = torch.empty(b, d, n, dtype=dtype), torch.empty(b, d, n, dtype=dtype)
    v, out, dy = (torch.empty(b, c, n, dtype=dtype) for _ in range(3))
    pam.pam_backward(dy, q, k, v, torch.empty(1), out, torch.empty(b, n))


def preprocess_work(meta: dict[str, Any], programs: int) -> tuple[Work, Work]:
    """delta = rowsum(dY * O): BLOCK_M columns of all C per program."""
    bm, c = meta["BLOCK_M"], meta["C"]
    element = meta["DY"].element_size()
    return Work(), Work(flops=programs * 2 * bm * c, bytes=programs * 2 * bm * c * element)


def dv_work(meta: dict[str, Any], programs: int) -> tuple[Work, Work]:
    """Per program (BLOCK_N keys, BLOCK_C channels), over all query blocks: recompute P (score)
    and dV += P^T dY."""
    bm, bn, bc, bd = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_C"], meta["BLOCK_D"]
    blocks = programs * _cdiv(meta["N"], bm)
    element = meta["Q"].element_size()
    score = Work(flops=blocks * 2 * bm * bn * bd, exp2=blocks * bm * bn)
    rest = Work(flops=blocks * 2 * bm * bn * bc, bytes=blocks * bm * (bd + bc) * element)
    return score, rest


def _ds_work(meta: dict[str, Any], programs: int, resident: str) -> tuple[Work, Work]:
    """dK (resident keys) or dQ (resident queries): per streamed block, recompute P (score),
    dP = dY^T v over all of C in BLOCK_C chunks, then dS times q or k."""
    bm, bn, bc, bd = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_C"], meta["BLOCK_D"]
    streamed = bm if resident == "keys" else bn
    blocks = programs * _cdiv(meta["N"], streamed)
    c_padded = _cdiv(meta["C"], bc) * bc
    element = meta["Q"].element_size()
    score = Work(flops=blocks * 2 * bm * bn * bd, exp2=blocks * bm * bn)
    rest = Work(flops=blocks * (2 * bm * bn * c_padded + 2 * bm * bn * bd),
                bytes=blocks * (streamed * bd + (bm + bn) * c_padded) * element)
    return score, rest


KERNELS = (
    KernelSpec("_pam_bwd_preprocess", preprocess_work),
    KernelSpec("_pam_bwd_dv_kernel", dv_work, exp2_tile=lambda meta: meta["BLOCK_M"] * meta["BLOCK_N"]),
    KernelSpec("_pam_bwd_dk_kernel", lambda meta, programs: _ds_work(meta, programs, "keys"),
               exp2_tile=lambda meta: meta["BLOCK_M"] * meta["BLOCK_N"]),
    KernelSpec("_pam_bwd_dq_kernel", lambda meta, programs: _ds_work(meta, programs, "queries"),
               exp2_tile=lambda meta: meta["BLOCK_M"] * meta["BLOCK_N"]),
)

SPEC = OpSpec(
    name="pam_backward",
    title="PAM backward",
    launch=launch,
    kernels=KERNELS,
    # dV and dP (2 N^2 C each), dQ, dK and the recomputed S (2 N^2 d each); P once.
    minimal=lambda p: Work(flops=2 * p.batch * p.n**2 * (2 * p.channels + 3 * p.head_dim),
                           exp2=p.batch * p.n**2),
    unit=("N^2", lambda p: p.batch * p.n**2),
)
