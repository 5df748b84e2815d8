"""What a model's outputs mean: the dataset's name, its class names and their colours.

A training checkpoint carries them (its ``"classes"`` record, :meth:`DatasetClasses.to_record`),
next to the normalisation in its config (``data.mean``/``data.std``), so that predict,
attention, export and eval need nothing but the checkpoint: the folder dataset's classes come
from the user's ``classes.txt``, which another directory or machine does not have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from danet.data.base import palette_array

__all__ = ["DatasetClasses"]


@dataclasses.dataclass(frozen=True)
class DatasetClasses:
    """The classes a model predicts.

    Attributes:
        dataset: the registry name of the dataset it was trained on (``"folder"``, ``"cityscapes"``, ...).
        names: one name per class id.
        palette: ``(len(names), 3)`` uint8 colours, one per class id.
    """

    dataset: str
    names: tuple[str, ...]
    palette: np.ndarray

    @property
    def num_classes(self) -> int:
        """The number of classes (the model's output channels)."""
        return len(self.names)

    @classmethod
    def of(cls, dataset: str, dataset_class: Any) -> DatasetClasses:
        """The classes of a registered dataset class (its CLASS_NAMES and PALETTE)."""
        return cls(dataset, tuple(dataset_class.CLASS_NAMES), palette_array(dataset_class.PALETTE))

    def to_record(self) -> dict[str, Any]:
        """Plain lists and strings, as a checkpoint stores them (loadable with ``weights_only``)."""
        return {"dataset": self.dataset, "class_names": list(self.names),
                "palette": np.asarray(self.palette).astype(int).tolist()}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], source: str) -> DatasetClasses:
        """The inverse of :meth:`to_record`; ``source`` names the file in errors.

        Raises:
            ValueError: a record that is not one (missing keys, names and colours that differ in number).
        """
        try:
            dataset, names, colours = record["dataset"], record["class_names"], record["palette"]
        except (KeyError, TypeError):
            raise ValueError(f"{source}: its 'classes' record is damaged (expected dataset, class_names "
                             f"and palette)") from None
        if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names) or not names:
            raise ValueError(f"{source}: its 'classes' record has no list of class names")
        palette = palette_array(colours)
        if len(palette) != len(names):
            raise ValueError(f"{source}: its 'classes' record has {len(names)} names and "
                             f"{len(palette)} colours")
        return cls(str(dataset), tuple(names), palette)
