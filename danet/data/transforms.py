"""The published DANet training and evaluation transforms, on torchvision.transforms.v2.

The training recipe follows the DANet release's ``encoding/datasets/base.py``
(``_sync_transform``), on (image, mask) pairs:

1. horizontal flip with probability 1/2;
2. random scale: the LONG side is resized to a random integer in
   ``[scale_range[0] * base_size, scale_range[1] * base_size]``, the short side keeping the
   aspect ratio (the release's comment says "short edge", its code scales the long one;
   we follow the code). Images bilinear (antialiased), masks NEAREST, so that no
   invented label values appear;
3. pad on the right and bottom to at least ``crop_size`` on each side: the image with 0
   (black, before normalisation, as the release), the mask with the ignore label, so that
   padding never counts as background;
4. random ``crop_size`` x ``crop_size`` crop;
5. image to float in [0, 1] and normalised with ``mean``/``std``; the mask stays int64.

The release also blurs half of the training images with a random Gaussian (radius < 1,
"as in PSP"); that step is left out. Every random draw goes through torch's global
generator, so ``torch.manual_seed`` makes the pipeline deterministic (DataLoader workers
get distinct, reproducible seeds from torch as usual).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F  # noqa: N812 (torchvision's own spelling)

from danet.data.base import IGNORE_INDEX


def _spatial_size(flat_inputs: list[Any]) -> tuple[int, int]:
    """The (H, W) shared by every image and mask of one sample; ValueError if they differ."""
    sizes = {tuple(F.get_size(x)) for x in flat_inputs if isinstance(x, (tv_tensors.Image, tv_tensors.Mask))}
    if len(sizes) != 1:
        raise ValueError(
            f"expected a tv_tensors.Image and tv_tensors.Mask of one size, got sizes {sorted(sizes)}"
        )
    (height, width) = sizes.pop()
    return height, width


class RandomLongSideScale(v2.Transform):
    """Resizes so that the long side is a random integer in ``[lo * base_size, hi * base_size]``.

    The aspect ratio is kept (short side rounded to nearest); images are resized bilinearly
    with antialiasing, masks with NEAREST (torchvision's mask kernel always uses nearest).
    """

    def __init__(self, base_size: int, scale_range: tuple[float, float] = (0.5, 2.0)):
        super().__init__()
        low, high = scale_range
        if base_size < 1:
            raise ValueError(f"base_size must be >= 1, got {base_size}")
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.base_size = base_size
        self.scale_range = (float(low), float(high))
        self.min_long = max(1, int(base_size * low))
        self.max_long = max(self.min_long, int(base_size * high))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _spatial_size(flat_inputs)
        long_side = int(torch.randint(self.min_long, self.max_long + 1, ()).item())
        if height > width:
            size = [long_side, max(1, int(width * long_side / height + 0.5))]
        else:
            size = [max(1, int(height * long_side / width + 0.5)), long_side]
        return {"size": size}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)

    def extra_repr(self) -> str:
        return f"base_size={self.base_size}, scale_range={self.scale_range}"


class PadToMinSize(v2.Transform):
    """Pads right and bottom up to ``size`` per side (images with ``image_fill``, masks ``mask_fill``)."""

    def __init__(self, size: int, image_fill: float = 0, mask_fill: int = IGNORE_INDEX):
        super().__init__()
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.image_fill = image_fill
        self.mask_fill = mask_fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _spatial_size(flat_inputs)
        return {"padding": [0, 0, max(0, self.size - width), max(0, self.size - height)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]):
            return inpt
        fill = self.mask_fill if isinstance(inpt, tv_tensors.Mask) else self.image_fill
        return F.pad(inpt, params["padding"], fill=fill)

    def extra_repr(self) -> str:
        return f"size={self.size}, image_fill={self.image_fill}, mask_fill={self.mask_fill}"


def _normalise(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """Image uint8 -> float in [0, 1] -> (x - mean) / std; masks untouched; plain tensors out."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {list(std)}")
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
        # Plain tensors from here on: the model and the loss need no tv_tensor dispatch.
        v2.ToPureTensor(),
    ]


def train_transforms(
    base_size: int,
    crop_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    ignore_index: int = IGNORE_INDEX,
    scale_range: tuple[float, float] = (0.5, 2.0),
) -> v2.Compose:
    """The published training augmentation (flip, long-side random scale, pad, crop, normalise).

    Takes ``(tv_tensors.Image uint8 (3, H, W), tv_tensors.Mask int64 (H, W))`` and returns
    ``(float32 (3, crop, crop), int64 (crop, crop))``; padded mask pixels are ``ignore_index``.
    """
    if crop_size < 1:
        raise ValueError(f"crop_size must be >= 1, got {crop_size}")
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=0.5),
            RandomLongSideScale(base_size, scale_range),
            PadToMinSize(crop_size, image_fill=0, mask_fill=ignore_index),
            v2.RandomCrop(crop_size),
            *_normalise(mean, std),
        ]
    )


def eval_transforms(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Evaluation: the full image, only converted to float and normalised (mask unchanged).

    Resizing, sliding windows and multi-scale testing belong to inference, not to the data.
    """
    return v2.Compose(_normalise(mean, std))
