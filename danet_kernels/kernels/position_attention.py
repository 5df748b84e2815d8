"""Fused position attention (DANet's PAM) in Triton: flash-style forward and recomputing backward.

Math (per batch element; q of shape (B, d, N), k of shape (B, d, M), v of shape (B, C, M); M = N
in DANet, M < N where a non-local block pools its keys; s the softmax scale, 1 in DANet)::

    S[i, j]   = s sum_d q[d, i] k[d, j]               s = 1: no 1/sqrt(d) scaling, as in DANet
    P[i, :]   = softmax_j(S[i, :])
    O[c, i]   = sum_j v[c, j] P[i, j]
    Y         = gamma * O + residual                  when gamma is given, else Y = O

Backward (dY the incoming gradient, dO = gamma * dY or dY)::

    dV[c, j]  = sum_i P[i, j] dO[c, i]
    dP[i, j]  = sum_c dO[c, i] v[c, j]                summed over ALL of C
    Delta[i]  = sum_c dO[c, i] O[c, i]  (= rowsum(dP * P))
    dS        = P * (dP - Delta[:, None])
    dQ[:, i]  = s sum_j dS[i, j] k[:, j]   dK[:, j] = s sum_i dS[i, j] q[:, i]
    dgamma    = sum(dY * O)               dresidual = dY

Forward (``_pam_fwd_kernel``), after FlashAttention and Triton's fused-attention tutorial: a
program keeps BLOCK_M queries and an fp32 (BLOCK_M, BLOCK_C) accumulator on chip and streams
BLOCK_N-key blocks of k and v (cp.async, num_stages deep) with an online softmax in base 2:
``exp2(S * s log2(e) - m)``, the scale and log2(e) one constant (``SCALE``, a constexpr: a
model's one or two scales compile once each, at no register), m the running max in log2 units.
The rescale is lazy (FlashAttention-4): m moves, and the accumulator is multiplied by
exp2(m_old - m_new), only when some row's max grew past it by more than RESCALE_THRESHOLD = 8
(a factor 256); otherwise p = exp2(S s log2(e) - m) is at most 2^8 and the tile's multiply per
accumulator element is skipped; exact either way, O = acc / l and lse = m + log2(l) using the
same m. It writes Y, O when the backward needs it, and the per-row lse; never S or P.

Why C is split across programs: DANet's d is 64 but C is 512, and an fp32 (BLOCK_M, C)
accumulator does not fit an SM's registers beside S. Grid axis 1 runs over C blocks, each
recomputing S = q^T k: ``2 N M (d ceil(C / BLOCK_C) + C)`` FLOPs and ``N M ceil(C / BLOCK_C)``
exp2; operand traffic from L2 ``M (d + BLOCK_C)`` elements per program. Programs of one (batch, C
block) are adjacent on grid axis 0, so they stream the same k and v blocks through L2 together;
every C block computes the same lse, the first one stores it. The tile lists (``_FWD_TILES``) are
what compiles for sm_90 without spills or replicated S per operand class; the autotuner ranks them
by the perf model at the real N, M and B (kernels/common.py: waves, residency, the serial MMA and
softmax phases), so that a grid whose last wave would be nearly empty is charged for it; the
figures of each tile (registers, FLOPs and bytes per N^2, the model's time) are in
docs/compile_report.md, the choices and what was tried in docs/performance.md.

Any N on the fast path. The pipelined, vectorised loads need every row of q, k, v, dY and O to
start 16-byte aligned, which a contiguous (B, *, N) map with N % 16 != 0 does not give (DANet's
97 x 97 = 9409): the launchers copy such operands into buffers with N rounded up to a multiple of
16 and zero tails (kernels/common.py's ``aligned_rows``; one read and one write of each, (d + C)
(N + M) elements against the kernels' O(N M) work); the kernels mask padded keys' scores to -inf
and never store padded queries, and the outputs are (B, *, N) views of 16-aligned buffers. Aligned
operands (N % 16 == 0, or channels_last maps, whose N axis has stride C) are read in place.

Backward recomputes P blockwise from q, k and lse (never N x M). Every pair needs dP = dO^T v over
ALL of C (2 C FLOPs, the dominant term) before its dS, and contributes P^T dO to dV across all of
C; an fp32 BLOCK_N x C dV tile does not fit sm_90's registers beside dK and dP, so dV gets its own
kernel, split over C like the forward, and everything that needs dP over all of C happens once,
in the key-side kernel:

* ``_pam_bwd_preprocess``: ``delta_raw[i] = sum_c dY[c, i] O[c, i]`` in fp32; Delta = gamma *
  delta_raw and dgamma = sum(delta_raw).
* ``_pam_bwd_dv_kernel``: grid (key blocks x C blocks, query splits, B). S^T = k^T q first (128
  key rows on 8 warps, no replicated S), so P^T is already the A operand of dV^T += P^T dO^T; an
  fp32 BLOCK_N x BLOCK_C dV tile stays on chip while query blocks stream by. Padded keys are
  biased to -inf as in the key-side kernel (else exp2(-lse) overflows there).
* ``_pam_bwd_dkdq_kernel``, the default: grid (key blocks, query splits, B). Per query block dP^T =
  v^T dO over all of C, S^T, P^T, dS^T = P^T (dP^T - Delta), dK += dS^T q^T on chip, and dQ^T =
  k dS^T added into an fp32 (B, d, N) buffer with atomics in its own (d, N) layout, as in
  FlashAttention-2: S, P, dP and dS once per pair. With 16-bit operands, d <= 64 and C <= 512 the
  key block's v^T for all of C stays in shared memory (loaded once per program: ``RESIDENT_V``)
  and only q and dY stream, ``2 (d + C) / BLOCK_N`` bytes per pair plus 4 d / BLOCK_N of fp32
  atomics; otherwise (fp32 operands, wider heads or C) C is streamed in chunks too, one flat
  (query block, C chunk) loop so that the pipeline never drains, re-reading v^T per query block.
  Each program starts at its own query block, so that the programs running together add their
  atomics into different dQ tiles.
* Deterministic, where ``torch.use_deterministic_algorithms(True)``: the same key-side kernel
  without the atomics, and ``_pam_bwd_dq_kernel``, its mirror image for dQ (grid (query blocks,
  key splits, B); with 16-bit operands the query block's dO^T stays in shared memory,
  ``RESIDENT_DY``): dP and S are computed twice; the gradients repeat bit for bit. 3xTF32 and
  heads wider than 128 take this pair always (their atomic dQ product spills).

Executed work (d = 64, C = 512): the dV kernel 2 (d ceil(C / BLOCK_C) + C) per pair, the key-side
kernel 2 (C + 3 d) with atomic dQ and 2 (C + 2 d) without, the dQ kernel 2 (C + 2 d); minimal
2 (2 C + 3 d). The deterministic floor: without ordering between programs (a spin-wait that the
interpreter cannot validate and that can hang) and without N^2 memory, dK and dQ are reduced by
different programs, each recomputing S and dP over all of C: 6 C + 8 d per pair if the key-side
kernel held dV for all of C (it does not fit), 2 d more per C block left to the dV kernel. The
figures per tile and precision, the floor's and a measured variant's, are in docs/performance.md
and docs/compile_report.md.

Small grids. Where a kernel launches fewer programs than the GPU has SMs (B = 1, small N),
``_split`` cuts each program's loop into up to 4 splits, each writing an fp32 partial summed
afterwards in a fixed order (deterministic either way; extra memory splits x B x rows x N x 4
bytes, only there).

Gamma never leaves the device: the kernels read it through a pointer (no ``.item()`` sync). The
forward stores O next to Y only when gamma is given and a gradient is needed (O cannot be
recovered from Y, gamma being 0 at initialisation).

Numerics. fp32, fp16 and bf16 inputs; S, the softmax statistics and all accumulators are fp32; P
and dS are rounded to the input dtype for the tensor cores (fp32 stays fp32). fp32 dots follow
torch's float32 matmul precision (kernels/common.py's ``dot_input_precision``: "ieee" by default,
"tf32x3" at "high", "tf32" at "medium"; each with its tile lists). NaN and Inf propagate as in the
reference; a row whose energies are all -inf so far is shifted by 0, so that ``-inf - -inf``
never makes a NaN the reference does not have.

Indexing. Every tensor comes with its per-axis strides; every load and store on N, M, C and d is
masked where it can run past the data (any N, M, C, d >= 1; d padded to BLOCK_D >= 16 for
tl.dot); batch offsets are int64. In-image offsets pass 2^31 at C N >= 2^31 (C = 512, N > 4.2M):
the backward forms all of them in int64 (kernels/common.py's ``offsets_2d``); the forward, whose
hot loop recomputes k and v offsets every key block, does so only where the launcher finds that
an image's offsets can pass 2^31 (``_needs_int64_offsets``, the ``INT64_OFFSETS`` constexpr, part
of the tuning key), keeping the int32 binary otherwise.

Under TRITON_INTERPRET=1 each kernel gets one small configuration (32-wide tiles, so that the
CI's small shapes still span several blocks with ragged tails), and nothing is tuned.

torch.compile. ``danet_kernels::pam_forward`` and ``pam_backward`` are defined by
kernels/common.py's ``define_op`` (``triton_op``s on a GPU, opaque ``custom_op``s with allocating
fake kernels under the interpreter); the forward op carries :class:`PositionAttentionFunction`'s
autograd formula, so a model calling :func:`position_attention_triton` compiles with
``fullgraph=True``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from danet_kernels.kernels.common import (
    INTERPRETING,
    LOG2E,
    MAX_SHARED_BYTES,
    LoopCost,
    aligned_rows,
    define_op,
    device_sms,
    dot_input_precision,
    is_aligned,
    launch_clocks,
    offsets_2d,
    operand_class,
    padded_length,
    padded_rows,
    resident_programs,
)

__all__ = ["PositionAttentionFunction", "pam_backward", "pam_forward", "position_attention_triton"]

# The forward's lazy rescale: how far (log2 units: a factor 256) a row's running max may grow
# before the accumulator is rescaled (FlashAttention-4's threshold).
RESCALE_THRESHOLD: tl.constexpr = tl.constexpr(8.0)


# ----------------------------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pam_fwd_offsets(rows, stride_rows, cols, stride_cols, INT64_OFFSETS: tl.constexpr):
    """The forward's in-image tile offsets: int64 (:func:`offsets_2d`) where the launcher
    found an image whose offsets may pass 2^31 (``_needs_int64_offsets``), else int32, the
    cheaper address arithmetic of the hot loop (the same binary as before the switch existed)."""
    if INT64_OFFSETS:
        return offsets_2d(rows, stride_rows, cols, stride_cols)
    else:
        return rows[:, None] * stride_rows + cols[None, :] * stride_cols


@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a 2-D tile, masking only the axes that can run past the data (zeros there)."""
    if MASK_ROWS and MASK_COLS:
        return tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
    elif MASK_ROWS:
        return tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    elif MASK_COLS:
        return tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _tile_mask(rows_ok, cols_ok, MASK_COLS: tl.constexpr):
    """A 2-D mask from a row mask, and from a column mask only where columns can run past the data."""
    if MASK_COLS:
        return rows_ok[:, None] & cols_ok[None, :]
    else:
        return rows_ok[:, None]


