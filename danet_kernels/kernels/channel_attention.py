"""Fused channel attention (DANet's CAM) in Triton: forward and backward kernels.

Written for this project from the published semantics (Fu et al., "Dual Attention Network for
Scene Segmentation", CVPR 2019); the file layout follows Liger-Kernel's op files and Triton's
fused-attention tutorial (kernels, then launchers, then the autograd Function).

What is computed, for x of shape (B, C, N)::

    E   = x x^T                       (B, C, C), unscaled, accumulated AND kept in fp32
    A   = softmax(rowmax(E) - E)      row softmax, in fp32
    out = A x                         (B, C, N)
    y   = gamma * out + x             when gamma is given (the residual fused in the epilogue)

Why softmax(rowmax(E) - E) == softmax(-E): softmax is invariant to adding a per-row constant,
and rowmax(E) is constant along each row. We compute it stably as
``A[i, j] = exp(m_i - E[i, j]) / sum_j exp(m_i - E[i, j])`` with ``m_i = min_j E[i, j]``, so every
exponent is <= 0 (no overflow) and the largest term is exactly exp(0) = 1 (the sum is >= 1, no
division by zero). torch's softmax of ``rowmax - E`` subtracts the maximum of ``rowmax - E``,
which is ``rowmax - m_i``, so it evaluates the same exponents: huge energies saturate to the same
one-hot row (at the row minimum of E) and never give NaN. Non-finite energies give what the
reference gives: a row of E holding any NaN or +-Inf is a NaN row of A (the reference subtracts
inf from inf there); the row minimum would skip a +Inf, so +Inf energies count as NaN.

Why fp32 energy: |E| grows with N (E[i, i] = |x_i|^2). Rounded to bf16 (8 mantissa bits) at
N = 4096 an energy of ~4000 is off by ~16, and the softmax of such differences is garbage: the
bf16 reference is at 0.5-0.7 relative error (../shared/baseline/h100_peers.md). Here E never
leaves fp32, whatever the input dtype; only A (entries in [0, 1]) is rounded to the input dtype
when it multiplies x on the tensor cores, a relative error of 2^-8 per entry that averages out.

Aligned rows, every N. The GEMM kernels read rows of x (and, backward, of dY) in pipelined
16-byte cp.async copies, which needs every row to start on 16 bytes and the row length to be
known divisible by 16 (Triton specialises integer arguments that are multiples of 16). A row
length like DANet's 97 x 97 = 9409 loses both: the kernels compile to synchronous scalar loads
at 255 registers with spills. So an input whose rows are not unit-stride, 16-element aligned
rows of a multiple of 16 is first copied into a (B, C, round_up(N, 16)) buffer with a zero
tail (kernels/common.py's :func:`aligned_rows`): zero columns change neither x x^T nor dY x^T, and
the columns of
A x past N are never stored. The copy costs one read of the tensor and one write of the
buffer, O(C N) bytes (linear in N, against the kernels' O(C^2 N) FLOPs), and the buffer's
memory until the op returns; the backward copies x again rather than keeping the buffer
alive. A 97 x 97 map then compiles to the same pipelined code as a 128 x 128 one, apart from
the final stores into the (B, C, N) result, which stay scalar.

Forward, three kernels (x is the only N-sized input; it is read twice, the output written once):

1. ``_cam_gram_kernel``: E tiles of BLOCK_C x BLOCK_C with fp32 accumulation. The reduction over
   N is SPLIT across programs so that B = 1 still fills a GPU: at C = 512 there are only 10
   distinct 128 x 128 tiles (E is symmetric, so only the lower triangle of tiles is computed and
   each off-diagonal tile is also stored mirrored), far fewer than an H100's 132 SMs. Each
   (tile, split) program writes its partial fp32 tile to a workspace of shape (B, S, C, C); the
   partials are summed in a fixed order by the next kernel, so the result is DETERMINISTIC
   (atomics would make E, and through the softmax every output, vary bitwise run to run). S is
   chosen so that about one wave of programs runs; the workspace is S x 4 C^2 bytes per image
   (13 MiB at C = 512 on an H100) and is freed when the forward returns. Tiles are the fastest
   moving program index, so the programs sharing one N-chunk of x run together and hit L2.
2. ``_cam_softmax_kernel``: per block of rows, pass 1 sums the S partials into E (written into
   the attention buffer) while keeping an online row minimum and sum of exponentials; pass 2
   rereads E and writes A in fp32 (saved for backward) and, for 16-bit inputs, a copy in the
   input dtype for the tensor cores of step 3. C x C traffic only (1 MiB at C = 512 in fp32).
3. ``_cam_apply_kernel``: out = A x tiled over (BLOCK_R rows of C, BLOCK_N positions) with a
   K-loop over C; the epilogue reads the matching x tile and writes ``gamma * out + x``. Row
   blocks are the fastest moving program index, so the C / BLOCK_R programs that read the same
   x columns run together and x comes from DRAM about once.

Backward (Y = gamma * O + x, O = A x, A = softmax(-E) by rows, E = x x^T; dY the incoming grad;
without gamma read gamma = 1 and drop the identity term)::

    dO      = gamma dY
    dgamma  = sum(dY * O)            = sum_ij A_ij P_ij  with  P = dY x^T   (no need for O)
    dA      = dO x^T                 = gamma P
    dx     <- A^T dO                 = gamma A^T dY                          (through O = A x)
    dS      = A * (dA - rowsum(dA * A))                                      (softmax, S = -E)
    dE      = -dS                    = -gamma A * (P - rowsum(P * A))
    dx     <- (dE + dE^T) x                                                  (through E = x x^T)
    dx     <- dY                                                              (the residual)

so ``dx = dY + W1 dY + W2 x`` with the C x C matrices ``W1 = gamma A^T`` and ``W2 = dE + dE^T``,
and the row dots ``rowsum(P * A)`` give dgamma for free. Four kernels, two passes over the
N-sized tensors:

1. ``_cam_gram_kernel`` again (not symmetric): the split-N partials of P = dY x^T.
2. ``_cam_softmax_bwd_kernel``: per block of rows, sums the partials of P, forms the row dots
   (kept for dgamma) and dE, in fp32.
3. ``_cam_bwd_weights_kernel``: W = [gamma A^T | dE + dE^T] of shape (B, C, 2C) in the input
   dtype (the transposes need all rows of dE, hence a kernel of their own; C x C traffic).
4. ``_cam_apply_kernel`` again: dx = W [dY; x] (+ dY), the GEMM with K = 2C and the same tiling
   as the forward's step 3; x's gradient is written in x's dtype.

When only gamma needs a gradient, steps 3 and 4 and the dE pass of step 2 are skipped: dgamma
needs P and the row dots only (one pass over dY and x instead of two).

The forward saves x, A (fp32, 4 C^2 bytes per image) and gamma; nothing N-sized is saved beyond
the input itself, and out is not needed (dgamma comes from P and A).

Precision: fp32 inputs multiply with the ``input_precision`` that
:func:`danet_kernels.kernels.common.dot_input_precision` reads from torch's float32 matmul
precision: "highest" (the default) -> "ieee", exact fp32 on the FMA units, as exact as the
reference; "high" -> "tf32x3" (near-fp32 on the tensor cores); "medium" -> "tf32". 16-bit
inputs use the tensor cores with fp32 accumulation. Each (dtype, precision) has its own tile
list (:data:`_GRAM_CONFIGS`, :data:`_APPLY_CONFIGS`): FMA dots hold both operands in registers
and tf32x3 splits each operand in two, so each list is what compiles for sm_90 with no spills
at that precision (the compile report's CAM targets, docs/compile_report.md).

Tuning: the Gram and apply kernels are autotuned per operand class on C and the power-of-two
buckets of N and B (a new image size reuses its bucket's choice), with a perf model (programs
from the tiles and the split plan, each the longest of its tensor-core or FMA time and its
operand bytes from L2, in waves over the SMs: the SM model of kernels/common.py) that keeps the
best three of a list for a first call in a new bucket to benchmark; Triton's ``cache_results``
keeps the choice across processes.

Shapes: any C >= 1 and N >= 1 (tiles are padded with masks, as tl.dot needs dims >= 16), any
B, arbitrary strides. Offsets are int64 (kernels/common.py's :func:`offsets_2d`): one image's
C x N may pass 2^31 elements, and so may B * C * N.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from danet_kernels.kernels.common import (
    INTERPRETING,
    LOG2E,
    OPERAND_CLASSES,
    LoopCost,
    aligned_rows,
    define_op,
    device_sms,
    dot_input_precision,
    launch_clocks,
    offsets_2d,
    operand_class,
    resident_programs,
    size_bucket,
)

__all__ = ["ChannelAttentionFunction", "channel_attention_triton"]

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gram_tile_coords(pid_tile, num_tiles, SYMMETRIC: tl.constexpr):
    """Map a tile index to (row tile, column tile); SYMMETRIC enumerates the lower triangle."""
    if SYMMETRIC:
        # pid = i (i + 1) / 2 + j with j <= i: invert the triangular number with a float square
        # root (approximate on GPUs), then correct the estimate by one either way in integers.
        tile_i = ((tl.sqrt((8 * pid_tile + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
        tile_i -= (tile_i * (tile_i + 1) // 2 > pid_tile).to(tl.int32)
        tile_i += ((tile_i + 1) * (tile_i + 2) // 2 <= pid_tile).to(tl.int32)
        tile_j = pid_tile - tile_i * (tile_i + 1) // 2
    else:
        tile_i = pid_tile // num_tiles
        tile_j = pid_tile % num_tiles
    return tile_i, tile_j


@triton.jit
def _cam_gram_kernel(
    L, stride_lb, stride_lc, stride_ln,
    R, stride_rb, stride_rc, stride_rn,
    Partial,
    C, N, n_per_split, num_splits,
    N_BUCKET, B_BUCKET,  # N's and B's next powers of two: the autotuning key (never read)
    SYMMETRIC: tl.constexpr,  # L is R (E = x x^T): lower triangle of tiles, mirrored stores
    INPUT_PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Partial[b, s] = L[b, :, chunk s] @ R[b, :, chunk s]^T in fp32, for each N-chunk s.

    N is the (padded) row length: columns past the true N are zeros. Grid:
    (num_tile_pairs * num_splits * B,), tiles fastest, then splits, then batch.
    """
    num_tiles = tl.cdiv(C, BLOCK_C)
    if SYMMETRIC:
        num_pairs = num_tiles * (num_tiles + 1) // 2
    else:
        num_pairs = num_tiles * num_tiles
    pid = tl.program_id(0)
    pid_tile = pid % num_pairs
    pid_split = (pid // num_pairs) % num_splits
    pid_b = (pid // (num_pairs * num_splits)).to(tl.int64)
    tile_i, tile_j = _gram_tile_coords(pid_tile, num_tiles, SYMMETRIC)

    offs_i = tile_i * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_j = tile_j * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_i = offs_i < C
    mask_j = offs_j < C
    left_image = L + pid_b * stride_lb
    right_image = R + pid_b * stride_rb

    n_start = pid_split * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        left = tl.load(left_image + offsets_2d(offs_i, stride_lc, offs_n, stride_ln),
                       mask=mask_i[:, None] & mask_n[None, :], other=0.0)
        right = tl.load(right_image + offsets_2d(offs_j, stride_rc, offs_n, stride_rn),
                        mask=mask_j[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(left, tl.trans(right), acc, input_precision=INPUT_PRECISION)

    tile_base = Partial + (pid_b * num_splits + pid_split) * C * C
    mask = mask_i[:, None] & mask_j[None, :]
    tl.store(tile_base + offsets_2d(offs_i, C, offs_j, 1), acc, mask=mask)
    if SYMMETRIC:
        # The mirrored tile E[j, i] = E[i, j]^T, so the row kernels read whole rows. Diagonal
        # tiles are skipped: two threads writing one address would race.
        tl.store(tile_base + offsets_2d(offs_i, 1, offs_j, C), acc, mask=mask & (tile_i != tile_j))


@triton.jit
def _row_block(C, BLOCK_R: tl.constexpr):
    """The row-kernel prologue: this program's image, rows and their offsets in a C x C matrix.

    Grid (cdiv(C, BLOCK_R) * B,). Returns (pid_b, offs_r, mask_r, plane, row_offs): ``plane``
    is C * C (one image's matrix, and the stride between split partials) and ``row_offs`` the
    rows' int64 offsets as a (BLOCK_R, 1) column.
    """
    num_row_blocks = tl.cdiv(C, BLOCK_R)
    pid = tl.program_id(0)
    pid_b = (pid // num_row_blocks).to(tl.int64)
    offs_r = (pid % num_row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < C
    plane = tl.cast(C, tl.int64) * C
    row_offs = offs_r.to(tl.int64)[:, None] * C
    return pid_b, offs_r, mask_r, plane, row_offs


@triton.jit
def _sum_partials(Partial, partial_offs, mask, num_splits, split_stride):
    """Sum the S partial tiles of one block of a (B, S, C, C) workspace in a fixed order."""
    total = tl.load(Partial + partial_offs, mask=mask, other=0.0)
    for s in range(1, num_splits):
        total += tl.load(Partial + s * split_stride + partial_offs, mask=mask, other=0.0)
    return total


@triton.jit
def _cam_softmax_kernel(
    Partial, num_splits,
    Attn, AttnLow,
    C,
    WRITE_LOW: tl.constexpr,  # also write A in the input dtype (16-bit inputs)
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """A = softmax(-E) by rows, E the sum of the Gram partials; E and A stay in fp32.

    Grid: (cdiv(C, BLOCK_R) * B,). Pass 1 writes E into Attn while keeping the running row
    minimum m and l = sum_j exp(m - E[i, j]); pass 2 rewrites Attn in place with A.
    """
    pid_b, _, mask_r, plane, row_offs = _row_block(C, BLOCK_R)
    matrix = pid_b * plane
    partials = Partial + pid_b * num_splits * plane

    row_min = tl.full((BLOCK_R,), float("inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_r[:, None] & (offs_k < C)[None, :]
        energy = _sum_partials(partials, row_offs + offs_k[None, :], mask, num_splits, plane)
        tl.store(Attn + matrix + row_offs + offs_k[None, :], energy, mask=mask)
        # The reference turns a row holding +inf into NaN (its rowmax is inf, inf - inf = NaN);
        # the minimum would skip the +inf, so count it as NaN, which reaches the row sum.
        energy = tl.where(energy == float("inf"), float("nan"), energy)
        # Padded columns get +inf: they neither lower the minimum nor add to the sum (exp(-inf) = 0).
        # Padded rows keep their finite zeros, so no inf - inf arises in rows never stored.
        energy = tl.where((offs_k < C)[None, :], energy, float("inf"))
        new_min = tl.minimum(row_min, tl.min(energy, axis=1))
        # exp(new_min - old_min) <= 1 rescales the sum to the new minimum; the first step has
        # old_min = +inf and row_sum = 0, and exp2(-inf) = 0 keeps it 0.
        row_sum = row_sum * tl.math.exp2((new_min - row_min) * LOG2E)
        row_sum += tl.sum(tl.math.exp2((new_min[:, None] - energy) * LOG2E), axis=1)
        row_min = new_min

    # Each element is reread by the thread that wrote it in this layout, but say so explicitly.
    tl.debug_barrier()
    inv_sum = 1.0 / row_sum
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_r[:, None] & (offs_k < C)[None, :]
        offs = matrix + row_offs + offs_k[None, :]
        energy = tl.load(Attn + offs, mask=mask, other=0.0)
        attn = tl.math.exp2((row_min[:, None] - energy) * LOG2E) * inv_sum[:, None]
        tl.store(Attn + offs, attn, mask=mask)
        if WRITE_LOW:
            tl.store(AttnLow + offs, attn.to(AttnLow.dtype.element_ty), mask=mask)


@triton.jit
def _matmul_accumulate(acc, W, w_rows, mask_r, U, stride_uc, stride_un, offs_n, mask_n, C,
                       INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += W[rows, 0:C] @ U[0:C, cols] with a K-loop over C (masked tails)."""
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        w = tl.load(W + w_rows + offs_k[None, :], mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        u = tl.load(U + offsets_2d(offs_k, stride_uc, offs_n, stride_un),
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(w.to(u.dtype), u, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _cam_apply_kernel(
    W, stride_wb, stride_wr,
    U, stride_ub, stride_uc, stride_un,
    V, stride_vb, stride_vc, stride_vn,
    Res, stride_resb, stride_resc, stride_resn,
    Scale,
    Y, stride_yb, stride_yc, stride_yn,
    C, N, N_PADDED,
    N_BUCKET, B_BUCKET,  # the autotuning key (never read)
    HAS_V: tl.constexpr,  # also add W[:, C:2C] @ V (the backward's K = 2C GEMM)
    HAS_SCALE: tl.constexpr,  # multiply the product by Scale[0] (gamma)
    HAS_RESIDUAL: tl.constexpr,  # add Res in the epilogue
    INPUT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Y = [Scale *] (W[:, :C] @ U [+ W[:, C:] @ V]) [+ Res], all (B, C, N) but W (B, C, C or 2C).

    Forward: W = A, U = Res = x, Scale = gamma. Backward: W = [gamma A^T | dE + dE^T], U = dY,
    V = x, Res = dY. U, V and Res have rows of N_PADDED columns, zero past N (loads are masked
    on N_PADDED, a multiple of 16 the compiler can use); Y has N. Grid:
    (cdiv(C, BLOCK_R) * cdiv(N, BLOCK_N) * B,), row blocks fastest so the programs that read
    the same columns of U and V run together (L2 reuse).
    """
    num_row_blocks = tl.cdiv(C, BLOCK_R)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    pid_r = pid % num_row_blocks
    pid_n = (pid // num_row_blocks) % num_n_blocks
    pid_b = (pid // (num_row_blocks * num_n_blocks)).to(tl.int64)

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = offs_r < C
    mask_load = offs_n < N_PADDED
    w_rows = pid_b * stride_wb + offs_r.to(tl.int64)[:, None] * stride_wr

    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    acc = _matmul_accumulate(acc, W, w_rows, mask_r, U + pid_b * stride_ub, stride_uc, stride_un, offs_n,
                             mask_load, C, INPUT_PRECISION, BLOCK_K)
    if HAS_V:
        acc = _matmul_accumulate(acc, W, w_rows + C, mask_r, V + pid_b * stride_vb, stride_vc, stride_vn,
                                 offs_n, mask_load, C, INPUT_PRECISION, BLOCK_K)
    if HAS_SCALE:
        acc = acc * tl.load(Scale).to(tl.float32)
    if HAS_RESIDUAL:
        res_offs = offsets_2d(offs_r, stride_resc, offs_n, stride_resn)
        res = tl.load(Res + pid_b * stride_resb + res_offs, mask=mask_r[:, None] & mask_load[None, :],
                      other=0.0)
        acc += res.to(tl.float32)
    y_ptrs = Y + pid_b * stride_yb + offsets_2d(offs_r, stride_yc, offs_n, stride_yn)
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask_r[:, None] & (offs_n < N)[None, :])


@triton.jit
def _cam_softmax_bwd_kernel(
    Partial, num_splits,
    Attn, Scale, DE, RowDot,
    C,
    HAS_SCALE: tl.constexpr,
    GRAD_ENERGY: tl.constexpr,  # also form dE (x needs a gradient); else the row dots only
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dE = -gamma A * (P - rowsum(P * A)) with P the sum of the partials of dY x^T; all fp32.

    Grid: (cdiv(C, BLOCK_R) * B,). Pass 1 writes P into DE and the row dots rowsum(P * A) into
    RowDot (their total is dgamma); pass 2 rewrites DE in place.
    """
    pid_b, offs_r, mask_r, plane, row_offs = _row_block(C, BLOCK_R)
    matrix = pid_b * plane
    partials = Partial + pid_b * num_splits * plane

    row_dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_r[:, None] & (offs_k < C)[None, :]
        offs = matrix + row_offs + offs_k[None, :]
        p = _sum_partials(partials, row_offs + offs_k[None, :], mask, num_splits, plane)
        if GRAD_ENERGY:
            tl.store(DE + offs, p, mask=mask)
        row_dot += tl.sum(p * tl.load(Attn + offs, mask=mask, other=0.0), axis=1)
    tl.store(RowDot + pid_b * C + offs_r, row_dot, mask=mask_r)

    if GRAD_ENERGY:
        tl.debug_barrier()
        scale = -1.0
        if HAS_SCALE:
            scale = -tl.load(Scale).to(tl.float32)
        for k0 in range(0, C, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask = mask_r[:, None] & (offs_k < C)[None, :]
            offs = matrix + row_offs + offs_k[None, :]
            p = tl.load(DE + offs, mask=mask, other=0.0)
            attn = tl.load(Attn + offs, mask=mask, other=0.0)
            tl.store(DE + offs, scale * attn * (p - row_dot[:, None]), mask=mask)


@triton.jit
def _cam_bwd_weights_kernel(
    Attn, DE, Scale, Wgt,
    C,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Wgt[b, i, k] = gamma A[b, k, i] and Wgt[b, i, C + k] = dE[b, i, k] + dE[b, k, i].

    Grid: (cdiv(C, BLOCK)^2 * B,). Tiles are loaded row-major (coalesced) and transposed in
    registers.
    """
    num_tiles = tl.cdiv(C, BLOCK)
    pid = tl.program_id(0)
    pid_b = (pid // (num_tiles * num_tiles)).to(tl.int64)
    tile = pid % (num_tiles * num_tiles)
    offs_i = (tile // num_tiles) * BLOCK + tl.arange(0, BLOCK)
    offs_k = (tile % num_tiles) * BLOCK + tl.arange(0, BLOCK)
    mask_ik = (offs_i < C)[:, None] & (offs_k < C)[None, :]
    mask_ki = (offs_k < C)[:, None] & (offs_i < C)[None, :]
    matrix = pid_b * C * C
    ik = matrix + offsets_2d(offs_i, C, offs_k, 1)
    ki = matrix + offsets_2d(offs_k, C, offs_i, 1)

    attn_t = tl.trans(tl.load(Attn + ki, mask=mask_ki, other=0.0))
    if HAS_SCALE:
        attn_t = attn_t * tl.load(Scale).to(tl.float32)
    grad_sym = tl.load(DE + ik, mask=mask_ik, other=0.0) + tl.trans(tl.load(DE + ki, mask=mask_ki, other=0.0))
    w_rows = Wgt + pid_b * 2 * C * C + offsets_2d(offs_i, 2 * C, offs_k, 1)
    tl.store(w_rows, attn_t.to(Wgt.dtype.element_ty), mask=mask_ik)
    tl.store(w_rows + C, grad_sym.to(Wgt.dtype.element_ty), mask=mask_ik)


# ----------------------------------------------------------------------------------------------
# Tuning. Hopper (H100/H200: 132 SMs, 227 KiB shared memory per CTA, 50 MiB L2), one tile list
# per operand class, each config compiled for sm_90 with a real launch's specialisation (16-byte
# divisible pointers, row strides and N) at 0 bytes of spill with triton 3.6 and 3.8, cp.async
# in the GEMMs' main loops at N = 9409 (padded) as at aligned N: docs/compile_report.md shows
# every config against the targets of benchmarks/compile_specs/cam.py (`python -m
# benchmarks.compile_report --ops cam_forward cam_backward`), and CI asserts them on a subset
# (tests/danet_kernels/test_hopper_compile.py). A perf model ranks each list (below, before the
# autotuners) so that a first call benchmarks only a few.
# Under TRITON_INTERPRET=1 each kernel gets one small configuration: the interpreter runs every
# program in Python, so autotuning would only multiply the CI time, and small tiles let small
# test shapes still cover several tiles and splits.
# ----------------------------------------------------------------------------------------------
def _gram_configs(rows: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_C": bc, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bc, bn, w, s in rows]


def _apply_configs(rows: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_R": br, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for br, bn, bk, w, s in rows]


if INTERPRETING:
    _GRAM_CONFIGS = dict.fromkeys(OPERAND_CLASSES, _gram_configs([(16, 32, 1, 1)]))
    _APPLY_CONFIGS = dict.fromkeys(OPERAND_CLASSES, _apply_configs([(16, 32, 16, 1, 1)]))
    _SOFTMAX_BLOCK_R, _SOFTMAX_BLOCK_K, _SOFTMAX_WARPS = 16, 32, 1
    _WEIGHTS_BLOCK = 16
    _MIN_N_PER_SPLIT = 32  # small, so that test shapes exercise the split-N reduction
    _N_SPLIT_ALIGN = 32
else:
    # Gram tiles (BLOCK_C, BLOCK_N, warps, stages). 128 x 128 fp32 accumulators (64 KiB of
    # registers over 8 warps) give the highest tensor-core intensity, 64 x 64 quarters the
    # register need for small C. The N step is the K dimension of the dot; the stages of two
    # BLOCK_C x BLOCK_N operand tiles must fit in shared memory, so fp32 (twice the bytes) gets
    # shallower or narrower pipelines. tf32x3 splits both operand tiles into high and low parts
    # in registers, and FMA dots ("ieee") hold both operands and the accumulator there: 128 x 128
    # only with an N step of 16 or 32, and no 64 x 64 (the symmetric kernel's mirrored store
    # spills 916 bytes on 4 warps with triton 3.6, 24 bytes on 8 warps with 3.8).
    _GRAM_CONFIGS = {
        "16-bit": _gram_configs([(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 4), (128, 128, 8, 3),
                                 (64, 64, 4, 4), (64, 128, 4, 3)]),
        "tf32": _gram_configs([(128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 4, 4), (64, 128, 4, 3)]),
        "tf32x3": _gram_configs([(128, 32, 8, 4), (128, 32, 8, 3), (64, 64, 4, 4), (64, 32, 4, 4)]),
        "ieee": _gram_configs([(128, 32, 8, 4), (128, 32, 8, 3), (128, 16, 8, 4), (64, 32, 8, 4)]),
    }
    # out = W @ U tiles (BLOCK_R, BLOCK_N, BLOCK_K, warps, stages): BLOCK_R rows of the small
    # C x C (or C x 2C) matrix against a BLOCK_R x BLOCK_N output tile. A larger BLOCK_R means
    # fewer programs re-read each x column (from L2), a larger BLOCK_N fewer re-reads of W;
    # 128 x 128 (fp32 accumulator 64 KiB over 8 warps) is the usual Hopper sweet spot. The result
    # (B, C, N) keeps the caller's unaligned rows (N = 9409): its scalar stores cost registers,
    # and 128 x 256 spills there in every class; tf32x3 keeps high and low parts of both operand
    # tiles in registers, so its K steps are short.
    _APPLY_CONFIGS = {
        "16-bit": _apply_configs([(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4),
                                  (64, 128, 64, 4, 4), (64, 256, 64, 8, 3)]),
        "tf32": _apply_configs([(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4),
                                (128, 64, 32, 4, 4), (64, 128, 32, 4, 4)]),
        "tf32x3": _apply_configs([(128, 128, 16, 8, 4), (64, 128, 32, 4, 4), (64, 128, 16, 4, 4),
                                  (64, 64, 64, 4, 4)]),
        "ieee": _apply_configs([(128, 128, 32, 8, 4), (64, 128, 32, 4, 4), (64, 128, 16, 4, 4),
                                (64, 256, 32, 8, 3)]),
    }
    # Row kernels over C x C fp32 matrices: 8 rows x 128 columns per step, coalesced along rows.
    _SOFTMAX_BLOCK_R, _SOFTMAX_BLOCK_K, _SOFTMAX_WARPS = 8, 128, 4
    _WEIGHTS_BLOCK = 64
    # Each split must loop over enough of N to amortise its prologue and its fp32 tile store
    # (and the reduction's reread of it): 512 positions are 8 BLOCK_N = 64 steps, while B = 1,
    # C = 512, N = 4096 still gets 8 splits (80 programs) instead of under-filling the GPU.
    # Split boundaries are aligned to the largest BLOCK_N so no split ends in a partial block.
    _MIN_N_PER_SPLIT = 512
    _N_SPLIT_ALIGN = 256
_MAX_SPLITS = 64  # bounds the fp32 workspace at 64 * 4 C^2 bytes per image
_WIDEST_BLOCK_C = max(cfg.kwargs["BLOCK_C"] for configs in _GRAM_CONFIGS.values() for cfg in configs)


# ----------------------------------------------------------------------------------------------
# Autotuning: per operand class, keyed on C and the (N, B) buckets; a perf model from the tiles,
# the waves and the bytes (the Hopper SM model of kernels/common.py) ranks a class's configs and
# a first call in a new bucket benchmarks only its best _TOP_K; Triton's cache_results keeps the
# choice across processes. The models depend on N and B only through their buckets, so every
# size of a bucket tunes alike.
# ----------------------------------------------------------------------------------------------
_TOP_K = 3


# Instructions per thread per K step of the GEMM loops (address arithmetic, the cp.async of the
# next stage, the barrier): about the same for every tile, and small beside the MMAs, which the
# loop does not wait for before them (the compile report models each config with its compiled
# loop's own count, docs/compile_report.md).
_GEMM_LOOP_INSTRUCTIONS = 40.0


def _gemm_clocks(programs: int, steps: int, flops: float, operand_bytes: float, accumulator: int,
                 operands: str, args: dict, sms: int) -> float:
    """The perf model (kernels/common.py) of a GEMM launch: ``programs`` programs of ``steps`` K
    steps, each step ``flops`` FLOPs and ``operand_bytes`` bytes, its MMAs running under the next
    step's loads (Triton keeps one wgmma group in flight); registers estimated from the fp32
    accumulator's elements per thread."""
    warps, stages = args["num_warps"], args["num_stages"]
    loop = LoopCost(flops, _GEMM_LOOP_INSTRUCTIONS, 0, operand_bytes, serial=False)
    registers = min(255, accumulator // (32 * warps) + 64)
    resident = resident_programs(registers, warps, stages * int(operand_bytes))
    return launch_clocks(programs, steps, loop, warps, stages, resident, operands, sms)


def _gram_time_estimate(**args: object) -> float:
    """Clocks of a Gram launch at the bucket's N and B: the split plan's programs (tile pairs x
    splits x B), each streaming two BLOCK_C x BLOCK_N tiles per step of its N chunk (its fp32
    partial tile's store, once per program, left out)."""
    left, c, symmetric = args["L"], args["C"], args["SYMMETRIC"]
    bc, bn = args["BLOCK_C"], args["BLOCK_N"]
    sms = device_sms(left.device)
    splits, n_per_split = _split_plan(args["B_BUCKET"], c, args["N_BUCKET"], symmetric, sms)
    tiles = triton.cdiv(c, bc)
    programs = (tiles * (tiles + 1) // 2 if symmetric else tiles * tiles) * splits * args["B_BUCKET"]
    element = left.element_size()
    return _gemm_clocks(programs, triton.cdiv(n_per_split, bn), 2 * bc * bc * bn, 2 * bc * bn * element,
                        bc * bc, operand_class(left.dtype, args["INPUT_PRECISION"]), args, sms)


def _apply_time_estimate(**args: object) -> float:
    """Clocks of an apply launch at the bucket's N and B: BLOCK_R x BLOCK_N output tiles, each a
    K loop over C (2 C with HAS_V) streaming a W and a U tile per step."""
    weights, u, c = args["W"], args["U"], args["C"]
    br, bn, bk = args["BLOCK_R"], args["BLOCK_N"], args["BLOCK_K"]
    programs = triton.cdiv(c, br) * triton.cdiv(args["N_BUCKET"], bn) * args["B_BUCKET"]
    steps = triton.cdiv(c, bk) * (2 if args["HAS_V"] else 1)
    tile_bytes = (br * weights.element_size() + bn * u.element_size()) * bk
    return _gemm_clocks(programs, steps, 2 * br * bn * bk, tile_bytes, br * bn,
                        operand_class(u.dtype, args["INPUT_PRECISION"]), args, device_sms(u.device))


def _autotuned(kernel, configs: dict[str, list[triton.Config]], key: list[str], perf_model) -> dict:
    """One autotuner per operand class around the same kernel (each class its own tile list)."""
    return {name: triton.autotune(configs=class_configs, key=key,
                                  prune_configs_by={"perf_model": perf_model, "top_k": _TOP_K},
                                  cache_results=True)(kernel)
            for name, class_configs in configs.items()}


_GRAM_KERNELS = _autotuned(_cam_gram_kernel, _GRAM_CONFIGS, ["C", "N_BUCKET", "B_BUCKET", "SYMMETRIC"],
                           _gram_time_estimate)
_APPLY_KERNELS = _autotuned(_cam_apply_kernel, _APPLY_CONFIGS,
                            ["C", "N_BUCKET", "B_BUCKET", "HAS_V", "HAS_SCALE", "HAS_RESIDUAL"],
                            _apply_time_estimate)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
# The Gram programs that fill the device once, under the interpreter (it has no SMs): 8 makes
# the small test shapes split N.
_INTERPRETER_SMS = 8


def _split_plan(batch: int, C: int, N: int, symmetric: bool, programs_per_wave: int) -> tuple[int, int]:
    """Number of N-splits of the Gram reduction and the positions each covers.

    Enough splits that (tiles x splits x batch) is about ``programs_per_wave`` programs,
    counting tiles of the largest BLOCK_C (``_WIDEST_BLOCK_C``); no split shorter than
    _MIN_N_PER_SPLIT; at most _MAX_SPLITS.
    """
    tiles = triton.cdiv(C, _WIDEST_BLOCK_C)
    pairs = tiles * (tiles + 1) // 2 if symmetric else tiles * tiles
    wanted = triton.cdiv(programs_per_wave, batch * pairs)
    splits = max(1, min(wanted, triton.cdiv(N, _MIN_N_PER_SPLIT), _MAX_SPLITS))
    n_per_split = triton.cdiv(triton.cdiv(N, splits), _N_SPLIT_ALIGN) * _N_SPLIT_ALIGN
    return triton.cdiv(N, n_per_split), n_per_split


def _gram_partials(left: torch.Tensor, right: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, int]:
    """Split-N partial products left @ right^T in fp32: returns the (B, S, C, C) workspace and S.

    ``left`` and ``right`` have aligned rows of the same (padded) length, zero past the true N.
    """
    B, C, N = left.shape
    num_splits, n_per_split = _split_plan(B, C, N, symmetric, device_sms(left.device, _INTERPRETER_SMS))
    partial = torch.empty((B, num_splits, C, C), dtype=torch.float32, device=left.device)
    precision = dot_input_precision(left.dtype)

    def grid(meta):
        tiles = triton.cdiv(C, meta["BLOCK_C"])
        pairs = tiles * (tiles + 1) // 2 if symmetric else tiles * tiles
        return (pairs * num_splits * B,)

    wrap_triton(_GRAM_KERNELS[operand_class(left.dtype, precision)])[grid](
        left, *left.stride(),
        right, *right.stride(),
        partial,
        C, N, n_per_split, num_splits, size_bucket(N), size_bucket(B),
        SYMMETRIC=symmetric, INPUT_PRECISION=precision,
    )
    return partial, num_splits


def _apply(weights: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None,
           residual: torch.Tensor | None, scale: torch.Tensor | None,
           out_dtype: torch.dtype, n: int) -> torch.Tensor:
    """Launch ``_cam_apply_kernel``: [scale *] (W[:, :C] @ u [+ W[:, C:] @ v]) [+ residual].

    u, v and residual have aligned rows of one padded length, zero past ``n``; the result is a
    contiguous (B, C, n) tensor.
    """
    B, C, n_padded = u.shape
    y = torch.empty((B, C, n), dtype=out_dtype, device=u.device)
    dummy = u  # stands in for absent operands; the constexpr flags keep them unread
    precision = dot_input_precision(u.dtype)

    def grid(meta):
        return (triton.cdiv(C, meta["BLOCK_R"]) * triton.cdiv(n, meta["BLOCK_N"]) * B,)

    v_ = dummy if v is None else v
    res = dummy if residual is None else residual
    wrap_triton(_APPLY_KERNELS[operand_class(u.dtype, precision)])[grid](
        weights, weights.stride(0), weights.stride(1),
        u, *u.stride(),
        v_, *v_.stride(),
        res, *res.stride(),
        dummy if scale is None else scale,
        y, *y.stride(),
        C, n, n_padded, size_bucket(n), size_bucket(B),
        HAS_V=v is not None, HAS_SCALE=scale is not None, HAS_RESIDUAL=residual is not None,
        INPUT_PRECISION=precision,
    )
    return y


def cam_forward(x: torch.Tensor, gamma: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernels; returns (y, A) with A = softmax(-x x^T) in fp32, shape (B, C, C)."""
    B, C, N = x.shape
    rows = aligned_rows(x, unit_stride=True)
    partial, num_splits = _gram_partials(rows, rows, symmetric=True)
    attention = torch.empty((B, C, C), dtype=torch.float32, device=x.device)
    write_low = x.dtype != torch.float32
    attention_low = torch.empty((B, C, C), dtype=x.dtype, device=x.device) if write_low else attention
    wrap_triton(_cam_softmax_kernel)[(triton.cdiv(C, _SOFTMAX_BLOCK_R) * B,)](
        partial, num_splits, attention, attention_low, C,
        WRITE_LOW=write_low, BLOCK_R=_SOFTMAX_BLOCK_R, BLOCK_K=_SOFTMAX_BLOCK_K, num_warps=_SOFTMAX_WARPS,
    )
    y = _apply(attention_low, rows, None, rows if gamma is not None else None, gamma, x.dtype, N)
    return y, attention


def cam_backward(
    grad_y: torch.Tensor, x: torch.Tensor, attention: torch.Tensor,
    gamma: torch.Tensor | None, needs_grad_x: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the backward kernels; returns (dx in x's dtype, dgamma as an fp32 scalar tensor).

    Without ``needs_grad_x`` only dgamma is computed (P and the row dots) and dx is an empty
    tensor.
    """
    B, C, N = x.shape
    grad_rows = aligned_rows(grad_y.to(x.dtype), unit_stride=True)
    rows = aligned_rows(x, unit_stride=True)
    partial, num_splits = _gram_partials(grad_rows, rows, symmetric=False)
    grad_energy = torch.empty((B, C, C) if needs_grad_x else (0,), dtype=torch.float32, device=x.device)
    row_dot = torch.empty((B, C), dtype=torch.float32, device=x.device)
    scale = attention if gamma is None else gamma
    wrap_triton(_cam_softmax_bwd_kernel)[(triton.cdiv(C, _SOFTMAX_BLOCK_R) * B,)](
        partial, num_splits, attention, scale, grad_energy, row_dot, C,
        HAS_SCALE=gamma is not None, GRAD_ENERGY=needs_grad_x,
        BLOCK_R=_SOFTMAX_BLOCK_R, BLOCK_K=_SOFTMAX_BLOCK_K, num_warps=_SOFTMAX_WARPS,
    )
    if not needs_grad_x:
        return x.new_empty((0,)), row_dot.sum()
    weights = torch.empty((B, C, 2 * C), dtype=x.dtype, device=x.device)
    wrap_triton(_cam_bwd_weights_kernel)[(triton.cdiv(C, _WEIGHTS_BLOCK) ** 2 * B,)](
        attention, grad_energy, scale, weights, C,
        HAS_SCALE=gamma is not None, BLOCK=_WEIGHTS_BLOCK,
    )
    grad_x = _apply(weights, grad_rows, rows, grad_rows if gamma is not None else None, None, x.dtype, N)
    return grad_x, row_dot.sum()


# ----------------------------------------------------------------------------------------------
# torch.library ops (torch.compile sees through triton_op into the kernels) and autograd
# ----------------------------------------------------------------------------------------------
def _cam_forward_fake(x: torch.Tensor, gamma: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    B, C, N = x.shape
    return x.new_empty((B, C, N)), x.new_empty((B, C, C), dtype=torch.float32)


def _cam_backward_fake(
    grad_y: torch.Tensor, x: torch.Tensor, attention: torch.Tensor, gamma: torch.Tensor | None,
    needs_grad_x: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape if needs_grad_x else (0,)), x.new_empty((), dtype=torch.float32)


@define_op("danet_kernels::cam_forward", _cam_forward_fake)
def _cam_forward_op(x: torch.Tensor, gamma: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return cam_forward(x, gamma)


@define_op("danet_kernels::cam_backward", _cam_backward_fake)
def _cam_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, attention: torch.Tensor, gamma: torch.Tensor | None,
    needs_grad_x: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return cam_backward(grad_y, x, attention, gamma, needs_grad_x)


class ChannelAttentionFunction(torch.autograd.Function):
    """Autograd for the fused CAM: ``(x, gamma) -> (y, attention)``.

    ``y`` is ``gamma * out + x`` (``out`` when gamma is None); ``attention`` is the fp32
    A = softmax(-x x^T) of shape (B, C, C), what the backward reads besides x and gamma, and is
    not differentiable. Its ``setup_context``/``backward`` are also registered as the autograd
    formula of the ``danet_kernels::cam_forward`` op, so eager and torch.compile share one
    definition; :func:`channel_attention_triton` is the entry point to use. Double backward is
    not supported.
    """

    @staticmethod
    def forward(x: torch.Tensor, gamma: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the forward op."""
        return _cam_forward_op(x, gamma)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
        """Save x, A and gamma for the backward (neither out nor the energy is needed)."""
        x, gamma = inputs
        _, attention = output
        ctx.save_for_backward(x, attention, gamma)
        ctx.mark_non_differentiable(attention)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor, *unused_grads: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Gradients of x (x's dtype) and gamma (gamma's dtype and shape); dx only if needed."""
        x, attention, gamma = ctx.saved_tensors
        needs_x, needs_gamma = ctx.needs_input_grad
        needs_gamma = needs_gamma and gamma is not None
        if not (needs_x or needs_gamma):
            return None, None
        grad_x, grad_gamma = _cam_backward_op(grad_y, x, attention, gamma, needs_x)
        return (grad_x if needs_x else None,
                grad_gamma.to(gamma.dtype).reshape(gamma.shape) if needs_gamma else None)


_cam_forward_op.register_autograd(
    ChannelAttentionFunction.backward, setup_context=ChannelAttentionFunction.setup_context
)


def channel_attention_triton(x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    """The Triton backend of :func:`danet_kernels.channel_attention` (inputs already validated).

    Args:
        x: (B, C, N), fp16, bf16 or fp32, any strides, on CUDA (or the CPU under the interpreter).
        gamma: None, or a one-element tensor of any float dtype (possibly requiring grad).

    Returns:
        ``gamma * out + x`` when gamma is given, else ``out``; x's dtype, contiguous.
    """
    y, _ = torch.ops.danet_kernels.cam_forward(x, gamma)
    return y
