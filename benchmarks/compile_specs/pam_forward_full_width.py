"""A PAM forward variant the compile report measures but the library does not use: full width.

FlashAttention-3's layout for this head-dim pair (q, k of 64, v of 512) gives one program all C
value channels, so S = q^T k and its exp2 are computed once per query block (the minimal
1152 N^2 FLOPs and N^2 exp2 at d = 64, C = 512) instead of once per C block. Triton cannot give
one warpgroup the softmax and two others the halves of O (no warp specialisation of that kind in
triton 3.6 to 3.9), and its MMA layout replicates S over 8 warps at 64 rows, so the variant here
is the closest Triton form: keys on the rows, ``S^T = k^T q`` as a BLOCK_N x BLOCK_M tile on one
warpgroup (64 x 32, no replication), the softmax down its columns, ``O^T += v P^T`` accumulated
as a C x BLOCK_M fp32 tile (512 x 32: 128 registers per thread on 4 warps), P^T through shared
memory, O^T stored along N. ``python -m benchmarks.compile_report --ops pam_forward_full_width``
shows why the library keeps the split layout (see the docstring of position_attention.py): it
spills with the residual epilogue, its per-query alpha exp2 run on every thread holding the
query's column (1.5x the tile's share), and each 32-query program streams all of k and v, 3.6x
the operand bytes of the split layout's 128-row, 256-channel programs.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

from benchmarks.compile_report import KernelSpec, OpSpec
from benchmarks.compile_specs import pam_forward as split
from danet_kernels.kernels.position_attention import LOG2E, _load_tile, _tile_mask

# (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages); BLOCK_C covers all of C.
TILES = ((32, 64, 4, 3), (32, 64, 4, 2), (16, 64, 4, 2))


@triton.jit
def _full_width_inner(acc, l_i, m_i, q, K_block, V_block, stride_kd, stride_kn, stride_vc, stride_vn,
                      offs_d, offs_c, mask_d, mask_c, start_n, end_n, N, N_LOADED,
                      TAIL: tl.constexpr, EVEN_D: tl.constexpr, EVEN_C: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """The library's online-softmax sweep, transposed: keys on the rows, statistics per column."""
    for block_start in range(start_n, end_n, BLOCK_N):
        offs_n = block_start + tl.arange(0, BLOCK_N)
        loaded = offs_n < N_LOADED
        k = _load_tile(K_block + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                       mask_d, loaded, not EVEN_D, TAIL)
        s = tl.dot(tl.trans(k), q, input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
        if TAIL:
            s = tl.where((offs_n < N)[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0) * LOG2E)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s * LOG2E - m_safe[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        v = _load_tile(V_block + offs_c[:, None] * stride_vc + offs_n[None, :] * stride_vn,
                       mask_c, loaded, not EVEN_C, TAIL)
        acc = tl.dot(v, p.to(v.dtype), acc * alpha[None, :], input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i

@triton.jit
def _pam_fwd_full_width_kernel(
    Q, K, V, Gamma, Residual, Result, Out, Lse,
    stride_qb, stride_qd, stride_qn, stride_kb, stride_kd, stride_kn, stride_vb, stride_vc, stride_vn,
    stride_rb, stride_rc, stride_rn, stride_yb, stride_yc, stride_yn, stride_ob, stride_oc, stride_on,
    N, N_LOADED, D, C,
    HAS_RESIDUAL: tl.constexpr, STORE_OUT: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr, EVEN_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: BLOCK_M queries x all C channels (BLOCK_C >= C) of one batch element."""
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    mask_d = offs_d < D
    mask_c = offs_c < C
    q = _load_tile(Q + pid_b * stride_qb + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_qn,
                   mask_d, offs_m < N_LOADED, not EVEN_D, True)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    K_block, V_block = K + pid_b * stride_kb, V + pid_b * stride_vb
    acc, l_i, m_i = _full_width_inner(
        acc, l_i, m_i, q, K_block, V_block, stride_kd, stride_kn, stride_vc, stride_vn,
        offs_d, offs_c, mask_d, mask_c, 0, n_full, N, N_LOADED,
        False, EVEN_D, EVEN_C, INPUT_PRECISION, BLOCK_N)
    if n_full < N:
        acc, l_i, m_i = _full_width_inner(
            acc, l_i, m_i, q, K_block, V_block, stride_kd, stride_kn, stride_vc, stride_vn,
            offs_d, offs_c, mask_d, mask_c, n_full, N, N, N_LOADED,
            True, EVEN_D, EVEN_C, INPUT_PRECISION, BLOCK_N)
    out = acc / l_i[None, :]
    tl.store(Lse + pid_b * N + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < N)
    mask_store = _tile_mask(mask_c, offs_m < tl.cdiv(N, 16) * 16, True)
    if HAS_RESIDUAL:
        if STORE_OUT:
            tl.store(Out + pid_b * stride_ob + offs_c[:, None] * stride_oc + offs_m[None, :] * stride_on,
                     out.to(Out.dtype.element_ty), mask=mask_store)
        residual = tl.load(
            Residual + pid_b * stride_rb + offs_c[:, None] * stride_rc + offs_m[None, :] * stride_rn,
            mask=_tile_mask(mask_c, offs_m < N_LOADED, True), other=0.0)
        result = tl.load(Gamma).to(tl.float32) * out + residual.to(tl.float32)
    else:
        result = out
    tl.store(Result + pid_b * stride_yb + offs_c[:, None] * stride_yc + offs_m[None, :] * stride_yn,
             result.to(Result.dtype.element_ty), mask=mask_store)

_full_width_tuner = triton.autotune(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in TILES],
    key=["N", "C"],
)(_pam_fwd_full_width_kernel)


def full_width_forward(q: Any, k: Any, v: Any, gamma: Any, residual: Any, **config: int) -> Any:
    """The variant's forward with the residual epilogue, through the library launcher's operands
    and outputs (padding included): one program per BLOCK_M queries and batch element, all of C.
    ``config`` (BLOCK_M, BLOCK_N, num_warps, num_stages) runs one config instead of the
    autotuner. Returns ``(result, out, lse)`` like ``pam_forward``."""
    from danet_kernels.kernels import position_attention as pam

    (b, d, n), c = q.shape, v.shape[1]
    result, out, lse = pam._forward_outputs(q, k, v, gamma, residual, 1.0, True)
    q, k, v, residual, n_loaded, _ = pam._kernel_operands(q, k, v, residual)
    block_d, block_c = pam._pow2_cap(d), pam._pow2_cap(c)
    kernel = _pam_fwd_full_width_kernel if config else _full_width_tuner
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), 1, b)](
        q, k, v, gamma, residual, result, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *residual.stride(), *result.stride(), *out.stride(),
        n, n_loaded, d, c,
        HAS_RESIDUAL=True, STORE_OUT=True, BLOCK_D=block_d, INPUT_PRECISION=pam.dot_input_precision(v.dtype),
        EVEN_D=d == block_d, EVEN_C=c == block_c, BLOCK_C=block_c, **config,
    )
    return result, out, lse


SPEC = OpSpec(
    name="pam_forward_full_width",
    title="PAM forward, full-width variant (measured, not used by the library)",
    launch=lambda problem: split.launch(problem, forward=full_width_forward),
    # The split layout's work model holds: every program sweeps all key blocks, its S^T tile once
    # (score), its BLOCK_C channels (here all of C) of O^T.
    kernels=(KernelSpec("_pam_fwd_full_width_kernel", split.forward_work, exp2_tile=split.score_tile),),
    minimal=split.SPEC.minimal,
    unit=split.SPEC.unit,
    precisions=("bf16", "fp32-tf32"),
)
