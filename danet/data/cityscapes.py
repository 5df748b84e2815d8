"""Cityscapes (fine annotations): the 19 evaluation classes of the official benchmark.

The masks read are ``*_gtFine_labelIds.png`` (the 34 label ids); they are mapped here to the
19 training ids of the official table (``cityscapesscripts/helpers/labels.py``), every other
id (void, and the classes the benchmark does not evaluate: parking, rail track, guard rail,
bridge, tunnel, polegroup, caravan, trailer) to 255. Converted ``*_labelTrainIds.png`` files
are therefore not needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from danet.data.base import (
    IGNORE_INDEX,
    INVALID_LABEL,
    SegmentationDataset,
    pair_by_suffix,
    palette_array,
    require_dir,
)

# labelId -> trainId for the 19 evaluated classes (the official table); all other ids are void.
LABEL_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
_NUM_LABEL_IDS = 34  # labelIds 0..33; the -1 (license plate) never appears in labelIds PNGs


class Cityscapes(SegmentationDataset):
    """Cityscapes with fine annotations, labelIds mapped to the 19 trainIds (255 = ignore).

    Args:
        root: the directory holding ``leftImg8bit/`` and ``gtFine/``.
        split: "train", "val" or "test" (the public test masks are all void).
        transform: optional ``transform(image, mask)``.
    """

    NUM_CLASSES: ClassVar[int] = 19
    TRAIN_IMAGES: ClassVar[int] = 2975
    CLASS_NAMES: ClassVar[tuple[str, ...]] = (
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
        "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
        "motorcycle", "bicycle",
    )  # fmt: skip
    PALETTE: ClassVar[np.ndarray] = palette_array([
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
        (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ])  # fmt: skip
    SPLITS: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    LAYOUT: ClassVar[str] = (
        "  root/leftImg8bit/{train,val,test}/<city>/<name>_leftImg8bit.png\n"
        "  root/gtFine/{train,val,test}/<city>/<name>_gtFine_labelIds.png"
    )

    def _find_samples(self) -> list[tuple[Path, Path]]:
        image_dir = require_dir(self.root / "leftImg8bit" / self.split, self.LAYOUT)
        mask_dir = require_dir(self.root / "gtFine" / self.split, self.LAYOUT)
        return pair_by_suffix(
            image_dir, mask_dir, "_leftImg8bit.png", "_gtFine_labelIds.png", self.LAYOUT, recursive=True
        )

    def _label_lut(self) -> np.ndarray:
        lut = np.full(256, INVALID_LABEL, dtype=np.int64)
        lut[:_NUM_LABEL_IDS] = IGNORE_INDEX
        for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
            lut[label_id] = train_id
        return lut
