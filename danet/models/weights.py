"""Weights from local files: ImageNet backbones, our checkpoints, the original DANet release.

(timm's own ImageNet weights, from the Hugging Face cache, are :mod:`danet.models.backbone`'s.)

Nothing here builds the network (``danet.models.danet`` builds it and uses this module, never
the other way round). Files are read on the CPU with ``torch.load(weights_only=True)``
(``.pth``/``.pt``/``.tar``) or safetensors (``.safetensors``).

Accepted layouts for :func:`load_weights`:

* our training checkpoints: ``{"model": state_dict, "config": {...}, ...}``;
* the original release / Encoding checkpoints: ``{"state_dict": state_dict, "epoch": ..., ...}``;
* a plain state_dict.

Keys lose any leading ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes.
Checkpoints in the original DANet release's naming (``pretrained.*``, ``head.*``, ``auxlayer.*``)
are renamed through :data:`ORIGINAL_KEY_MAP`:

==========================  ==================  =============================================
original prefix             our prefix          why
==========================  ==================  =============================================
``pretrained.fc.``          (dropped)           ImageNet classifier, unused for segmentation
``pretrained.``             ``backbone.``       timm's ResNet keys equal Encoding's: deep stem
                                                ``conv1.0/1/3/4/6``, ``bn1``, ``layerX.Y.convZ``,
                                                ``layerX.0.downsample.0/1``
``head.``                   ``head.``           same modules: conv5a/5c, sa, sc, conv51/52, conv6/7/8
``auxlayer.``               ``auxlayer.``       Encoding's FCNHead: ``auxlayer.conv5.{0,1,4}``
==========================  ==================  =============================================

The release's inference-only variant (no ``head.conv6``/``head.conv7``, the PAM/CAM classifiers
only the training loss uses) and its stage-3 auxiliary DANetHead (``auxlayer.conv5a...``) load too:
the former keep their initialisation, the latter is skipped when the model has no such head
(both with a warning).

The released DANet-101 checkpoint loads into the published model, ModelConfig's defaults
(``DANet(nclass, "resnet101", multi_grid=True)``): the release's README tests it with
``--no-deepstem --multi-grid --multi-dilation 4 8 16 --os 8``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from danet.config import ModelConfig
from danet.io.checkpoint import check_finite, read_file, strip_prefixes
from danet.models.backbone import missing_weights_message

__all__ = [
    "ORIGINAL_KEY_MAP",
    "Checkpoint",
    "from_original_naming",
    "load_backbone_weights",
    "load_checkpoint_into",
    "load_state_dict_checked",
    "load_weights",
    "model_config_from",
    "num_classes_in",
    "read_checkpoint",
    "to_original_naming",
]

# (original prefix, our prefix or None = drop), first match wins; see the module docstring
ORIGINAL_KEY_MAP: tuple[tuple[str, str | None], ...] = (
    ("pretrained.fc.", None),
    ("pretrained.", "backbone."),
    ("head.", "head."),
    ("auxlayer.", "auxlayer."),
)
# the PAM-only and CAM-only classifiers: used by the training loss only, absent from the
# release's inference-only head
_TRAINING_ONLY_CLASSIFIERS = ("head.conv6.", "head.conv7.")
# the sum classifier's weight: its first dimension is the number of classes
_CLASSIFIER_KEY = "head.conv8.1.weight"
_MAX_KEYS_IN_ERROR = 8

StateDict = dict[str, torch.Tensor]


def _rename(state_dict: Mapping[str, torch.Tensor], table: tuple[tuple[str, str | None], ...]) -> StateDict:
    renamed = {}
    for key, value in state_dict.items():
        for source, target in table:
            if key.startswith(source):
                if target is not None:
                    renamed[target + key[len(source):]] = value
                break
        else:
            raise ValueError(f"key {key!r} has no rule in the original-DANet key mapping "
                             f"(known prefixes: {', '.join(s for s, _ in table)})")
    return renamed


def from_original_naming(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename a state_dict from the original DANet release's keys to ours (ORIGINAL_KEY_MAP)."""
    return _rename(state_dict, ORIGINAL_KEY_MAP)


def to_original_naming(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename our keys to the original release's (the inverse of :func:`from_original_naming`)."""
    inverse = tuple((ours, original) for original, ours in ORIGINAL_KEY_MAP if ours is not None)
    return _rename(state_dict, inverse)


def _is_original_naming(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(key.startswith("pretrained.") for key in state_dict)


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint file's contents, renamed to our keys.

    Attributes:
        state_dict: the model's tensors, in our naming.
        config: the stored run config (``dataclasses.asdict`` of the trainer's Config) or None.
        original_naming: the file used the original DANet release's key names.
        path: where it was read from (for messages).
        classes: the stored record of the classes the model predicts (dataset name, class names,
            palette: danet.data.classes.DatasetClasses.to_record), or None (a checkpoint from
            elsewhere, or written before danet stored it).
    """

    state_dict: StateDict
    config: dict[str, Any] | None
    original_naming: bool
    path: str
    classes: dict[str, Any] | None = None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read ``path`` (our checkpoint, the original release's, or a plain state_dict).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable or corrupted file, one that holds no state_dict, or NaN/Inf weights.
    """
    obj = read_file(path, what="weights file")
    config = classes = None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        state_dict, config, classes = obj["model"], obj.get("config"), obj.get("classes")
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        state_dict = obj["state_dict"]
    else:
        state_dict = obj
    if not isinstance(state_dict, Mapping) or not state_dict or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} holds no state_dict (expected a dict of tensors, or one under "
                         f"'model' or 'state_dict')")
    check_finite(state_dict, path)  # NaN weights would give plausible metrics and blank masks
    state_dict = strip_prefixes(state_dict)
    original = _is_original_naming(state_dict)
    if original:
        state_dict = from_original_naming(state_dict)
    return Checkpoint(state_dict, config if isinstance(config, dict) else None, original, str(path),
                      classes if isinstance(classes, dict) else None)


def _key_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_IN_ERROR])
    more = len(keys) - _MAX_KEYS_IN_ERROR
    return shown + (f" (and {more} more)" if more > 0 else "")


