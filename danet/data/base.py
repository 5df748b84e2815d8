"""The shared image/mask-pair logic of every on-disk segmentation dataset.

A dataset class only says where its files are (:meth:`SegmentationDataset._find_samples`)
and how the stored label values map to training ids (:meth:`SegmentationDataset._label_lut`);
reading, mapping, validating and transforming an (image, mask) pair happens here, once.

Items are ``(tv_tensors.Image uint8 (3, H, W), tv_tensors.Mask int64 (H, W))`` with
:data:`IGNORE_INDEX` (255) marking pixels the loss and the metrics skip, passed through the
optional ``transform(image, mask)``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from danet.data.images import image_size, load_rgb

IGNORE_INDEX = 255
"""The label of pixels that carry no class (void, borders, unlabelled)."""

INVALID_LABEL = -1
"""Look-up-table entry for stored values a dataset never contains: reading one raises ValueError."""

Transform = Callable[[tv_tensors.Image, tv_tensors.Mask], tuple[Any, Any]]

_SHOWN_PROBLEMS = 3  # unusable masks named in the error of check_masks (then a count)


def value_ranges(values: Sequence[int]) -> str:
    """Sorted integers as ranges: ``[0, 1, 2, 5, 255]`` -> ``"0-2, 5, 255"``."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive values
    for value in sorted(values):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def identity_lut(num_classes: int) -> np.ndarray:
    """A look-up table that keeps ``0..num_classes-1`` and 255, and rejects every other value."""
    lut = np.full(256, INVALID_LABEL, dtype=np.int64)
    lut[:num_classes] = np.arange(num_classes)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


def reduce_zero_label_lut(num_classes: int) -> np.ndarray:
    """The "reduce zero label" table: stored 0 (unlabelled) -> 255, stored k -> k - 1, 255 stays 255.

    Used where the annotation's 0 means "no class" and the classes are stored as 1..K
    (ADE20K, the 59-class PASCAL Context).
    """
    lut = np.full(256, INVALID_LABEL, dtype=np.int64)
    lut[0] = IGNORE_INDEX
    lut[1 : num_classes + 1] = np.arange(num_classes)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


def require_dir(path: Path, layout: str) -> Path:
    """``path`` if it is a directory, else FileNotFoundError naming it and the expected layout."""
    if not path.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {path}\nexpected layout:\n{layout}")
    return path


def require_file(path: Path, layout: str) -> Path:
    """``path`` if it is a file, else FileNotFoundError naming it and the expected layout."""
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}\nexpected layout:\n{layout}")
    return path


def repeated_names(names: Iterable[str]) -> list[str]:
    """The names that occur more than once in ``names``, sorted (one pass: any number of names)."""
    return sorted(name for name, count in Counter(names).items() if count > 1)


