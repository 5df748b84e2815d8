"""Inference modes: whole image, sliding window, multi-scale with horizontal flip.

All modes return logits averaged over every prediction that covers a pixel:

* ``whole``: one forward pass over the full image.
* ``sliding``: ``crop_size`` x ``crop_size`` windows every ``int(crop_size * stride_ratio)``
  pixels (the published test used a 2/3 stride). The last window of a row or column is
  aligned to the image border and a side shorter than the crop gets one window of the full
  side (mmsegmentation's ``slide_inference``), so windows never leave the image and no
  padding value leaks into the logits; where the crop covers the image, sliding is exactly
  ``whole``. Overlaps are averaged through a per-pixel count map.
* ``multiscale``: the image is resized by each scale (relative to its own size, bilinear,
  align_corners=True as the release's ``resize_image``), predicted whole when the scaled
  image fits in the crop and by sliding windows otherwise, and the logits are resized back.

With ``flip``, every prediction is also made on the horizontally flipped input and flipped
back. Logits are averaged (the mean, so the result stays on a single pass's scale). The
published ``MultiEvalModule`` sums, over scales, ``exp`` of the flip-summed logits instead
(unnormalised probabilities), which lets one confident pass dominate; averaging logits
weighs every scale and flip equally, and the argmax of the two can differ only where the
passes disagree. Unlike the release,
windows are never padded (see "sliding").
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from danet.config import DataConfig, EvalConfig, ModelConfig
from danet.models.backbone import BACKBONES

__all__ = [
    "MODES",
    "CommandSetup",
    "add_inference_arguments",
    "add_model_arguments",
    "predict_logits",
    "run_inference",
    "setup_from_args",
    "sliding_window_starts",
]

MODES: tuple[str, ...] = ("whole", "sliding", "multiscale")


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if (x.shape[-2], x.shape[-1]) == size:
        return x
    return functional.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _accumulation_dtype(images: torch.Tensor) -> torch.dtype:
    """float32 (half-precision logits are summed in float32), float64 for float64 inputs."""
    return torch.promote_types(images.dtype, torch.float32)


def _forward(model: nn.Module, images: torch.Tensor, num_classes: int, flip: bool) -> torch.Tensor:
    """Logits of one pass, plus the flipped pass when ``flip`` (summed, not averaged)."""
    logits = _checked(model(images), images, num_classes)
    if flip:
        logits = logits + _checked(model(images.flip(-1)), images, num_classes).flip(-1)
    return logits


def _checked(output: torch.Tensor | Sequence[torch.Tensor], images: torch.Tensor,
             num_classes: int) -> torch.Tensor:
    if isinstance(output, (tuple, list)):  # a model in training mode: the first output is the sum
        output = output[0]
    expected = (images.shape[0], num_classes, images.shape[-2], images.shape[-1])
    if tuple(output.shape) != expected:
        raise ValueError(f"model returned logits of shape {tuple(output.shape)}, expected {expected} "
                         f"(num_classes={num_classes})")
    return output.to(_accumulation_dtype(images))


def sliding_window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the windows along one side of ``length`` pixels.

    Windows are ``min(crop, length)`` long, ``stride`` apart, the last one ending at the border.
    """
    if length <= crop:
        return [0]
    count = (length - crop + stride - 1) // stride + 1
    return [min(i * stride, length - crop) for i in range(count)]


def _sliding(model: nn.Module, images: torch.Tensor, num_classes: int, crop_size: int, stride: int,
             flip: bool) -> torch.Tensor:
    """Sum over flips of the window-averaged logits (the caller divides by the flip count)."""
    b, _, h, w = images.shape
    logits = images.new_zeros((b, num_classes, h, w), dtype=_accumulation_dtype(images))
    count = images.new_zeros((1, 1, h, w), dtype=logits.dtype)
    crop_h, crop_w = min(crop_size, h), min(crop_size, w)
    for top in sliding_window_starts(h, crop_size, stride):
        for left in sliding_window_starts(w, crop_size, stride):
            window = images[:, :, top:top + crop_h, left:left + crop_w]
            logits[:, :, top:top + crop_h, left:left + crop_w] += _forward(model, window, num_classes, flip)
            count[:, :, top:top + crop_h, left:left + crop_w] += 1
    return logits / count


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, num_classes: int, mode: str = "whole",
                   crop_size: int | None = None, stride_ratio: float = 2.0 / 3.0,
                   scales: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
    """Average logits (B, num_classes, H, W) of ``model`` on ``images`` (B, 3, H, W).

    Logits are accumulated and returned in float32 (float64 for float64 images).

    ``model`` should be in eval mode (a tuple output is reduced to its first element).
    ``crop_size`` is required by "sliding" and "multiscale"; ``scales`` is used by
    "multiscale" only; ``flip`` applies to every mode. See the module docstring.

    Raises:
        ValueError: bad mode, shapes, crop size, stride ratio or scales.
    """
    if mode not in MODES:
        raise ValueError(f"unknown inference mode {mode!r}; choose from {', '.join(MODES)}")
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if mode != "whole":
        if crop_size is None or crop_size < 1:
            raise ValueError(f"mode {mode!r} needs a crop_size >= 1, got {crop_size}")
        if not 0 < stride_ratio <= 1:
            raise ValueError(f"stride_ratio must be in (0, 1], got {stride_ratio}")
    if mode == "multiscale" and (not scales or any(s <= 0 for s in scales)):
        raise ValueError(f"scales must be a non-empty list of positive numbers, got {list(scales)}")
    images = images.as_subclass(torch.Tensor)  # tv_tensors.Image would re-wrap some results
    passes = 2 if flip else 1
    if mode == "whole":
        return _forward(model, images, num_classes, flip) / passes
    stride = max(1, int(crop_size * stride_ratio))
    if mode == "sliding":
        return _sliding(model, images, num_classes, crop_size, stride, flip) / passes

    size = (images.shape[-2], images.shape[-1])
    total = images.new_zeros((images.shape[0], num_classes, *size), dtype=_accumulation_dtype(images))
    for scale in scales:
        scaled_size = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        # a scaled image that fits in the crop is one window: a whole-image pass
        logits = _sliding(model, _resize(images, scaled_size), num_classes, crop_size, stride, flip)
        total += _resize(logits, size)
    return total / (passes * len(scales))