def load_state_dict_checked(module: nn.Module, state_dict: Mapping[str, torch.Tensor],
                            source: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``module`` after checking every key and shape.

    Missing BatchNorm ``num_batches_tracked`` buffers are tolerated (old checkpoints lack them).

    Raises:
        ValueError: different classes (classifier shape), shape mismatches, missing or
            unexpected keys; the message names them.
    """
    expected = module.state_dict()
    classifier = state_dict.get(_CLASSIFIER_KEY)
    if classifier is not None and _CLASSIFIER_KEY in expected and \
            classifier.shape[0] != expected[_CLASSIFIER_KEY].shape[0]:
        raise ValueError(f"{source} was trained for {classifier.shape[0]} classes, the model has "
                         f"{expected[_CLASSIFIER_KEY].shape[0]} (check --dataset)")
    mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)} in the model"
                  for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    if mismatched:
        raise ValueError(f"{source} does not match the model's shapes (another backbone?): "
                         f"{_key_list(mismatched)}")
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_key_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_key_list(unexpected)}")
        raise ValueError(f"{source} does not match the model (another backbone, aux head or "
                         f"naming?): {'; '.join(parts)}")
    module.load_state_dict(state_dict, strict=False)


def load_checkpoint_into(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Checked load; the original release's checkpoints get the leniency their variants need.

    The release also shipped an inference-only head (``conv8`` alone, without the PAM/CAM
    classifiers ``conv6``/``conv7``, which only training uses) and an auxiliary head of another
    design (a DANetHead on stage 3). For those checkpoints the missing classifiers keep their
    fresh initialisation and an auxiliary head the model does not have is skipped, with a warning.
    """
    state_dict = checkpoint.state_dict
    source = f"checkpoint {checkpoint.path}"
    if not checkpoint.original_naming:
        load_state_dict_checked(model, state_dict, source=source)
        return
    expected = model.state_dict()
    skipped = [k for k in state_dict if k.startswith("auxlayer.") and k not in expected]
    absent = [k for k in expected if k.startswith(_TRAINING_ONLY_CLASSIFIERS) and k not in state_dict]
    if skipped or absent:
        warnings.warn(f"{source}: original release checkpoint; "
                      + (f"skipping its auxiliary head ({len(skipped)} tensors); " if skipped else "")
                      + (f"no PAM/CAM classifiers, kept freshly initialised: {_key_list(absent)}"
                         if absent else ""), stacklevel=3)
    state_dict = {k: v for k, v in state_dict.items() if k not in skipped}
    state_dict.update({k: expected[k] for k in absent})
    load_state_dict_checked(model, state_dict, source=source)


def load_weights(model: nn.Module, path: str | Path) -> dict[str, Any] | None:
    """Load a checkpoint (ours, the original release's, or a plain state_dict) into ``model``.

    Returns the checkpoint's "config" dict, or None when it has none.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, or keys/shapes/classes that do not match the model.
    """
    checkpoint = read_checkpoint(path)
    load_checkpoint_into(model, checkpoint)
    return checkpoint.config


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load ImageNet ResNet weights (timm or torchvision naming) from a local file.

    The ImageNet classifier (``fc.*``) is dropped; every other key must match the backbone
    (timm and torchvision name ResNet parameters identically; deep-stem variants use timm's
    ``conv1.0/1/3/4/6``, as the original release's backbone does).

    Raises:
        FileNotFoundError: no such file (the message names timm's way too).
        ValueError: unreadable file, or keys/shapes that do not fit the backbone.
    """
    if not Path(path).exists():
        raise FileNotFoundError(missing_weights_message(f"ImageNet weights file not found: {path}"))
    state_dict = read_checkpoint(path).state_dict
    if any(key.startswith("backbone.") for key in state_dict):  # a full DANet checkpoint's backbone
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    load_state_dict_checked(backbone, state_dict, source=f"backbone weights {path}")


def num_classes_in(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Number of classes of a DANet state_dict (rows of the sum classifier).

    Raises:
        ValueError: the state_dict has no DANet classifier.
    """
    if _CLASSIFIER_KEY not in state_dict:
        raise ValueError(f"not a DANet state_dict: no {_CLASSIFIER_KEY!r}")
    return int(state_dict[_CLASSIFIER_KEY].shape[0])


def model_config_from(config: Mapping[str, Any] | None) -> ModelConfig | None:
    """The ModelConfig stored in a checkpoint's config (its "model" section), or None.

    The ImageNet file is not needed (the checkpoint holds the weights) and may not exist on
    this machine, so ``pretrained_backbone`` is cleared.
    """
    if not config:
        return None
    section = config.get("model", config)
    if not isinstance(section, Mapping) or "backbone" not in section:
        return None
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in section.items() if k in fields})
    cfg.pretrained_backbone = None
    return cfg
