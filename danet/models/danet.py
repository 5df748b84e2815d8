"""DANet: a dilated ResNet with the dual attention head (Fu et al., CVPR 2019).

Layout follows timm: the :class:`DANet` module, a private builder, tiny registered entry points
(``danet_resnet101``, ...) and :func:`create_model`, which rejects unknown names. The
dataclass route is :func:`build_model` (``ModelConfig`` -> model), used by every command;
:func:`build_from_checkpoint` and :func:`load_model` build the model a checkpoint describes.
Reading and renaming weights is :mod:`danet.models.weights`' job; it never imports this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from danet.config import ModelConfig
from danet.models.backbone import create_backbone
from danet.models.head import DANetHead, FCNHead
from danet.models.weights import (
    PUBLISHED_MODEL_CONFIG,
    Checkpoint,
    load_backbone_weights,
    load_checkpoint_into,
    model_config_from,
    num_classes_in,
    read_checkpoint,
)

__all__ = ["DANet", "build_from_checkpoint", "build_model", "create_model", "list_models", "load_model",
           "register_model"]


def _upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with align_corners=True, as the published model upsamples its outputs."""
    return functional.interpolate(logits, size=size, mode="bilinear", align_corners=True)


class DANet(nn.Module):
    """Dual Attention Network for scene segmentation.

    Args:
        nclass: number of classes.
        backbone: a name from :data:`danet.models.backbone.BACKBONES` ("resnet101" is the
            released model's; "resnet101s" has Encoding's deep stem; "resnet_tiny" is for CPUs).
        output_stride: 8 (published) or 16.
        attention: "fused" (danet_kernels) or "reference" (bmm modules); same state_dict.
        aux: add the auxiliary FCN head on the third stage (training output gains a 4th logit).
        multi_grid: dilate the last stage's blocks by (1, 2, 4) x its dilation.
        pretrained_backbone: local file of ImageNet weights (timm or torchvision naming) for
            the backbone, or None for random weights. Nothing is ever downloaded.

    ``forward(x)`` returns, in training mode, ``(sum, pam, cam[, aux])`` logits and, in eval
    mode, the sum logits alone; every logit map is (B, nclass, H, W), upsampled to the input.
    ``forward(x, head_outputs=True)`` returns ``(sum, pam, cam)`` in eval mode too, as the
    original release's model always does (code written for it indexes ``model(x)[0]``); the
    PAM-only and CAM-only predictions are the paper's ablation.
    """

    def __init__(self, nclass: int, backbone: str = "resnet101", output_stride: int = 8,
                 attention: str = "fused", aux: bool = False, multi_grid: bool = False,
                 pretrained_backbone: str | None = None) -> None:
        super().__init__()
        if nclass < 1:
            raise ValueError(f"nclass must be >= 1, got {nclass}")
        self.nclass = nclass
        self.backbone = create_backbone(backbone, output_stride=output_stride, multi_grid=multi_grid)
        if pretrained_backbone is not None:
            load_backbone_weights(self.backbone, pretrained_backbone)
        stage3_channels, stage4_channels = self.backbone.feature_info.channels()
        self.head = DANetHead(stage4_channels, nclass, attention=attention)
        self.auxlayer = FCNHead(stage3_channels, nclass) if aux else None

    def forward(self, x: torch.Tensor, head_outputs: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Segment ``x`` (B, 3, H, W): see the class docstring for what is returned."""
        size = (x.shape[-2], x.shape[-1])
        stage3, stage4 = self.backbone(x)
        outputs = [_upsample(logits, size) for logits in self.head(stage4, all_outputs=head_outputs)]
        if not self.training:
            return tuple(outputs) if head_outputs else outputs[0]
        if self.auxlayer is not None:
            outputs.append(_upsample(self.auxlayer(stage3), size))
        return tuple(outputs)

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Return (backbone parameters, head parameters), the latter including the aux head.

        The published recipe trains the freshly initialised heads at 10x the backbone's LR.
        """
        head = [p for name, p in self.named_parameters() if not name.startswith("backbone.")]
        return list(self.backbone.parameters()), head


_MODEL_ENTRYPOINTS: dict[str, Callable[..., DANet]] = {}


def register_model(fn: Callable[..., DANet]) -> Callable[..., DANet]:
    """Register ``fn`` under its function name for :func:`create_model` (timm style)."""
    if fn.__name__ in _MODEL_ENTRYPOINTS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODEL_ENTRYPOINTS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_MODEL_ENTRYPOINTS)