def read_id_list(path: Path, layout: str) -> list[str]:
    """The image ids of a split file (one per line, blank lines skipped)."""
    require_file(path, layout)
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class SegmentationDataset(Dataset):
    """Base class: a list of (image file, mask file) pairs with a label look-up table.

    Subclasses set the class attributes and implement :meth:`_find_samples` (and
    :meth:`_label_lut` when the stored values are not already the training ids).

    Attributes:
        NUM_CLASSES: number of classes the model predicts (255 excluded).
        CLASS_NAMES: one name per class, in training-id order.
        PALETTE: ``(NUM_CLASSES, 3)`` uint8 colours, in training-id order.
        SPLITS: the accepted ``split`` names.
        LAYOUT: the expected directory tree, shown in every "not found" error.
        TRAIN_IMAGES: the published size of the "train" split (None: unknown), to plan a run
            without the data at hand (``danet lr-plot``).
        CHECK_MASKS_BEFORE_TRAINING: training reads every mask (:meth:`check_masks`) before it
            starts. On for the folder dataset (masks a user made, where a stray value is likely);
            off for the published datasets, whose converters write valid values and whose size
            would make the check cost minutes (COCO-Stuff: 123k masks); there a bad mask stops
            the run when it is read, its message naming the valid values.
    """

    NUM_CLASSES: ClassVar[int]
    CLASS_NAMES: ClassVar[tuple[str, ...]]
    PALETTE: ClassVar[np.ndarray]
    SPLITS: ClassVar[tuple[str, ...]] = ("train", "val")
    LAYOUT: ClassVar[str] = ""
    TRAIN_IMAGES: ClassVar[int | None] = None
    CHECK_MASKS_BEFORE_TRAINING: ClassVar[bool] = False

    def __init__(self, root: str | Path | None, split: str = "train", transform: Transform | None = None):
        if split not in self.SPLITS:
            raise ValueError(
                f"{type(self).__name__}: unknown split {split!r}; expected one of {', '.join(self.SPLITS)}"
            )
        if root is None:
            raise FileNotFoundError(
                f"{type(self).__name__} needs a dataset root directory (got none)\n"
                f"expected layout:\n{self.LAYOUT}"
            )
        self.root = require_dir(Path(root).expanduser(), self.LAYOUT)
        self.split = split
        self.transform = transform
        self.samples: list[tuple[Path, Path]] = self._find_samples()
        if not self.samples:
            raise FileNotFoundError(
                f"{type(self).__name__}: no images found for split {split!r} under {self.root}\n"
                f"expected layout:\n{self.LAYOUT}"
            )
        self._lut = self._label_lut()

    def _find_samples(self) -> list[tuple[Path, Path]]:
        """The sorted (image path, mask path) pairs of ``self.split``; raise FileNotFoundError if absent."""
        raise NotImplementedError

    def _label_lut(self) -> np.ndarray:
        """A 256-entry int64 table from stored mask values to training ids (-1: invalid value)."""
        return identity_lut(self.NUM_CLASSES)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image_path, mask_path = self.samples[index]
        image = load_rgb(image_path)  # 8-bit RGB from any mode, EXIF orientation applied
        labels = self._labels(mask_path, image.shape[:2], image_path)
        image_t = tv_tensors.Image(torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous())
        mask_t = tv_tensors.Mask(torch.from_numpy(labels))
        if self.transform is not None:
            return self.transform(image_t, mask_t)
        return image_t, mask_t

    def _labels(self, mask_path: Path, image_shape: tuple[int, int], image_path: Path) -> np.ndarray:
        """The training ids (H, W) int64 of ``mask_path``; ValueError for a mask that cannot be used."""
        with Image.open(mask_path) as im:
            # Palette ("P") and grey ("L") PNGs both read as their stored indices.
            stored = np.asarray(im)
        if stored.ndim != 2 or stored.dtype != np.uint8:
            raise ValueError(
                f"{mask_path}: expected a single-channel 8-bit label PNG, got shape {stored.shape} "
                f"and dtype {stored.dtype} (was it saved as a colour image?)"
            )
        if stored.shape != tuple(image_shape):
            raise ValueError(
                f"{mask_path}: mask size {stored.shape} differs from image size {tuple(image_shape)} "
                f"of {image_path}"
            )
        labels = self._lut[stored]
        if (labels == INVALID_LABEL).any():
            bad = np.unique(stored[labels == INVALID_LABEL]).tolist()
            raise ValueError(f"{mask_path}: label values {bad} are not valid; {self.valid_values()}")
        return labels

    def valid_values(self) -> str:
        """The mask values this dataset accepts, in words (for errors), e.g. "valid values: 0-18 ..."."""
        values = np.flatnonzero(self._lut != INVALID_LABEL).tolist()
        ignored = [v for v in values if self._lut[v] == IGNORE_INDEX]
        return (f"valid values for {type(self).__name__}: {value_ranges(values)} "
                f"({self.NUM_CLASSES} classes; {value_ranges(ignored)} = ignored)")

    def check_masks(self, threads: int = 1) -> None:
        """Read every mask (the images' headers only) and raise one error naming the unusable ones.

        What reading a sample would refuse mid-training (a colour mask, a size differing from its
        image's, values that are not classes) is found here at once, with the valid values named.
        ``threads`` read in parallel (PIL decodes PNGs outside the GIL).

        Raises:
            ValueError: how many masks are unusable, the first few with their problem, the valid values.
        """
        def problem(sample: tuple[Path, Path]) -> str | None:
            image_path, mask_path = sample
            width, height = image_size(image_path)
            try:
                self._labels(mask_path, (height, width), image_path)
            except ValueError as err:
                return str(err).split("; valid values")[0]
            return None

        with ThreadPoolExecutor(max(1, threads)) as pool:
            problems = [p for p in pool.map(problem, self.samples) if p is not None]
        if problems:
            shown = "; ".join(problems[:_SHOWN_PROBLEMS])
            more = f"; and {len(problems) - _SHOWN_PROBLEMS} more" if len(problems) > _SHOWN_PROBLEMS else ""
            raise ValueError(f"{len(problems)} of the {len(self)} {self.split} masks under {self.root} "
                             f"cannot be used; {self.valid_values()}. {shown}{more}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"


def pair_by_suffix(
    image_dir: Path, mask_dir: Path, image_suffix: str, mask_suffix: str, layout: str, recursive: bool = False
) -> list[tuple[Path, Path]]:
    """Pairs every ``*image_suffix`` file under ``image_dir`` with its ``*mask_suffix`` twin in ``mask_dir``.

    The twin has the same path relative to its directory, with the suffix swapped. A missing
    twin raises FileNotFoundError naming it: silently dropping images would change the split.
    """
    require_dir(image_dir, layout)
    require_dir(mask_dir, layout)
    pattern = f"**/*{image_suffix}" if recursive else f"*{image_suffix}"
    pairs = []
    for image_path in sorted(image_dir.glob(pattern)):
        relative = image_path.relative_to(image_dir)
        mask_path = mask_dir / relative.parent / (relative.name[: -len(image_suffix)] + mask_suffix)
        require_file(mask_path, layout)
        pairs.append((image_path, mask_path))
    return pairs


def palette_array(colours: Sequence[Sequence[int]]) -> np.ndarray:
    """A read-only ``(K, 3)`` uint8 palette from a list of RGB triples."""
    palette = np.asarray(colours, dtype=np.uint8)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"a palette is a list of RGB triples, got shape {palette.shape}")
    palette.setflags(write=False)
    return palette
