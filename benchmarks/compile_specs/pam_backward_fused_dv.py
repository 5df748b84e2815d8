"""A deterministic PAM backward variant the compile report measures but the library does not use:
dV for the first C block fused into the key-side kernel.

The library's deterministic backward (danet_kernels/kernels/position_attention.py) runs a dV
kernel over C in BLOCK_C = 256 blocks, each recomputing S^T (2 (d * 2 + C) = 1280 N^2 at d = 64,
C = 512), the key-side kernel for dK (dP over all of C, S, dS: 1280) and the dQ kernel (1280):
3840 N^2. The key-side kernel has P^T for its keys already, so it can also accumulate dV for
one block of channels (dV^T += P^T dO^T, 2 BLOCK_C N^2) if a BLOCK_N x BLOCK_C fp32 accumulator
fits beside dK and dP: at BLOCK_C = 256 that is 128 registers per thread on 8 warps, which
leaves room only for 32 queries per step (``TILES``). The dV kernel then covers the other
C - BLOCK_C channels in one block, S^T recomputed once: 2 (64 + 256) = 640 N^2, the key-side
kernel 1280 + 512 = 1792, the dQ kernel 1280: 3712 N^2, 128 less. But the 32-query steps re-read
the key block's v^T (BLOCK_N x C) for every 32 queries instead of 64: ``python -m
benchmarks.compile_report --ops pam_backward_fused_dv pam_backward_deterministic`` compares the
two (registers, spills, bytes, waves, the perf model's time), and docs/performance.md says
which the library keeps and why.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from benchmarks.compile_report import KernelSpec, OpSpec, Work
from benchmarks.compile_specs import pam_backward as library
from benchmarks.compile_specs.pam_forward import score_tile
from danet_kernels.kernels.common import offsets_2d, padded_length
from danet_kernels.kernels.position_attention import LOG2E, _pam_load_gamma

# The fused key-side kernel's tiles (BLOCK_M, BLOCK_N, BLOCK_C, num_warps, num_stages) per operand
# class; BLOCK_C is also the block of channels whose dV it accumulates.
TILES = {"16-bit": (32, 128, 256, 8, 2), "tf32": (16, 128, 128, 8, 2), "interpreter": (32, 32, 32, 4, 1)}


@triton.jit
def _pam_bwd_dkdv_kernel(
    Q, K, V, DY, Gamma, Lse, DeltaRaw, DK, DV,
    stride_qb, stride_qd, stride_qn,
    stride_kb, stride_kd, stride_kn,
    stride_vb, stride_vc, stride_vn,
    stride_gb, stride_gc, stride_gn,
    stride_dks, stride_dkb, stride_dkd, stride_dkn,
    stride_dvs, stride_dvb, stride_dvc, stride_dvn,
    N, N_VALID, D, C, blocks_per_split, num_c_blocks, num_steps,
    HAS_GAMMA: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The library's key-side kernel without atomics (dK for BLOCK_N keys over one split of the
    query blocks), plus dV for the keys' first BLOCK_C channels: at a query block's first C
    chunk S^T and P^T are formed (and kept until its last chunk, for dS) and dV^T += P^T dO^T
    with that chunk's dO, which the dP loop loads anyway."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    gamma = _pam_load_gamma(Gamma, HAS_GAMMA)

    kT = tl.load(K + pid_b * stride_kb + offsets_2d(offs_n, stride_kn, offs_d, stride_kd),
                 mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    Q_block = Q + pid_b * stride_qb
    V_block = V + pid_b * stride_vb
    DY_block = DY + pid_b * stride_gb
    Lse_block = Lse + pid_b * N
    Delta_block = DeltaRaw + pid_b * N
    key_bias = tl.where(offs_n < N_VALID, 0.0, float("-inf"))  # padded keys: P = 0 (library)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    dp_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    p_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    q = tl.zeros([BLOCK_D, BLOCK_M], dtype=Q.dtype.element_ty)
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    first_m = pid_s * blocks_per_split * BLOCK_M
    for step in range(0, num_steps):
        block = step // num_c_blocks
        chunk = step - block * num_c_blocks
        offs_m = first_m + block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_m = offs_m < N
        mask_c = offs_c < C
        if chunk == 0:
            q = tl.load(Q_block + offsets_2d(offs_d, stride_qd, offs_m, stride_qn),
                        mask=mask_d[:, None] & mask_m[None, :], other=0.0)
            lse = tl.load(Lse_block + offs_m, mask=mask_m, other=float("inf"))
            delta = tl.load(Delta_block + offs_m, mask=mask_m, other=0.0)
            s_t = tl.dot(kT, q, input_precision=INPUT_PRECISION)
            p_t = tl.math.exp2(s_t * LOG2E - lse[None, :] + key_bias[:, None])
        vT = tl.load(V_block + offsets_2d(offs_n, stride_vn, offs_c, stride_vc),
                     mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        dy = tl.load(DY_block + offsets_2d(offs_c, stride_gc, offs_m, stride_gn),
                     mask=mask_c[:, None] & mask_m[None, :], other=0.0)
        dp_t = tl.dot(vT, dy, tl.where(chunk == 0, 0.0, dp_t), input_precision=INPUT_PRECISION)
        if chunk == 0:
            dv = tl.dot(p_t.to(dy.dtype), tl.trans(dy), dv, input_precision=INPUT_PRECISION)
        if chunk == num_c_blocks - 1:
            ds_t = (p_t * (dp_t - delta[None, :]) * gamma).to(Q.dtype.element_ty)
            dk = tl.dot(ds_t, tl.trans(q), dk, input_precision=INPUT_PRECISION)
    DK_tile = DK + pid_s.to(tl.int64) * stride_dks + pid_b * stride_dkb
    tl.store(DK_tile + offsets_2d(offs_n, stride_dkn, offs_d, stride_dkd), dk.to(DK.dtype.element_ty),
             mask=mask_n[:, None] & mask_d[None, :])
    offs_c = tl.arange(0, BLOCK_C)
    DV_tile = DV + pid_s.to(tl.int64) * stride_dvs + pid_b * stride_dvb
    tl.store(DV_tile + offsets_2d(offs_n, stride_dvn, offs_c, stride_dvc),
             (dv * gamma).to(DV.dtype.element_ty), mask=mask_n[:, None] & (offs_c < C)[None, :])


def fused_dv_backward(
    dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor | None,
    out: torch.Tensor, lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pam_backward``'s deterministic path with the variant's kernels (one launch chunk of B):
    the library's preprocess, its dV kernel on the channels past the fused block (views of dY
    and dV), the fused key-side kernel, the library's dQ kernel. Same returns."""
    from danet_kernels.kernels import position_attention as pam

    batch, head_dim, n = q.shape
    channels = v.shape[1]
    assert batch <= pam._MAX_GRID_BATCH
    n_pad = padded_length(n)
    q_in, k_in, v_in, dy_in, out_in = (pam._bwd_operand(t) for t in (q, k, v, dy, out))
    lse_in = pam._bwd_operand(lse, fill=float("inf"))
    dq_out, dk_out, dv_out, delta_out = pam._backward_buffers(q, k, v)
    gamma_arg = gamma if gamma is not None else lse_in
    precision = pam.dot_input_precision(v.dtype)
    block_d = pam._pow2_cap(head_dim)
    config = pam._bwd_config(v.dtype, precision, block_d, n_pad, n_pad, channels)
    operands = pam._bwd_operand_class(v.dtype, precision)
    block_m, block_n, block_c, warps, stages = TILES[operands]
    block_c = min(block_c, pam._pow2_cap(channels))
    fused = {"BLOCK_M": min(block_m, pam._pow2_cap(n_pad)), "BLOCK_N": min(block_n, pam._pow2_cap(n_pad)),
             "BLOCK_C": block_c, "num_warps": warps, "num_stages": stages}
    sm_count = pam.device_sms(q.device, pam._INTERPRETER_SMS)
    common = {"HAS_GAMMA": gamma is not None, "BLOCK_D": block_d, "INPUT_PRECISION": precision}
    pam._launch_bwd_preprocess(out_in, dy_in, delta_out, config["pre"])

    rest = channels - block_c  # channels past the fused block: the library's dV kernel
    if rest > 0:
        dv_cfg = config["dv"]
        key_blocks = triton.cdiv(n_pad, dv_cfg["BLOCK_N"])
        c_blocks = triton.cdiv(rest, dv_cfg["BLOCK_C"])
        per_split, splits = pam._split(key_blocks * c_blocks * batch, triton.cdiv(n_pad, dv_cfg["BLOCK_M"]),
                                       sm_count)
        dv_rest = dv_out[:, block_c:]
        dv_partials = pam._partials(dv_rest, splits)
        dy_rest = dy_in[:, block_c:]
        torch.library.wrap_triton(pam._pam_bwd_dv_kernel)[(key_blocks * c_blocks, splits, batch)](
            q_in, k_in, dy_rest, gamma_arg, lse_in, dv_partials,
            *q_in.stride(), *k_in.stride(), *dy_rest.stride(), *dv_partials.stride(),
            n_pad, n_pad, n, head_dim, rest, key_blocks, per_split, SCALE=1.0, **common, **dv_cfg)
        pam._sum_partials(dv_rest, dv_partials)

    key_blocks = triton.cdiv(n_pad, fused["BLOCK_N"])
    c_blocks = triton.cdiv(channels, block_c)
    per_split, splits = pam._split(key_blocks * batch, triton.cdiv(n_pad, fused["BLOCK_M"]), sm_count)
    dk_partials = pam._partials(dk_out, splits)
    dv_fused = dv_out[:, :block_c]
    dv_partials = pam._partials(dv_fused, splits)
    torch.library.wrap_triton(_pam_bwd_dkdv_kernel)[(key_blocks, splits, batch)](
        q_in, k_in, v_in, dy_in, gamma_arg, lse_in, delta_out, dk_partials, dv_partials,
        *q_in.stride(), *k_in.stride(), *v_in.stride(), *dy_in.stride(), *dk_partials.stride(),
        *dv_partials.stride(),
        n_pad, n, head_dim, channels, per_split, c_blocks, per_split * c_blocks, **common, **fused)
    pam._sum_partials(dk_out, dk_partials)
    pam._sum_partials(dv_fused, dv_partials)

    pam._launch_bwd_dq(q_in, k_in, v_in, dy_in, gamma_arg, 1.0, lse_in, delta_out, dq_out, n, config["dq"],
                       common, sm_count)
    return tuple(t[..., :n] for t in (dq_out, dk_out, dv_out, delta_out))


def fused_work(meta: dict[str, Any], programs: int) -> tuple[Work, Work]:
    """The library's key-side work (dP over all of C, S, dS, dK) plus dV for BLOCK_C channels."""
    score, rest = library.dsdk_work(meta, programs)
    blocks = programs * meta["blocks_per_split"]
    return score, rest + Work(flops=blocks * 2 * meta["BLOCK_M"] * meta["BLOCK_N"] * meta["BLOCK_C"])


SPEC = OpSpec(
    name="pam_backward_fused_dv",
    title="PAM backward, deterministic, dV of one C block fused into the key-side kernel "
          "(measured, not used)",
    # As the library's spec launches the backward (the variant has one path: no switch to set).
    launch=lambda problem: library.launch(problem, backward=fused_dv_backward),
    kernels=(*library.KERNELS, KernelSpec("_pam_bwd_dkdv_kernel", fused_work, exp2_tile=score_tile)),
    minimal=library.DETERMINISTIC.minimal,
    unit=library.DETERMINISTIC.unit,
    sizes=(32768, 9409, 4096),
    precisions=("bf16", "fp32-tf32"),
)
