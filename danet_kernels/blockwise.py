"""Blockwise pure-PyTorch backend: DANet's attention without the N x N matrix, on any device.

The same algorithm as the fused Triton kernels, written in plain tensor ops so that it runs
on the CPU (where ``backend="auto"`` picks it), on any GPU, and in float64 (which Triton does
not compute). Both ops are ``torch.autograd.Function``s with their own backward; both
return ``gamma * out + residual`` when ``gamma`` is given (the residual added while each
output block is written, not in a separate pass), else ``out``.

Precision: fp16 and bf16 operands are computed in fp32 (energies, softmax, accumulators),
one block at a time, and the result is rounded to the input dtype once; fp32 stays fp32 and
float64 stays float64.

Position attention (PAM), q of shape (B, d, N), k of shape (B, d, M), v of shape (B, C, M)
(M = N in DANet), with the softmax scale s (1 in DANet)::

    S = s q^T k  (N x M, never whole)   P = softmax_rows(S)   O = v P^T   Y = gamma O + R

The scale is folded into q once (q_s = s q, (B, d, N) elements): S = q_s^T k, and the backward's
dK = q_s dS needs nothing more; dQ = s k dS^T gets the scale with gamma at the end.

The forward loops over *query* blocks of ``rows`` queries. Each block sees all M keys at once,
so its softmax is exact in one pass (no online rescaling is needed, unlike on a GPU whose
on-chip memory holds only a few key blocks), and the block's two matmuls are as large as the
memory budget allows, which is what makes a CPU fast. Per block it keeps one ``rows x N``
buffer, normalises after the second matmul (on rows x C, not rows x N), and writes
``gamma O + R`` straight into the result. It saves q, k, v, the per-row log-sum-exp
``lse = max + log(sum exp)`` (B x N) and, only when a gradient is wanted, O (B x C x N, the
size of the output; with no gamma O is the result itself and nothing is copied).

The backward recomputes P block by block. With ``dPY = dY^T v`` (the gradient of P for
gamma = 1) and ``D = rowsum_c(dY * O)`` from the saved O (per block, on rows x C)::

    P_blk  = exp([q_s,blk; -lse_blk]^T [k; 1])  (the lse subtraction rides in the matmul)
    dS     = gamma * P * (dPY - D)              (softmax backward, in place in the dPY buffer)
    dV    += gamma * dY_blk P;   dQ_blk = s k dS^T;   dK += q_s,blk dS
    dgamma = sum(D);   dR = dY

Elementwise passes over a ``rows x N`` buffer are memory bound and, on a CPU, take a real
share of the time next to the matmuls, so the loop keeps them few: four in forward (max,
subtract, exp, sum; the reference's softmax makes about as many) and three in backward
(exp, subtract, multiply). Two ``rows x N`` buffers live at a time in backward.

Channel attention (CAM), x of shape (B, C, N)::

    E = x x^T (C x C, fp32)   A = softmax(rowmax(E) - E) = softmax(rowmin(E) - E)   O = A x

The published model's ``rowmax(E) - E`` and ``-E`` differ by a per-row constant, which
softmax ignores: softmax(rowmax - E) = softmax(-E). We stabilise it by the row minimum,
``rowmin(E) - E <= 0``, whose largest entry is exactly 0; huge energies then saturate to the
same one-hot as the reference, never NaN. Backward (``Y = gamma O + x``, ``G = dY x^T``)::

    dA = gamma G                                  (O = A x, gradient wrt A)
    dgamma = sum(A * G)                           (= sum(dY * O), without keeping O)
    dS = A * (dA - rowsum(dA * A))                (softmax backward, S = rowmin(E) - E)
    dE = -dS                                      (rowmin's gradient vanishes: softmax is
                                                   shift invariant, rowsum(dS) = 0)
    dx = dY + gamma A^T dY + (dE + dE^T) x        (residual, O = A x, and E = x x^T, which is
                                                   quadratic in x: both factors get dE x)

The C x C matrices are small (1 MiB at C = 512); x and dY are streamed over column blocks of
N, so fp16/bf16 inputs are upcast one block at a time instead of as a whole fp32 copy.

Export. The blocks write through ``out=`` into preallocated buffers, which a graph capture
cannot replay (``torch.export`` re-runs the forward with parameters that require grad, and
bmm's ``out=`` refuses autograd; the legacy ``torch.jit`` tracer records no ops of an
autograd.Function at all and would export a constant). Under ``torch.export`` (which
``torch.onnx.export(dynamo=True)`` uses) and under ``torch.jit.trace`` (``dynamo=False``) the
public functions therefore compute the plain decomposition instead, the reference's bmm +
softmax in the compute dtype, whose ops every exporter knows; it holds the N x N matrix, as
any exported graph of PAM does. ``torch.compile`` keeps the blockwise Functions.

Double backward is not supported: the backward is computed under no_grad, and differentiating
its result raises a RuntimeError that says so (as the Triton backend does).
"""

