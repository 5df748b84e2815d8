"""Dilated ResNet backbones from timm, returning the stage-3 and stage-4 feature maps.

timm builds every backbone (``features_only=True``): its ``output_stride`` turns the strides
of the last stages into dilations, exactly as the original DANet's dilated ResNet does
(stage 3: first block dilation 1, then 2; stage 4: first block 2, then 4 at output stride 8).

Stems. Encoding (the library DANet was released in) offers a "deep base" ResNet: three 3x3
convs 64-64-128 (``conv1.0/1/3/4/6`` in its state_dict) before the max-pool. In timm that stem
is the ``s`` variant (``stem_type='deep', stem_width=64``): ``resnet50s``/``resnet101s``/
``resnet152s``, with the same key names. The released DANet-101 checkpoint does NOT use it: the
September 2018 release's dilated ResNet has the standard 7x7 stem, and the 2020 README tests
``DANet101.pth.tar`` with ``--no-deepstem``; that is timm's plain ``resnet101``. timm's ``c``
variants (32-32-64 stem) and ``d`` variants (32-32-64 stem plus average-pool shortcuts) are
other deep stems, offered for their ImageNet weights.

Multi-grid (DeepLabv3, used by the published DANet at output stride 8): the last stage's
blocks get dilations ``base * (1, 2, 4)`` cycled over the blocks, i.e. (4, 8, 16) at output
stride 8 and (2, 4, 8) at 16. timm has no such option, so the 3x3 convs are re-dilated after
creation (padding = dilation keeps the map size); weights are unaffected.
"""

from __future__ import annotations

import timm
from timm.models import FeatureListNet
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

__all__ = ["BACKBONES", "MULTI_GRID", "OUT_INDICES", "create_backbone"]

# timm feature indices of the stage-3 (aux head input) and stage-4 (DANet head input) maps
OUT_INDICES: tuple[int, int] = (3, 4)
# multi-grid dilation multipliers of the last stage's blocks (DeepLabv3 / published DANet)
MULTI_GRID: tuple[int, ...] = (1, 2, 4)

_TIMM_BACKBONES = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnet50s", "resnet101s", "resnet152s",  # Encoding's 64-64-128 "deep base" stem
    "resnet50c", "resnet101c", "resnet152c",  # 32-32-64 deep stem
    "resnet18d", "resnet34d", "resnet50d", "resnet101d", "resnet152d",  # deep stem + avg-pool shortcut
)


def _resnet_tiny(output_stride: int) -> ResNet:
    """A very narrow basic-block ResNet: deep stem 8-8-16, one block per stage, 16-32-64-128 channels.

    Trains on two CPU cores in minutes at 64-128 px crops: the demo and the tests' backbone.
    The deep stem (timm's default stem would be a 64-channel 7x7 conv, the costliest layer at
    this width) keeps the full-resolution work small.
    """
    return ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_type="deep",
                  stem_width=8, output_stride=output_stride, num_classes=0, global_pool="")


# name -> description shown in errors and --help
BACKBONES: dict[str, str] = {name: "timm " + name for name in _TIMM_BACKBONES}
BACKBONES["resnet_tiny"] = "tiny basic-block ResNet (16-32-64-128) for CPU demos and tests"


def _apply_multi_grid(stage: nn.Sequential, base_dilation: int) -> None:
    """Re-dilate the 3x3 convs of ``stage``'s blocks to ``base_dilation * MULTI_GRID`` (cycled).

    The block's first 3x3 conv is the one whose dilation the multi-grid schedule sets
    (Bottleneck.conv2; BasicBlock.conv1, whose conv2 keeps the stage's base dilation, as in
    Encoding's BasicBlock with ``previous_dilation``).
    """
    for index, block in enumerate(stage):
        dilation = base_dilation * MULTI_GRID[index % len(MULTI_GRID)]
        if isinstance(block, Bottleneck):
            conv = block.conv2
        elif isinstance(block, BasicBlock):
            conv = block.conv1
        else:  # pragma: no cover - every supported backbone is made of these two blocks
            raise TypeError(f"multi-grid needs ResNet blocks, got {type(block).__name__}")
        conv.dilation = (dilation, dilation)
        conv.padding = (dilation, dilation)


def create_backbone(name: str, output_stride: int = 8, multi_grid: bool = False) -> FeatureListNet:
    """Build the dilated backbone ``name``; its forward returns [stage-3 map, stage-4 map].

    Channel counts are ``backbone.feature_info.channels()``. Weights are random (ImageNet
    weights come from a local file through :func:`danet.models.weights.load_backbone_weights`;
    nothing is downloaded).

    Raises:
        ValueError: unknown ``name`` (the message lists the valid ones), or an output stride
            other than 8 or 16.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}")
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16 for segmentation, got {output_stride}")
    if name == "resnet_tiny":
        backbone = FeatureListNet(_resnet_tiny(output_stride), out_indices=OUT_INDICES)
    else:
        backbone = timm.create_model(name, pretrained=False, features_only=True,
                                     output_stride=output_stride, out_indices=OUT_INDICES)
    if multi_grid:
        # stage 4 runs at dilation 4 (OS 8) or 2 (OS 16): its stride 2 became dilation there
        _apply_multi_grid(backbone.layer4, base_dilation=32 // output_stride)
    return backbone
