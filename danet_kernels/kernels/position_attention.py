"""Fused position attention (DANet's PAM) in Triton: flash-style forward and recomputing backward.

Math (per batch element b; q of shape (B, d, N), k of shape (B, d, M), v of shape (B, C, M);
M = N in DANet, M < N where a non-local block pools its keys; s the softmax scale, 1 in DANet)::

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

Algorithm and memory traffic
----------------------------
Forward (``_pam_fwd_kernel``), after FlashAttention and Triton's fused-attention tutorial: a
program keeps a BLOCK_M block of queries and an fp32 (BLOCK_M, BLOCK_C) accumulator on chip,
streams BLOCK_N blocks of k and v (cp.async, num_stages deep), and keeps a running row max and
row sum (online softmax). The softmax works in base 2: ``exp2(S * s log2(e) - m)`` with the
scale and log2(e) one constant (``SCALE``, a constexpr: a model's one or two scales compile once
each, at no register) folded into the subtraction (one FMA per element) and m, the running max,
kept in log2 units. It
writes Y (and O when the backward will need it) and the per-row log-sum-exp
``lse = m + log2(l)``, never S or P: device memory holds O(B * (C + d) * N), not O(B * N^2).
Key blocks wholly inside N run unmasked; the last one masks its scores to -inf past N.

The value dim: why C is split across programs. DANet's d is 64 but C is 512 (meant to reach
2048), and an fp32 (BLOCK_M, C) accumulator does not fit an SM's registers beside S (256 KiB at
BLOCK_M = 128). Grid axis 1 runs over C blocks of BLOCK_C, each recomputing S = q^T k:
``2 N^2 (d * ceil(C / BLOCK_C) + C)`` FLOPs and ``N^2 * ceil(C / BLOCK_C)`` exp2. The tile
that wins, by the compile report (docs/compile_report.md, sm_90, bf16, d = 64, C = 512), is
128 x 64 x 256 on 8 warps: 1280 N^2 FLOPs and 2 N^2 exp2 against the minimal 1152 N^2 and N^2
(+11%), 0 spills at 237-248 registers, each warpgroup owning 64 rows of S (no replicated
work), 10 operand bytes per N^2 streamed from L2. The full-width layout FlashAttention-3 uses
for this head-dim pair (one program owning all 512 channels, S computed once) was measured too
(docs/performance.md, "Tried and not kept"): Triton's closest form, keys on the rows
of a 64 x 32 S^T tile on one warpgroup and a 512 x 32 O^T accumulator, executes the minimal
1152 N^2 but spills 144 B at 32 queries (0 only at 16 queries, whose m64n16 wgmmas are too
narrow to feed), computes 1.5x the exp2 per thread (the per-query rescale runs on every thread
holding the query), and streams 36 N^2 operand bytes (72 at 16 queries) against 10: 3.6x (7.2x)
the split layout's time by the perf model below, which makes it L2-bound. Programs of one
(batch, C block) are adjacent on grid axis 0, so they stream the same k and v blocks through
L2 together. Every C block computes the same lse; the first one stores it.

Any N on the fast path. The pipelined, vectorised loads need every row of q, k and v to start
16-byte aligned, which a contiguous (B, *, N) map with N % 16 != 0 does not give (DANet's
97 x 97 = 9409): compiled as such, the forward had no cp.async, 255 registers and up to 3 KiB
of spills. The launcher then copies q, k, v and the residual into contiguous buffers with N
rounded up to a multiple of 16 and zero tails (``_kernel_operands``; extra traffic one read
and one write of each, (2 d + 2 C) N elements, against the kernel's O(N^2) work), the kernel
masks the padded keys' scores to -inf and never stores past the 16-rounded length, and Y and
O are (B, C, N) views of buffers whose rows are 16-aligned too. Aligned operands (N % 16 == 0,
or channels_last maps, whose N axis has stride C) are read in place. A 97 x 97 map compiles to
the same code as a 128 x 256 one.

Backward recomputes P blockwise from q, k and lse (never N x N). Every (query, key) pair needs
dP = dO^T v summed over ALL of C (2 C FLOPs, the dominant term at C = 512) before its dS, and
contributes P^T dO to dV across all of C. Holding a key block's dV for all of C on chip (an fp32
BLOCK_N x C tile: 128 KiB at BLOCK_N = 64, half the register file) is what would make each
product happen once, and it does not fit sm_90: S^T-first it needs 128 key rows on 8 warps, 256
registers per thread for dV alone; with C as the MMA's M and 32 keys per program it compiles
with 68 to 1080 bytes of spills. Fusing dV for half of C (256 channels) into the key-side
kernel compiles spill-free only at 32 queries per step, even without the atomic dQ product,
and its re-reads of v^T then cost more than the S^T it saves (measured for the deterministic
path: "The deterministic floor" below).
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
queries get P = 0; padded keys get P = 0 by a -inf bias on their scores past the true N), and
the kernels write the
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
dQ kernel 1280. exp2: 3 N^2 by default (1 N^2 more per extra dV C block), 4 deterministic; the
previous split (dV, dK and dQ kernels, S on both warpgroups of its 64-row tiles) executed 6272.

The deterministic floor. Without atomics, dK (a sum over queries) and dQ (a sum over keys) are
reduced by different programs; without ordering between programs (a spin-wait on a counter,
which the interpreter cannot validate and which can hang) and without N^2 memory (stored dS or
per-key-block dQ partials: N^2 d / BLOCK_N), each of them recomputes dS, so S and dP = dO^T v
over all of C happen twice per pair: the key side S, dP, dK (2 C + 4 d) and dV (2 C, its P^T at
hand), the query side S, dP, dQ (2 C + 4 d), together 6 C + 8 d = 3584 N^2 at d = 64, C = 512.
That needs dV for all of C in the key-side kernel, an fp32 BLOCK_N x C tile sm_90's registers do
not hold at C = 512; every C block whose dV is left to a kernel of its own adds its S^T, 2 d
= 128 N^2: 3584 + 128 ceil(C / BLOCK_C) when the dV kernel does it all (3840 here), 3712 with
one 256-channel block fused into the key-side kernel. The issue's 3600 is below what sm_90
reaches this way. That fused variant was measured (docs/performance.md, "The deterministic
path"): spill-free only with 32 queries per step (254-255 registers; 64 spill
628 B), whose re-reads of the key block's v^T make its key-side kernel stream 41 B per pair
against 25, which the perf model (L2-bound) puts 21% slower than this split at N = 32768 and at
N = 4096, so the deterministic path keeps the split: 3840.

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
kernel is as exact as the reference; ``"tf32x3"`` at "high", ``"tf32"`` at "medium"; the
forward's tile lists follow the precision, any but "ieee" on the tensor cores). NaN/Inf propagate
as in the reference; a row whose energies are all -inf so far gets its max guarded to 0 so that
``-inf - -inf`` never manufactures a NaN the reference does not have.

Indexing. Every tensor comes with its per-axis strides (non-contiguous inputs such as
flattened channels_last maps are read in place where aligned), every load and store on N, C
and d is masked where it can run past the data (any N, C, d >= 1; d is padded to
BLOCK_D >= 16 for tl.dot), and batch and block offsets are int64 so that B * C * N beyond 2^31
cannot overflow. Inside one image C * N passes 2^31 at C = 512, N > 4.2M (channels_last maps
read in place have stride C on N): the backward computes every in-image offset in int64
(kernels/common.py's ``offsets_2d``); the forward, whose hot loop recomputes k and v offsets
every key block, does so only where the launcher finds that an image's offsets can pass 2^31
(``_needs_int64_offsets``, the ``INT64_OFFSETS`` constexpr, part of the tuning key) and keeps
int32 arithmetic, the same binary as without the switch, otherwise. The int64 form costs the
preferred tiles 3 to 16 more registers (bf16 238 -> 250, fp32 "ieee" 209 -> 225) and no spills
in any kept config of any precision (the compile report's "int64 offsets" rows). The backward
reads the caller's q, k, v and the forward's O (a view of a 16-aligned buffer) and lse.

Tuning (Hopper). The forward is autotuned per size bucket: the key holds N and B rounded up to
powers of two (and d, C, the precision, the dtypes), so a new image size reuses its bucket's
config; the prune caps the tiles at the bucket and a perf model (tensor-core, exp2 and L2
time of a program, in waves over the SMs: kernels/common.py's SM model, which CAM's autotuners
and the compile report use too) keeps the best ``_FWD_TOP_K`` = 4 for the first call
of a bucket to benchmark; Triton's ``cache_results`` keeps the choice across processes. The
tile lists per operand class (``_FWD_TILES``: 16-bit, tf32, tf32x3, fp32 "ieee" on FMA) are
each spill-free in the compile report. Under TRITON_INTERPRET=1 a single small configuration
is used and nothing is tuned.

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
from torch.library import wrap_triton

from danet_kernels._dispatch import triton_interpreting
from danet_kernels.kernels.common import (
    ALIGN,
    MAX_SHARED_BYTES,
    device_sms,
    dot_input_precision,
    launch_clocks,
    offsets_2d,
    operand_class,
    padded_length,
    program_clocks,
    size_bucket,
)
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
        # A row whose energies are all -inf so far would compute -inf - -inf = NaN; shift by 0
        # instead, which leaves p = 0 and alpha = 0 (the reference is NaN only if all are -inf,
        # and then l = 0 gives 0/0 = NaN at the end, as it should).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s * QK_SCALE - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V_block + _pam_fwd_offsets(offs_n, stride_vn, offs_c, stride_vc, INT64_OFFSETS),
                       loaded, mask_c, TAIL, not EVEN_C)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
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
    N_BUCKET, M_BUCKET, B_BUCKET,  # the autotuning key (N's, M's, B's power-of-two buckets); never read
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
    SCALE: tl.constexpr, HAS_GAMMA: tl.constexpr, ATOMIC_DQ: tl.constexpr, BLOCK_D: tl.constexpr,
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
    # gives P = 0. A bias per key row, formed once: a mask on N_VALID inside the loop (not a
    # multiple of 16 at 97 x 97) cost the 3xTF32 tile 100 bytes of spills at N = 9409.
    key_bias = tl.where(offs_n < M_VALID, 0.0, float("-inf"))
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
            q = tl.load(Q_block + offsets_2d(offs_d, stride_qd, offs_m, stride_qn),
                        mask=mask_d[:, None] & mask_m[None, :], other=0.0)
            # lse = +inf on padded query rows makes their P exactly 0.
            lse = tl.load(Lse_block + offs_m, mask=mask_m, other=float("inf"))
            delta = tl.load(Delta_block + offs_m, mask=mask_m, other=0.0)
        vT = tl.load(V_block + offsets_2d(offs_n, stride_vn, offs_c, stride_vc),
                     mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        dy = tl.load(DY_block + offsets_2d(offs_c, stride_gc, offs_m, stride_gn),
                     mask=mask_c[:, None] & mask_m[None, :], other=0.0)
        # where(chunk == 0, 0, acc) becomes the MMA's "ignore the accumulator" flag.
        dp_t = tl.dot(vT, dy, tl.where(chunk == 0, 0.0, dp_t), input_precision=INPUT_PRECISION)
        if chunk == num_c_blocks - 1:
            s_t = tl.dot(kT, q, input_precision=INPUT_PRECISION)
            p_t = tl.math.exp2(s_t * (SCALE * LOG2E) - lse[None, :] + key_bias[:, None])
            ds_t = (p_t * (dp_t - delta[None, :]) * ds_scale).to(Q.dtype.element_ty)
            dk = tl.dot(ds_t, tl.trans(q), dk, input_precision=INPUT_PRECISION)
            if ATOMIC_DQ:
                dq = tl.dot(tl.trans(ds_t), kT, input_precision=INPUT_PRECISION)
                tl.atomic_add(DQ + pid_b * stride_dqb + offsets_2d(offs_m, stride_dqn, offs_d, stride_dqd),
                              dq, mask=mask_m[:, None] & mask_d[None, :], sem="relaxed")
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
    SCALE: tl.constexpr, HAS_GAMMA: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
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
    ds_scale = _pam_load_gamma(Gamma, HAS_GAMMA) * SCALE

    qT = tl.load(Q + pid_b * stride_qb + offsets_2d(offs_m, stride_qn, offs_d, stride_qd),
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
        mask_n = offs_n < M
        mask_c = offs_c < C
        if chunk == 0:
            k = tl.load(K_block + offsets_2d(offs_d, stride_kd, offs_n, stride_kn),
                        mask=mask_d[:, None] & mask_n[None, :], other=0.0)
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
# prune below only caps them at the problem and checks shared memory. Why these:
# * 128 query rows take 8 warps, each warpgroup owning 64 rows of S, of the softmax and of O.
#   64 rows take 4 warps: on 8, Triton lays the q^T k dot (whose result feeds another dot) with
#   all warps along M, warpsPerCTA [8, 1] over 64 rows, and both warpgroups would compute the
#   same scores and exponentials (twice the ex2 per thread: the old 8-warp 64-row configs).
# * BLOCK_C: S = q^T k is recomputed once per C block. For 16-bit operands 128 x 64 x 256
#   (1280 N^2 FLOPs, 2 N^2 exp2 at d = 64, C = 512; a 128-register accumulator, 255 registers
#   in all) is the largest tile that fits; 128 x 128 x 256 spills. BLOCK_C = 128 (1536 N^2,
#   4 N^2) and 64-row tiles give more programs to small maps and small batches.
# * fp32 operands (tf32) double the register and shared memory of P and of the k, v tiles:
#   BLOCK_C <= 128 (1536 N^2); tf32x3 splits each operand in two and needs one tile step less.
# * fp32 "ieee" has no tensor cores: tl.dot becomes FMA loops with both operands in registers,
#   and only small tiles compile.
_FWD_TILES = {
    "16-bit": ((128, 64, 256, 8, 2), (128, 64, 256, 8, 3), (128, 128, 128, 8, 2), (128, 128, 128, 8, 3),
               (128, 64, 128, 8, 3), (64, 64, 128, 4, 3), (64, 64, 64, 4, 3)),
    "tf32": ((128, 64, 128, 8, 2), (128, 64, 128, 8, 3), (128, 32, 128, 8, 3), (128, 64, 64, 8, 3),
             (64, 32, 128, 4, 3), (64, 64, 64, 4, 3)),
    "tf32x3": ((128, 32, 128, 8, 2), (128, 32, 128, 8, 3), (128, 64, 64, 8, 3), (128, 32, 64, 8, 3),
               (64, 32, 64, 4, 3)),
    "ieee": ((32, 32, 64, 4, 2), (64, 32, 64, 8, 2), (64, 16, 64, 4, 2), (64, 32, 128, 8, 2)),
}
# The interpreter runs programs one by one in numpy: tuning would only multiply its run time,
# and 32-wide tiles keep the CI shapes multi-block (ragged tails, several C blocks).
_INTERPRETER_TILES = (32, 32, 32, 4, 1)
# A first call in a new (N, B) bucket benchmarks at most this many configs: the perf model's best.
_FWD_TOP_K = 4


def _pow2_cap(n: int) -> int:
    """Smallest tile (a power of two >= 16, tl.dot's minimum) that covers n."""
    return max(16, triton.next_power_of_2(n))


def _fwd_configs(tiles: tuple[tuple[int, ...], ...]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_C": bc}, num_warps=w, num_stages=s)
            for bm, bn, bc, w, s in tiles]


def _prune_fwd_configs(
    configs: list[triton.Config], named_args: dict, **kwargs: object
) -> list[triton.Config]:
    """The configs that fit this problem: tiles capped at the problem's bucket (duplicates
    removed), the shared memory of q plus num_stages k and v tiles (exact against the compiler's
    figure) within an sm_90 block's. Depends on N and M only through their buckets, so every N of a
    bucket tunes over the same configs."""
    n, m, c = named_args["N_BUCKET"], named_args["M_BUCKET"], named_args["C"]
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
        shared = element_size * (bm * block_d + config.num_stages * bn * (block_d + bc))
        if shared > MAX_SHARED_BYTES:
            continue
        key = (bm, bn, bc, warps, config.num_stages)
        # Other kwargs (torch.compile applies the EVEN_C heuristic to the configs before the
        # prune) are kept: a flag that held for the uncapped BLOCK_C holds for the capped one.
        tiles = {**config.kwargs, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_C": bc}
        kept.setdefault(key, triton.Config(tiles, num_warps=warps, num_stages=config.num_stages))
    # Huge d (256) with fp32 can exclude everything: fall back to the smallest tile.
    return list(kept.values()) or [triton.Config({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_C": 16},
                                                 num_warps=4, num_stages=1)]


def _fwd_work(n: int, m: int, batch: int, channels: int, block_d: int, bm: int, bn: int, bc: int
              ) -> tuple[int, ...]:
    """(programs, FLOPs, exp2, operand bytes / element size) of one program of a forward pass
    over N queries and M keys: every program sweeps all key blocks, computing its S tile and its
    share of P v."""
    programs = triton.cdiv(n, bm) * triton.cdiv(channels, bc) * batch
    blocks = triton.cdiv(m, bn)
    return programs, blocks * 2 * bm * bn * (block_d + bc), blocks * bm * bn, blocks * bn * (block_d + bc)


def _fwd_time_estimate(**args: object) -> float:
    """The forward perf model (clocks), for the autotuner's top-k: a program takes the longest of
    its tensor-core (or FMA) work, its exp2 and its operand traffic at one SM's rates, and the
    busiest SM runs ceil(programs / SMs) of them (:mod:`danet_kernels.kernels.common`).
    Evaluated at the bucket's N and B, like the prune."""
    v = args["V"]
    n, m, batch, channels = args["N_BUCKET"], args["M_BUCKET"], args["B_BUCKET"], args["C"]
    bm, bn, bc = args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_C"]
    programs, flops, exp2, elements = _fwd_work(n, m, batch, channels, args["BLOCK_D"], bm, bn, bc)
    program = program_clocks(flops, exp2, elements * v.element_size(),
                             operand_class(v.dtype, args["INPUT_PRECISION"]))
    return launch_clocks(programs, program, device_sms(v.device))


def _fwd_tuner(tiles: tuple[tuple[int, ...], ...]) -> triton.runtime.Autotuner:
    """The forward kernel autotuned over ``tiles``, per (N, B) bucket, d, C, precision and dtype;
    the choice persists across processes in Triton's cache (``cache_results``)."""
    return triton.autotune(
        _fwd_configs(tiles),
        key=["N_BUCKET", "M_BUCKET", "B_BUCKET", "BLOCK_D", "C", "INPUT_PRECISION", "INT64_OFFSETS"],
        prune_configs_by={"early_config_prune": _prune_fwd_configs, "perf_model": _fwd_time_estimate,
                          "top_k": _FWD_TOP_K},
        cache_results=True,
    )(_pam_fwd_kernel)


if _INTERPRETING:
    _FWD_KERNELS = dict.fromkeys(_FWD_TILES, _fwd_tuner((_INTERPRETER_TILES,)))
else:
    _FWD_KERNELS = {name: _fwd_tuner(tiles) for name, tiles in _FWD_TILES.items()}


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
_BWD_PREPROCESS = {"BLOCK_M": 128, "BLOCK_C": 32, "num_warps": 4, "num_stages": 1}


def _bwd_operand_class(dtype: torch.dtype, input_precision: str) -> str:
    """The row of the backward's tile tables: the operand class, or the interpreter's tiles."""
    return "interpreter" if _INTERPRETING else operand_class(dtype, input_precision)


def _bwd_config(
    dtype: torch.dtype, input_precision: str, block_d: int, n: int, m: int, c: int
) -> dict[str, dict[str, int]]:
    """Launch parameters of every backward kernel: tiles (capped at the problem size: N queries,
    M keys, C channels) and the num_warps / num_stages each one was compiled and measured with."""
    table = _BWD_TILES_WIDE_HEAD if block_d > 128 else _BWD_TILES
    tiles = table[_bwd_operand_class(dtype, input_precision)]
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


def _is_aligned(t: torch.Tensor) -> bool:
    """Whether a launch specialises ``t`` for the fast path: its first element 16-byte aligned
    (torch's allocators align storages to at least 64 bytes) and every stride of an axis longer
    than 1 either 1 or a multiple of 16 elements."""
    strides = (stride for size, stride in zip(t.shape, t.stride(), strict=True) if size > 1)
    return (t.storage_offset() * t.element_size()) % ALIGN == 0 and all(
        stride == 1 or stride % ALIGN == 0 for stride in strides)


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


def _pad_positions(t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``t`` (..., L) as a contiguous copy whose last axis is rounded up to a multiple of 16, the
    tail holding ``fill``."""
    return torch.nn.functional.pad(t, (0, padded_length(t.shape[-1]) - t.shape[-1]), value=fill)


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
    if all(_is_aligned(t) for t in operands):
        return q, k, v, residual, q.shape[-1], k.shape[-1]
    q, k, v = _pad_positions(q), _pad_positions(k), _pad_positions(v)
    residual = None if residual is None else _pad_positions(residual)
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
            n, n_loaded, m, m_loaded, head_dim, channels,
            size_bucket(n), size_bucket(m), size_bucket(chunk),
            SCALE=scale, **meta,
        )
    return result, out, lse


def _bwd_operand(t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``t`` (..., L) as the backward kernels read it: itself where L is a multiple of 16, else a
    copy padded to one whose tail holds ``fill`` (zeros: padded positions add nothing; lse = +inf:
    padded queries get P = 0). Without the copy, L % 16 != 0 (DANet's 97 x 97 = 9409) leaves no
    row 16-byte aligned: no vectorised or asynchronous loads, and spills (788 bytes in dV, bf16)."""
    return t if t.shape[-1] == padded_length(t.shape[-1]) else _pad_positions(t, fill)


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
        SCALE=scale, **common, **config,
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
    q_in, k_in, v_in, dy_in, out_in = (_bwd_operand(t) for t in (q, k, v, dy, out))
    lse_in = _bwd_operand(lse, fill=float("inf"))
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
            SCALE=scale, ATOMIC_DQ=atomic_dq, **common, **dk_cfg,
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
    scale: float,
    store_out: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return pam_forward(q, k, v, gamma, residual, scale, store_out)


@_define_op("danet_kernels::pam_backward", mutates_args=())
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


if _INTERPRETING:
    _pam_forward_op.register_fake(_forward_outputs)
    _pam_backward_op.register_fake(_backward_outputs)


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
