"""The DANet model, its backbones and weight loading.

* :class:`DANet`, :func:`build_model` (from a ModelConfig), :func:`create_model` (by name, :data:`MODELS`);
* :data:`BACKBONES`: the backbone names DANet accepts;
* :func:`load_weights` (checkpoints, including the original release's naming),
  :func:`load_backbone_weights` (ImageNet weights from a local file), :func:`load_model`.
"""

from danet.models.backbone import BACKBONES, create_backbone
from danet.models.danet import (
    MODELS,
    DANet,
    build_from_checkpoint,
    build_model,
    create_model,
    list_models,
    load_model,
)
from danet.models.head import DANetHead, FCNHead
from danet.models.weights import (
    ORIGINAL_KEY_MAP,
    Checkpoint,
    load_backbone_weights,
    load_weights,
    read_checkpoint,
)

__all__ = [
    "BACKBONES",
    "MODELS",
    "ORIGINAL_KEY_MAP",
    "Checkpoint",
    "DANet",
    "DANetHead",
    "FCNHead",
    "build_from_checkpoint",
    "build_model",
    "create_backbone",
    "create_model",
    "list_models",
    "load_backbone_weights",
    "load_model",
    "load_weights",
    "read_checkpoint",
]
