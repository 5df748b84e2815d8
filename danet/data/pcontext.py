"""PASCAL Context in the layout mmsegmentation's ``pascal_context.py`` converter writes.

The converter reduces the 459 raw labels to the 59 most frequent classes and stores
``SegmentationClassContext/<id>.png`` with 0 = background (everything else) and 1..59 = the
classes, each at the position of its raw label id among the 59 sorted ids (``np.digitize`` on
the sorted ``_mapping``): alphabetical order, as mmsegmentation 1.x's class list. Two variants
exist in the literature:

* :class:`PascalContext` (registry name "pcontext"): 60 classes, background included; the
  DANet paper reports this one (52.6% mIoU on 60 classes).
* :class:`PascalContext59` ("pcontext59"): 59 classes, background ignored (0 -> 255, k -> k - 1),
  the convention of most later work.

Colours are mmsegmentation's (the first 60 ADE20K colours; the 59-class variant drops the
background's).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from danet.data.ade20k import ADE20K_PALETTE
from danet.data.base import (
    SegmentationDataset,
    palette_array,
    read_id_list,
    reduce_zero_label_lut,
    require_dir,
    require_file,
)

# the order of the converter's output: it stores each class at the position of its raw id (of the
# 459 labels of the PASCAL Context release, which are alphabetical) among the 59 sorted raw ids, so
# that order is alphabetical too; mmsegmentation 1.x names the classes so (PascalContextDataset59).
# (The order of the release's 59_labels.txt, which mmsegmentation 0.x used, names 54 of them wrong.)
_CONTEXT_CLASSES: tuple[str, ...] = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup",
    "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard",
    "light", "motorbike", "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road",
    "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train",
    "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)  # fmt: skip


class PascalContext(SegmentationDataset):
    """PASCAL Context, 60 classes (background + 59), nothing ignored but stored 255.

    Args:
        root: the directory holding ``VOCdevkit/``.
        split: "train" or "val".
        transform: optional ``transform(image, mask)``.
    """

    NUM_CLASSES: ClassVar[int] = 60
    TRAIN_IMAGES: ClassVar[int] = 4998
    CLASS_NAMES: ClassVar[tuple[str, ...]] = ("background", *_CONTEXT_CLASSES)
    PALETTE: ClassVar[np.ndarray] = palette_array(ADE20K_PALETTE[:60])
    LAYOUT: ClassVar[str] = (
        "  root/VOCdevkit/VOC2010/JPEGImages/<id>.jpg\n"
        "  root/VOCdevkit/VOC2010/SegmentationClassContext/<id>.png\n"
        "  root/VOCdevkit/VOC2010/ImageSets/SegmentationContext/{train,val}.txt"
    )

    def _find_samples(self) -> list[tuple[Path, Path]]:
        base = self.root / "VOCdevkit" / "VOC2010"
        image_dir = require_dir(base / "JPEGImages", self.LAYOUT)
        mask_dir = require_dir(base / "SegmentationClassContext", self.LAYOUT)
        ids = read_id_list(base / "ImageSets" / "SegmentationContext" / f"{self.split}.txt", self.LAYOUT)
        return [
            (
                require_file(image_dir / f"{i}.jpg", self.LAYOUT),
                require_file(mask_dir / f"{i}.png", self.LAYOUT),
            )
            for i in ids
        ]


class PascalContext59(PascalContext):
    """PASCAL Context, 59 classes: the stored background (0) ignored, class k stored as k + 1."""

    NUM_CLASSES: ClassVar[int] = 59
    CLASS_NAMES: ClassVar[tuple[str, ...]] = _CONTEXT_CLASSES
    PALETTE: ClassVar[np.ndarray] = palette_array(ADE20K_PALETTE[1:60])

    def _label_lut(self) -> np.ndarray:
        return reduce_zero_label_lut(self.NUM_CLASSES)
