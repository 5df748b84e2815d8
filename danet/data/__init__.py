"""Segmentation datasets, their registry, and the published training/evaluation transforms.

>>> from danet.data import build_dataset
>>> ds = build_dataset("synthetic", None, "train")  # generated; the root is ignored
>>> image, mask = ds[0]  # tv_tensors.Image uint8 (3, H, W), tv_tensors.Mask int64 (H, W)

Registry names and on-disk layouts (see each class for details):

* ``cityscapes``: :class:`Cityscapes` (leftImg8bit + gtFine labelIds -> 19 trainIds)
* ``ade20k``: :class:`ADE20K` (ADEChallengeData2016, 150 classes, zero label reduced)
* ``voc``: :class:`VOCSegmentation` (VOC 2012, 21 classes; SBD trainaug for "train" when present)
* ``pcontext``: :class:`PascalContext` (60 classes incl. background, as the DANet paper)
* ``pcontext59``: :class:`PascalContext59` (59 classes, background ignored)
* ``cocostuff``: :class:`COCOStuff` (COCO-Stuff 164k, 171 classes)
* ``folder``: :class:`FolderDataset` (your own: images/ + masks/ + classes.txt, see danet.data.folder)
* ``synthetic``: :class:`SyntheticShapes` (generated; the default of the demo and the tests)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from danet.data.ade20k import ADE20K
from danet.data.base import IGNORE_INDEX, SegmentationDataset
from danet.data.cityscapes import Cityscapes
from danet.data.classes import DatasetClasses
from danet.data.cocostuff import COCOStuff
from danet.data.folder import FolderDataset
from danet.data.pcontext import PascalContext, PascalContext59
from danet.data.synthetic import SyntheticShapes
from danet.data.transforms import eval_transforms, train_transforms
from danet.data.voc import VOCSegmentation

DATASETS: dict[str, type[Dataset]] = {
    "cityscapes": Cityscapes,
    "ade20k": ADE20K,
    "voc": VOCSegmentation,
    "pcontext": PascalContext,
    "pcontext59": PascalContext59,
    "cocostuff": COCOStuff,
    "folder": FolderDataset,
    "synthetic": SyntheticShapes,
}
"""Registry: dataset name -> class (each with NUM_CLASSES, CLASS_NAMES, PALETTE)."""


def get_dataset_class(name: str, root: str | Path | None = None) -> type[Dataset]:
    """The dataset class registered as ``name``; ValueError listing the known names otherwise.

    ``root`` matters to the "folder" dataset only, whose classes are read from the data
    (:meth:`FolderDataset.for_root`); the others' classes are fixed.
    """
    try:
        dataset_class = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}") from None
    if dataset_class is FolderDataset:
        return FolderDataset.for_root(root)
    return dataset_class


def build_dataset(
    name: str, root: str | Path | None, split: str, transform: Any = None, **kwargs: Any
) -> Dataset:
    """An instance of the dataset ``name`` for ``split`` under ``root``.

    ``transform(image, mask)`` is applied to every item; ``kwargs`` go to the class (e.g.
    ``num_samples``/``image_size``/``seed`` for "synthetic", ``augmented`` for "voc"). A
    missing root or split raises FileNotFoundError that shows the expected layout.
    """
    return get_dataset_class(name, root)(root=root, split=split, transform=transform, **kwargs)


__all__ = [
    "ADE20K",
    "DATASETS",
    "IGNORE_INDEX",
    "COCOStuff",
    "Cityscapes",
    "DatasetClasses",
    "FolderDataset",
    "PascalContext",
    "PascalContext59",
    "SegmentationDataset",
    "SyntheticShapes",
    "VOCSegmentation",
    "build_dataset",
    "eval_transforms",
    "get_dataset_class",
    "train_transforms",
]