@triton.jit
def _pam_fwd_inner(
    acc, l_i, m_i, q, K_block, V_block, stride_kd, stride_kn, stride_vc, stride_vn,
    offs_d, offs_c, mask_d, mask_c, start_n, end_n, M, M_LOADED, QK_SCALE: tl.constexpr,
    TAIL: tl.constexpr, EVEN_D: tl.constexpr, EVEN_C: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online-softmax sweep over key blocks [start_n, end_n).

    Full blocks (TAIL False) lie inside the M real keys: no mask at all. The TAIL block masks
    its loads at M_LOADED (the buffers' length, a multiple of 16 when the launcher padded them,
    so the mask stays vector-aligned) and its scores at M (keys past M get -inf). QK_SCALE
    is the softmax scale times log2(e) (> 0, so the row max of the scaled scores is the scaled
    row max)."""
    for block_start in range(start_n, end_n, BLOCK_N):
        offs_n = block_start + tl.arange(0, BLOCK_N)
        loaded = offs_n < M_LOADED
        kT = _load_tile(K_block + _pam_fwd_offsets(offs_d, stride_kd, offs_n, stride_kn, INT64_OFFSETS),
                        mask_d, loaded, not EVEN_D, TAIL)
        s = tl.dot(q, kT, input_precision=INPUT_PRECISION)
        if TAIL:
            s = tl.where((offs_n < M)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * QK_SCALE)
        # Lazy rescale (FlashAttention-4): the reference max m_i moves only when some row's max grew
        # past it by more than RESCALE_THRESHOLD (log2 units), and then for every row; otherwise p
        # is at most 2^8 and acc, l keep their scale, so the tile's acc * alpha (a multiply per
        # accumulator element) is skipped. Exact either way: O = acc / l and lse = m_i + log2(l)
        # use the same m_i. A row whose energies are all -inf so far keeps m_i = -inf and is
        # shifted by 0 (p = 0, and alpha = 0 when it rescales) so that -inf - -inf never makes a
        # NaN the reference does not have; a NaN energy propagates through p as in the reference.
        grew = (m_new > m_i + RESCALE_THRESHOLD).to(tl.int32)
        if tl.max(grew, 0) > 0:
            alpha = tl.math.exp2(m_i - tl.where(m_new == float("-inf"), 0.0, m_new))
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        p = tl.math.exp2(s * QK_SCALE - m_safe[:, None])
        l_i = l_i + tl.sum(p, 1)
        v = _load_tile(V_block + _pam_fwd_offsets(offs_n, stride_vn, offs_c, stride_vc, INT64_OFFSETS),
                       loaded, mask_c, TAIL, not EVEN_C)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _pam_fwd_store(
    out, Gamma, Residual, Result, Out,
    stride_rc, stride_rn, stride_yc, stride_yn, stride_oc, stride_on,
    offs_m, offs_c, mask_c, N, N_LOADED,
    HAS_RESIDUAL: tl.constexpr, STORE_OUT: tl.constexpr, EVEN_C: tl.constexpr, INT64_OFFSETS: tl.constexpr,
):
    """Write a (BLOCK_M, width) tile of O's channels offs_c: Result = gamma * O + residual (or O),
    and O itself when STORE_OUT (pointers already at the batch element and the C block).

    Result and Out are views of buffers whose N axis is rounded up to a multiple of 16: rows up
    to that length may be written (the padded rows are never seen), and a row mask constant over
    16-row groups keeps the stores vectorised. The residual holds N_LOADED rows (zero-padded
    when the launcher padded the operands). O is stored before the residual is loaded: the
    other order keeps both tiles live, and 128 x 64 x 256 fp16 tiles then spill.
    """
    n_stored = tl.cdiv(N, 16) * 16
    mask_store = _tile_mask(offs_m < n_stored, mask_c, not EVEN_C)
    if HAS_RESIDUAL:
        if STORE_OUT:
            tl.store(Out + _pam_fwd_offsets(offs_m, stride_on, offs_c, stride_oc, INT64_OFFSETS),
                     out.to(Out.dtype.element_ty), mask=mask_store)
        gamma = tl.load(Gamma).to(tl.float32)
        residual = tl.load(Residual + _pam_fwd_offsets(offs_m, stride_rn, offs_c, stride_rc, INT64_OFFSETS),
                           mask=_tile_mask(offs_m < N_LOADED, mask_c, not EVEN_C), other=0.0)
        result = gamma * out + residual.to(tl.float32)
    else:
        result = out
    tl.store(Result + _pam_fwd_offsets(offs_m, stride_yn, offs_c, stride_yc, INT64_OFFSETS),
             result.to(Result.dtype.element_ty), mask=mask_store)


# C % BLOCK_C == 0 lets every load and store drop its channel mask (whose predicates would cost
# the 128 x 64 x 256 tile its last registers). A heuristic, evaluated on the config the
# autotuner (or torch.compile's copy of it) runs.
@triton.heuristics({"EVEN_C": lambda args: args["C"] % args["BLOCK_C"] == 0})
@triton.jit
def _pam_fwd_kernel(
    Q, K, V, Gamma, Residual, Result, Out, Lse,
    stride_qb, stride_qd, stride_qn,
    stride_kb, stride_kd, stride_kn,
    stride_vb, stride_vc, stride_vn,
    stride_rb, stride_rc, stride_rn,
    stride_yb, stride_yc, stride_yn,
    stride_ob, stride_oc, stride_on,
    N, N_LOADED, M, M_LOADED, D, C,
    B,  # the grid's batch: part of the autotuning key (the real grid), never read
    SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_OUT: tl.constexpr,
    BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_C: tl.constexpr,
):
    """One program: BLOCK_M queries x BLOCK_C value channels of one batch element.

    q and the residual hold N_LOADED positions (N real queries, zeros after), k and v M_LOADED
    (M real keys); Result, Out and Lse hold N. Writes Result (gamma * O + residual, or O), O
    itself when STORE_OUT, and lse (log2 units, of the scaled scores) from the first C block.
    """
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    start_c = pid_c.to(tl.int64) * BLOCK_C
    mask_d = offs_d < D
    mask_c = (start_c + offs_c) < C

    q_offsets = _pam_fwd_offsets(offs_m, stride_qn, offs_d, stride_qd, INT64_OFFSETS)
    q = _load_tile(Q + pid_b * stride_qb + q_offsets, offs_m < N_LOADED, mask_d, True, not EVEN_D)
    K_block = K + pid_b * stride_kb
    V_block = V + pid_b * stride_vb + start_c * stride_vc

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    m_full = (M // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _pam_fwd_inner(
        acc, l_i, m_i, q, K_block, V_block, stride_kd, stride_kn, stride_vc, stride_vn,
        offs_d, offs_c, mask_d, mask_c, 0, m_full, M, M_LOADED, SCALE * LOG2E,
        False, EVEN_D, EVEN_C, INPUT_PRECISION, INT64_OFFSETS, BLOCK_N,
    )
    if m_full < M:
        acc, l_i, m_i = _pam_fwd_inner(
            acc, l_i, m_i, q, K_block, V_block, stride_kd, stride_kn, stride_vc, stride_vn,
            offs_d, offs_c, mask_d, mask_c, m_full, M, M, M_LOADED, SCALE * LOG2E,
            True, EVEN_D, EVEN_C, INPUT_PRECISION, INT64_OFFSETS, BLOCK_N,
        )

    out = acc / l_i[:, None]
    if pid_c == 0:
        tl.store(Lse + pid_b * N + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < N)
    Residual_block = Residual + pid_b * stride_rb + start_c * stride_rc
    Result_block = Result + pid_b * stride_yb + start_c * stride_yc
    Out_block = Out + pid_b * stride_ob + start_c * stride_oc
    _pam_fwd_store(out, Gamma, Residual_block, Result_block, Out_block,
                   stride_rc, stride_rn, stride_yc, stride_yn, stride_oc, stride_on,
                   offs_m, offs_c, mask_c, N, N_LOADED, HAS_RESIDUAL, STORE_OUT, EVEN_C, INT64_OFFSETS)


# ----------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------


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
        o = tl.load(Out + pid_b * stride_ob + offsets_2d(offs_c, stride_oc, offs_m, stride_on),
                    mask=mask, other=0.0)
        dy = tl.load(DY + pid_b * stride_gb + offsets_2d(offs_c, stride_gc, offs_m, stride_gn),
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
    N, M, M_VALID, D, C, num_key_blocks, blocks_per_split,
    SCALE: tl.constexpr, HAS_GAMMA: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dV for BLOCK_N keys x BLOCK_C channels over one split of the query blocks: dV += P^T dO^T.

    S^T = k^T q first (BLOCK_N = 128 rows: 16 per warp on 8 warps, no replicated S), so P^T is
    already the A operand of the dV product, in registers. Grid: (key block + key blocks * C
    block, query split, batch); with one split DV is dV itself, else an fp32 partial per split.
    Queries run to N, keys to M (the buffers' lengths), the real keys to M_VALID.
    """
    pid_n = tl.program_id(0) % num_key_blocks
    pid_c = tl.program_id(0) // num_key_blocks
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_n = offs_n < M
    mask_d = offs_d < D
    mask_c = offs_c < C

    kT = tl.load(K + pid_b * stride_kb + offsets_2d(offs_n, stride_kn, offs_d, stride_kd),
                 mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    Q_block = Q + pid_b * stride_qb
    DY_block = DY + pid_b * stride_gb
    Lse_block = Lse + pid_b * N
    key_bias = tl.where(offs_n < M_VALID, 0.0, float("-inf"))  # padded keys: see the dK kernel
    dv = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    first_m = pid_s * blocks_per_split * BLOCK_M
    for step in range(0, blocks_per_split):
        offs_m = first_m + step * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        q = tl.load(Q_block + offsets_2d(offs_d, stride_qd, offs_m, stride_qn),
                    mask=mask_d[:, None] & mask_m[None, :], other=0.0)
        # lse = +inf on padded query rows makes their P exactly 0.
        lse = tl.load(Lse_block + offs_m, mask=mask_m, other=float("inf"))
        s_t = tl.dot(kT, q, input_precision=INPUT_PRECISION)
        p_t = tl.math.exp2(s_t * (SCALE * LOG2E) - lse[None, :] + key_bias[:, None])
        dy = tl.load(DY_block + offsets_2d(offs_c, stride_gc, offs_m, stride_gn),
                     mask=mask_c[:, None] & mask_m[None, :], other=0.0)
        dv = tl.dot(p_t.to(dy.dtype), tl.trans(dy), dv, input_precision=INPUT_PRECISION)
    dv = dv * _pam_load_gamma(Gamma, HAS_GAMMA)
    DV_tile = DV + pid_s.to(tl.int64) * stride_dvs + pid_b * stride_dvb
    tl.store(DV_tile + offsets_2d(offs_n, stride_dvn, offs_c, stride_dvc), dv.to(DV.dtype.element_ty),
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
    N, M, M_VALID, D, C, blocks_per_split, num_c_blocks, num_steps,
    SCALE: tl.constexpr, HAS_GAMMA: tl.constexpr, ATOMIC_DQ: tl.constexpr, RESIDENT_V: tl.constexpr,
    BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dK for BLOCK_N keys over one split of the query blocks, and (ATOMIC_DQ) dQ by fp32 atomics.

    Per query block: dP^T = v^T dO summed over ALL of C, S^T = k^T q, dS^T = P^T (dP^T - Delta),
    dK += dS^T q^T; with ATOMIC_DQ also dQ^T = k dS^T, added into the fp32 (B, d, N) buffer in its
    own (d, N) layout: each of S, P, dP and dS once per (query, key) pair.

    RESIDENT_V (BLOCK_C covers C, one chunk): the key block's v^T is loaded once, before the loop,
    and stays in shared memory; each query block streams only its q and dY. Otherwise the
    (query block, C chunk) nest runs as ONE flat loop of ``num_steps`` steps, so the software
    pipeline of the v and dY chunks never drains at a query-block boundary; the block's q, lse and
    Delta are loaded at its first C step and used at its last. Each program starts at its own
    query block (its key block's index, modulo the split's blocks) so that the programs running
    together add their dQ atomics into different tiles.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < M
    mask_d = offs_d < D
    # dS = P (dP - Delta) with dP = gamma dP_raw, Delta = gamma delta_raw; dQ and dK carry the scale.
    ds_scale = _pam_load_gamma(Gamma, HAS_GAMMA) * SCALE

    kT = tl.load(K + pid_b * stride_kb + offsets_2d(offs_n, stride_kn, offs_d, stride_kd),
                 mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    Q_block = Q + pid_b * stride_qb
    V_block = V + pid_b * stride_vb
    DY_block = DY + pid_b * stride_gb
    Lse_block = Lse + pid_b * N
    Delta_block = DeltaRaw + pid_b * N
    # A padded key has k = 0, so S = 0 and P = exp2(-lse), which overflows to inf when a row's
    # energies are hugely negative: inf * (k = 0) would poison dQ with NaN. Keys from M_VALID
    # to M are the launcher's zero padding, beyond M the tile's: -inf added to their scores
    # gives P = 0. A bias per key row, formed once: a mask on M_VALID inside the loop (not a
    # multiple of 16 at 97 x 97) cost the 3xTF32 tile 100 bytes of spills at N = 9409.
    key_bias = tl.where(offs_n < M_VALID, 0.0, float("-inf"))
    if RESIDENT_V:
        offs_c = tl.arange(0, BLOCK_C)
        vT = tl.load(V_block + offsets_2d(offs_n, stride_vn, offs_c, stride_vc),
                     mask=mask_n[:, None] & (offs_c < C)[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dp_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    q = tl.zeros([BLOCK_D, BLOCK_M], dtype=Q.dtype.element_ty)
    lse = tl.zeros([BLOCK_M], dtype=tl.float32)
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    first_m = pid_s * blocks_per_split
    rotation = pid_n % blocks_per_split
    for step in range(0, num_steps):
        block = step // num_c_blocks
        chunk = step - block * num_c_blocks
        block = (block + rotation) % blocks_per_split
        offs_m = (first_m + block) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_m = offs_m < N
        mask_c = offs_c < C
        if chunk == 0:
            q = tl.load(Q_block + offsets_2d(offs_d, stride_qd, offs_m, stride_qn),
                        mask=mask_d[:, None] & mask_m[None, :], other=0.0)
            # lse = +inf on padded query rows makes their P exactly 0.
            lse = tl.load(Lse_block + offs_m, mask=mask_m, other=float("inf"))
            delta = tl.load(Delta_block + offs_m, mask=mask_m, other=0.0)
        if not RESIDENT_V:
            vT = tl.load(V_block + offsets_2d(offs_n, stride_vn, offs_c, stride_vc),
                         mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        dy = tl.load(DY_block + offsets_2d(offs_c, stride_gc, offs_m, stride_gn),
                     mask=mask_c[:, None] & mask_m[None, :], other=0.0)
        # A fresh dP^T at a block's first chunk: the PTX zeroes the accumulator's registers (the
        # wgmma's scale-d flag stays 1); with one chunk (RESIDENT_V) the select folds away.
        dp_t = tl.dot(vT, dy, tl.where(chunk == 0, 0.0, dp_t), input_precision=INPUT_PRECISION)
        if chunk == num_c_blocks - 1:
            s_t = tl.dot(kT, q, input_precision=INPUT_PRECISION)
            p_t = tl.math.exp2(s_t * (SCALE * LOG2E) - lse[None, :] + key_bias[:, None])
            ds_t = (p_t * (dp_t - delta[None, :]) * ds_scale).to(Q.dtype.element_ty)
            dk = tl.dot(ds_t, tl.trans(q), dk, input_precision=INPUT_PRECISION)
            if ATOMIC_DQ:
                dq_t = tl.dot(tl.trans(kT), ds_t, input_precision=INPUT_PRECISION)
                tl.atomic_add(DQ + pid_b * stride_dqb + offsets_2d(offs_d, stride_dqd, offs_m, stride_dqn),
                              dq_t, mask=mask_d[:, None] & mask_m[None, :], sem="relaxed")
    DK_tile = DK + pid_s.to(tl.int64) * stride_dks + pid_b * stride_dkb
    tl.store(DK_tile + offsets_2d(offs_n, stride_dkn, offs_d, stride_dkd), dk.to(DK.dtype.element_ty),
             mask=mask_n[:, None] & mask_d[None, :])


@triton.jit
def _pam_bwd_dq_kernel(
    Q, K, V, DY, Gamma, Lse, DeltaRaw, DQ,
    stride_qb, stride_qd, stride_qn,
    stride_kb, stride_kd, stride_kn,
    stride_vb, stride_vc, stride_vn,
    stride_gb, stride_gc, stride_gn,
    stride_dqs, stride_dqb, stride_dqd, stride_dqn,
    N, M, M_VALID, D, C, blocks_per_split, num_c_blocks, num_steps,
    SCALE: tl.constexpr, HAS_GAMMA: tl.constexpr, RESIDENT_DY: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dQ for BLOCK_M queries over one split of the key blocks, without atomics (deterministic).

    The mirror image of the dK kernel: dP = dO^T v over all of C, S = q^T k, dS, dQ += dS k^T;
    RESIDENT_DY keeps the query block's dO^T in shared memory (loaded once) and streams k and v,
    else one flat (key block, C chunk) loop streams dO^T too, k loaded at a key block's first C
    step. With one split DQ is dQ itself, else an fp32 partial per split.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < D
    ds_scale = _pam_load_gamma(Gamma, HAS_GAMMA) * SCALE

    qT = tl.load(Q + pid_b * stride_qb + offsets_2d(offs_m, stride_qn, offs_d, stride_qd),
                 mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    lse = tl.load(Lse + pid_b * N + offs_m, mask=mask_m, other=float("inf"))
    delta = tl.load(DeltaRaw + pid_b * N + offs_m, mask=mask_m, other=0.0)
    K_block = K + pid_b * stride_kb
    V_block = V + pid_b * stride_vb
    DY_block = DY + pid_b * stride_gb
    if RESIDENT_DY:
        offs_c = tl.arange(0, BLOCK_C)
        dyT = tl.load(DY_block + offsets_2d(offs_m, stride_gn, offs_c, stride_gc),
                      mask=mask_m[:, None] & (offs_c < C)[None, :], other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k = tl.zeros([BLOCK_D, BLOCK_N], dtype=K.dtype.element_ty)
    first_n = pid_s * blocks_per_split * BLOCK_N
    for step in range(0, num_steps):
        block = step // num_c_blocks
        chunk = step - block * num_c_blocks
        offs_n = first_n + block * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_c = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_n = offs_n < M
        mask_c = offs_c < C
        if chunk == 0:
            k = tl.load(K_block + offsets_2d(offs_d, stride_kd, offs_n, stride_kn),
                        mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        if not RESIDENT_DY:
            dyT = tl.load(DY_block + offsets_2d(offs_m, stride_gn, offs_c, stride_gc),
                          mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        v = tl.load(V_block + offsets_2d(offs_c, stride_vc, offs_n, stride_vn),
                    mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        dp = tl.dot(dyT, v, tl.where(chunk == 0, 0.0, dp), input_precision=INPUT_PRECISION)
        if chunk == num_c_blocks - 1:
            p = tl.math.exp2(tl.dot(qT, k, input_precision=INPUT_PRECISION) * (SCALE * LOG2E) - lse[:, None])
            p = tl.where((offs_n < M_VALID)[None, :], p, 0.0)  # padded keys: see the dK kernel
            ds = (p * (dp - delta[:, None]) * ds_scale).to(K.dtype.element_ty)
            dq = tl.dot(ds, tl.trans(k), dq, input_precision=INPUT_PRECISION)
    DQ_tile = DQ + pid_s.to(tl.int64) * stride_dqs + pid_b * stride_dqb
    tl.store(DQ_tile + offsets_2d(offs_m, stride_dqn, offs_d, stride_dqd), dq.to(DQ.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------------------------
# Tuning
# ----------------------------------------------------------------------------------------------
# Hopper (H100/H200) forward tiles per operand class, (BLOCK_M, BLOCK_N, BLOCK_C, num_warps,
# num_stages). Each compiles without spills for sm_90 at d = 64, C = 512 and N = 32768 and 9409,
# residual epilogue included, as docs/compile_report.md shows (`python -m
# benchmarks.compile_report --ops pam_forward` measures them; its CI test keeps them true). The
# prune below caps them at the problem, checks shared memory and keeps one pipeline depth per
# tile; the perf model ranks the rest at the real grid. Why these:
# * 128 query rows take 8 warps, each warpgroup owning 64 rows of S, of the softmax and of O.
#   64 rows take 4 warps: on 8, Triton lays the q^T k dot (whose result feeds another dot) with
#   all warps along M, warpsPerCTA [8, 1] over 64 rows, and both warpgroups would compute the
#   same scores and exponentials (twice the ex2 per thread: the old 8-warp 64-row configs).
# * BLOCK_C: S = q^T k is recomputed once per C block. For 16-bit operands 128 x 64 x 256
#   (1280 N^2 FLOPs, 2 N^2 exp2 at d = 64, C = 512; a 128-register accumulator, 255 registers
#   in all) is the largest tile that fits; 128 x 128 x 256 spills. BLOCK_C = 128 (1536 N^2,
#   4 N^2) and 64-row tiles give more programs to small maps and small batches; 64 x 64 x 256 on
#   one warpgroup (the same 1280 N^2, 251 registers) fits two programs on an SM, whose serial
#   MMA and softmax phases then overlap: the perf model's first at DANet's sizes.
# * fp32 operands (tf32) double the register and shared memory of P and of the k, v tiles:
#   BLOCK_C <= 128 (1536 N^2); tf32x3 splits each operand in two and needs one tile step less.
# * fp32 "ieee" has no tensor cores: tl.dot becomes FMA loops with both operands in registers,
#   and only small tiles compile.
_FWD_TILES = {
    "16-bit": ((128, 64, 256, 8, 2), (128, 64, 256, 8, 3), (128, 128, 128, 8, 2), (128, 128, 128, 8, 3),
               (128, 64, 128, 8, 3), (64, 64, 256, 4, 2), (64, 64, 256, 4, 3), (64, 64, 128, 4, 3),
               (64, 64, 64, 4, 3)),
    "tf32": ((128, 64, 128, 8, 2), (128, 64, 128, 8, 3), (128, 32, 128, 8, 3), (128, 64, 64, 8, 3),
             (64, 32, 128, 4, 3), (64, 64, 64, 4, 3)),
    "tf32x3": ((128, 32, 128, 8, 2), (128, 32, 128, 8, 3), (128, 64, 64, 8, 3), (128, 32, 64, 8, 3),
               (64, 32, 64, 4, 3)),
    "ieee": ((32, 32, 64, 4, 2), (64, 32, 64, 8, 2), (64, 16, 64, 4, 2), (64, 32, 128, 8, 2)),
}
# The interpreter runs programs one by one in numpy: tuning would only multiply its run time,
# and 32-wide tiles keep the CI shapes multi-block (ragged tails, several C blocks).
_INTERPRETER_TILES = (32, 32, 32, 4, 1)
# A first call at a new (N, M, B) benchmarks at most this many configs: the perf model's best.
_FWD_TOP_K = 4


def _pow2_cap(n: int) -> int:
    """Smallest tile (a power of two >= 16, tl.dot's minimum) that covers n."""
    return max(16, triton.next_power_of_2(n))


def _fwd_configs(tiles: tuple[tuple[int, ...], ...]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_C": bc}, num_warps=w, num_stages=s)
            for bm, bn, bc, w, s in tiles]


def _fwd_shared_bytes(element_size: int, bm: int, bn: int, bc: int, bd: int, num_stages: int) -> int:
    """The forward's shared memory: the q tile plus num_stages k and v tiles (exact against the
    compiler's figure)."""
    return element_size * (bm * bd + num_stages * bn * (bd + bc))


def _prune_fwd_configs(
    configs: list[triton.Config], named_args: dict, **kwargs: object
) -> list[triton.Config]:
    """The configs that fit this problem: tiles capped at the problem (duplicates removed), the
    shared memory of q plus num_stages k and v tiles (exact against the compiler's figure) within
    an sm_90 block's, and of configs differing only in num_stages the shallowest one, deeper ones
    only where the perf model says the extra stage pays (it hides L2 latency the shallower pipeline
    exposes): otherwise they would tie and take the benchmark's slots from other tiles."""
    n, m, c = named_args["N"], named_args["M"], named_args["C"]
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    element_size = named_args["V"].element_size()
    kept: dict[tuple, triton.Config] = {}
    for config in configs:
        bm = min(config.kwargs["BLOCK_M"], _pow2_cap(n))
        bn = min(config.kwargs["BLOCK_N"], _pow2_cap(m))
        bc = min(config.kwargs["BLOCK_C"], _pow2_cap(c))
        # A tile capped below the rows its warps' MMA slices cover runs on one warpgroup (see above).
        capped = bm < config.kwargs["BLOCK_M"] and bm < 16 * config.num_warps
        warps = 4 if capped else config.num_warps
        if _fwd_shared_bytes(element_size, bm, bn, bc, block_d, config.num_stages) > MAX_SHARED_BYTES:
            continue
        key = (bm, bn, bc, warps, config.num_stages)
        # Other kwargs (torch.compile applies the EVEN_C heuristic to the configs before the
        # prune) are kept: a flag that held for the uncapped BLOCK_C holds for the capped one.
        tiles = {**config.kwargs, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_C": bc}
        kept.setdefault(key, triton.Config(tiles, num_warps=warps, num_stages=config.num_stages))
    deepest: dict[tuple, tuple[float, triton.Config]] = {}
    for config in sorted(kept.values(), key=lambda config: config.num_stages):
        tile = (*(config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_C")), config.num_warps)
        clocks = _fwd_time_estimate(**{**named_args, **kwargs, **config.all_kwargs()})
        if tile not in deepest or clocks < 0.99 * deepest[tile][0]:
            deepest[tile] = (clocks, config)
    pruned = [config for config in kept.values() if any(config is best for _, best in deepest.values())]
    # Huge d (256) with fp32 can exclude everything: fall back to the smallest tile.
    return pruned or [triton.Config({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_C": 16}, num_warps=4, num_stages=1)]


# The forward's main loop as the autotuner estimates it from the tiles: PTX instructions per thread
# per key block, per score element a thread holds (its FMA, ex2, row max and sum, the conversion
# to the MMA's type), per accumulator element (the loop-carried moves around the lazy rescale's
# branch) and fixed (address arithmetic, loads, barriers, the rescale's test); registers, the
# fp32 accumulator and score elements a thread holds plus a fixed part. Fitted on the compiled
# loops of the kept 16-bit configs; the report checks the estimate against every compiled loop
# (a target of the forward, docs/compile_report.md).
_FWD_LOOP_INSTRUCTIONS = (4.7, 0.26, 147.0)
_FWD_REGISTERS = 64


def forward_loop_instructions(block_m: int, block_n: int, block_c: int, num_warps: int) -> float:
    """The autotuner's estimate of the forward's PTX instructions per thread per key block, but the
    MMAs (:data:`_FWD_LOOP_INSTRUCTIONS`)."""
    per_score, per_accumulator, fixed = _FWD_LOOP_INSTRUCTIONS
    return (per_score * block_m * block_n + per_accumulator * block_m * block_c) / (32 * num_warps) + fixed


def _fwd_time_estimate(**args: object) -> float:
    """The forward perf model (clocks) at the real grid (N queries, M keys, B images): the
    autotuner benchmarks its top-k. :func:`danet_kernels.kernels.common.launch_clocks` of the
    programs (query blocks x C blocks x B), each sweeping cdiv(M, BLOCK_N) key blocks whose loop
    iteration computes S and its share of P v, waits for both MMAs before its softmax (serial)
    and streams a k and a v tile; residency from the estimated registers and the shared memory."""
    v = args["V"]
    bm, bn, bc, bd = args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_C"], args["BLOCK_D"]
    warps, stages = args["num_warps"], args["num_stages"]
    operands = operand_class(v.dtype, args["INPUT_PRECISION"])
    programs = triton.cdiv(args["N"], bm) * triton.cdiv(args["C"], bc) * args["B"]
    threads = 32 * warps
    loop = LoopCost(flops=2 * bm * bn * (bd + bc), instructions=forward_loop_instructions(bm, bn, bc, warps),
                    exp2=bm * bn / threads, bytes=bn * (bd + bc) * v.element_size(),
                    serial=operands != "ieee")
    registers = min(255, (bm * bc + bm * bn) // threads + _FWD_REGISTERS)
    shared = _fwd_shared_bytes(v.element_size(), bm, bn, bc, bd, stages)
    resident = resident_programs(registers, warps, shared)
    return launch_clocks(programs, triton.cdiv(args["M"], bn), loop, warps, stages, resident, operands,
                         device_sms(v.device))


def _fwd_tuner(tiles: tuple[tuple[int, ...], ...]) -> triton.runtime.Autotuner:
    """The forward kernel autotuned over ``tiles``, per N, M, B (the real grid: a tile that leaves
    a nearly empty last wave at one size may be the best at another), d, C, precision and dtype;
    the choice persists across processes in Triton's cache (``cache_results``)."""
    return triton.autotune(
        _fwd_configs(tiles),
        key=["N", "M", "B", "BLOCK_D", "C", "INPUT_PRECISION", "INT64_OFFSETS"],
        prune_configs_by={"early_config_prune": _prune_fwd_configs, "perf_model": _fwd_time_estimate,
                          "top_k": _FWD_TOP_K},
        cache_results=True,
    )(_pam_fwd_kernel)


if INTERPRETING:
    _FWD_KERNELS = dict.fromkeys(_FWD_TILES, _fwd_tuner((_INTERPRETER_TILES,)))
else:
    _FWD_KERNELS = {name: _fwd_tuner(tiles) for name, tiles in _FWD_TILES.items()}


# Backward tiles, (BLOCK_M, BLOCK_N, BLOCK_C, num_warps, num_stages) per kernel and operand class,
# fixed rather than autotuned (as in the tutorial: tuning four kernels would multiply the first
# call's time). Each was chosen by compiling for sm_90 with a real launch's specialisation
# (d = 64, C = 512): no spills, no replicated S, every load of the main loop software-pipelined;
# the figures are in docs/compile_report.md. "dkdq" is the key-side kernel with atomic dQ (the
# default), "dk" and "dq" the deterministic pair.
_BWD_TILES: dict[str, dict[str, tuple[int, int, int, int, int]]] = {
    # bf16 / fp16 on wgmma.
    "16-bit": {"dv": (64, 128, 256, 8, 2), "dkdq": (64, 128, 64, 8, 3), "dk": (64, 128, 64, 8, 3),
               "dq": (128, 128, 64, 8, 2)},
    # fp32 operands on wgmma: twice the bytes and (P, dS kept fp32) twice the registers per tile.
    "tf32": {"dv": (64, 128, 128, 8, 2), "dkdq": (32, 128, 32, 8, 2), "dk": (64, 128, 32, 8, 2),
             "dq": (128, 64, 32, 8, 2)},
    # 3xTF32 splits each operand into high and low halves in registers. The atomic dQ product
    # spills at every tile tried, so this class always takes the atomics-free pair (no "dkdq");
    # its key-side kernel runs at 255 registers (16 x 128 x 16 spilled 8 B at N = 9409 once the
    # key and query lengths became separate arguments; 32-wide C chunks do not).
    "tf32x3": {"dv": (32, 128, 128, 8, 2), "dk": (16, 128, 32, 8, 2), "dq": (128, 16, 32, 8, 2)},
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
# 16-bit operands, d <= 64 and C <= 512 (DANet's C / 8 = 64, C = 512): the key-side kernel keeps
# its key block's v^T for all of C in shared memory (128 x 512 bf16, 128 KiB, loaded once per
# program) and streams 32-query blocks of q and dY; the deterministic dQ kernel keeps its query
# block's dO^T likewise and streams 32-key blocks of k and v. 224 and 216 KiB of shared memory
# with 2 stages, within a block's 227; fp32 operands (twice the bytes), wider heads and C > 512
# do not fit and keep the streamed tiles above.
_BWD_TILES_RESIDENT = {"dkdq": (32, 128, 512, 8, 2), "dk": (32, 128, 512, 8, 2), "dq": (128, 32, 512, 8, 2)}
_BWD_PREPROCESS = {"BLOCK_M": 128, "BLOCK_C": 32, "num_warps": 4, "num_stages": 1}


def _bwd_operand_class(dtype: torch.dtype, input_precision: str) -> str:
    """The row of the backward's tile tables: the operand class, or the interpreter's tiles."""
    return "interpreter" if INTERPRETING else operand_class(dtype, input_precision)


def _bwd_config(
    dtype: torch.dtype, input_precision: str, block_d: int, n: int, m: int, c: int
) -> dict[str, dict[str, int]]:
    """Launch parameters of every backward kernel: tiles (capped at the problem size: N queries,
    M keys, C channels) and the num_warps / num_stages each one was compiled and measured with."""
    table = _BWD_TILES_WIDE_HEAD if block_d > 128 else _BWD_TILES
    operands = _bwd_operand_class(dtype, input_precision)
    tiles = table[operands]
    if operands == "16-bit" and block_d <= 64 and _pow2_cap(c) <= _BWD_TILES_RESIDENT["dk"][2]:
        tiles = {**tiles, **_BWD_TILES_RESIDENT}
    caps = {"BLOCK_M": _pow2_cap(n), "BLOCK_N": _pow2_cap(m), "BLOCK_C": _pow2_cap(c)}
    config: dict[str, dict[str, int]] = {"pre": {**_BWD_PREPROCESS, "BLOCK_M": min(128, _pow2_cap(n))}}
    for name, (block_m, block_n, block_c, num_warps, num_stages) in tiles.items():
        sizes = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_C": block_c}
        config[name] = {key: min(size, caps[key]) for key, size in sizes.items()}
        config[name] |= {"num_warps": num_warps, "num_stages": num_stages}
    return config


# The SMs the backward's splits fill under the interpreter, which runs programs one by one.
_INTERPRETER_SMS = 1


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


def _padded_empty(batch: int, rows: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised (batch, rows, n) view of a buffer whose N axis is a multiple of 16."""
    buffer = torch.empty((batch, rows, padded_length(n)), device=like.device, dtype=like.dtype)
    return buffer[..., :n]


def _forward_outputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor | None,
    residual: torch.Tensor | None,
    scale: float,
    store_out: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward's (result, out, lse), allocated and not yet written (see :func:`pam_forward`).

    result and O live in buffers whose N axis is rounded up to a multiple of 16 (so that every
    row the kernel stores starts 16-byte aligned) and are returned as (B, C, N) views of them.
    """
    batch, _, n = q.shape
    result = _padded_empty(batch, v.shape[1], n, v)
    out = _padded_empty(batch, v.shape[1], n, v) if (gamma is not None and store_out) else v.new_empty(0)
    lse = torch.empty((batch, n), device=v.device, dtype=torch.float32)
    return result, out, lse


def _backward_buffers(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised (dq, dk, dv, delta_raw) as the backward kernels write them: their query (N)
    and key (M) axes rounded up to multiples of 16 (:func:`padded_length`), so that every row
    starts 16-byte aligned."""
    (batch, head_dim, n), (channels, m) = q.shape, v.shape[1:]
    n_pad, m_pad = padded_length(n), padded_length(m)
    dq = torch.empty((batch, head_dim, n_pad), device=q.device, dtype=q.dtype)
    dk = torch.empty((batch, head_dim, m_pad), device=k.device, dtype=k.dtype)
    dv = torch.empty((batch, channels, m_pad), device=v.device, dtype=v.dtype)
    delta_raw = torch.empty((batch, n_pad), device=v.device, dtype=torch.float32)
    return dq, dk, dv, delta_raw


def _backward_outputs(
    dy: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor | None,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward's (dq, dk, dv, delta_raw), allocated and not yet written (see
    :func:`pam_backward`): views of :func:`_backward_buffers` as long as the inputs."""
    dq, dk, dv, delta_raw = _backward_buffers(q, k, v)
    n, m = q.shape[-1], k.shape[-1]
    return dq[..., :n], dk[..., :m], dv[..., :m], delta_raw[..., :n]


def _kernel_operands(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int, int]:
    """q, k, v and the residual as the forward kernel reads them, and the lengths of their query
    (q, residual) and key (k, v) axes.

    When any operand's rows are misaligned (contiguous maps with N % 16 != 0, such as DANet's
    97 x 97), all of them are copied into contiguous buffers with N (M) rounded up to a multiple
    of 16 and zero tails: one extra read and write of each, O((d + C) (N + M)) bytes against the
    kernel's O(N M) work. The kernel masks the padded keys' scores to -inf and never stores the
    padded queries. Aligned operands (N % 16 == 0, or channels_last maps, whose N axis has
    stride C) are read in place.
    """
    operands = (q, k, v) if residual is None else (q, k, v, residual)
    if all(is_aligned(t) for t in operands):
        return q, k, v, residual, q.shape[-1], k.shape[-1]
    q, k, v = padded_rows(q), padded_rows(k), padded_rows(v)
    residual = None if residual is None else padded_rows(residual)
    return q, k, v, residual, q.shape[-1], k.shape[-1]


# Offsets of masked lanes reach past an axis' end by less than the widest tile of the forward
# (the only kernel with the switch): 256, the 16-bit tiles' BLOCK_C.
_WIDEST_TILE = max(max(tile[:3]) for tiles in _FWD_TILES.values() for tile in tiles)


def _needs_int64_offsets(*tensors: torch.Tensor) -> bool:
    """Whether an offset the forward forms inside one image can pass int32 (2^31 - 1): for each
    (B, rows, N) tensor, the offset of its last element with both axes rounded up to the widest
    tile (masked lanes form offsets too). True from C * N ~ 2^31 on, contiguous or channels_last
    (C = 512: N > 4.2M); the batch offset is int64 either way."""
    for t in tensors:
        reach = sum((triton.cdiv(size, _WIDEST_TILE) * _WIDEST_TILE - 1) * abs(stride)
                    for size, stride in zip(t.shape[1:], t.stride()[1:], strict=True))
        if reach >= 2**31:
            return True
    return False


def pam_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor | None,
    residual: torch.Tensor | None,
    scale: float,
    store_out: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on validated inputs (see danet_kernels.functional).

    Returns ``(result, out, lse)``: result = gamma * O + residual (or O without gamma), shape
    (B, C, N) in v's dtype; out = O when gamma is given and ``store_out`` (the backward needs it),
    else an empty tensor; lse = per-row log2-sum-exp2 of the energies times scale * log2(e),
    (B, N) fp32.
    """
    batch, head_dim, n = q.shape
    channels, m = v.shape[1:]
    has_residual = gamma is not None
    store_out = has_residual and store_out
    result, out, lse = _forward_outputs(q, k, v, gamma, residual, scale, store_out)
    # Placeholders for pointer arguments a constexpr branch never reads.
    gamma_arg = gamma if has_residual else lse
    out_arg = out if store_out else result
    q_in, k_in, v_in, residual_in, n_loaded, m_loaded = _kernel_operands(q, k, v, residual)
    residual_arg = residual_in if has_residual else v_in
    precision = dot_input_precision(v.dtype)
    kernel = _FWD_KERNELS[operand_class(v.dtype, precision)]
    block_d = _pow2_cap(head_dim)
    meta = {
        "HAS_RESIDUAL": has_residual,
        "STORE_OUT": store_out,
        "BLOCK_D": block_d,
        "EVEN_D": head_dim == block_d,
        "INPUT_PRECISION": precision,
        "INT64_OFFSETS": _needs_int64_offsets(q_in, k_in, v_in, residual_arg, result, out_arg),
    }
    for b0, b1 in _batch_chunks(batch):
        chunk = b1 - b0

        def grid(meta: dict, chunk: int = chunk) -> tuple[int, int, int]:
            return (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(channels, meta["BLOCK_C"]), chunk)

        wrap_triton(kernel)[grid](
            q_in[b0:b1], k_in[b0:b1], v_in[b0:b1], gamma_arg, residual_arg[b0:b1],
            result[b0:b1], out_arg[b0:b1], lse[b0:b1],
            *q_in.stride(), *k_in.stride(), *v_in.stride(), *residual_arg.stride(),
            *result.stride(), *out_arg.stride(),
            n, n_loaded, m, m_loaded, head_dim, channels, chunk,
            SCALE=scale, **meta,
        )
    return result, out, lse


def _partials(out: torch.Tensor, splits: int) -> torch.Tensor:
    """Where a kernel writes ``out`` (B, rows, L) from ``splits`` programs per tile: ``out``
    itself (as a split axis of one) or an fp32 (splits, B, rows, L) buffer for
    :func:`_sum_partials`."""
    if splits == 1:
        return out.unsqueeze(0)
    return torch.empty((splits, *out.shape), device=out.device, dtype=torch.float32)


def _sum_partials(out: torch.Tensor, partials: torch.Tensor) -> None:
    """Add the splits' partials into ``out`` in a fixed order (deterministic)."""
    if partials.shape[0] > 1:
        out.copy_(partials.sum(0))


def _launch_bwd_preprocess(out: torch.Tensor, dy: torch.Tensor, delta: torch.Tensor, config: dict) -> None:
    """``delta[b, i] = sum_c dy[b, c, i] out[b, c, i]`` in fp32 for (B, C, N_PAD) operands, B at
    most a grid's batch (``_pam_bwd_preprocess``)."""
    batch, channels, n_pad = out.shape
    wrap_triton(_pam_bwd_preprocess)[(triton.cdiv(n_pad, config["BLOCK_M"]), batch)](
        out, dy, delta, *out.stride(), *dy.stride(), n_pad, channels, **config,
    )


def _launch_bwd_dq(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dy: torch.Tensor, gamma: torch.Tensor, scale: float,
    lse: torch.Tensor, delta: torch.Tensor, dq: torch.Tensor, m: int, config: dict, common: dict,
    sm_count: int,
) -> None:
    """dQ into ``dq`` (B, d, N_PAD) by the atomics-free query-side kernel (``_pam_bwd_dq_kernel``),
    its key loop split into fp32 partials where the grid is small; operands as
    :func:`pam_backward` passes them (M real keys of M_PAD), B at most a grid's batch."""
    batch, head_dim, n_pad = q.shape
    channels, m_pad = v.shape[1:]
    query_blocks = triton.cdiv(n_pad, config["BLOCK_M"])
    c_blocks = triton.cdiv(channels, config["BLOCK_C"])
    per_split, splits = _split(query_blocks * batch, triton.cdiv(m_pad, config["BLOCK_N"]), sm_count)
    partials = _partials(dq, splits)
    wrap_triton(_pam_bwd_dq_kernel)[(query_blocks, splits, batch)](
        q, k, v, dy, gamma, lse, delta, partials,
        *q.stride(), *k.stride(), *v.stride(), *dy.stride(), *partials.stride(),
        n_pad, m_pad, m, head_dim, channels, per_split, c_blocks, per_split * c_blocks,
        SCALE=scale, RESIDENT_DY=c_blocks == 1, **common, **config,
    )
    _sum_partials(dq, partials)


def pam_backward(
    dy: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor | None,
    scale: float,
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
    channels, m = v.shape[1:]
    has_gamma = gamma is not None
    deterministic = torch.are_deterministic_algorithms_enabled()
    # Rows the pipelined loads cannot read (N % 16 != 0, like DANet's 97 x 97 = 9409, or odd
    # offsets) are copied into aligned zero-tailed ones (lse's tail +inf: padded queries get P = 0);
    # read as they were, the kernels lose their vectorised, asynchronous loads and spill.
    q_in, k_in, v_in, dy_in, out_in = (aligned_rows(t) for t in (q, k, v, dy, out))
    lse_in = aligned_rows(lse, fill=float("inf"))
    n_pad, m_pad = q_in.shape[-1], k_in.shape[-1]
    dq_out, dk_out, dv_out, delta_out = _backward_buffers(q, k, v)
    gamma_arg = gamma if has_gamma else lse_in
    precision = dot_input_precision(v.dtype)
    block_d = _pow2_cap(head_dim)
    config = _bwd_config(v.dtype, precision, block_d, n_pad, m_pad, channels)
    sm_count = device_sms(q.device, _INTERPRETER_SMS)
    common = {"HAS_GAMMA": has_gamma, "BLOCK_D": block_d, "INPUT_PRECISION": precision}
    atomic_dq = not deterministic and "dkdq" in config
    pre, dv_cfg = config["pre"], config["dv"]
    dk_cfg = config["dkdq" if atomic_dq else "dk"]
    for b0, b1 in _batch_chunks(batch):
        chunk = b1 - b0
        q_, k_, v_, dy_, lse_ = q_in[b0:b1], k_in[b0:b1], v_in[b0:b1], dy_in[b0:b1], lse_in[b0:b1]
        delta_ = delta_out[b0:b1]
        _launch_bwd_preprocess(out_in[b0:b1], dy_, delta_, pre)

        key_blocks = triton.cdiv(m_pad, dv_cfg["BLOCK_N"])
        c_blocks = triton.cdiv(channels, dv_cfg["BLOCK_C"])
        query_blocks = triton.cdiv(n_pad, dv_cfg["BLOCK_M"])
        per_split, splits = _split(key_blocks * c_blocks * chunk, query_blocks, sm_count)
        dv_partials = _partials(dv_out[b0:b1], splits)
        wrap_triton(_pam_bwd_dv_kernel)[(key_blocks * c_blocks, splits, chunk)](
            q_, k_, dy_, gamma_arg, lse_, dv_partials,
            *q_in.stride(), *k_in.stride(), *dy_in.stride(), *dv_partials.stride(),
            n_pad, m_pad, m, head_dim, channels, key_blocks, per_split, SCALE=scale, **common, **dv_cfg,
        )
        _sum_partials(dv_out[b0:b1], dv_partials)

        key_blocks = triton.cdiv(m_pad, dk_cfg["BLOCK_N"])
        c_blocks = triton.cdiv(channels, dk_cfg["BLOCK_C"])
        per_split, splits = _split(key_blocks * chunk, triton.cdiv(n_pad, dk_cfg["BLOCK_M"]), sm_count)
        dk_partials = _partials(dk_out[b0:b1], splits)
        if not atomic_dq:
            dq_accumulator = dq_out  # not written: ATOMIC_DQ is off
        elif dq_out.dtype == torch.float32:
            dq_accumulator = dq_out[b0:b1].zero_()
        else:
            dq_accumulator = torch.zeros(dq_out[b0:b1].shape, device=dq_out.device, dtype=torch.float32)
        wrap_triton(_pam_bwd_dkdq_kernel)[(key_blocks, splits, chunk)](
            q_, k_, v_, dy_, gamma_arg, lse_, delta_, dk_partials, dq_accumulator,
            *q_in.stride(), *k_in.stride(), *v_in.stride(), *dy_in.stride(), *dk_partials.stride(),
            *dq_accumulator.stride(),
            n_pad, m_pad, m, head_dim, channels, per_split, c_blocks, per_split * c_blocks,
            SCALE=scale, ATOMIC_DQ=atomic_dq, RESIDENT_V=c_blocks == 1, **common, **dk_cfg,
        )
        _sum_partials(dk_out[b0:b1], dk_partials)
        if atomic_dq:
            if dq_out.dtype != torch.float32:
                dq_out[b0:b1].copy_(dq_accumulator)
            continue
        _launch_bwd_dq(q_, k_, v_, dy_, gamma_arg, scale, lse_, delta_, dq_out[b0:b1], m, config["dq"],
                       common, sm_count)
    return dq_out[..., :n], dk_out[..., :m], dv_out[..., :m], delta_out[..., :n]


# ----------------------------------------------------------------------------------------------
# Custom ops and autograd
# ----------------------------------------------------------------------------------------------


@define_op("danet_kernels::pam_forward", _forward_outputs)
def _pam_forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor | None,
    residual: torch.Tensor | None,
    scale: float,
    store_out: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return pam_forward(q, k, v, gamma, residual, scale, store_out)


@define_op("danet_kernels::pam_backward", _backward_outputs)
def _pam_backward_op(
    dy: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor | None,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return pam_backward(dy, q, k, v, gamma, scale, out, lse)


class PositionAttentionFunction(torch.autograd.Function):
    """Autograd for fused PAM: ``(q, k, v, gamma, residual, scale, store_out) -> (result, out, lse)``.

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
        scale: float,
        store_out: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the forward op."""
        return _pam_forward_op(q, k, v, gamma, residual, scale, store_out)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
        """Save q, k, v, gamma, O and lse for the backward, and the scale."""
        q, k, v, gamma, _, scale, _ = inputs
        result, out, lse = output
        ctx.save_for_backward(q, k, v, gamma, result if gamma is None else out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(out, lse)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dresult: torch.Tensor, *unused_grads: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        """Gradients of q, k, v, gamma, residual (None for scale and store_out)."""
        q, k, v, gamma, out, lse = ctx.saved_tensors
        needs_q, needs_k, needs_v, needs_gamma, needs_residual, _, _ = ctx.needs_input_grad
        dresidual = dresult if needs_residual else None
        if not (needs_q or needs_k or needs_v or needs_gamma):
            return None, None, None, None, dresidual, None, None
        if out.numel() == 0:
            raise RuntimeError(
                "pam_forward ran with store_out=False, so O was not kept and the backward cannot "
                "run; call position_attention_triton (it decides store_out from grad mode)"
            )
        dq, dk, dv, delta_raw = _pam_backward_op(dresult, q, k, v, gamma, ctx.scale, out, lse)
        dgamma = delta_raw.sum().reshape(gamma.shape).to(gamma.dtype) if needs_gamma else None
        return (dq if needs_q else None, dk if needs_k else None, dv if needs_v else None,
                dgamma, dresidual, None, None)


_pam_forward_op.register_autograd(
    PositionAttentionFunction.backward, setup_context=PositionAttentionFunction.setup_context
)


def position_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor | None,
    residual: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Fused PAM: ``gamma * attention(q, k, v) + residual`` when gamma is given, else the attention.

    Inputs are validated by :func:`danet_kernels.position_attention`: q (B, d, N), k (B, d, M);
    v (B, C, M), residual (B, C, N); one dtype (fp16, bf16, fp32) and device; any strides; the
    softmax scale a positive float. O is kept for the backward only when a gradient will be
    needed.
    """
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, gamma)
    )
    result, _, _ = torch.ops.danet_kernels.pam_forward(q, k, v, gamma, residual, scale, needs_grad)
    return result
