"""The inference protocols as plans: which windows of which resized image a protocol runs.

Every protocol cuts the (resized) image into windows, runs the model on them and merges the
predictions (danet.evaluation.engine runs and merges); they differ in the grid, the padding,
the resizing and how passes are merged (docs/evaluation.md compares them):

* ``danet`` (ours, the default). Modes ``whole`` (one pass over the image), ``sliding``
  (``crop_size`` windows ``stride`` apart, the last one of a row or column aligned to the
  border, a side shorter than the crop taken whole: windows never leave the image and no
  padding value reaches the model) and ``multiscale`` (the image resized by each scale, relative
  to its own size, bilinear with align_corners=True, then sliding). Logits are averaged over
  the windows covering a pixel, over flips and over scales, so the result stays on a single
  pass's scale.
* ``release``: the evaluator of the original DANet release (PyTorch-Encoding's
  ``MultiEvalModule``, 2020 code). Scales are relative to ``base_size``: the long side becomes
  ``ceil(base_size * scale)``, the short side ``int(short * long / long_side + 0.5)``; bilinear
  resizing with align_corners=True; the scaled image is padded at the bottom and right to
  ``crop_size`` with the value of a black pixel after normalisation (``-mean / std``); windows
  start every ``int(crop * stride_ratio)`` pixels (``ceil((side - crop) / stride) + 1`` of them),
  end at ``min(start + crop, side)`` and are padded back to the crop (not shifted); each window
  gives ``exp(logits + flipped logits)``, averaged where windows overlap, cropped back, resized
  to the image and **summed** over scales. ``mode`` only chooses single scale (``whole``,
  ``sliding``) or ``scales`` (``multiscale``); whether windows are used follows the release's
  rule (a scaled image whose long side fits in the crop is one padded window).
* ``mmseg``: mmsegmentation's ``whole_inference`` / ``slide_inference`` (the same border-aligned
  grid as ours, with the stride given in pixels) and its test-time augmentation: each pass (scale
  ``r``: sides ``int(side * r + 0.5)``, align_corners=False; the horizontally flipped image) is
  resized back to the image, turned into probabilities (softmax) and the probabilities are
  averaged. ``multiscale`` slides at each scale.
"""

from __future__ import annotations

import dataclasses
import math

from danet.config import EvalConfig

__all__ = ["Stage", "Window", "inference_plan", "release_window_starts", "sliding_window_starts",
           "window_stride"]



@dataclasses.dataclass(frozen=True)
class Window:
    """A window of a (resized, padded) image: rows ``top:top + height``, columns ``left:left + width``."""

    top: int
    left: int
    height: int
    width: int

    def region(self) -> tuple[slice, slice, slice, slice]:
        """The index of this window in a (B, C, H, W) tensor."""
        return (slice(None), slice(None), slice(self.top, self.top + self.height),
                slice(self.left, self.left + self.width))


@dataclasses.dataclass(frozen=True)
class Stage:
    """One scale of a protocol's plan.

    Attributes:
        scale: the scale factor (of the image for "danet"/"mmseg", of base_size for "release").
        size: (H, W) the image is resized to.
        padded: (H, W) after bottom/right padding ("release"; else ``size``).
        windows: the windows of the padded image.
        pad_to: windows shorter than this are padded to it ("release"; else None).
        image_flips: passes over the image, unflipped and flipped ("mmseg" flip: separate passes).
        window_flip: each window also runs mirrored and the two logits are summed ("danet", "release").
    """

    scale: float
    size: tuple[int, int]
    padded: tuple[int, int]
    windows: tuple[Window, ...]
    pad_to: int | None
    image_flips: tuple[bool, ...]
    window_flip: bool

    @property
    def forwards(self) -> int:
        """Model samples this stage runs per image."""
        return len(self.windows) * len(self.image_flips) * (2 if self.window_flip else 1)

    @property
    def window_shape(self) -> tuple[int, int]:
        """(H, W) of the model's input: every window of a stage has it."""
        first = self.windows[0]
        return (self.pad_to, self.pad_to) if self.pad_to else (first.height, first.width)


def sliding_window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the border-aligned windows along one side of ``length`` pixels.

    Windows are ``min(crop, length)`` long, ``stride`` apart, the last one ending at the
    border (mmsegmentation's ``slide_inference`` grid; ours).
    """
    if length <= crop:
        return [0]
    count = (length - crop + stride - 1) // stride + 1
    return [min(i * stride, length - crop) for i in range(count)]


def release_window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the release's windows along a (padded) side of ``length >= crop`` pixels.

    ``ceil((length - crop) / stride) + 1`` windows at multiples of ``stride``; a window ends at
    ``min(start + crop, length)`` and is padded back to the crop, never shifted.
    """
    return [i * stride for i in range(-(-(length - crop) // stride) + 1)]


def window_stride(cfg: EvalConfig) -> int:
    """The stride in pixels: ``cfg.stride``, else ``int(crop_size * stride_ratio)`` (at least 1)."""
    if cfg.stride is not None:
        return cfg.stride
    return max(1, int(cfg.crop_size * cfg.stride_ratio))


def _grid(size: tuple[int, int], crop: int, stride: int) -> tuple[Window, ...]:
    h, w = size
    crop_h, crop_w = min(crop, h), min(crop, w)
    return tuple(Window(top, left, crop_h, crop_w) for top in sliding_window_starts(h, crop, stride)
                 for left in sliding_window_starts(w, crop, stride))


def _release_size(height: int, width: int, base_size: int, scale: float) -> tuple[int, int]:
    """The release's scaled (H, W): the long side ``ceil(base_size * scale)``, the short one rounded."""
    long_size = math.ceil(base_size * scale)
    if height > width:
        return long_size, int(1.0 * width * long_size / height + 0.5)
    return int(1.0 * height * long_size / width + 0.5), long_size


def inference_plan(height: int, width: int, cfg: EvalConfig) -> list[Stage]:
    """The stages ``cfg``'s protocol runs on an image of ``height`` x ``width`` (cfg resolved).

    Raises:
        ValueError: a scaled size below one pixel.
    """
    scales = cfg.scales if cfg.mode == "multiscale" else (1.0,)
    stages = []
    for scale in scales:
        if cfg.protocol == "release":
            size = _release_size(height, width, cfg.base_size, scale)
        elif cfg.protocol == "mmseg":
            size = (int(height * scale + 0.5), int(width * scale + 0.5))
        else:
            size = (height, width)
            if cfg.mode == "multiscale":
                size = (round(height * scale), round(width * scale))
        if min(size) < 1:
            raise ValueError(f"scale {scale} makes the {height}x{width} image {size[0]}x{size[1]}")
        if cfg.protocol == "release":
            crop, stride = cfg.crop_size, window_stride(cfg)
            padded = (max(size[0], crop), max(size[1], crop))
            windows = tuple(Window(top, left, min(top + crop, padded[0]) - top,
                                   min(left + crop, padded[1]) - left)
                            for top in release_window_starts(padded[0], crop, stride)
                            for left in release_window_starts(padded[1], crop, stride))
            stages.append(Stage(scale, size, padded, windows, crop, (False,), cfg.flip))
            continue
        if cfg.mode == "whole":
            windows: tuple[Window, ...] = (Window(0, 0, *size),)
        else:
            windows = _grid(size, cfg.crop_size, window_stride(cfg))
        if cfg.protocol == "mmseg":
            flips = (False, True) if cfg.flip else (False,)
            stages.append(Stage(scale, size, size, windows, None, flips, False))
        else:
            stages.append(Stage(scale, size, size, windows, None, (False,), cfg.flip))
    return stages
