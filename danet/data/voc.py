"""PASCAL VOC 2012 segmentation: 21 classes (background + 20), the 255 object borders ignored.

The masks are palette PNGs whose indices are the class ids, read as stored.

Split "train" uses the SBD-augmented training set ("trainaug", 10582 images) automatically
when it is present in the layout mmsegmentation's ``tools/dataset_converters/voc_aug.py``
writes: ``VOC2012/SegmentationClassAug/`` (the SBD masks converted to PNG) and
``VOC2012/ImageSets/Segmentation/trainaug.txt``. Otherwise "train" is the 1464 images of
``train.txt``. ``augmented=True`` demands the augmented set (FileNotFoundError without it),
``augmented=False`` refuses it. The masks are mmsegmentation's recipe (``pascal_voc12_aug.py``:
VOC's ``train.txt`` with ``SegmentationClass`` concatenated with ``aug.txt``, the SBD images that
are neither, with ``SegmentationClassAug``): a trainaug image that VOC annotated itself (its 1464
train images) takes VOC's fine mask from ``SegmentationClass/``, though SBD has a coarser one of
it too; the other 9118 take SBD's.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from danet.data.base import (
    SegmentationDataset,
    Transform,
    palette_array,
    read_id_list,
    require_dir,
    require_file,
)


def voc_palette(num_colours: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: the bits of the class id spread over R, G and B, high bit first."""
    ids = np.arange(num_colours)
    palette = np.zeros((num_colours, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((ids >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette_array(palette)


class VOCSegmentation(SegmentationDataset):
    """PASCAL VOC 2012 (+ SBD "trainaug" when present), 21 classes, 255 = border/ignore.

    Args:
        root: the directory holding ``VOCdevkit/``.
        split: "train", "val", "trainval" or "trainaug".
        transform: optional ``transform(image, mask)``.
        augmented: for split "train": None uses trainaug when present, True requires it,
            False uses VOC's own ``train.txt``.
    """

    NUM_CLASSES: ClassVar[int] = 21
    TRAIN_IMAGES: ClassVar[int] = 10582  # trainaug, what "train" means with SBD present
    CLASS_NAMES: ClassVar[tuple[str, ...]] = (
        "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
        "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
        "train", "tvmonitor",
    )  # fmt: skip
    PALETTE: ClassVar[np.ndarray] = voc_palette(21)
    SPLITS: ClassVar[tuple[str, ...]] = ("train", "val", "trainval", "trainaug")
    LAYOUT: ClassVar[str] = (
        "  root/VOCdevkit/VOC2012/JPEGImages/<id>.jpg\n"
        "  root/VOCdevkit/VOC2012/SegmentationClass/<id>.png\n"
        "  root/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt\n"
        "  optional SBD augmentation (mmsegmentation's voc_aug.py):\n"
        "  root/VOCdevkit/VOC2012/SegmentationClassAug/<id>.png\n"
        "  root/VOCdevkit/VOC2012/ImageSets/Segmentation/trainaug.txt"
    )

    def __init__(
        self,
        root: str | Path | None,
        split: str = "train",
        transform: Transform | None = None,
        augmented: bool | None = None,
    ):
        self.augmented = augmented
        super().__init__(root, split, transform)

    def _find_samples(self) -> list[tuple[Path, Path]]:
        base = self.root / "VOCdevkit" / "VOC2012"
        image_dir = require_dir(base / "JPEGImages", self.LAYOUT)
        mask_dir = base / "SegmentationClass"
        aug_dir = base / "SegmentationClassAug"
        lists = base / "ImageSets" / "Segmentation"
        aug_list = lists / "trainaug.txt"
        aug_present = aug_dir.is_dir() and aug_list.is_file()

        split = self.split
        if split == "train" and self.augmented is None:
            split = "trainaug" if aug_present else "train"
        elif split == "train" and self.augmented:
            split = "trainaug"
        self.resolved_split = split  # what "train" turned out to mean, for logs

        if split == "trainaug":
            require_dir(aug_dir, self.LAYOUT)
            ids = read_id_list(aug_list, self.LAYOUT)
            mask_dirs = (mask_dir, aug_dir)  # VOC's own fine mask where there is one (module docstring)
        else:
            require_dir(mask_dir, self.LAYOUT)
            ids = read_id_list(lists / f"{split}.txt", self.LAYOUT)
            mask_dirs = (mask_dir,)
        return [(require_file(image_dir / f"{i}.jpg", self.LAYOUT), self._mask_of(i, mask_dirs)) for i in ids]

    def _mask_of(self, image_id: str, mask_dirs: tuple[Path, ...]) -> Path:
        """The first ``<id>.png`` among ``mask_dirs`` (VOC's own before SBD's)."""
        for directory in mask_dirs:
            candidate = directory / f"{image_id}.png"
            if candidate.is_file():
                return candidate
        return require_file(mask_dirs[-1] / f"{image_id}.png", self.LAYOUT)
