"""DANet's dual attention head and the auxiliary FCN head.

Attribute names and ``nn.Sequential`` layouts are the original release's (Fu et al., CVPR 2019,
``encoding/models/danet.py``), so its checkpoints load with no renaming inside the head:
``conv5a``/``conv5c`` (3x3 conv to C/4, BN, ReLU), ``sa`` (PAM_Module), ``sc`` (CAM_Module),
``conv51``/``conv52`` (3x3 conv, BN, ReLU), ``conv6``/``conv7``/``conv8`` (Dropout2d(0.1), 1x1
conv) on the PAM branch, the CAM branch and their sum; the auxiliary head is Encoding's
``FCNHead`` (``auxlayer.conv5.{0,1,4}``).
"""

from __future__ import annotations

import torch
from torch import nn

import danet_kernels
from danet_kernels import reference

__all__ = ["ATTENTION_IMPLEMENTATIONS", "DANetHead", "FCNHead"]

# attention= value -> module pair; both pairs have identical parameters and state_dict keys
ATTENTION_IMPLEMENTATIONS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "fused": (danet_kernels.PAM_Module, danet_kernels.CAM_Module),
    "reference": (reference.PAM_Module, reference.CAM_Module),
}


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv (no bias: BN follows), BN, ReLU: indices 0, 1, 2 as in the original."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _classifier(in_channels: int, nclass: int) -> nn.Sequential:
    """Dropout2d(0.1) then a 1x1 conv to the class logits: indices 0, 1 as in the original."""
    return nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(in_channels, nclass, 1))


class DANetHead(nn.Module):
    """Position and channel attention branches on the last backbone stage.

    Args:
        in_channels: channels C of the backbone's last stage (2048 for ResNet-50/101/152);
            both branches work at C/4.
        nclass: number of classes.
        attention: "fused" (danet_kernels' modules) or "reference" (the bmm modules).
    """

    def __init__(self, in_channels: int, nclass: int, attention: str = "fused") -> None:
        super().__init__()
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"unknown attention {attention!r}; choose from "
                             f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
        if in_channels < 32 or in_channels % 32:
            # C/4 channels, then C/32 query/key channels in PAM: both must be whole and non-zero
            raise ValueError(f"DANetHead needs in_channels divisible by 32, got {in_channels}")
        inter_channels = in_channels // 4
        pam_cls, cam_cls = ATTENTION_IMPLEMENTATIONS[attention]
        self.conv5a = _conv_bn_relu(in_channels, inter_channels)
        self.conv5c = _conv_bn_relu(in_channels, inter_channels)
        self.sa = pam_cls(inter_channels)
        self.sc = cam_cls(inter_channels)
        self.conv51 = _conv_bn_relu(inter_channels, inter_channels)
        self.conv52 = _conv_bn_relu(inter_channels, inter_channels)
        self.conv6 = _classifier(inter_channels, nclass)
        self.conv7 = _classifier(inter_channels, nclass)
        self.conv8 = _classifier(inter_channels, nclass)

    def forward(self, x: torch.Tensor, all_outputs: bool = False) -> tuple[torch.Tensor, ...]:
        """Return (sum, pam, cam) logits at feature resolution in training or when ``all_outputs``;
        (sum,) in eval otherwise (the PAM and CAM classifiers are then not run)."""
        sa_conv = self.conv51(self.sa(self.conv5a(x)))
        sc_conv = self.conv52(self.sc(self.conv5c(x)))
        sum_logits = self.conv8(sa_conv + sc_conv)
        if not (self.training or all_outputs):  # inference needs only the fused prediction
            return (sum_logits,)
        return sum_logits, self.conv6(sa_conv), self.conv7(sc_conv)


class FCNHead(nn.Module):
    """Auxiliary FCN head: 3x3 conv to C/4, BN, ReLU, Dropout2d(0.1), 1x1 conv (Encoding's layout).

    Args:
        in_channels: channels of the feature map it reads (the third backbone stage).
        nclass: number of classes.
    """

    def __init__(self, in_channels: int, nclass: int) -> None:
        super().__init__()
        inter_channels = in_channels // 4
        self.conv5 = nn.Sequential(
            nn.Conv2d(in_channels, inter_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(inter_channels),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.1),
            nn.Conv2d(inter_channels, nclass, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the auxiliary logits at feature resolution."""
        return self.conv5(x)
