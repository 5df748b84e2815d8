"""Typed configuration: the one place where defaults live.

Every command (train, eval, predict, attention) reads its options from these dataclasses;
YAML presets (``danet/configs/*.yaml``) and command-line flags only override fields.
Sections:

* :class:`ModelConfig`: the network (backbone, output stride, attention implementation).
* :class:`DataConfig`: the dataset and its transforms.
* :class:`EvalConfig`: inference mode (whole, sliding, multi-scale).
* the training sections (optimiser, schedule, run) are defined below them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """The network: DANet on a dilated ResNet."""

    backbone: str = "resnet101"
    output_stride: int = 8
    multi_grid: bool = False
    attention: str = "fused"  # "fused" (danet_kernels) or "reference" (bmm modules)
    aux: bool = False  # auxiliary FCN head on the third stage
    pretrained_backbone: str | None = None  # local file of ImageNet weights (timm/torchvision)


@dataclass
class DataConfig:
    """The dataset and its transforms."""

    dataset: str = "synthetic"
    root: str | None = None
    base_size: int = 520
    crop_size: int = 480
    ignore_index: int = 255
    workers: int = 2
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class EvalConfig:
    """How validation and ``danet eval`` run inference."""

    mode: str = "whole"  # "whole", "sliding" or "multiscale"
    crop_size: int | None = None  # sliding-window crop; None: DataConfig.crop_size
    stride_ratio: float = 2.0 / 3.0  # the published sliding stride: 2/3 of the crop
    scales: tuple[float, ...] = (0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
    flip: bool = True
    batch_size: int = 1
    checkpoint: str | None = None
