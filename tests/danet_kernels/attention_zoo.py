"""Attention modules as other code bases write them, for tests/danet_kernels/test_convert.py.

Transcriptions (only what the tests need; attribute names, registration order and arithmetic
kept as in the source, the code restyled):

* the original DANet release's PAM_Module / CAM_Module, with their ``softmax`` child:
  junfu1115/DANet ``encoding/nn/da_att.py`` @ 766c34e6c3553a1f9754dcd29f286055bb5300ad;
* SAGAN's ``Self_Attn`` (``query_conv``, ``key_conv``, ``value_conv``, ``gamma``, ``softmax``;
  returns ``(out, attention)``): heykeetae/Self-Attention-GAN ``sagan_models.py`` (master),
  and the common copy that returns ``out`` alone with children named query/key/value;
* mmsegmentation's DAHead ``PAM`` (on ``SelfAttentionBlock``) and ``CAM``, with mmcv's ``Scale``:
  open-mmlab/mmsegmentation ``mmseg/models/decode_heads/da_head.py`` @
  94f9cb4e1dbffa13323dde65ce13b8af61e5ff07 and ``mmseg/models/utils/self_attention_block.py``
  @ 50546da85c96c6bb2cf386f179215ab54f82a3e3 (``build_project`` without ConvModule, the branch
  DAHead's PAM takes), ``mmcv/cnn/bricks/scale.py`` @ a8073c74bf83d62ec36a103f835faa4837fb6585;
* mmcv's ``NonLocal2d`` (embedded Gaussian, ``use_scale``, ``sub_sample``) with the part of
  ``ConvModule`` it uses (a conv, an optional norm; no activation): open-mmlab/mmcv
  ``mmcv/cnn/bricks/non_local.py`` @ a8073c74bf83d62ec36a103f835faa4837fb6585;
* the Non-local_pytorch layout (AlexHex7/Non-local_pytorch, copied widely): ``g``, ``theta``,
  ``phi`` and the output projection ``W``, no scale and no flag that says so (this one as
  lizhihao6/MMCompression_open ``mmcomp/models/utils/non_local.py`` writes it).

Look-alikes: modules with the same parts that compute something else; convert must leave them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - as the sources write it
from torch import nn

# ---------------------------------------------------------------------------- the DANet release


class ReleasePAM(nn.Module):
    """The release's PAM_Module (named otherwise: convert must not rely on class names)."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.chanel_in = in_dim
        self.query_conv = nn.Conv2d(in_channels=in_dim, out_channels=in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_channels=in_dim, out_channels=in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_channels=in_dim, out_channels=in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        m_batchsize, C, height, width = x.size()
        proj_query = self.query_conv(x).view(m_batchsize, -1, width * height).permute(0, 2, 1)
        proj_key = self.key_conv(x).view(m_batchsize, -1, width * height)
        energy = torch.bmm(proj_query, proj_key)
        attention = self.softmax(energy)
        proj_value = self.value_conv(x).view(m_batchsize, -1, width * height)
        out = torch.bmm(proj_value, attention.permute(0, 2, 1))
        out = out.view(m_batchsize, C, height, width)
        out = self.gamma * out + x
        return out


class ReleaseCAM(nn.Module):
    """The release's CAM_Module."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.chanel_in = in_dim
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        m_batchsize, C, height, width = x.size()
        proj_query = x.view(m_batchsize, C, -1)
        proj_key = x.view(m_batchsize, C, -1).permute(0, 2, 1)
        energy = torch.bmm(proj_query, proj_key)
        energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
        attention = self.softmax(energy_new)
        proj_value = x.view(m_batchsize, C, -1)
        out = torch.bmm(attention, proj_value)
        out = out.view(m_batchsize, C, height, width)
        out = self.gamma * out + x
        return out


# ---------------------------------------------------------------------------- SAGAN


class SelfAttn(nn.Module):
    """SAGAN's Self_Attn: PAM's computation, returning the N x N attention map too."""

    def __init__(self, in_dim: int, activation: str = "relu") -> None:
        super().__init__()
        self.chanel_in = in_dim
        self.activation = activation
        self.query_conv = nn.Conv2d(in_channels=in_dim, out_channels=in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_channels=in_dim, out_channels=in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_channels=in_dim, out_channels=in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        m_batchsize, C, width, height = x.size()
        proj_query = self.query_conv(x).view(m_batchsize, -1, width * height).permute(0, 2, 1)
        proj_key = self.key_conv(x).view(m_batchsize, -1, width * height)
        energy = torch.bmm(proj_query, proj_key)
        attention = self.softmax(energy)
        proj_value = self.value_conv(x).view(m_batchsize, -1, width * height)
        out = torch.bmm(proj_value, attention.permute(0, 2, 1))
        out = out.view(m_batchsize, C, width, height)
        out = self.gamma * out + x
        return out, attention


class SelfAttention(nn.Module):
    """The common SAGAN copy: children query/key/value, gamma registered last, ``out`` alone."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(in_channels, in_channels // 8, 1)
        self.key = nn.Conv2d(in_channels, in_channels // 8, 1)
        self.value = nn.Conv2d(in_channels, in_channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        batch_size, channels, height, width = x.size()
        query = self.query(x).view(batch_size, -1, height * width).permute(0, 2, 1)
        key = self.key(x).view(batch_size, -1, height * width)
        attention = torch.softmax(torch.bmm(query, key), dim=-1)
        value = self.value(x).view(batch_size, -1, height * width)
        out = torch.bmm(value, attention.permute(0, 2, 1)).view(batch_size, channels, height, width)
        return self.gamma * out + x


# ---------------------------------------------------------------------------- mmsegmentation / mmcv


class Scale(nn.Module):
    """mmcv's Scale: a learnable scalar (a 0-dim parameter)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float))

    def forward(self, x):
        return x * self.scale


class SelfAttentionBlock(nn.Module):
    """mmseg's SelfAttentionBlock, the configuration DAHead's PAM uses (plain 1x1 convs, one each)."""

    def __init__(self, key_in_channels, query_in_channels, channels, out_channels, share_key_query,
                 query_downsample, key_downsample, key_query_num_convs, value_out_num_convs,
                 key_query_norm, value_out_norm, matmul_norm, with_out, conv_cfg, norm_cfg, act_cfg):
        super().__init__()
        assert not (share_key_query or key_query_norm or value_out_norm or with_out)
        assert key_query_num_convs == value_out_num_convs == 1
        self.key_in_channels = key_in_channels
        self.query_in_channels = query_in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.share_key_query = share_key_query
        self.conv_cfg = conv_cfg
        self.norm_cfg = norm_cfg
        self.act_cfg = act_cfg
        self.key_project = nn.Conv2d(key_in_channels, channels, 1)
        self.query_project = nn.Conv2d(query_in_channels, channels, 1)
        self.value_project = nn.Conv2d(key_in_channels, out_channels, 1)
        self.out_project = None
        self.query_downsample = query_downsample
        self.key_downsample = key_downsample
        self.matmul_norm = matmul_norm

    def forward(self, query_feats, key_feats):
        batch_size = query_feats.size(0)
        query = self.query_project(query_feats)
        if self.query_downsample is not None:
            query = self.query_downsample(query)
        query = query.reshape(*query.shape[:2], -1)
        query = query.permute(0, 2, 1).contiguous()

        key = self.key_project(key_feats)
        value = self.value_project(key_feats)
        if self.key_downsample is not None:
            key = self.key_downsample(key)
            value = self.key_downsample(value)
        key = key.reshape(*key.shape[:2], -1)
        value = value.reshape(*value.shape[:2], -1)
        value = value.permute(0, 2, 1).contiguous()

        sim_map = torch.matmul(query, key)
        if self.matmul_norm:
            sim_map = (self.channels**-.5) * sim_map
        sim_map = F.softmax(sim_map, dim=-1)

        context = torch.matmul(sim_map, value)
        context = context.permute(0, 2, 1).contiguous()
        context = context.reshape(batch_size, -1, *query_feats.shape[2:])
        if self.out_project is not None:
            context = self.out_project(context)
        return context


class MmsegPAM(SelfAttentionBlock):
    """mmseg DAHead's PAM."""

    def __init__(self, in_channels: int, channels: int, matmul_norm: bool = False) -> None:
        super().__init__(key_in_channels=in_channels, query_in_channels=in_channels, channels=channels,
                         out_channels=in_channels, share_key_query=False, query_downsample=None,
                         key_downsample=None, key_query_num_convs=1, key_query_norm=False,
                         value_out_num_convs=1, value_out_norm=False, matmul_norm=matmul_norm,
                         with_out=False, conv_cfg=None, norm_cfg=None, act_cfg=None)
        self.gamma = Scale(0)

    def forward(self, x):
        out = super().forward(x, x)
        out = self.gamma(out) + x
        return out


class MmsegCAM(nn.Module):
    """mmseg DAHead's CAM."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = Scale(0)

    def forward(self, x):
        batch_size, channels, height, width = x.size()
        proj_query = x.view(batch_size, channels, -1)
        proj_key = x.view(batch_size, channels, -1).permute(0, 2, 1)
        energy = torch.bmm(proj_query, proj_key)
        energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
        attention = F.softmax(energy_new, dim=-1)
        proj_value = x.view(batch_size, channels, -1)
        out = torch.bmm(attention, proj_value)
        out = out.view(batch_size, channels, height, width)
        out = self.gamma(out) + x
        return out


class ConvModule(nn.Module):
    """The part of mmcv's ConvModule NonLocal2d uses: a conv, then an optional norm (act_cfg=None)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=not norm)
        self.norm = nn.BatchNorm2d(out_channels) if norm else None

    def forward(self, x):
        x = self.conv(x)
        return self.norm(x) if self.norm is not None else x


class NonLocal2d(nn.Module):
    """mmcv's NonLocal2d in 'embedded_gaussian' mode (its _NonLocalNd's parts that mode uses)."""

    def __init__(self, in_channels: int, reduction: int = 2, use_scale: bool = True,
                 sub_sample: bool = False, norm: bool = False, mode: str = "embedded_gaussian") -> None:
        super().__init__()
        self.in_channels = in_channels
        self.reduction = reduction
        self.use_scale = use_scale
        self.inter_channels = max(in_channels // reduction, 1)
        self.mode = mode
        self.g = ConvModule(self.in_channels, self.inter_channels, kernel_size=1)
        self.conv_out = ConvModule(self.inter_channels, self.in_channels, kernel_size=1, norm=norm)
        self.theta = ConvModule(self.in_channels, self.inter_channels, kernel_size=1)
        self.phi = ConvModule(self.in_channels, self.inter_channels, kernel_size=1)
        nn.init.zeros_(self.conv_out.norm.weight if norm else self.conv_out.conv.weight)  # zeros_init
        self.sub_sample = sub_sample
        if sub_sample:
            max_pool_layer = nn.MaxPool2d(kernel_size=(2, 2))
            self.g = nn.Sequential(self.g, max_pool_layer)
            self.phi = nn.Sequential(self.phi, max_pool_layer)

    def embedded_gaussian(self, theta_x, phi_x):
        pairwise_weight = torch.matmul(theta_x, phi_x)
        if self.use_scale:
            pairwise_weight /= theta_x.shape[-1]**0.5
        pairwise_weight = pairwise_weight.softmax(dim=-1)
        return pairwise_weight

    def dot_product(self, theta_x, phi_x):
        pairwise_weight = torch.matmul(theta_x, phi_x)
        pairwise_weight /= pairwise_weight.shape[-1]
        return pairwise_weight

    def forward(self, x):
        n = x.size(0)
        g_x = self.g(x).view(n, self.inter_channels, -1)
        g_x = g_x.permute(0, 2, 1)
        theta_x = self.theta(x).view(n, self.inter_channels, -1)
        theta_x = theta_x.permute(0, 2, 1)
        phi_x = self.phi(x).view(n, self.inter_channels, -1)
        pairwise_func = getattr(self, self.mode)
        pairwise_weight = pairwise_func(theta_x, phi_x)
        y = torch.matmul(pairwise_weight, g_x)
        y = y.permute(0, 2, 1).contiguous().reshape(n, self.inter_channels, *x.size()[2:])
        output = x + self.conv_out(y)
        return output


class NonLocalBlock(nn.Module):
    """The Non-local_pytorch layout: plain 1x1 convs, softmax without a scale, output ``W``."""

    def __init__(self, in_channel: int, out_channel: int) -> None:
        super().__init__()
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.g = nn.Conv2d(self.in_channel, self.out_channel, 1, 1, 0)
        self.theta = nn.Conv2d(self.in_channel, self.out_channel, 1, 1, 0)
        self.phi = nn.Conv2d(self.in_channel, self.out_channel, 1, 1, 0)
        self.W = nn.Conv2d(self.out_channel, self.in_channel, 1, 1, 0)
        nn.init.constant_(self.W.weight, 0)
        nn.init.constant_(self.W.bias, 0)

    def forward(self, x):
        batch_size = x.size(0)
        g_x = self.g(x).view(batch_size, self.out_channel, -1)
        g_x = g_x.permute(0, 2, 1)
        theta_x = self.theta(x).view(batch_size, self.out_channel, -1)
        theta_x = theta_x.permute(0, 2, 1)
        phi_x = self.phi(x).view(batch_size, self.out_channel, -1)
        f1 = torch.matmul(theta_x, phi_x)
        f_div_C = torch.softmax(f1, dim=-1)
        y = torch.matmul(f_div_C, g_x)
        y = y.permute(0, 2, 1).contiguous()
        y = y.view(batch_size, self.out_channel, *x.size()[2:])
        W_y = self.W(y)
        z = W_y + x
        return z


# ---------------------------------------------------------------------------- look-alikes


class SoftmaxOverQueries(ReleasePAM):
    """PAM's parts, but the softmax normalises over the queries (dim 1), not the keys."""

    def forward(self, x):
        b, c, h, w = x.size()
        energy = torch.bmm(self.query_conv(x).view(b, -1, h * w).permute(0, 2, 1),
                           self.key_conv(x).view(b, -1, h * w))
        attention = torch.softmax(energy, dim=1)
        out = torch.bmm(self.value_conv(x).view(b, -1, h * w), attention.permute(0, 2, 1))
        return self.gamma * out.view(b, c, h, w) + x


class SoftmaxChildOverQueries(ReleasePAM):
    """A copy whose softmax child runs over dim 1 (a real SAGAN copy does this)."""

    def __init__(self, in_dim: int) -> None:
        super().__init__(in_dim)
        self.softmax = nn.Softmax(dim=1)


class ScaledEnergy(ReleasePAM):
    """PAM with an extra normalisation: energies divided by sqrt(d) (a transformer's habit)."""

    def forward(self, x):
        b, c, h, w = x.size()
        q = self.query_conv(x).view(b, -1, h * w)
        energy = torch.bmm(q.permute(0, 2, 1), self.key_conv(x).view(b, -1, h * w)) / q.shape[1] ** 0.5
        out = torch.bmm(self.value_conv(x).view(b, -1, h * w), self.softmax(energy).permute(0, 2, 1))
        return self.gamma * out.view(b, c, h, w) + x


class AttentionDropout(ReleasePAM):
    """PAM with dropout on the attention matrix: not what the fused kernel computes in training."""

    def __init__(self, in_dim: int) -> None:
        super().__init__(in_dim)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        b, c, h, w = x.size()
        energy = torch.bmm(self.query_conv(x).view(b, -1, h * w).permute(0, 2, 1),
                           self.key_conv(x).view(b, -1, h * w))
        attention = self.dropout(self.softmax(energy))
        out = torch.bmm(self.value_conv(x).view(b, -1, h * w), attention.permute(0, 2, 1))
        return self.gamma * out.view(b, c, h, w) + x


class FunctionalAttentionDropout(ReleasePAM):
    """PAM with dropout on the attention written as a function call: the same parts, other results
    in training (and it draws from the global random generator)."""

    def forward(self, x):
        b, c, h, w = x.size()
        energy = torch.bmm(self.query_conv(x).view(b, -1, h * w).permute(0, 2, 1),
                           self.key_conv(x).view(b, -1, h * w))
        attention = F.dropout(self.softmax(energy), 0.1, self.training)
        out = torch.bmm(self.value_conv(x).view(b, -1, h * w), attention.permute(0, 2, 1))
        return self.gamma * out.view(b, c, h, w) + x


class CAMWithoutRowmax(ReleaseCAM):
    """CAM's parts, softmax of the energy itself (no rowmax - energy): the opposite ranking."""

    def forward(self, x):
        b, c, h, w = x.size()
        flat = x.view(b, c, -1)
        attention = self.softmax(torch.bmm(flat, flat.permute(0, 2, 1)))
        return self.gamma * torch.bmm(attention, flat).view(b, c, h, w) + x


class CAMTransposed(ReleaseCAM):
    """CAM applying the transposed attention (columns, not rows, sum to one)."""

    def forward(self, x):
        b, c, h, w = x.size()
        flat = x.view(b, c, -1)
        energy = torch.bmm(flat, flat.permute(0, 2, 1))
        attention = self.softmax(torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy)
        return self.gamma * torch.bmm(attention.transpose(1, 2), flat).view(b, c, h, w) + x


class CAMNormalised(ReleaseCAM):
    """CAM on L2-normalised channels (an extra normalisation of the energy)."""

    def forward(self, x):
        b, c, h, w = x.size()
        flat = x.view(b, c, -1)
        unit = F.normalize(flat, dim=-1)
        energy = torch.bmm(unit, unit.permute(0, 2, 1))
        attention = self.softmax(torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy)
        return self.gamma * torch.bmm(attention, flat).view(b, c, h, w) + x


class TemperatureScale(nn.Module):
    """A lone learnable scalar named gamma: no attention at all."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.gamma