from __future__ import annotations

import contextlib

import torch

from danet_kernels.reference import channel_attention_reference, position_attention_reference

__all__ = [
    "cam_backward",
    "cam_forward",
    "channel_attention_blockwise",
    "pam_backward",
    "pam_forward",
    "position_attention_blockwise",
]

# Elements per rows x N buffer (2 Mi elements: 8 MiB in fp32). Why this size, measured on a
# 2-core CPU at B=1, C=512 (scripts/measure_cpu.py, docs/performance.md):
# * memory: PAM forward holds one such buffer and backward two, so the attention's extra
#   memory stays in the tens of MB at any N (the reference's N x N is 354 MB at N = 9409);
# * CPU speed: the block's matmuls are (rows x d) @ (d x N) and (C x N) @ (N x rows); at
#   N = 9409 a block has 222 rows, enough for a CPU matmul to run near its peak. Doubling the
#   budget made forward+backward ~10% faster at N = 9409 but its peak RSS growth 144 MB
#   instead of 114 MB (the reference's: 1438 MB); halving it cost ~25% at N = 4096.
# Tests lower it to exercise many blocks at small N.
BLOCK_ELEMENTS = 1 << 21
# Below the cap, a buffer holds at most 1/32 of the N x N matrix (never less than 256 Ki
# elements, so small maps keep large matmuls): at 64x64 (N = 4096) that is 128 rows, 2 MiB
# instead of 8 MiB per buffer, which brings the backend under 10% of the reference's memory
# there (measured, docs/performance.md) at about 10% of its forward speed; from N = 8192 on
# the cap decides alone.
MIN_BLOCK_ELEMENTS = 1 << 18


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _row_tiles(batch: int, n: int, m: int) -> list[tuple[int, int, int, int]]:
    """Tiles ``(b0, b1, i0, i1)`` of (batch, query rows) whose ``rows x M`` energy fits the budget.

    Whole N x M matrices of several images share a tile when they fit (small N, large B);
    otherwise one image per tile and as many query rows as fit.
    """
    budget = min(BLOCK_ELEMENTS, max(n * m // 32, MIN_BLOCK_ELEMENTS))
    rows = max(1, min(n, budget // m))
    images = max(1, budget // (n * m)) if rows == n else 1
    return [
        (b0, min(b0 + images, batch), i0, min(i0 + rows, n))
        for b0 in range(0, batch, images)
        for i0 in range(0, n, rows)
    ]


def _tile_buffer(
    tiles: list[tuple[int, int, int, int]], m: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """One (images, rows, M) buffer that every tile's rows x M block is a contiguous view of.

    Allocated once per call, not per block: a fresh multi-MiB tensor per block made glibc's heap
    fragment (its mmap threshold adapts to freed sizes), and peak RSS crept up call after call.
    """
    images = max((b1 - b0 for b0, b1, _, _ in tiles), default=0)
    rows = max((i1 - i0 for _, _, i0, i1 in tiles), default=0)
    return torch.empty((images, rows, m), dtype=dtype, device=device)


def _column_blocks(batch: int, channels: int, n: int) -> list[tuple[int, int]]:
    """Column ranges ``(n0, n1)`` of N such that a (B, C, n1 - n0) block fits the budget."""
    cols = max(1, min(n, BLOCK_ELEMENTS // (batch * channels)))
    return [(n0, min(n0 + cols, n)) for n0 in range(0, n, cols)]


def _scalar(gamma: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """gamma as a 0-dim tensor of the compute dtype (any one-element shape broadcasts safely)."""
    return None if gamma is None else gamma.detach().reshape(()).to(dtype)


def _without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off: it would run the matmuls below in bf16/fp16, losing the fp32 energy."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _scaled_queries(q: torch.Tensor, compute: torch.dtype, scale: float) -> torch.Tensor:
    """q in the compute dtype with the softmax scale folded in: (s q)^T k = s q^T k."""
    qc = q.to(compute)
    return qc if scale == 1.0 else qc * scale


def pam_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor | None,
    residual: torch.Tensor | None,
    scale: float,
    keep_attention_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """PAM forward by query blocks.

    Returns the (B, C, N) result in v's dtype, the (B, N) log-sum-exp of the scaled energies,
    and, when ``keep_attention_output``, the attention output O (B, C, N) in the compute dtype
    (the backward's ``rowsum(dY * O)``; without gamma it is the result itself and is not copied).
    """
    compute = _compute_dtype(v.dtype)
    (batch, _, n), (channels, m) = q.shape, v.shape[1:]
    qc, kc, vc = _scaled_queries(q, compute, scale), k.to(compute), v.to(compute)
    gamma_c = _scalar(gamma, compute)
    result = torch.empty((batch, channels, n), dtype=v.dtype, device=v.device)
    attention_out = None
    if keep_attention_output and (gamma_c is not None or compute != v.dtype):
        attention_out = torch.empty(result.shape, dtype=compute, device=v.device)
    lse = torch.empty((batch, n), dtype=compute, device=v.device)
    tiles = _row_tiles(batch, n, m)
    probs_buffer = _tile_buffer(tiles, m, compute, v.device)
    for b0, b1, i0, i1 in tiles:
        probs = probs_buffer[: b1 - b0, : i1 - i0]  # (b, rows, M): energy, then exp(energy - max)
        torch.bmm(qc[b0:b1, :, i0:i1].transpose(1, 2), kc[b0:b1], out=probs)
        row_max = probs.amax(dim=-1, keepdim=True)
        probs.sub_(row_max).exp_()  # unnormalised; a NaN or inf energy spreads as in softmax
        row_sum = probs.sum(dim=-1, keepdim=True)  # >= 1: the max entry contributes exp(0)
        lse[b0:b1, i0:i1] = (row_max + row_sum.log()).squeeze(-1)
        out = torch.bmm(vc[b0:b1], probs.transpose(1, 2))  # (b, C, rows), unnormalised
        norm = row_sum.transpose(1, 2).reciprocal()
        result_blk = result[b0:b1, :, i0:i1]
        if attention_out is not None:  # O, kept for the backward: normalised where it is stored
            out = torch.mul(out, norm, out=attention_out[b0:b1, :, i0:i1])
            norm = 1.0
        # epilogue written straight into the result: gamma * out + residual (or out)
        if gamma_c is None:
            torch.mul(out, norm, out=result_blk)
        else:
            torch.addcmul(residual[b0:b1, :, i0:i1], out, norm * gamma_c, out=result_blk)
    if keep_attention_output and attention_out is None:
        attention_out = result
    return result, lse, attention_out


def pam_backward(
    grad_result: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor | None,
    scale: float,
    lse: torch.Tensor,
    attention_out: torch.Tensor,
    needs_grad: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """PAM backward, recomputing P by query blocks; returns (dq, dk, dv, dgamma, dresidual).

    ``attention_out`` is O from :func:`pam_forward`; ``needs_grad`` is autograd's
    ``needs_input_grad`` for (q, k, v, gamma, residual); a gradient that is not needed is
    None and is not computed.
    """
    need_q, need_k, need_v, need_gamma, need_residual = needs_grad
    compute = lse.dtype
    (batch, _, n), m = q.shape, k.shape[2]
    qc, kc, vc = _scaled_queries(q, compute, scale), k.to(compute), v.to(compute)
    grad = grad_result.to(compute)
    gamma_c = _scalar(gamma, compute)
    need_gamma = need_gamma and gamma is not None
    need_scores = need_q or need_k  # dS is needed; dgamma only needs D
    # [q; -lse]^T [k; 1] = q^T k - lse: the matmul subtracts the lse, and exp_ alone gives P
    ones = torch.ones((batch, 1, m), dtype=compute, device=v.device)
    k_aug = torch.cat([kc, ones], dim=1)
    q_aug = torch.cat([qc, -lse.unsqueeze(1)], dim=1)
    grad_q = torch.empty(qc.shape, dtype=compute, device=q.device) if need_q else None
    grad_k = torch.zeros(kc.shape, dtype=compute, device=k.device) if need_k else None
    grad_v = torch.zeros(vc.shape, dtype=compute, device=v.device) if need_v else None
    grad_gamma = torch.zeros((), dtype=compute, device=v.device)
    tiles = _row_tiles(batch, n, m) if need_v or need_scores or need_gamma else []
    probs_buffer = _tile_buffer(tiles if need_v or need_scores else [], m, compute, v.device)
    dscores_buffer = _tile_buffer(tiles if need_scores else [], m, compute, v.device)
    for b0, b1, i0, i1 in tiles:
        grad_blk = grad[b0:b1, :, i0:i1]  # (b, C, rows)
        if need_scores or need_gamma:  # D = rowsum(dY * O) (= rowsum(P * dPY)); dgamma = sum(D)
            delta = (grad_blk * attention_out[b0:b1, :, i0:i1]).sum(dim=1, keepdim=True)  # (b, 1, rows)
            grad_gamma = grad_gamma + delta.sum()
        if not (need_v or need_scores):
            continue
        probs = probs_buffer[: b1 - b0, : i1 - i0]
        torch.bmm(q_aug[b0:b1, :, i0:i1].transpose(1, 2), k_aug[b0:b1], out=probs).exp_()  # P, recomputed
        if grad_v is not None:
            grad_v[b0:b1].baddbmm_(grad_blk, probs)
        if not need_scores:
            continue
        dscores = dscores_buffer[: b1 - b0, : i1 - i0]
        torch.bmm(grad_blk.transpose(1, 2), vc[b0:b1], out=dscores)  # dPY, (b, rows, M)
        dscores.sub_(delta.transpose(1, 2)).mul_(probs)  # dS / gamma = P * (dPY - D)
        if grad_q is not None:
            torch.bmm(kc[b0:b1], dscores.transpose(1, 2), out=grad_q[b0:b1, :, i0:i1])
        if grad_k is not None:
            grad_k[b0:b1].baddbmm_(qc[b0:b1, :, i0:i1], dscores)
    # dO = gamma dY, and dQ = s k dS^T: each scaled once at the end instead of per block
    for g, factor in ((grad_q, scale), (grad_k, 1.0), (grad_v, 1.0)):
        if g is not None and gamma_c is not None:
            g.mul_(gamma_c)
        if g is not None and factor != 1.0:
            g.mul_(factor)
    return (
        None if grad_q is None else grad_q.to(q.dtype),
        None if grad_k is None else grad_k.to(k.dtype),
        None if grad_v is None else grad_v.to(v.dtype),
        grad_gamma.reshape(gamma.shape).to(gamma.dtype) if need_gamma else None,
        grad_result if need_residual else None,
    )


def cam_forward(x: torch.Tensor, gamma: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """CAM forward; returns the (B, C, N) result in x's dtype and the (B, C, C) attention (fp32/f64)."""
    compute = _compute_dtype(x.dtype)
    batch, channels, n = x.shape
    blocks = _column_blocks(batch, channels, n)
    energy = None
    for n0, n1 in blocks:  # E = sum over column blocks of x_blk x_blk^T, in the compute dtype
        x_blk = x[:, :, n0:n1].to(compute)
        if energy is None:
            energy = torch.bmm(x_blk, x_blk.transpose(1, 2))
        else:
            energy.baddbmm_(x_blk, x_blk.transpose(1, 2))
    # softmax(rowmax(E) - E) == softmax(-E) == softmax(rowmin(E) - E): all <= 0, max exactly 0.
    # One difference with the reference remains: a row holding +inf (an inf input) is NaN
    # there (rowmax - E = inf - inf) but would be finite here; 0 * rowmax is NaN exactly
    # when rowmax is infinite (0 otherwise), which restores the reference's propagation.
    shift = energy.amin(dim=-1, keepdim=True) + 0 * energy.amax(dim=-1, keepdim=True)
    attention = torch.softmax(shift - energy, dim=-1)
    del shift, energy
    scale = _scalar(gamma, compute)
    # gamma folded into the small C x C matrix: gamma * A x + x is then one baddbmm per block
    mix = attention if scale is None else attention * scale
    result = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    for n0, n1 in blocks:
        x_blk = x[:, :, n0:n1].to(compute)
        # written straight into the result when the dtypes agree: no (B, C, N) temporary
        dest = result[:, :, n0:n1] if compute == x.dtype else None
        out = torch.bmm(mix, x_blk, out=dest) if scale is None else torch.baddbmm(x_blk, mix, x_blk, out=dest)
        if dest is None:
            result[:, :, n0:n1] = out
    return result, attention


def cam_backward(
    grad_result: torch.Tensor,
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    attention: torch.Tensor,
    needs_grad: tuple[bool, ...],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """CAM backward (derived in the module docstring); returns (dx, dgamma)."""
    need_x, need_gamma = needs_grad
    compute = attention.dtype
    batch, channels, n = x.shape
    blocks = _column_blocks(batch, channels, n)
    scale = _scalar(gamma, compute)
    grad_attention = torch.zeros_like(attention)  # G = dY x^T
    for n0, n1 in blocks:
        x_blk = x[:, :, n0:n1].to(compute)
        grad_attention.baddbmm_(grad_result[:, :, n0:n1].to(compute), x_blk.transpose(1, 2))
    grad_gamma = None
    if gamma is not None and need_gamma:
        grad_gamma = (attention * grad_attention).sum().reshape(gamma.shape).to(gamma.dtype)
    if not need_x:
        return None, grad_gamma
    if scale is not None:
        grad_attention.mul_(scale)  # dA = gamma G
    # dS = A * (dA - rowsum(dA * A)); dE = -dS; the Gram matrix takes dE + dE^T
    grad_scores = attention * (grad_attention - (grad_attention * attention).sum(dim=-1, keepdim=True))
    grad_energy_sym = -(grad_scores + grad_scores.transpose(1, 2))
    attention_t = attention.transpose(1, 2) if scale is None else attention.transpose(1, 2) * scale
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    for n0, n1 in blocks:
        x_blk = x[:, :, n0:n1].to(compute)
        grad_blk = grad_result[:, :, n0:n1].to(compute)
        dest = grad_x[:, :, n0:n1] if compute == x.dtype else None
        block = torch.bmm(grad_energy_sym, x_blk, out=dest).baddbmm_(attention_t, grad_blk)
        if scale is not None:
            block.add_(grad_blk)  # the residual x
        if dest is None:
            grad_x[:, :, n0:n1] = block
    return grad_x, grad_gamma


class _RefuseDoubleBackward(torch.autograd.Function):
    """Identity on a backward's gradients whose own backward raises: double backward is unsupported.

    ``anchor`` (an input of the op that requires grad) only makes autograd record this node: the
    gradients themselves were computed under no_grad.
    """

    @staticmethod
    def forward(ctx, op_name, anchor, *grads):
        ctx.op_name = op_name
        return tuple(g.clone() for g in grads)

    @staticmethod
    def backward(ctx, *unused):
        raise RuntimeError(
            f"double backward through the blockwise {ctx.op_name} is not supported (its backward is "
            "not differentiable); use backend='reference' for higher-order gradients"
        )


def _refuse_double_backward(op_name: str, inputs: tuple[torch.Tensor | None, ...],
                            grads: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
    """``grads`` as they are, or, under create_graph=True, through :class:`_RefuseDoubleBackward`."""
    anchor = next((t for t in inputs if t is not None and t.requires_grad), None)
    if not torch.is_grad_enabled() or anchor is None:
        return grads
    present = [i for i, g in enumerate(grads) if g is not None]
    wrapped = _RefuseDoubleBackward.apply(op_name, anchor, *(grads[i] for i in present))
    out = list(grads)
    for i, g in zip(present, wrapped, strict=True):
        out[i] = g
    return tuple(out)


class _PositionAttentionBlockwise(torch.autograd.Function):
    """PAM ``gamma * v softmax(s q^T k)^T + residual`` by query blocks; saves q, k, v, gamma, lse."""

    @staticmethod
    def forward(ctx, q, k, v, gamma, residual, scale):
        needs_backward = any(ctx.needs_input_grad[:4])
        with _without_autocast(v.device):
            result, lse, attention_out = pam_forward(q, k, v, gamma, residual, scale, needs_backward)
        ctx.save_for_backward(q, k, v, gamma, lse, attention_out)
        ctx.scale = scale
        return result

    @staticmethod
    def backward(ctx, grad_result):
        q, k, v, gamma, lse, attention_out = ctx.saved_tensors
        # no_grad: the out= writes below refuse tensors that require grad (create_graph=True)
        with _without_autocast(v.device), torch.no_grad():
            grads = pam_backward(grad_result, q, k, v, gamma, ctx.scale, lse, attention_out,
                                 ctx.needs_input_grad[:5])
        return (*_refuse_double_backward("position attention", (q, k, v, gamma), grads), None)


class _ChannelAttentionBlockwise(torch.autograd.Function):
    """CAM ``gamma * softmax(rowmin(E) - E) x + x`` with E in fp32; saves x, gamma, attention."""

    @staticmethod
    def forward(ctx, x, gamma):
        with _without_autocast(x.device):
            result, attention = cam_forward(x, gamma)
        ctx.save_for_backward(x, gamma, attention)
        return result

    @staticmethod
    def backward(ctx, grad_result):
        x, gamma, attention = ctx.saved_tensors
        with _without_autocast(x.device), torch.no_grad():
            grads = cam_backward(grad_result, x, gamma, attention, ctx.needs_input_grad)
        return _refuse_double_backward("channel attention", (x, gamma), grads)


def _capturing_graph() -> bool:
    """Whether torch.export or the torch.jit tracer is recording (see "Export" above)."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def _plain_position_attention(q, k, v, gamma, residual, scale):
    """The reference PAM in the compute dtype: plain ops that every exporter translates."""
    compute = _compute_dtype(v.dtype)
    out = position_attention_reference(q.to(compute), k.to(compute), v.to(compute), scale)
    if gamma is not None:
        out = gamma.reshape(()).to(compute) * out + residual.to(compute)
    return out.to(v.dtype)


def _plain_channel_attention(x, gamma):
    """The reference CAM in the compute dtype (its energy in fp32 at least, as the blockwise one)."""
    compute = _compute_dtype(x.dtype)
    xc = x.to(compute)
    out = channel_attention_reference(xc)
    if gamma is not None:
        out = gamma.reshape(()).to(compute) * out + xc
    return out.to(x.dtype)


def position_attention_blockwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor | None,
    residual: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """PAM by query blocks: ``gamma * v softmax(scale q^T k)^T + residual`` (or the attention alone).

    Inputs are validated by :func:`danet_kernels.position_attention`: q (B, d, N), k (B, d, M),
    v (B, C, M), residual (B, C, N), one float dtype and device, possibly non-contiguous; gamma
    and residual both given or both None; scale a positive float. Returns a contiguous
    (B, C, N) tensor of v's dtype. Memory beyond inputs and output: one ``rows x M`` buffer
    forward, two backward, plus the (B, N) log-sum-exp; never N x M.
    """
    if _capturing_graph():
        return _plain_position_attention(q, k, v, gamma, residual, scale)
    return _PositionAttentionBlockwise.apply(q, k, v, gamma, residual, scale)


def channel_attention_blockwise(x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    """CAM with the C x C energy in fp32: ``gamma * softmax(rowmax(E) - E) x + x`` (or without gamma/x).

    x has shape (B, C, N), any float dtype, possibly non-contiguous (validated by
    :func:`danet_kernels.channel_attention`). Returns a contiguous (B, C, N) tensor of x's dtype.
    """
    if _capturing_graph():
        return _plain_channel_attention(x, gamma)
    return _ChannelAttentionBlockwise.apply(x, gamma)
