"""What a prediction becomes as an image: palette masks, colour overlays, legends, Cityscapes label ids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from danet.data.cityscapes import LABEL_ID_TO_TRAIN_ID

__all__ = ["cityscapes_label_ids", "colourise", "legend_panel", "mask_image", "overlay", "with_legend"]

_TRAIN_ID_TO_LABEL_ID = np.zeros(256, dtype=np.uint8)
for _label_id, _train_id in LABEL_ID_TO_TRAIN_ID.items():
    _TRAIN_ID_TO_LABEL_ID[_train_id] = _label_id


def cityscapes_label_ids(prediction: torch.Tensor) -> Image.Image:
    """An 8-bit ("L") PNG image of Cityscapes label ids for a (H, W) map of the 19 train ids."""
    return Image.fromarray(_TRAIN_ID_TO_LABEL_ID[prediction.numpy()])


def mask_image(prediction: torch.Tensor, palette: np.ndarray) -> Image.Image:
    """A palette ("P") PIL image: pixel values are class ids, shown in the dataset's colours."""
    if len(palette) > 256:
        raise ValueError(f"a palette PNG holds at most 256 classes, got {len(palette)}")
    image = Image.fromarray(prediction.numpy().astype(np.uint8))  # mode "L"; putpalette makes it "P"
    image.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    return image


def colourise(prediction: torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) colours of the class ids ``prediction`` (H, W)."""
    return np.asarray(palette, dtype=np.uint8)[prediction.numpy()]


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * image + alpha * colours`` as uint8."""
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def legend_panel(class_ids: Sequence[int], class_names: Sequence[str], palette: np.ndarray,
                 height: int) -> np.ndarray:
    """A white RGB uint8 panel (at least ``height`` rows) listing ``class_ids``: colour swatch and name."""
    font_size = int(np.clip(height / 30, 11, 28))
    font = ImageFont.load_default(size=font_size)
    row, pad = font_size + font_size // 2, font_size // 2
    labels = [f"{c} {class_names[c]}" for c in class_ids]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max((int(probe.textlength(label, font=font)) for label in labels), default=0)
    width = pad + row + pad + text_width + pad
    panel = Image.new("RGB", (width, max(height, pad + row * len(labels) + pad)), "white")
    draw = ImageDraw.Draw(panel)
    for i, (class_id, label) in enumerate(zip(class_ids, labels, strict=True)):
        top = pad + i * row
        swatch = (pad, top + 2, pad + row - 4, top + row - 2)
        draw.rectangle(swatch, fill=tuple(int(v) for v in palette[class_id]), outline="black")
        draw.text((pad + row + pad // 2, top + row // 2), label, fill="black", font=font, anchor="lm")
    return np.asarray(panel)


def with_legend(blended: np.ndarray, prediction: torch.Tensor, class_names: Sequence[str],
                 palette: np.ndarray) -> np.ndarray:
    """``blended`` with the legend of the classes in ``prediction`` to its right (white below if taller)."""
    panel = legend_panel(torch.unique(prediction).tolist(), class_names, palette, blended.shape[0])
    height = max(blended.shape[0], panel.shape[0])
    canvas = np.full((height, blended.shape[1] + panel.shape[1], 3), 255, dtype=np.uint8)
    canvas[: blended.shape[0], : blended.shape[1]] = blended
    canvas[: panel.shape[0], blended.shape[1]:] = panel
    return canvas
