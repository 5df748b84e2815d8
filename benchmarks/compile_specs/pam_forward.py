"""Compile-report entry of the PAM forward (danet_kernels/kernels/position_attention.py)."""

from __future__ import annotations

from typing import Any

from benchmarks.compile_report import KernelSpec, OpSpec, Problem, Work


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def launch(problem: Problem) -> None:
    """A training call: gamma, the residual epilogue and O stored for the backward."""
    import torch

    from danet_kernels.kernels import position_attention as pam

    b, d, c, n, dtype = problem.batch, problem.head_dim, problem.channels, problem.n, problem.dtype
    q, k = torch.empty(b, d, n, dtype=dtype), torch.empty(b, d, n, dtype=dtype)
    v, residual = torch.empty(b, c, n, dtype=dtype), torch.empty(b, c, n, dtype=dtype)
    pam.pam_forward(q, k, v, torch.empty(1), residual, True)


def forward_work(meta: dict[str, Any], programs: int) -> tuple[Work, Work]:
    """Every program sweeps all cdiv(N, BLOCK_N) key blocks: S = q^T k on its BLOCK_M x BLOCK_N
    tile (the score part) and its BLOCK_C channels of P v, streaming a k and a v tile per block."""
    bm, bn, bc, bd = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_C"], meta["BLOCK_D"]
    blocks = programs * _cdiv(meta["N"], bn)
    element = meta["V"].element_size()
    score = Work(flops=blocks * 2 * bm * bn * bd, exp2=blocks * bm * bn)
    rest = Work(flops=blocks * 2 * bm * bn * bc, bytes=blocks * bn * (bd + bc) * element)
    return score, rest


KERNELS = (
    KernelSpec("_pam_fwd_kernel", forward_work, exp2_tile=lambda meta: meta["BLOCK_M"] * meta["BLOCK_N"]),
)

SPEC = OpSpec(
    name="pam_forward",
    title="PAM forward",
    launch=launch,
    kernels=KERNELS,
    minimal=lambda p: Work(flops=2 * p.batch * p.n**2 * (p.head_dim + p.channels), exp2=p.batch * p.n**2),
    unit=("N^2", lambda p: p.batch * p.n**2),
)
