"""Your own data: a folder of images, a folder of label masks, and a list of class names.

Layout (registry name ``folder``, preset ``folder``)::

    root/classes.txt                  one class per line: line k (from 0) is mask value k
    root/images/{train,val}/NAME.ext  any format PIL reads (jpg, png, tif, ...)
    root/masks/{train,val}/NAME.png   8-bit single-channel PNG (grey or palette), same size

A mask pixel holds its class id, 0 to K - 1, or 255 for pixels to ignore (unlabelled, borders);
any other value is an error naming the file and the valid values. ``danet train`` reads every
mask before it starts (:meth:`SegmentationDataset.check_masks`), so such a mistake stops it before
anything is written. A line of ``classes.txt`` may end in a colour,
``road #804080``, used in the masks and overlays ``danet predict`` writes; classes without one
get the PASCAL VOC colour of their id. Blank lines and lines starting with ``#`` are skipped.
Every image needs its mask (a missing one is an error, not a skipped image).

The class list belongs to the data: a checkpoint of ``danet train`` carries it (names and
colours), so predict, attention, export and eval need only the checkpoint, from any directory;
eval reads the images from the root stored in the checkpoint (an absolute path), or ``--root``.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import ClassVar

import numpy as np

from danet.data.base import (
    SegmentationDataset,
    Transform,
    palette_array,
    repeated_names,
    require_dir,
    require_file,
    value_ranges,
)
from danet.data.images import image_suffixes
from danet.data.voc import voc_palette

__all__ = ["FolderDataset", "read_class_list"]

CLASS_LIST = "classes.txt"
_COLOUR = re.compile(r"^(?P<name>.*?)\s+#(?P<hex>[0-9a-fA-F]{6})$")


def read_class_list(path: Path) -> tuple[tuple[str, ...], np.ndarray]:
    """(class names, (K, 3) uint8 palette) from a ``classes.txt`` (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: no classes, more than 255 (255 is the ignore label), or a repeated name.
    """
    names, colours = [], []
    for line in require_file(path, FolderDataset.LAYOUT).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _COLOUR.match(line)
        name = match["name"].strip() if match else line
        names.append(name)
        colours.append(tuple(bytes.fromhex(match["hex"])) if match else None)
    if not names:
        raise ValueError(f"{path} names no class (one name per line, line k for mask value k)")
    if len(names) > 255:
        raise ValueError(f"{path} names {len(names)} classes; at most 255 fit in 8-bit masks (255 = ignore)")
    repeated = repeated_names(names)
    if repeated:
        raise ValueError(f"{path} names {', '.join(repeated)} more than once")
    defaults = voc_palette(len(names))
    palette = [colour if colour is not None else tuple(defaults[i]) for i, colour in enumerate(colours)]
    return tuple(names), palette_array(palette)


class FolderDataset(SegmentationDataset):
    """Images and masks in two folders, classes from ``root/classes.txt`` (see the module docstring).

    The class attributes (``NUM_CLASSES``, ``CLASS_NAMES``, ``PALETTE``) depend on the root: use
    :meth:`for_root` for a class that carries them (what ``get_dataset_class("folder", root)``
    returns); an instance always carries its own.

    Args:
        root: the dataset directory.
        split: "train" or "val".
        transform: optional ``transform(image, mask)``.
    """

    LAYOUT: ClassVar[str] = (
        f"  root/{CLASS_LIST}  (one class name per line; line k is mask value k)\n"
        "  root/images/{train,val}/<name>.<jpg|png|...>\n"
        "  root/masks/{train,val}/<name>.png  (8-bit class ids, 255 = ignore)"
    )
    CHECK_MASKS_BEFORE_TRAINING: ClassVar[bool] = True  # a user's own masks: read them all before training

    def __init__(self, root: str | Path | None, split: str = "train", transform: Transform | None = None):
        if root is not None and not hasattr(type(self), "NUM_CLASSES"):
            names, palette = read_class_list(Path(root).expanduser() / CLASS_LIST)
            self.NUM_CLASSES, self.CLASS_NAMES, self.PALETTE = len(names), names, palette
        super().__init__(root, split, transform)

    @classmethod
    def for_root(cls, root: str | Path | None) -> type[FolderDataset]:
        """A subclass whose class attributes are the classes of ``root`` (cached per directory)."""
        if root is None:
            raise FileNotFoundError(f"the folder dataset needs data.root (its {CLASS_LIST} names the classes)"
                                    f"\nexpected layout:\n{cls.LAYOUT}")
        return _folder_class(Path(root).expanduser().resolve())

    def valid_values(self) -> str:
        """The mask values this dataset accepts, in words: its classes' ids and 255."""
        return (f"valid values: {value_ranges(range(self.NUM_CLASSES))} (the {self.NUM_CLASSES} classes of "
                f"{self.root / CLASS_LIST}, line k is value k) and 255 (pixels to ignore)")

    def _find_samples(self) -> list[tuple[Path, Path]]:
        image_dir = require_dir(self.root / "images" / self.split, self.LAYOUT)
        mask_dir = require_dir(self.root / "masks" / self.split, self.LAYOUT)
        suffixes = image_suffixes()
        images = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        repeated = repeated_names(p.stem for p in images)
        if repeated:
            raise ValueError(f"{image_dir}: several images named {', '.join(repeated)} (one mask each is "
                             "expected: rename them)")
        return [(image, require_file(mask_dir / f"{image.stem}.png", self.LAYOUT)) for image in images]


@functools.cache
def _folder_class(root: Path) -> type[FolderDataset]:
    names, palette = read_class_list(root / CLASS_LIST)
    return type("FolderDataset", (FolderDataset,), {
        "NUM_CLASSES": len(names), "CLASS_NAMES": names, "PALETTE": palette, "__module__": __name__,
        "__doc__": f"FolderDataset of {root} ({len(names)} classes)."})
