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

ImageNet weights, two ways (``ModelConfig.pretrained_backbone``): timm's own pretrained mechanism
(``"timm"``, or ``"timm:<tag>"`` for another of timm's weights, e.g. ``"timm:tv_in1k"``,
torchvision's), which reads them from the Hugging Face cache and downloads them into it once
where huggingface.co is reachable; or a local file (:func:`danet.models.weights.load_backbone_weights`).
When neither is there, one error names both (:func:`missing_weights_message`).
"""

from __future__ import annotations

import timm
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError
from timm.models import FeatureListNet
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

__all__ = ["BACKBONES", "MULTI_GRID", "OUT_INDICES", "TIMM_WEIGHTS", "create_backbone",
           "missing_weights_message", "timm_weights_tag"]

TIMM_WEIGHTS = "timm"
"""``pretrained_backbone`` value for timm's ImageNet weights (``"timm:<tag>"``: a chosen tag)."""

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


def timm_weights_tag(pretrained_backbone: str | None) -> str | None:
    """The timm pretrained tag ``pretrained_backbone`` asks for ("" = timm's default for the
    backbone), or None when it names a local file (or nothing)."""
    if pretrained_backbone == TIMM_WEIGHTS:
        return ""
    if pretrained_backbone is not None and pretrained_backbone.startswith(TIMM_WEIGHTS + ":"):
        return pretrained_backbone[len(TIMM_WEIGHTS) + 1:]
    return None


def missing_weights_message(what: str) -> str:
    """One line naming both ways to ImageNet weights, after ``what`` went wrong."""
    return (f"{what}; ImageNet weights come either from timm (model.pretrained_backbone={TIMM_WEIGHTS} or "
            f"{TIMM_WEIGHTS}:<tag>: read from the Hugging Face cache {hub_constants.HF_HUB_CACHE}, "
            "downloaded into it once where huggingface.co is reachable) or from a local file "
            "(model.pretrained_backbone=/path/to/resnet101.pth, timm or torchvision naming)")


def _timm_pretrained(name: str, tag: str, **kwargs: object) -> FeatureListNet:
    """timm's backbone ``name`` with its pretrained weights ``tag``, through timm's own mechanism."""
    if name == "resnet_tiny":
        raise ValueError(f"the resnet_tiny backbone has no ImageNet weights (model.pretrained_backbone="
                         f"{TIMM_WEIGHTS} needs one of timm's: {', '.join(_TIMM_BACKBONES)})")
    model_name = f"{name}.{tag}" if tag else name
    if not timm.is_model_pretrained(model_name):
        raise ValueError(f"timm has no pretrained weights {model_name!r} (its tags for {name}: "
                         f"{', '.join(timm.list_pretrained(name + '.*')) or 'none'})")
    try:
        return timm.create_model(model_name, pretrained=True, features_only=True, **kwargs)
    except (OSError, HfHubHTTPError) as exc:  # not cached, and no connection (or offline mode)
        source = timm.models.get_pretrained_cfg(model_name)
        raise FileNotFoundError(missing_weights_message(
            f"timm's weights {source.hf_hub_id or source.url or model_name} are not in the Hugging Face "
            f"cache and could not be downloaded ({type(exc).__name__})")) from exc


def create_backbone(name: str, output_stride: int = 8, multi_grid: bool = False,
                    pretrained: str | None = None) -> FeatureListNet:
    """Build the dilated backbone ``name``; its forward returns [stage-3 map, stage-4 map].

    Channel counts are ``backbone.feature_info.channels()``. Weights are random, or with
    ``pretrained`` (a timm pretrained tag, "" for timm's default) timm's ImageNet weights, read
    from the Hugging Face cache or downloaded into it (module docstring). Local files of weights
    are :func:`danet.models.weights.load_backbone_weights`' job.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid ones), an output stride other
            than 8 or 16, or a pretrained tag timm does not have.
        FileNotFoundError: timm's weights are neither cached nor downloadable (names both ways).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}")
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16 for segmentation, got {output_stride}")
    options = {"output_stride": output_stride, "out_indices": OUT_INDICES}
    if pretrained is not None:
        backbone = _timm_pretrained(name, pretrained, **options)
    elif name == "resnet_tiny":
        backbone = FeatureListNet(_resnet_tiny(output_stride), out_indices=OUT_INDICES)
    else:
        backbone = timm.create_model(name, pretrained=False, features_only=True, **options)
    if multi_grid:
        # stage 4 runs at dilation 4 (OS 8) or 2 (OS 16): its stride 2 became dilation there
        _apply_multi_grid(backbone.layer4, base_dilation=32 // output_stride)
    return backbone
