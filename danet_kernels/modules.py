"""Drop-in PAM_Module and CAM_Module running the fused attention.

Each subclasses its reference module (:mod:`danet_kernels.reference`, the original DANet
release's modules) and replaces only ``forward``: the constructor, parameter names and
``state_dict`` are the reference's own, so a checkpoint trained with the reference loads with
no key changes. The work happens in :func:`danet_kernels.position_attention` /
:func:`danet_kernels.channel_attention`, whose backend follows the switch in
:mod:`danet_kernels._dispatch`.
"""

from __future__ import annotations

import torch

from danet_kernels import reference
from danet_kernels.functional import channel_attention, position_attention

__all__ = ["CAM_Module", "PAM_Module", "channel_attention_residual", "position_attention_residual"]


def _sum_dtype(gamma: torch.Tensor, attention: torch.dtype, residual: torch.Tensor) -> torch.dtype:
    """The dtype torch gives ``gamma * attention + residual``: a 0-dim gamma (mmcv's Scale) does
    not promote a dimensioned tensor, a one-element gamma (the release's) does."""
    scaled = torch.promote_types(gamma.dtype, attention) if gamma.dim() > 0 else attention
    return torch.promote_types(scaled, residual.dtype)


def position_attention_residual(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor,
    residual: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """``gamma * position_attention(q, k, v, scale=scale) + residual`` in the dtype the original
    modules' arithmetic gives; the residual fused into the kernel where that is v's dtype.

    Under autocast the 1x1 convolutions give q, k, v in the autocast dtype, and the residual (the
    module's input) or an fp32 gamma may promote the sum: it is then formed in torch.
    """
    if _sum_dtype(gamma, v.dtype, residual) == v.dtype == residual.dtype:
        return position_attention(q, k, v, gamma=gamma, residual=residual, scale=scale)
    return gamma * position_attention(q, k, v, scale=scale) + residual


def channel_attention_residual(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``gamma * channel_attention(x) + x`` in the dtype the original modules' arithmetic gives
    (fused where that is x's own)."""
    if _sum_dtype(gamma, x.dtype, x) == x.dtype:
        return channel_attention(x, gamma=gamma)
    return gamma * channel_attention(x) + x


class PAM_Module(reference.PAM_Module):  # noqa: N801 - the original release's name, kept for drop-in use
    """Position attention module: ``gamma * PAM(x) + x`` without the N x N matrix.

    Args:
        in_dim: channels C of the input, at least 8; queries and keys have ``C // 8`` channels.
    """

    def __init__(self, in_dim: int) -> None:
        if in_dim < 8:  # C // 8 query/key channels: none below 8, and the 1x1 convolutions fail in forward
            raise ValueError(f"PAM_Module: in_dim must be >= 8 (queries and keys have in_dim // 8 "
                             f"channels), got {in_dim}")
        super().__init__(in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``gamma * PAM(x) + x`` for x of shape (B, C, H, W)."""
        if x.dim() != 4:
            raise ValueError(f"PAM_Module expects (B, C, H, W), got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        q = self.query_conv(x).flatten(2)
        k = self.key_conv(x).flatten(2)
        v = self.value_conv(x).flatten(2)
        return position_attention_residual(q, k, v, self.gamma, x.flatten(2)).reshape(b, c, h, w)


class CAM_Module(reference.CAM_Module):  # noqa: N801 - the original release's name, kept for drop-in use
    """Channel attention module: ``gamma * CAM(x) + x`` with the C x C energy in fp32.

    Args:
        in_dim: channels C of the input (kept for the original signature).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``gamma * CAM(x) + x`` for x of shape (B, C, H, W)."""
        if x.dim() != 4:
            raise ValueError(f"CAM_Module expects (B, C, H, W), got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        return channel_attention_residual(x.flatten(2), self.gamma).reshape(b, c, h, w)
