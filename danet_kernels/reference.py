"""The plain bmm implementation of DANet's attention modules: the oracle.

Written from the published semantics (Fu et al., "Dual Attention Network for Scene
Segmentation", CVPR 2019), the same way the original release computes them: two
``torch.bmm`` calls around a softmax, materialising the N x N (PAM) or C x C (CAM)
attention matrix. Tests and benchmarks compare every other backend with these
functions; they are deliberately naive and must stay that way.

Position attention (PAM), with q of shape (B, d, N), k of shape (B, d, M) and v of shape
(B, C, M) (M = N in DANet; non-local blocks may pool the keys, M < N)::

    energy[b, i, j] = scale * sum_d q[b, d, i] * k[b, d, j]   (scale = 1 in DANet: no 1/sqrt(d))
    attention       = softmax(energy, dim=-1)
    out[b, c, i]    = sum_j v[b, c, j] * attention[b, i, j]

Channel attention (CAM), with x of shape (B, C, N)::

    energy    = x @ x^T                                    (B, C, C)
    attention = softmax(rowmax(energy) - energy, dim=-1)
    out       = attention @ x

Both modules return ``gamma * out + x`` with a learnable scalar ``gamma`` initialised
to zero.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "CAM_Module",
    "PAM_Module",
    "channel_attention_reference",
    "position_attention_reference",
]


def position_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """PAM's attention output ``v @ softmax(scale * q^T k)^T`` for q (B, d, N), k (B, d, M) and
    v (B, C, M).

    Materialises the (B, N, M) attention matrix, exactly as the original module does (which has
    scale = 1 and M = N). Returns a tensor of shape (B, C, N).
    """
    energy = torch.bmm(q.transpose(1, 2), k)  # (B, N, M)
    if scale != 1.0:
        energy = energy * scale
    attention = torch.softmax(energy, dim=-1)
    return torch.bmm(v, attention.transpose(1, 2))  # (B, C, N)


def channel_attention_reference(x: torch.Tensor) -> torch.Tensor:
    """CAM's attention output ``softmax(rowmax(x x^T) - x x^T) @ x`` for x of shape (B, C, N).

    Keeps the published model's inverted ranking (rowmax - energy). Returns (B, C, N).
    """
    energy = torch.bmm(x, x.transpose(1, 2))  # (B, C, C)
    energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
    attention = torch.softmax(energy_new, dim=-1)
    return torch.bmm(attention, x)


class PAM_Module(nn.Module):  # noqa: N801 - the original release's name, kept for drop-in use
    """Position attention module of DANet, the reference bmm implementation.

    Args:
        in_dim: channels C of the input feature map; the query/key dim is ``C // 8``.
    """

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.chanel_in = in_dim
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``gamma * PAM(x) + x`` for x of shape (B, C, H, W)."""
        b, c, h, w = x.shape
        q = self.query_conv(x).view(b, -1, h * w)
        k = self.key_conv(x).view(b, -1, h * w)
        v = self.value_conv(x).view(b, -1, h * w)
        out = position_attention_reference(q, k, v).view(b, c, h, w)
        return self.gamma * out + x

    def extra_repr(self) -> str:
        return f"in_dim={self.chanel_in}"


class CAM_Module(nn.Module):  # noqa: N801 - the original release's name, kept for drop-in use
    """Channel attention module of DANet, the reference bmm implementation.

    Args:
        in_dim: channels C of the input feature map (kept for the original signature).
    """

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.chanel_in = in_dim
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``gamma * CAM(x) + x`` for x of shape (B, C, H, W)."""
        b, c, h, w = x.shape
        out = channel_attention_reference(x.reshape(b, c, h * w)).view(b, c, h, w)
        return self.gamma * out + x

    def extra_repr(self) -> str:
        return f"in_dim={self.chanel_in}"
