"""Fused position attention (DANet's PAM) in Triton: flash-style forward and recomputing backward.

Math (per batch element b; q, k of shape (B, d, N), v of shape (B, C, N))::

    S[i, j]   = sum_d q[d, i] k[d, j]                 no 1/sqrt(d) scaling, as in DANet
    P[i, :]   = softmax_j(S[i, :])
    O[c, i]   = sum_j v[c, j] P[i, j]
    Y         = gamma * O + residual                  when gamma is given, else Y = O

Backward (dY the incoming gradient, dO = gamma * dY or dY)::

    dV[c, j]  = sum_i P[i, j] dO[c, i]
    dP[i, j]  = sum_c dO[c, i] v[c, j]                summed over ALL of C
    Delta[i]  = sum_c dO[c, i] O[c, i]  (= rowsum(dP * P))
    dS        = P * (dP - Delta[:, None])
    dQ[:, i]  = sum_j dS[i, j] k[:, j]     dK[:, j] = sum_i dS[i, j] q[:, i]
    dgamma    = sum(dY * O)               dresidual = dY

Algorithm and memory traffic
----------------------------
Forward (``_pam_fwd_kernel``), after FlashAttention and Triton's fused-attention tutorial: a
program keeps a BLOCK_M block of queries and an fp32 (BLOCK_M, BLOCK_C) accumulator on chip,
streams BLOCK_N blocks of k and v, and keeps a running row max and row sum (online softmax).
The softmax works in base 2: ``exp2(S * log2(e) - m)`` with log2(e) folded into the subtraction
(one FMA per element) and m, the running max, kept in log2 units. It writes Y (and O when the
backward will need it) and the per-row log-sum-exp ``lse = m + log2(l)``, never S or P: device
memory holds O(B * (C + d) * N), not O(B * N^2).

The value dim. DANet's d is 64 but C is 512, and C is meant to reach 2048: an fp32
(BLOCK_M, C) accumulator (256 KiB at BLOCK_M = 128, C = 512) does not fit a Hopper SM's
registers. We SPLIT C ACROSS PROGRAMS (grid axis 1 runs over C blocks of BLOCK_C) rather than
looping over it inside a program. Both options must recompute S = q^T k once per C block (the
accumulator for all of C never exists at once), so their FLOPs are equal:
``2 N^2 (d * ceil(C / BLOCK_C) + C)`` plus ``N^2 * ceil(C / BLOCK_C)`` exp2s; at d = 64,
C = 512, BLOCK_C = 128 that is 1536 N^2 against the minimal 1152 N^2 (+33%; +11% with
BLOCK_C = 256, which the autotuner weighs against register pressure). The split wins on
occupancy: at B = 1, N = 4096, BLOCK_M = 128 a loop would launch 32 programs on 132 SMs, the
split launches 32 * 4. Programs of one (batch, C block) are adjacent on grid axis 0, so they
stream the same k and v blocks through L2 together. Every C block computes the same lse; the
first one stores it.

Backward recomputes P blockwise from q, k and lse (never N x N). Every (query, key) pair needs
dP = dO^T v summed over ALL of C (2 C FLOPs, the dominant term at C = 512) before its dS, and
contributes P^T dO to dV across all of C. Holding a key block's dV for all of C on chip (an fp32
BLOCK_N x C tile: 128 KiB at BLOCK_N = 64, half the register file) is what would make each
product happen once, and it does not fit sm_90: S^T-first it needs 128 key rows on 8 warps, 256
registers per thread for dV alone; with C as the MMA's M and 32 keys per program it compiles
with 68 to 1080 bytes of spills. Fusing dV for half of C (256 channels) into the key-side
kernel compiles clean at 32 x 128 x 256 but computes dS twice: 2816 N^2 against the 2688 here.
So dV gets its own kernel, split over C like the forward, and everything that needs dP over all
of C happens once, in the key-side kernel:

* ``_pam_bwd_preprocess``: ``delta_raw[i] = sum_c dY[c, i] O[c, i]`` in fp32. Delta = gamma *
  delta_raw and dgamma = sum(delta_raw) both fall out of it (one pass over O and dY).
* ``_pam_bwd_dv_kernel``: grid (key blocks x C blocks, query splits, B). S^T = k^T q first, as
  in Triton's tutorial: 128 key rows are 16 per warp on 8 warps (no S computed twice), and P^T
  is already the A operand of dV^T += P^T dO^T, in registers (no transpose through shared
  memory). An fp32 BLOCK_N x BLOCK_C dV tile stays on chip while query blocks stream by.
* ``_pam_bwd_dkdq_kernel``, the default: grid (key blocks, query splits, B). Per query block,
  dP^T = v^T dO over all of C in BLOCK_C chunks, S^T, P^T, dS^T = P^T (dP^T - Delta), dK +=
  dS^T q^T on chip, and dQ += dS k added into an fp32 (B, d, N) buffer with atomics, as in
  FlashAttention-2: S, P, dP and dS once per pair. The (query block, C chunk) nest is ONE flat
  loop, so the cp.async pipeline of the v and dY chunks never drains at a query block; the
  block's q, lse and Delta are loaded at its first chunk and used at its last.
* Deterministic, where ``torch.use_deterministic_algorithms(True)``: the same key-side kernel
  without the atomics, and ``_pam_bwd_dq_kernel`` (grid (query blocks, key splits, B)), its
  mirror image with 128 x 128 dP tiles, for dQ. dP is computed twice; the gradients repeat bit
  for bit. (3xTF32 and heads wider than 128 take this pair always: their atomic dQ product
  spills.)

Small grids. At B = 1 and small N a kernel launches fewer programs than the GPU has SMs (N =
4096: 32 key blocks of 128 for 132 SMs). ``_split`` then cuts each program's sequential loop
into up to 4 splits (query ranges for the key-side kernels, key ranges for dQ), each writing an
fp32 partial of its output, summed afterwards in a fixed order (deterministic either way): at
N = 4096 every kernel runs 128 programs in one wave. Extra memory: splits x B x C x N x 4
bytes for dV, splits x B x d x N x 4 for dK / dQ, only where the grid is small.

Unaligned N. Where N is not a multiple of 16 (DANet's 97 x 97 = 9409) no row of a (B, *, N)
tensor starts 16-byte aligned, and the compiled kernels lose their vectorised asynchronous
loads (and spill: 788 bytes in dV, bf16). The launcher then copies q, k, v, dY and O into
buffers with N rounded up to a multiple of 16 and zero tails (lse with +inf tails: padded
queries get P = 0; padded keys get P = 0 by a mask on the true N), and the kernels write the
gradients into buffers of that length, returned as (B, *, N) views: (2 d + 3 C) N extra
elements, 31 MB at 97 x 97, C = 512 in bf16, against the kernels' O(N^2) work.

FLOPs executed per N^2 (d = 64, C = 512, the sm_90 tiles of ``_BWD_TILES``; minimal 2432):

=============  =======================================  ========  =============
operands       dV (S^T recomputed per C block) + rest   default   deterministic
=============  =======================================  ========  =============
bf16, fp16     2 (64 * 2 + 512) = 1280, BLOCK_C = 256    2688      3840
fp32, tf32     2 (64 * 4 + 512) = 1536, BLOCK_C = 128    2944      4096
fp32, tf32x3   1536                                      4096      4096
fp32, ieee     1280, BLOCK_C = 256                       2688      3840
=============  =======================================  ========  =============

The key-side kernel is 2 (C + 3 d) = 1408 with atomic dQ, 2 (C + 2 d) = 1280 without; the
dQ kernel 1280. exp2: 3 N^2 by default (1 N^2 more per extra dV C block), 4 deterministic. The
deterministic split computes dP twice, so no tiling takes it below 3584 + 128 ceil(C /
BLOCK_C) of dV, 3712 at best (3600 is out of its reach); the previous split (dV, dK and dQ
kernels, S on both warpgroups of its 64-row tiles) executed 6272.

Memory traffic (operand reads from L2 per pair, bf16): the dV kernel re-reads q and its dY
chunk per key block, 2 (d ceil(C / BLOCK_C) + C) / BLOCK_N = 10 B; the key-side kernel re-reads
its v^T block per query block, dY and q per key block, 2 C / BLOCK_M + 2 (C + d) / BLOCK_N =
25 B, plus 2 B of fp32 dQ atomics; the dQ kernel (128 x 128) 17 B. About 37 B per pair by
default, 52 B deterministic; DRAM traffic stays O((d + C) N) per pass where L2 holds the
re-read blocks. 128 x 128 key-side tiles would cut 25 B to 17 B but spill 132 to 424 bytes.

Gamma never leaves the device: the kernels read it through a pointer (no ``.item()`` sync,
nothing data-dependent for torch.compile), so gamma = 0 at initialisation costs nothing special.

What the forward stores for the backward: q, k, v, lse (B x N fp32) and O. With the residual
epilogue the kernel writes O next to Y, because O cannot be recovered from Y (gamma is 0 at
initialisation) and is needed for dgamma and Delta; the extra write is skipped when no gradient
is needed. Without gamma, Y is O.

Numerics. fp32, fp16 and bf16 inputs; S, the softmax statistics and all accumulators are fp32;
P and dS are rounded to the input dtype before their matmuls for fp16/bf16 (tensor-core
inputs), kept fp32 for fp32. For fp32 inputs ``tl.dot``'s input_precision follows torch
(:func:`danet_kernels.kernels.common.dot_input_precision`: ``"ieee"`` by default, so the
kernel is as exact as the reference; ``"tf32"`` where torch allows TF32). NaN/Inf propagate
as in the reference; a row whose energies are all -inf so far gets its max guarded to 0 so that
``-inf - -inf`` never manufactures a NaN the reference does not have.

Indexing. Every tensor comes with its per-axis strides (non-contiguous inputs such as
flattened channels_last maps are read in place), every load and store on N, C and d is masked
(any N, C, d >= 1; d is padded to BLOCK_D >= 16 for tl.dot), and batch and block offsets are
int64 so that B * C * N beyond 2^31 cannot overflow; the backward computes every offset inside
an image in int64 too (``_pam_offsets``), as C * N passes 2^31 in one image at C = 512, N > 4.2M.

Tuning (Hopper). The forward is autotuned (``_FWD_CONFIGS`` with a ``_keep`` filter and a
problem-aware prune, keyed on N, d, C and the dot precision); its register and shared-memory
budgets were calibrated by compiling every config for sm_90 with ``ptxas -v`` (no GPU was
available to time them). fp32 in "ieee" precision has no tensor cores: its FMA dots hold both
operands in registers, so it gets its own small tiles (``_FWD_CONFIGS_FMA``). Under
TRITON_INTERPRET=1 a single small configuration is used and nothing is tuned.

torch.compile. ``danet_kernels::pam_forward`` and ``danet_kernels::pam_backward`` are
``torch.library.triton_op`` custom ops on a GPU (their kernels launched through ``wrap_triton``,
so Inductor sees and schedules them) and plain ``custom_op``s with allocating fake kernels under
the interpreter (see ``_define_op``); the forward op carries the autograd formula of
:class:`PositionAttentionFunction` through ``register_autograd``. A model calling
:func:`position_attention_triton` compiles with ``fullgraph=True``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from danet_kernels._dispatch import triton_interpreting
from danet_kernels.kernels.common import dot_input_precision
from danet_kernels.kernels.interpreter_compat import squeeze_scalar_index

__all__ = ["PositionAttentionFunction", "pam_backward", "pam_forward", "position_attention_triton"]

# Read once at import, like Triton itself: TRITON_INTERPRET must be set before triton is imported.
_INTERPRETING = triton_interpreting()
if _INTERPRETING:
    squeeze_scalar_index()  # loop bounds under Triton 3.6's interpreter with numpy >= 2.4

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


# ----------------------------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pam_fwd_inner(
    acc, l_i, m_i, q, K_block, V_block, stride_kd, stride_kn, stride_vc, stride_vn,
    offs_d, offs_c, mask_d, mask_c, start_n, end_n, N,
    MASK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online-softmax sweep over key blocks [start_n, end_n); MASK_N only for the ragged tail."""
    for block_start in range(start_n, end_n, BLOCK_N):
        offs_n = block_start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        kT = tl.load(
            K_block + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
            mask=mask_d[:, None] & mask_n[None, :], other=0.0,
        )
        s = tl.dot(q, kT, input_precision=INPUT_PRECISION)
        if MASK_N:
            s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * LOG2E)
        # A row whose energies are all -inf so far would compute -inf - -inf = NaN; shift by 0
        # instead, which leaves p = 0 and alpha = 0 (the reference is NaN only if all are -inf,
        # and then l = 0 gives 0/0 = NaN at the end, as it should).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s * LOG2E - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V_block + offs_n[:, None] * stride_vn + offs_c[None, :] * stride_vc,
            mask=mask_n[:, None] & mask_c[None, :], other=0.0,
        )
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _pam_fwd_kernel(
    Q, K, V, Gamma, Residual, Result, Out, Lse,
    stride_qb, stride_qd, stride_qn,
    stride_kb, stride_kd, stride_kn,
    stride_vb, stride_vc, stride_vn,
    stride_rb, stride_rc, stride_rn,
    stride_yb, stride_yc, stride_yn,
    stride_ob, stride_oc, stride_on,
    N, D, C,
    HAS_RESIDUAL: tl.constexpr, STORE_OUT: tl.constexpr,
    BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: BLOCK_M queries x BLOCK_C value channels of one batch element.

    Writes Result (gamma * O + residual, or O), O itself when STORE_OUT, and lse (log2 units)
    from the first C block.
    """
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    start_c = pid_c.to(tl.int64) * BLOCK_C
    mask_m = offs_m < N
    mask_d = offs_d < D
    mask_c = (start_c + offs_c) < C

    q = tl.load(
        Q + pid_b * stride_qb + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=mask_m[:, None] & mask_d[None, :], other=0.0,
    )
    K_block = K + pid_b * stride_kb
    V_block = V + pid_b * stride_vb + start_c * stride_vc

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _pam_fwd_inner(
        acc, l_i, m_i, q, K_block, V_block, stride_kd, stride_kn, stride_vc, stride_vn,
        offs_d, offs_c, mask_d, mask_c, 0, n_full, N,
        False, INPUT_PRECISION, BLOCK_N,
    )
    if n_full < N:
        acc, l_i, m_i = _pam_fwd_inner(
            acc, l_i, m_i, q, K_block, V_block, stride_kd, stride_kn, stride_vc, stride_vn,
            offs_d, offs_c, mask_d, mask_c, n_full, N, N,
            True, INPUT_PRECISION, BLOCK_N,
        )

    out = acc / l_i[:, None]
    mask_mc = mask_m[:, None] & mask_c[None, :]
    if pid_c == 0:
        tl.store(Lse + pid_b * N + offs_m, m_i + tl.math.log2(l_i), mask=mask_m)
    if HAS_RESIDUAL:
        gamma = tl.load(Gamma).to(tl.float32)
        residual = tl.load(
            Residual + pid_b * stride_rb + start_c * stride_rc
            + offs_m[:, None] * stride_rn + offs_c[None, :] * stride_rc,
            mask=mask_mc, other=0.0,
        )
        result = gamma * out + residual.to(tl.float32)
        if STORE_OUT:
            tl.store(
                Out + pid_b * stride_ob + start_c * stride_oc
                + offs_m[:, None] * stride_on + offs_c[None, :] * stride_oc,
                out.to(Out.dtype.element_ty), mask=mask_mc,
            )
    else:
        result = out
    tl.store(
        Result + pid_b * stride_yb + start_c * stride_yc
        + offs_m[:, None] * stride_yn + offs_c[None, :] * stride_yc,
        result.to(Result.dtype.element_ty), mask=mask_mc,
    )


# ----------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pam_offsets(rows, stride_rows, cols, stride_cols):
    """Element offsets of a (rows x cols) tile inside one image, in int64.

    A (C, N) image passes 2^31 elements at C * N >= 2^31 (C = 512 at N = 4.2M, or any N with
    C = 2048 and a channels_last stride of C on the N axis), and a row index times its stride
    overflows int32 long before the pointer does: every in-image offset goes through here.
    """
    return rows.to(tl.int64)[:, None] * stride_rows + cols.to(tl.int64)[None, :] * stride_cols


@triton.jit
def _pam_bwd_preprocess(
    Out, DY, DeltaRaw,
    stride_ob, stride_oc, stride_on,
    stride_gb, stride_gc, stride_gn,
    N, C,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """delta_raw[b, i] = sum_c dY[b, c, i] * O[b, c, i] in fp32 (tiles are (C, N): N is the fast axis)."""
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_c in range(0, C, BLOCK_C):
        offs_c = start_c + tl.arange(0, BLOCK_C)
        mask = (offs_c < C)[:, None] & mask_m[None, :]
        o = tl.load(Out + pid_b * stride_ob + _pam_offsets(offs_c, stride_oc, offs_m, stride_on),
                    mask=mask, other=0.0)
        dy = tl.load(DY + pid_b * stride_gb + _pam_offsets(offs_c, stride_gc, offs_m, stride_gn),
                     mask=mask, other=0.0)
        total += tl.sum(o.to(tl.float32) * dy.to(tl.float32), 0)
    tl.store(DeltaRaw + pid_b * N + offs_m, total, mask=mask_m)


@triton.jit
def _pam_load_gamma(Gamma, HAS_GAMMA: tl.constexpr):
    """gamma as an fp32 scalar (1 when the op has no residual epilogue: dO = dY)."""
    if HAS_GAMMA:
        return tl.load(Gamma).to(tl.float32)
    else:
        return 1.0


@triton.jit
def _pam_bwd_dv_kernel(
    Q, K, DY, Gamma, Lse, DV,
    stride_qb, stride_qd, stride_qn,
    stride_kb, stride_kd, stride_kn,
    stride_gb, stride_gc, stride_gn,
    stride_dvs, stride_dvb, stride_dvc, stride_dvn,
    N, D, C, num_key_blocks, blocks_per_split,
    HAS_GAMMA: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dV for BLOCK_N keys x BLOCK_C channels over one split of the query blocks: dV += P^T dO^T.

    S^T = k^T q first (BLOCK_N = 128 rows: 16 per warp on 8 warps, no replicated S), so P^T is
    already the A operand of the dV product, in registers. Grid: (key block + key blocks * C
    block, query split, batch); with one split DV is dV itself, else an fp32 partial per split.
    """
    pid_n = tl.program_id(0) % num_key_blocks
    pid_c = tl.program_id(0) // num_key_blocks
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask_d = offs_d < D
    mask_c = offs_c < C

    kT = tl.load(K + pid_b * stride_kb + _pam_offsets(offs_n, stride_kn, offs_d, stride_kd),
                 mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    Q_block = Q + pid_b * stride_qb
    DY_block = DY + pid_b * stride_gb
    Lse_block = Lse + pid_b * N
    dv = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    first_m = pid_s * blocks_per_split * BLOCK_M
    for step in range(0, blocks_per_split):
        offs_m = first_m + step * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        q = tl.load(Q_block + _pam_offsets(offs_d, stride_qd, offs_m, stride_qn),
                    mask=mask_d[:, None] & mask_m[None, :], other=0.0)
        # lse = +inf on padded query rows makes their P exactly 0.
        lse = tl.load(Lse_block + offs_m, mask=mask_m, other=float("inf"))
        p_t = tl.math.exp2(tl.dot(kT, q, input_precision=INPUT_PRECISION) * LOG2E - lse[None, :])
        dy = tl.load(DY_block + _pam_offsets(offs_c, stride_gc, offs_m, stride_gn),
                     mask=mask_c[:, None] & mask_m[None, :], other=0.0)
        dv = tl.dot(p_t.to(dy.dtype), tl.trans(dy), dv, input_precision=INPUT_PRECISION)
    dv = dv * _pam_load_gamma(Gamma, HAS_GAMMA)
    DV_tile = DV + pid_s.to(tl.int64) * stride_dvs + pid_b * stride_dvb
    tl.store(DV_tile + _pam_offsets(offs_n, stride_dvn, offs_c, stride_dvc), dv.to(DV.dtype.element_ty),
             mask=mask_n[:, None] & mask_c[None, :])


@triton.jit
def _pam_bwd_dkdq_kernel(
    Q, K, V, DY, Gamma, Lse, DeltaRaw, DK, DQ,
    stride_qb, stride_qd, stride_qn,
    stride_kb, stride_kd, stride_kn,
    stride_vb, stride_vc, stride_vn,
    stride_gb, stride_gc, stride_gn,
    stride_dks, stride_dkb, stride_dkd, stride_dkn,
    stride_dqb, stride_dqd, stride_dqn,
    N, N_VALID, D, C, blocks_per_split, num_c_blocks, num_steps,
    HAS_GAMMA: tl.constexpr, ATOMIC_DQ: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dK for BLOCK_N keys over one split of the query blocks, and (ATOMIC_DQ) dQ by fp32 atomics.

    Per query block: dP^T = v^T dO summed over ALL of C in BLOCK_C chunks, S^T = k^T q,
    dS^T = P^T (dP^T - Delta), dK += dS^T q^T; with ATOMIC_DQ also dQ^T += k dS^T, added into an
    fp32 (B, d, N) buffer: each of S, P, dP and dS once per (query, key) pair. The (query block,
    C chunk) nest runs as ONE flat loop of ``num_steps`` steps, so the software pipeline of the
    v and dY chunks never drains at a query-block boundary; the block's q, lse and Delta are
    loaded at its first C step and used at its last (their latency hides behind the chunks).
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    gamma = _pam_load_gamma(Gamma, HAS_GAMMA)

    kT = tl.load(K + pid_b * stride_kb + _pam_offsets(offs_n, stride_kn, offs_d, stride_kd),
                 mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    Q_block = Q + pid_b * stride_qb
    V_block = V + pid_b * stride_vb
    DY_block = DY + pid_b * stride_gb
    Lse_block = Lse + pid_b * N
    Delta_block = DeltaRaw + pid_b * N
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dp_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    q = tl.zeros([BLOCK_D, BLOCK_M], dtype=Q.dtype.element_ty)
    lse = tl.zeros([BLOCK_M], dtype=tl.float32)
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
            q = tl.load(Q_block + _pam_offsets(offs_d, stride_qd, offs_m, stride_qn),
                        mask=mask_d[:, None] & mask_m[None, :], other=0.0)
            # lse = +inf on padded query rows makes their P exactly 0.
            lse = tl.load(Lse_block + offs_m, mask=mask_m, other=float("inf"))
            delta = tl.load(Delta_block + offs_m, mask=mask_m, other=0.0)
        vT = tl.load(V_block + _pam_offsets(offs_n, stride_vn, offs_c, stride_vc),
                     mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        dy = tl.load(DY_block + _pam_offsets(offs_c, stride_gc, offs_m, stride_gn),
                     mask=mask_c[:, None] & mask_m[None, :], other=0.0)
        # where(chunk == 0, 0, acc) becomes the MMA's "ignore the accumulator" flag.
        dp_t = tl.dot(vT, dy, tl.where(chunk == 0, 0.0, dp_t), input_precision=INPUT_PRECISION)
        if chunk == num_c_blocks - 1:
            p_t = tl.math.exp2(tl.dot(kT, q, input_precision=INPUT_PRECISION) * LOG2E - lse[None, :])
            # A padded key has k = 0, so S = 0 and P = exp2(-lse), which overflows to inf when a
            # row's energies are hugely negative: inf * (k = 0) would poison dQ with NaN. Keys
            # from N_VALID to N are the launcher's zero padding, beyond N the tile's.
            p_t = tl.where((offs_n < N_VALID)[:, None], p_t, 0.0)
            # dS = P (dP - Delta) with dP = gamma dP_raw and Delta = gamma delta_raw.
            ds_t = (p_t * (dp_t - delta[None, :]) * gamma).to(Q.dtype.element_ty)
            dk = tl.dot(ds_t, tl.trans(q), dk, input_precision=INPUT_PRECISION)
            if ATOMIC_DQ:
                dq = tl.dot(tl.trans(ds_t), kT, input_precision=INPUT_PRECISION)
                tl.atomic_add(DQ + pid_b * stride_dqb + _pam_offsets(offs_m, stride_dqn, offs_d, stride_dqd),
                              dq, mask=mask_m[:, None] & mask_d[None, :], sem="relaxed")
    DK_tile = DK + pid_s.to(tl.int64) * stride_dks + pid_b * stride_dkb
    tl.store(DK_tile + _pam_offsets(offs_n, stride_dkn, offs_d, stride_dkd), dk.to(DK.dtype.element_ty),
             mask=mask_n[:, None] & mask_d[None, :])


@triton.jit
def _pam_bwd_dq_kernel(
    Q, K, V, DY, Gamma, Lse, DeltaRaw, DQ,
    stride_qb, stride_qd, stride_qn,
    stride_kb, stride_kd, stride_kn,
    stride_vb, stride_vc, stride_vn,
    stride_gb, stride_gc, stride_gn,
    stride_dqs, stride_dqb, stride_dqd, stride_dqn,
    N, N_VALID, D, C, blocks_per_split, num_c_blocks, num_steps,
    HAS_GAMMA: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dQ for BLOCK_M queries over one split of the key blocks, without atomics (deterministic).

    The mirror image of the dK kernel: dP = dO^T v over all of C, S = q^T k, dS, dQ += dS k^T,
    in one flat (key block, C chunk) loop; k is loaded at a key block's first C step. With one
    split DQ is dQ itself, else an fp32 partial per split.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < D
    gamma = _pam_load_gamma(Gamma, HAS_GAMMA)

    qT = tl.load(Q + pid_b * stride_qb + _pam_offsets(offs_m, stride_qn, offs_d, stride_qd),
                 mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    lse = tl.load(Lse + pid_b * N + offs_m, mask=mask_m, other=float("inf"))
    delta = tl.load(DeltaRaw + pid_b * N + offs_m, mask=mask_m, other=0.0)
    K_block = K + pid_b * stride_kb
    V_block = V + pid_b * stride_vb
    DY_block = DY + pid_b * stride_gb
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k = tl.zeros([BLOCK_D, BLOCK_N], dtype=K.dtype.element_ty)
    first_n = pid_s * blocks_per_split * BLOCK_N
    for step in range(0, num_steps):
        block = step // num_c_blocks
        chunk = step - block * num_c_blocks
        offs_n = first_n + block * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_c = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_n = offs_n < N
        mask_c = offs_c < C
        if chunk == 0:
            k = tl.load(K_block + _pam_offsets(offs_d, stride_kd, offs_n, stride_kn),
                        mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        dyT = tl.load(DY_block + _pam_offsets(offs_m, stride_gn, offs_c, stride_gc),
                      mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        v = tl.load(V_block + _pam_offsets(offs_c, stride_vc, offs_n, stride_vn),
                    mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        dp = tl.dot(dyT, v, tl.where(chunk == 0, 0.0, dp), input_precision=INPUT_PRECISION)
        if chunk == num_c_blocks - 1:
            p = tl.math.exp2(tl.dot(qT, k, input_precision=INPUT_PRECISION) * LOG2E - lse[:, None])
            p = tl.where((offs_n < N_VALID)[None, :], p, 0.0)  # padded keys: see the dK kernel
            ds = (p * (dp - delta[:, None]) * gamma).to(K.dtype.element_ty)
            dq = tl.dot(ds, tl.trans(k), dq, input_precision=INPUT_PRECISION)
    DQ_tile = DQ + pid_s.to(tl.int64) * stride_dqs + pid_b * stride_dqb
    tl.store(DQ_tile + _pam_offsets(offs_m, stride_dqn, offs_d, stride_dqd), dq.to(DQ.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------------------------
# Tuning
# ----------------------------------------------------------------------------------------------
# Hopper (H100/H200) forward search space. Reasoning behind the ranges:
# * BLOCK_M 64 or 128 rows: wgmma works on 64-row slices per warpgroup (4 warps). 8 warps on 64
#   rows split the C columns between two warpgroups, which halves the per-thread accumulator and
#   makes BLOCK_C = 256 fit (fewer recomputations of q^T k); 128 rows need 8 warps (see _keep).
# * BLOCK_C: 64..256. Larger tiles recompute S = q^T k fewer times (ceil(C / BLOCK_C) per query
#   block) but hold an fp32 BLOCK_M x BLOCK_C accumulator in registers.
# * BLOCK_N: 64 or 128, the key block streamed per step: it is the N of the q^T k wgmma and the
#   K of the P v one, and each step pays one accumulator rescale, so narrower blocks only add
#   overhead. num_stages 2-3 software-pipelines the k/v loads.
# The prune below keeps what fits: a register estimate calibrated against `ptxas -v` for sm_90
# (bf16, d = 64; 37 tile configurations compiled without a GPU: estimates up to 144 compiled
# without spills, several at 160 spilled), and shared memory q + stages * (k + v tiles), exact
# against the compiler's figure, under 200 KiB of the H100's 227 KiB per block.
_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_C": bc}, num_warps=w, num_stages=s)
    for bm in (64, 128)
    for bn in (64, 128)
    for bc in (64, 128, 256)
    for w in (4, 8)
    for s in (2, 3)
]
# The interpreter runs programs one by one in numpy: tuning would only multiply its run time,
# and 32-wide tiles keep the CI shapes multi-block (ragged tails, several C blocks).
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_C": 32}

_MAX_REGS_PER_THREAD = 144
_MAX_SHARED_BYTES = 200 * 1024


def _keep(config: triton.Config) -> bool:
    """Static filter: 128 query rows take 8 warps. On one warpgroup the row statistics and the
    exp2 of the whole 128 x BLOCK_N tile (MUFU throughput is the forward's second limit after
    the tensor cores) would run on half the threads."""
    return not (config.kwargs["BLOCK_M"] == 128 and config.num_warps == 4)


def _registers_per_thread(block_m: int, block_n: int, block_c: int, element_size: int, num_warps: int) -> int:
    """Forward register estimate per thread: the fp32 accumulator and S tiles plus the v tile in
    flight (calibrated with ptxas, see above; the compiled count is about 1.6x this figure)."""
    words = block_m * block_c + block_m * block_n + block_n * block_c * element_size // 4
    return words // (32 * num_warps)


def _pow2_cap(n: int) -> int:
    """Smallest tile (a power of two >= 16, tl.dot's minimum) that covers n."""
    return max(16, triton.next_power_of_2(n))


def _prune_fwd_configs(
    configs: list[triton.Config], named_args: dict, **kwargs: object
) -> list[triton.Config]:
    """Drop forward configs that cannot fit this problem: tiles capped at the problem size
    (duplicates removed), register and shared-memory budgets computed for the input dtype."""
    n, c, block_d = named_args["N"], named_args["C"], kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    element_size = named_args["V"].element_size()
    kept: dict[tuple, triton.Config] = {}
    for config in configs:
        bm = min(config.kwargs["BLOCK_M"], _pow2_cap(n))
        bn = min(config.kwargs["BLOCK_N"], _pow2_cap(n))
        bc = min(config.kwargs["BLOCK_C"], _pow2_cap(c))
        registers = _registers_per_thread(bm, bn, bc, element_size, config.num_warps)
        shared = element_size * (bm * block_d + config.num_stages * bn * (block_d + bc))
        if registers > _MAX_REGS_PER_THREAD or shared > _MAX_SHARED_BYTES:
            continue
        key = (bm, bn, bc, config.num_warps, config.num_stages)
        kept.setdefault(key, triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_C": bc},
                                           num_warps=config.num_warps, num_stages=config.num_stages))
    # Huge d (256) with fp32 can exclude everything: fall back to the smallest tile.
    return list(kept.values()) or [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_C": 64},
                                                 num_warps=4, num_stages=1)]


# fp32 with input_precision="ieee" (torch's default, "highest"): no tensor cores, tl.dot becomes
# FMA loops with both operands in registers, and ptxas spills kilobytes on every tensor-core tile
# above. This path gets its own small tiles, each compiled spill-free for sm_90.
_FWD_CONFIGS_FMA = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_C": bc}, num_warps=w, num_stages=2)
    for bm, bn, bc, w in ((32, 32, 64, 4), (64, 32, 64, 8), (64, 16, 64, 4))
]

if _INTERPRETING:
    _interpreter_tuner = triton.autotune([triton.Config(_INTERPRETER_CONFIG, num_warps=4, num_stages=1)],
                                         key=["N", "BLOCK_D", "C"])
    _pam_fwd_kernel_tensor_cores = _pam_fwd_kernel_fma = _interpreter_tuner(_pam_fwd_kernel)
else:
    _pam_fwd_kernel_tensor_cores = triton.autotune(
        list(filter(_keep, _FWD_CONFIGS)),
        key=["N", "BLOCK_D", "C", "INPUT_PRECISION"],
        prune_configs_by={"early_config_prune": _prune_fwd_configs},
    )(_pam_fwd_kernel)
    _pam_fwd_kernel_fma = triton.autotune(
        _FWD_CONFIGS_FMA,
        key=["N", "BLOCK_D", "C"],
        prune_configs_by={"early_config_prune": _prune_fwd_configs},
    )(_pam_fwd_kernel)


# Backward tiles, (BLOCK_M, BLOCK_N, BLOCK_C, num_warps, num_stages) per kernel and operand class,
# fixed rather than autotuned (as in the tutorial: tuning four kernels would multiply the first
# call's time). Each was chosen by compiling for sm_90 with a real launch's specialisation
# (d = 64, C = 512): no spills, no replicated S, every load of the main loop software-pipelined;
# the figures are in the module docstring. "dkdq" is the key-side kernel with atomic dQ (the
# default), "dk" and "dq" the deterministic pair.
_BWD_TILES: dict[str, dict[str, tuple[int, int, int, int, int]]] = {
    # bf16 / fp16 on wgmma.
    "16-bit": {"dv": (64, 128, 256, 8, 2), "dkdq": (64, 128, 64, 8, 3), "dk": (64, 128, 64, 8, 3),
               "dq": (128, 128, 64, 8, 2)},
    # fp32 operands on wgmma: twice the bytes and (P, dS kept fp32) twice the registers per tile.
    "tf32": {"dv": (64, 128, 128, 8, 2), "dkdq": (32, 128, 32, 8, 2), "dk": (64, 128, 32, 8, 2),
             "dq": (128, 64, 32, 8, 2)},
    # 3xTF32 splits each operand into high and low halves in registers. The atomic dQ product
    # spills at every tile tried, so this class always takes the atomics-free pair (no "dkdq").
    "tf32x3": {"dv": (32, 128, 128, 8, 2), "dk": (16, 128, 16, 8, 2), "dq": (128, 16, 32, 8, 2)},
    # fp32 "ieee": FMA dots hold both operands in registers, hence the small tiles.
    "ieee": {"dv": (32, 32, 256, 8, 2), "dkdq": (16, 16, 32, 4, 2), "dk": (16, 64, 32, 8, 2),
             "dq": (32, 32, 32, 8, 2)},
    # The interpreter: 32-wide tiles keep the CI shapes multi-block (ragged tails, several chunks).
    "interpreter": {name: (32, 32, 32, 4, 1) for name in ("dv", "dkdq", "dk", "dq")},
}
# Heads wider than 128 (BLOCK_D = 256, compiled at d = 256, C = 2048): the resident k^T / q^T
# tile and the dK / dQ accumulators grow 4x over d = 64, so the tiles shrink (keeping 128 rows
# of S on 8 warps), and the atomic dQ product spills at every 16-bit and tf32 tile tried (those
# classes take the atomics-free pair). 3xTF32 and "ieee" spill at every tile tried at this width
# (376 bytes to 4.7 KB; d = 256 is outside DANet's shapes, and at d = 64 they compile clean).
_BWD_TILES_WIDE_HEAD: dict[str, dict[str, tuple[int, int, int, int, int]]] = {
    "16-bit": {"dv": (64, 128, 128, 8, 2), "dk": (32, 128, 32, 8, 2), "dq": (128, 32, 64, 8, 2)},
    "tf32": {"dv": (32, 128, 128, 8, 2), "dk": (16, 128, 16, 8, 2), "dq": (128, 16, 32, 8, 2)},
    "tf32x3": {"dv": (16, 64, 128, 4, 2), "dk": (16, 64, 16, 4, 2), "dq": (64, 16, 16, 4, 2)},
    "ieee": {"dv": (32, 16, 256, 8, 2), "dk": (16, 32, 16, 8, 2), "dq": (16, 16, 16, 8, 2)},
    "interpreter": _BWD_TILES["interpreter"],
}
_BWD_PREPROCESS = {"BLOCK_M": 128, "BLOCK_C": 32, "num_warps": 4, "num_stages": 1}


def _bwd_operand_class(dtype: torch.dtype, input_precision: str) -> str:
    if _INTERPRETING:
        return "interpreter"
    if dtype != torch.float32:
        return "16-bit"
    return input_precision


def _bwd_config(
    dtype: torch.dtype, input_precision: str, block_d: int, n: int, c: int
) -> dict[str, dict[str, int]]:
    """Launch parameters of every backward kernel: tiles (capped at the problem size) and the
    num_warps / num_stages each one was compiled and measured with."""
    table = _BWD_TILES_WIDE_HEAD if block_d > 128 else _BWD_TILES
    tiles = table[_bwd_operand_class(dtype, input_precision)]
    caps = {"BLOCK_M": _pow2_cap(n), "BLOCK_N": _pow2_cap(n), "BLOCK_C": _pow2_cap(c)}
    config: dict[str, dict[str, int]] = {"pre": {**_BWD_PREPROCESS, "BLOCK_M": min(128, _pow2_cap(n))}}
    for name, (block_m, block_n, block_c, num_warps, num_stages) in tiles.items():
        sizes = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_C": block_c}
        config[name] = {key: min(size, caps[key]) for key, size in sizes.items()}
        config[name] |= {"num_warps": num_warps, "num_stages": num_stages}
    return config


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors to fill; 1 off the GPU (the interpreter runs programs one by one)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# Splits of a backward kernel's sequential loop: each one more costs an fp32 partial of the
# kernel's output (at most 4 of them: 4 x 19 MB for dV at C = 512, N = 9409).
_MAX_SPLITS = 4


def _split(programs: int, blocks: int, sm_count: int) -> tuple[int, int]:
    """``(blocks_per_split, splits)`` for a kernel of ``programs`` programs that each loop over
    ``blocks`` blocks: the split count (1 to 4) that finishes soonest on ``sm_count`` SMs with one
    program per SM at a time, ``ceil(programs * splits / sm_count) / splits``, the fewest splits
    among equals, and no split unless it saves 10%. B = 1, N = 4096 gives the dK kernel 32
    programs (32 key blocks of 128): 4 splits of 16 query blocks make 128 programs, one wave on
    132 SMs. The partial sums are added afterwards in a fixed order: no determinism is lost."""
    def finish(splits: int) -> float:
        return triton.cdiv(programs * splits, sm_count) / splits

    best = min(range(1, min(_MAX_SPLITS, blocks) + 1), key=lambda splits: (finish(splits), splits))
    if finish(best) > 0.9 * finish(1):
        best = 1
    per_split = triton.cdiv(blocks, best)
    return per_split, triton.cdiv(blocks, per_split)


# Grid axes 1 and 2 are limited to 65535 programs: larger batches are launched in chunks.
_MAX_GRID_BATCH = 65535


def _batch_chunks(batch: int) -> list[tuple[int, int]]:
    return [(start, min(batch, start + _MAX_GRID_BATCH)) for start in range(0, batch, _MAX_GRID_BATCH)]


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _forward_outputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor | None,
    residual: torch.Tensor | None,
    store_out: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward's (result, out, lse), allocated and not yet written (see :func:`pam_forward`)."""
    batch, _, n = q.shape
    result = torch.empty((batch, v.shape[1], n), device=v.device, dtype=v.dtype)
    out = torch.empty_like(result) if (gamma is not None and store_out) else result.new_empty(0)
    lse = torch.empty((batch, n), device=v.device, dtype=torch.float32)
    return result, out, lse


def _backward_buffers(
    q: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised (dq, dk, dv, delta_raw) as the backward kernels write them: their N axis is
    N_PAD long (:func:`_bwd_padded_length`), so every row starts 16-byte aligned."""
    batch, head_dim, n = q.shape
    n_pad = _bwd_padded_length(n)
    dq = torch.empty((batch, head_dim, n_pad), device=q.device, dtype=q.dtype)
    dv = torch.empty((batch, v.shape[1], n_pad), device=v.device, dtype=v.dtype)
    delta_raw = torch.empty((batch, n_pad), device=v.device, dtype=torch.float32)
    return dq, torch.empty_like(dq), dv, delta_raw


def _backward_outputs(
    dy: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward's (dq, dk, dv, delta_raw), allocated and not yet written (see
    :func:`pam_backward`): N-long views of :func:`_backward_buffers`."""
    return tuple(t[..., : q.shape[-1]] for t in _backward_buffers(q, v))


def pam_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor | None,
    residual: torch.Tensor | None,
    store_out: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on validated inputs (see danet_kernels.functional).

    Returns ``(result, out, lse)``: result = gamma * O + residual (or O without gamma), shape
    (B, C, N) in v's dtype; out = O when gamma is given and ``store_out`` (the backward needs it),
    else an empty tensor; lse = per-row log2-sum-exp2 of the log2(e)-scaled energies, (B, N) fp32.
    """
    batch, head_dim, n = q.shape
    channels = v.shape[1]
    has_residual = gamma is not None
    store_out = has_residual and store_out
    result, out, lse = _forward_outputs(q, k, v, gamma, residual, store_out)
    # Placeholders for pointer arguments a constexpr branch never reads.
    gamma_arg = gamma if has_residual else lse
    residual_arg = residual if has_residual else v
    out_arg = out if store_out else result
    precision = dot_input_precision(v.dtype)
    kernel = _pam_fwd_kernel_fma if precision == "ieee" else _pam_fwd_kernel_tensor_cores
    meta = {
        "HAS_RESIDUAL": has_residual,
        "STORE_OUT": store_out,
        "BLOCK_D": _pow2_cap(head_dim),
        "INPUT_PRECISION": precision,
    }
    for b0, b1 in _batch_chunks(batch):
        chunk = b1 - b0

        def grid(meta: dict, chunk: int = chunk) -> tuple[int, int, int]:
            return (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(channels, meta["BLOCK_C"]), chunk)

        torch.library.wrap_triton(kernel)[grid](
            q[b0:b1], k[b0:b1], v[b0:b1], gamma_arg, residual_arg[b0:b1],
            result[b0:b1], out_arg[b0:b1], lse[b0:b1],
            *q.stride(), *k.stride(), *v.stride(), *residual_arg.stride(),
            *result.stride(), *out_arg.stride(),
            n, head_dim, channels,
            **meta,
        )
    return result, out, lse


def _bwd_padded_length(n: int) -> int:
    """The N axis as the backward kernels see it: rounded up to a multiple of 16 elements."""
    return triton.cdiv(n, 16) * 16


def _bwd_operand(t: torch.Tensor, n_pad: int, fill: float = 0.0) -> torch.Tensor:
    """``t`` (..., N) as the backward kernels read it, N_PAD long: itself where N_PAD is N, else a
    copy whose tail holds ``fill`` (zeros: padded positions add nothing; lse = +inf: padded
    queries get P = 0). Without the copy, N % 16 != 0 (DANet's 97 x 97 = 9409) leaves no row
    16-byte aligned: no vectorised or asynchronous loads, and spills (788 bytes in dV, bf16)."""
    if t.shape[-1] == n_pad:
        return t
    return torch.nn.functional.pad(t, (0, n_pad - t.shape[-1]), value=fill)


def _partials(out: torch.Tensor, splits: int) -> torch.Tensor:
    """Where a kernel writes ``out`` (B, rows, N_PAD) from ``splits`` programs per tile: ``out``
    itself (as a split axis of one) or an fp32 (splits, B, rows, N_PAD) buffer for
    :func:`_sum_partials`."""
    if splits == 1:
        return out.unsqueeze(0)
    return torch.empty((splits, *out.shape), device=out.device, dtype=torch.float32)


def _sum_partials(out: torch.Tensor, partials: torch.Tensor) -> None:
    """Add the splits' partials into ``out`` in a fixed order (deterministic)."""
    if partials.shape[0] > 1:
        out.copy_(partials.sum(0))


def pam_backward(
    dy: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels. ``out`` is O (the forward's result when there is no gamma).

    Returns ``(dq, dk, dv, delta_raw)`` with delta_raw[b, i] = sum_c dy[b, c, i] O[b, c, i]
    (fp32, (B, N)): dgamma = delta_raw.sum(). dq, dk, dv take the inputs' dtype.

    By default dQ is accumulated with fp32 atomics by the dK kernel (each product once, the
    order of the additions varies from run to run); under
    ``torch.use_deterministic_algorithms(True)`` a separate dQ kernel computes it without
    atomics, bit-for-bit repeatable.
    """
    batch, head_dim, n = q.shape
    channels = v.shape[1]
    has_gamma = gamma is not None
    deterministic = torch.are_deterministic_algorithms_enabled()
    n_pad = _bwd_padded_length(n)
    q_in, k_in, v_in, dy_in, out_in = (_bwd_operand(t, n_pad) for t in (q, k, v, dy, out))
    lse_in = _bwd_operand(lse, n_pad, fill=float("inf"))
    dq_out, dk_out, dv_out, delta_out = _backward_buffers(q, v)
    gamma_arg = gamma if has_gamma else lse_in
    precision = dot_input_precision(v.dtype)
    block_d = _pow2_cap(head_dim)
    config = _bwd_config(v.dtype, precision, block_d, n_pad, channels)
    sm_count = _sm_count(q.device)
    common = {"HAS_GAMMA": has_gamma, "BLOCK_D": block_d, "INPUT_PRECISION": precision}
    atomic_dq = not deterministic and "dkdq" in config
    pre, dv_cfg = config["pre"], config["dv"]
    dk_cfg = config["dkdq" if atomic_dq else "dk"]
    for b0, b1 in _batch_chunks(batch):
        chunk = b1 - b0
        q_, k_, v_, dy_, lse_ = q_in[b0:b1], k_in[b0:b1], v_in[b0:b1], dy_in[b0:b1], lse_in[b0:b1]
        delta_ = delta_out[b0:b1]
        torch.library.wrap_triton(_pam_bwd_preprocess)[(triton.cdiv(n_pad, pre["BLOCK_M"]), chunk)](
            out_in[b0:b1], dy_, delta_, *out_in.stride(), *dy_in.stride(), n_pad, channels, **pre,
        )

        key_blocks = triton.cdiv(n_pad, dv_cfg["BLOCK_N"])
        c_blocks = triton.cdiv(channels, dv_cfg["BLOCK_C"])
        query_blocks = triton.cdiv(n_pad, dv_cfg["BLOCK_M"])
        per_split, splits = _split(key_blocks * c_blocks * chunk, query_blocks, sm_count)
        dv_partials = _partials(dv_out[b0:b1], splits)
        torch.library.wrap_triton(_pam_bwd_dv_kernel)[(key_blocks * c_blocks, splits, chunk)](
            q_, k_, dy_, gamma_arg, lse_, dv_partials,
            *q_in.stride(), *k_in.stride(), *dy_in.stride(), *dv_partials.stride(),
            n_pad, head_dim, channels, key_blocks, per_split, **common, **dv_cfg,
        )
        _sum_partials(dv_out[b0:b1], dv_partials)

        key_blocks = triton.cdiv(n_pad, dk_cfg["BLOCK_N"])
        c_blocks = triton.cdiv(channels, dk_cfg["BLOCK_C"])
        per_split, splits = _split(key_blocks * chunk, triton.cdiv(n_pad, dk_cfg["BLOCK_M"]), sm_count)
        dk_partials = _partials(dk_out[b0:b1], splits)
        if not atomic_dq:
            dq_accumulator = dq_out  # not written: ATOMIC_DQ is off
        elif dq_out.dtype == torch.float32:
            dq_accumulator = dq_out[b0:b1].zero_()
        else:
            dq_accumulator = torch.zeros(dq_out[b0:b1].shape, device=dq_out.device, dtype=torch.float32)
        torch.library.wrap_triton(_pam_bwd_dkdq_kernel)[(key_blocks, splits, chunk)](
            q_, k_, v_, dy_, gamma_arg, lse_, delta_, dk_partials, dq_accumulator,
            *q_in.stride(), *k_in.stride(), *v_in.stride(), *dy_in.stride(), *dk_partials.stride(),
            *dq_accumulator.stride(),
            n_pad, n, head_dim, channels, per_split, c_blocks, per_split * c_blocks,
            ATOMIC_DQ=atomic_dq, **common, **dk_cfg,
        )
        _sum_partials(dk_out[b0:b1], dk_partials)
        if atomic_dq:
            if dq_out.dtype != torch.float32:
                dq_out[b0:b1].copy_(dq_accumulator)
            continue

        dq_cfg = config["dq"]
        query_blocks = triton.cdiv(n_pad, dq_cfg["BLOCK_M"])
        c_blocks = triton.cdiv(channels, dq_cfg["BLOCK_C"])
        per_split, splits = _split(query_blocks * chunk, triton.cdiv(n_pad, dq_cfg["BLOCK_N"]), sm_count)
        dq_partials = _partials(dq_out[b0:b1], splits)
        torch.library.wrap_triton(_pam_bwd_dq_kernel)[(query_blocks, splits, chunk)](
            q_, k_, v_, dy_, gamma_arg, lse_, delta_, dq_partials,
            *q_in.stride(), *k_in.stride(), *v_in.stride(), *dy_in.stride(), *dq_partials.stride(),
            n_pad, n, head_dim, channels, per_split, c_blocks, per_split * c_blocks,
            **common, **dq_cfg,
        )
        _sum_partials(dq_out[b0:b1], dq_partials)
    return tuple(t[..., :n] for t in (dq_out, dk_out, dv_out, delta_out))


# ----------------------------------------------------------------------------------------------
# Custom ops and autograd
# ----------------------------------------------------------------------------------------------


# On a GPU the ops are triton_ops: their kernels stay visible to torch.compile (Inductor schedules
# them like its own). Under TRITON_INTERPRET=1 wrap_triton hands back the bare interpreted kernel,
# which fake-tensor tracing would execute on fake data (and AOT's decomposition of a triton_op
# would drop); there the ops are opaque custom_ops whose fake kernels only allocate the outputs.
_define_op = torch.library.custom_op if _INTERPRETING else torch.library.triton_op


@_define_op("danet_kernels::pam_forward", mutates_args=())
def _pam_forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor | None,
    residual: torch.Tensor | None,
    store_out: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return pam_forward(q, k, v, gamma, residual, store_out)


@_define_op("danet_kernels::pam_backward", mutates_args=())
def _pam_backward_op(
    dy: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return pam_backward(dy, q, k, v, gamma, out, lse)


if _INTERPRETING:
    _pam_forward_op.register_fake(_forward_outputs)
    _pam_backward_op.register_fake(_backward_outputs)


class PositionAttentionFunction(torch.autograd.Function):
    """Autograd for fused PAM: ``(q, k, v, gamma, residual, store_out) -> (result, out, lse)``.

    ``result`` is the attention output (``gamma * O + residual`` when gamma is given); ``out``
    (O, saved only with gamma and ``store_out``) and ``lse`` are what the backward reads and
    are not differentiable. Its ``setup_context``/``backward`` are also registered as the
    autograd formula of the ``danet_kernels::pam_forward`` op, so eager and torch.compile share
    one definition; :func:`position_attention_triton` is the entry point to use.
    """

    @staticmethod
    def forward(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gamma: torch.Tensor | None,
        residual: torch.Tensor | None,
        store_out: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the forward op."""
        return _pam_forward_op(q, k, v, gamma, residual, store_out)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
        """Save q, k, v, gamma, O and lse for the backward."""
        q, k, v, gamma, _, _ = inputs
        result, out, lse = output
        ctx.save_for_backward(q, k, v, gamma, result if gamma is None else out, lse)
        ctx.has_gamma = gamma is not None
        ctx.mark_non_differentiable(out, lse)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dresult: torch.Tensor, *unused_grads: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        """Gradients of q, k, v, gamma, residual (None for store_out)."""
        q, k, v, gamma, out, lse = ctx.saved_tensors
        needs_q, needs_k, needs_v, needs_gamma, needs_residual, _ = ctx.needs_input_grad
        dresidual = dresult if needs_residual else None
        if not (needs_q or needs_k or needs_v or needs_gamma):
            return None, None, None, None, dresidual, None
        if out.numel() == 0:
            raise RuntimeError(
                "pam_forward ran with store_out=False, so O was not kept and the backward cannot "
                "run; call position_attention_triton (it decides store_out from grad mode)"
            )
        dq, dk, dv, delta_raw = _pam_backward_op(dresult, q, k, v, gamma, out, lse)
        dgamma = delta_raw.sum().reshape(gamma.shape).to(gamma.dtype) if needs_gamma else None
        return (dq if needs_q else None, dk if needs_k else None, dv if needs_v else None,
                dgamma, dresidual, None)


_pam_forward_op.register_autograd(
    PositionAttentionFunction.backward, setup_context=PositionAttentionFunction.setup_context
)


def position_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """Fused PAM: ``gamma * attention(q, k, v) + residual`` when gamma is given, else the attention.

    Inputs are validated by :func:`danet_kernels.position_attention`: q, k (B, d, N); v, residual
    (B, C, N); one dtype (fp16, bf16, fp32) and device; any strides. O is kept for the backward
    only when a gradient will be needed.
    """
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, gamma)
    )
    result, _, _ = torch.ops.danet_kernels.pam_forward(q, k, v, gamma, residual, needs_grad)
    return result
