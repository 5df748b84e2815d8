"""The public functions: validate the input once, then run the chosen backend.

Every check happens here, before any kernel launch, so that each backend receives inputs
it can trust and a user gets an error that names the problem. The backends are:

* ``danet_kernels.kernels.position_attention`` / ``channel_attention``: fused Triton kernels;
* ``danet_kernels.blockwise``: the same algorithm in plain PyTorch;
* ``danet_kernels.reference``: the bmm oracle.

Each backend entry point has the signature used below and returns ``gamma * out + residual``
when ``gamma`` is given (the residual fused into the epilogue where the backend can), else
``out``.
"""

from __future__ import annotations

import math

import torch

from danet_kernels import blockwise, reference
from danet_kernels._dispatch import resolve_backend

__all__ = ["channel_attention", "position_attention"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_operand(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; attention takes float16, bfloat16, float32 or float64"
        )
    if t.dim() != 3:
        raise ValueError(f"{name} must have shape (B, channels, N), got {tuple(t.shape)}")
    return t


def _check_same(names: str, tensors: tuple[torch.Tensor, ...], what: str) -> None:
    values = {getattr(t, what) for t in tensors}
    if len(values) > 1:
        shown = ", ".join(f"{n}={getattr(t, what)}" for n, t in zip(names.split(), tensors, strict=True))
        raise ValueError(f"{names.replace(' ', ', ')} must share one {what}; got {shown}")


def _check_gamma(gamma: torch.Tensor | None, like: torch.Tensor) -> None:
    if gamma is None:
        return
    if not isinstance(gamma, torch.Tensor):
        raise TypeError(f"gamma must be a torch.Tensor or None, got {type(gamma).__name__}")
    if gamma.numel() != 1:
        raise ValueError(f"gamma must hold one element, got shape {tuple(gamma.shape)}")
    if not gamma.dtype.is_floating_point:
        raise TypeError(f"gamma has dtype {gamma.dtype}; it must be floating point")
    if gamma.device != like.device:
        raise ValueError(f"gamma is on {gamma.device} but the input is on {like.device}")


def _check_not_empty(**dims: int) -> None:
    for name, size in dims.items():
        if size == 0:
            raise ValueError(f"{name} is 0: attention over an empty dimension is undefined")


def _check_scale(scale: object) -> float:
    """The softmax scale as a float: None means 1 (DANet's); else a positive finite number."""
    if scale is None:
        return 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float (a softmax temperature), got {scale!r}")
    return float(scale)


def position_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    gamma: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """DANet's position attention: ``out[b, c, i] = sum_j v[b, c, j] softmax_j(scale * q[b,:,i] . k[b,:,j])``.

    Args:
        q: queries, shape (B, d, N).
        k: keys, shape (B, d, M); M = N in DANet, smaller where a non-local block pools its keys
            and values (mmcv's NonLocal2d with sub_sample).
        v: values, shape (B, C, M).
        gamma: optional one-element scale; with it the result is ``gamma * out + residual``.
        residual: the tensor added to ``gamma * out``, shape (B, C, N), v's dtype; given
            together with ``gamma``.
        scale: the softmax scale of the energies: None (default) means 1, DANet's (no
            1/sqrt(d)); non-local blocks use ``d ** -0.5``. A positive finite float.
        backend: ``"auto"`` (default), ``"triton"``, ``"torch"`` or ``"reference"``; see
            :mod:`danet_kernels._dispatch`.

    Every backend takes any query/key width d >= 1 (non-local blocks use C / 2) and any N, M >= 1.
    The Triton kernels pad d to a power of two of at least 16 (the tensor cores' minimum): d = 16,
    32 and 64 (DANet's C / 8) take the fast path, the tiles of docs/compile_report.md; wider
    heads run on smaller tiles (their rows in the report), other widths compute their padding.

    Returns:
        A (B, C, N) tensor of v's dtype. No backend but ``"reference"`` ever holds the
        N x M attention matrix.
    """
    _check_operand("q", q)
    _check_operand("k", k)
    _check_operand("v", v)
    _check_same("q k v", (q, k, v), "device")
    _check_same("q k v", (q, k, v), "dtype")
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"q (B, d, N) and k (B, d, M) must share B and d; got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if v.shape[0] != k.shape[0] or v.shape[2] != k.shape[2]:
        raise ValueError(
            f"v must have shape (B, C, M) with k's B and M; got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    _check_not_empty(d=q.shape[1], C=v.shape[1], N=q.shape[2], M=k.shape[2])
    scale = _check_scale(scale)
    if (gamma is None) != (residual is None):
        raise ValueError("gamma and residual must be given together (the result is gamma * out + residual)")
    _check_gamma(gamma, v)
    if residual is not None:
        _check_operand("residual", residual)
        expected = (v.shape[0], v.shape[1], q.shape[2])
        if tuple(residual.shape) != expected or residual.dtype != v.dtype or residual.device != v.device:
            raise ValueError(
                f"residual must have shape (B, C, N) = {expected} and v's dtype and device; got "
                f"{tuple(residual.shape)} {residual.dtype} {residual.device}, v is {v.dtype} {v.device}"
            )

    chosen = resolve_backend(backend, v)
    if chosen == "triton" and q.shape[0] > 0:
        # lazy: triton loads only with its backend (TRITON_INTERPRET must precede it)
        from danet_kernels.kernels.position_attention import position_attention_triton

        return position_attention_triton(q, k, v, gamma, residual, scale)
    if chosen == "torch" and q.shape[0] > 0:
        return blockwise.position_attention_blockwise(q, k, v, gamma, residual, scale)
    out = reference.position_attention_reference(q, k, v, scale)
    return out if gamma is None else (gamma * out + residual).to(v.dtype)


def channel_attention(
    x: torch.Tensor, *, gamma: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """DANet's channel attention: ``softmax(rowmax(x x^T) - x x^T) @ x`` for x of shape (B, C, N).

    The C x C energy is accumulated and kept in fp32 by the Triton and blockwise backends
    whatever the input dtype (the reference rounds it to the input dtype).

    Args:
        x: features, shape (B, C, N).
        gamma: optional one-element scale; with it the result is ``gamma * out + x``.
        backend: ``"auto"`` (default), ``"triton"``, ``"torch"`` or ``"reference"``.

    Returns:
        A (B, C, N) tensor of x's dtype.
    """
    _check_operand("x", x)
    _check_not_empty(C=x.shape[1], N=x.shape[2])
    _check_gamma(gamma, x)

    chosen = resolve_backend(backend, x)
    if chosen == "triton" and x.shape[0] > 0:
        # lazy: as above, triton only when its backend runs
        from danet_kernels.kernels.channel_attention import channel_attention_triton

        return channel_attention_triton(x, gamma)
    if chosen == "torch" and x.shape[0] > 0:
        return blockwise.channel_attention_blockwise(x, gamma)
    out = reference.channel_attention_reference(x)
    return out if gamma is None else (gamma * out + x).to(x.dtype)