# --------------------------------------------------------------------------------------------
# Command-line plumbing shared by `danet eval`, `danet predict` and `danet attention`.
# Every option defaults to None so that "not given" can be told apart: the value then comes
# from the checkpoint's stored config, else from the dataclasses in danet/config.py.


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --dataset and the model/device overrides."""
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="model weights: a danet training checkpoint, the original DANet release's "
                             "checkpoint, or a plain state_dict")
    parser.add_argument("--dataset", default=None, metavar="NAME",
                        help="dataset the model was trained on (classes, palette); default: the "
                             f"checkpoint's, else {DataConfig.dataset!r}")
    group = parser.add_argument_group("model (default: the checkpoint's stored config, else "
                                      "danet/config.py's ModelConfig)")
    group.add_argument("--backbone", default=None,
                       help=f"one of {', '.join(BACKBONES)} (default {ModelConfig.backbone!r})")
    group.add_argument("--output-stride", type=int, choices=(8, 16), default=None)
    group.add_argument("--attention", choices=("fused", "reference"), default=None)
    group.add_argument("--aux", action=argparse.BooleanOptionalAction, default=None,
                       help="the checkpoint has the auxiliary FCN head")
    group.add_argument("--multi-grid", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA when available (default)")


def _scale_list(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"scales must be positive, got {text}")
    return value


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """--mode, --crop-size, --stride-ratio, --scales, --flip (defaults: EvalConfig)."""
    group = parser.add_argument_group("inference (default: the checkpoint's eval config, else "
                                      "danet/config.py's EvalConfig)")
    group.add_argument("--mode", choices=MODES, default=None, help=f"default {EvalConfig.mode!r}")
    group.add_argument("--crop-size", type=int, default=None,
                       help="sliding-window crop (default: the training crop size)")
    group.add_argument("--stride-ratio", type=float, default=None,
                       help=f"window stride / crop (default {EvalConfig.stride_ratio:.3g})")
    group.add_argument("--scales", type=_scale_list, nargs="+", default=None, metavar="S",
                       help=f"multi-scale factors (default {' '.join(map(str, EvalConfig.scales))})")
    group.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                       help=f"average with the horizontally flipped image (default {EvalConfig.flip})")


def _section(cls: type, stored: Mapping[str, Any] | None) -> Any:
    """A ``cls`` dataclass from a stored (asdict) section, ignoring fields this version lacks."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in (stored or {}).items() if k in names}
    return cls(**values)


@dataclasses.dataclass
class CommandSetup:
    """What eval/predict/attention need: the loaded model and the resolved config sections."""

    model: nn.Module  # on ``device``, in eval mode
    device: torch.device
    dataset_class: type  # NUM_CLASSES, CLASS_NAMES, PALETTE
    data: DataConfig
    eval: EvalConfig


def setup_from_args(args: argparse.Namespace) -> CommandSetup:
    """Read the checkpoint, resolve every option (flag > checkpoint config > default), load the model.

    Raises:
        FileNotFoundError: missing checkpoint.
        ValueError: unknown dataset or backbone, a checkpoint that does not fit the model.
    """
    from danet.data import get_dataset_class
    from danet.distributed import resolve_device
    from danet.models import build_from_checkpoint, read_checkpoint

    checkpoint = read_checkpoint(args.checkpoint)
    stored = checkpoint.config or {}
    data = _section(DataConfig, stored.get("data"))
    eval_cfg = _section(EvalConfig, stored.get("eval"))
    if args.dataset is not None and args.dataset != data.dataset:
        data.root = None  # the stored root belongs to the stored dataset
    eval_fields = ("mode", "crop_size", "stride_ratio", "scales", "flip", "batch_size")
    for section, fields in ((data, ("dataset", "root")), (eval_cfg, eval_fields)):
        for name in fields:
            value = getattr(args, name, None)
            if value is not None:
                setattr(section, name, tuple(value) if isinstance(value, list) else value)
    if eval_cfg.crop_size is None:
        eval_cfg.crop_size = data.crop_size
    dataset_class = get_dataset_class(data.dataset)
    overrides = {"backbone": args.backbone, "output_stride": args.output_stride, "attention": args.attention,
                 "aux": args.aux, "multi_grid": args.multi_grid}
    model = build_from_checkpoint(checkpoint, dataset_class.NUM_CLASSES, overrides)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is available")
    device = resolve_device(args.device)
    return CommandSetup(model.to(device).eval(), device, dataset_class, data, eval_cfg)


def run_inference(setup: CommandSetup, images: torch.Tensor) -> torch.Tensor:
    """:func:`predict_logits` with the setup's model, classes and EvalConfig."""
    cfg = setup.eval
    return predict_logits(setup.model, images.to(setup.device), setup.dataset_class.NUM_CLASSES,
                          mode=cfg.mode, crop_size=cfg.crop_size, stride_ratio=cfg.stride_ratio,
                          scales=cfg.scales, flip=cfg.flip)
