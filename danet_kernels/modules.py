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

__all__ = ["CAM_Module", "PAM_Module"]


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
        residual = x.flatten(2)
        if residual.dtype == v.dtype:
            out = position_attention(q, k, v, gamma=self.gamma, residual=residual)
        else:  # autocast gave the convs another dtype than x: add in torch, as the reference does
            out = self.gamma * position_attention(q, k, v) + residual
        return out.reshape(b, c, h, w)


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
        return channel_attention(x.flatten(2), gamma=self.gamma).reshape(b, c, h, w)