def create_model(name: str, nclass: int, **kwargs: object) -> DANet:
    """Build the registered model ``name``; ``None`` keyword values fall back to the defaults.

    Raises:
        ValueError: unknown ``name`` (the message lists the registered ones).
    """
    if name not in _MODEL_ENTRYPOINTS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _MODEL_ENTRYPOINTS[name](nclass, **{k: v for k, v in kwargs.items() if v is not None})


def _create_danet(backbone: str, nclass: int, **kwargs: object) -> DANet:
    return DANet(nclass, backbone=backbone, **kwargs)


@register_model
def danet_resnet_tiny(nclass: int, **kwargs: object) -> DANet:
    """DANet on the tiny CPU backbone."""
    return _create_danet("resnet_tiny", nclass, **kwargs)


@register_model
def danet_resnet50(nclass: int, **kwargs: object) -> DANet:
    """DANet on ResNet-50 (timm's standard stem)."""
    return _create_danet("resnet50", nclass, **kwargs)


@register_model
def danet_resnet101(nclass: int, **kwargs: object) -> DANet:
    """The released DANet-101: ResNet-101 (standard stem), multi-grid (4, 8, 16) at output stride 8."""
    return _create_danet("resnet101", nclass, **{"multi_grid": True, **kwargs})


@register_model
def danet_resnet101s(nclass: int, **kwargs: object) -> DANet:
    """DANet on ResNet-101 with Encoding's 64-64-128 deep stem, multi-grid at output stride 8."""
    return _create_danet("resnet101s", nclass, **{"multi_grid": True, **kwargs})


@register_model
def danet_resnet152(nclass: int, **kwargs: object) -> DANet:
    """DANet on ResNet-152 (timm's standard stem)."""
    return _create_danet("resnet152", nclass, **kwargs)


def build_model(cfg: ModelConfig, nclass: int) -> DANet:
    """Build the model a :class:`~danet.config.ModelConfig` describes, for ``nclass`` classes."""
    return DANet(nclass, backbone=cfg.backbone, output_stride=cfg.output_stride, attention=cfg.attention,
                 aux=cfg.aux, multi_grid=cfg.multi_grid, pretrained_backbone=cfg.pretrained_backbone)


def build_from_checkpoint(checkpoint: Checkpoint, nclass: int | None = None,
                          overrides: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the DANet ``checkpoint`` describes and load its weights.

    The architecture is, field by field: ``overrides`` (non-None values, e.g. command-line
    flags), else the checkpoint's stored ModelConfig, else the ModelConfig defaults; a
    checkpoint in the original release's naming carries no config and gets the published
    architecture (:data:`PUBLISHED_MODEL_CONFIG`). The number of classes comes from ``nclass``
    when given (a mismatch with the checkpoint is an error), else from its classifier.

    Raises:
        ValueError: unknown backbone or option, or a checkpoint that does not fit.
    """
    cfg = model_config_from(checkpoint.config) or (
        dataclasses.replace(PUBLISHED_MODEL_CONFIG) if checkpoint.original_naming else ModelConfig())
    cfg.pretrained_backbone = None
    for key, value in (overrides or {}).items():
        if value is not None:
            if not hasattr(cfg, key):
                raise ValueError(f"unknown model option {key!r}")
            setattr(cfg, key, value)
    model = build_model(cfg, nclass if nclass is not None else num_classes_in(checkpoint.state_dict))
    load_checkpoint_into(model, checkpoint)
    return model


def load_model(path: str | Path, nclass: int | None = None,
               overrides: Mapping[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any] | None]:
    """Read checkpoint ``path`` and :func:`build_from_checkpoint`; returns (model, stored config).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, unknown backbone, or a checkpoint that does not fit.
    """
    checkpoint = read_checkpoint(path)
    return build_from_checkpoint(checkpoint, nclass, overrides), checkpoint.config
