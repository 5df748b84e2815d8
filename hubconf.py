"""torch.hub entry points: the named DANets of danet.models.MODELS, and from_pretrained.

    import torch
    model = torch.hub.load("<owner>/<repo>", "danet_resnet101", nclass=19)       # from GitHub
    model = torch.hub.load("/path/to/checkout", "danet_resnet101", source="local",
                           weights="DANet101.pth.tar")                           # the release's checkpoint
    model = torch.hub.load("/path/to/checkout", "from_pretrained", "user/danet-cityscapes",
                           source="local")                                       # save_pretrained's files

Each named entry builds that model (``danet_resnet101`` is the published one): ``nclass`` classes,
``weights`` a checkpoint file to load (ours, the original release's, a plain state_dict; then
``nclass`` may be left out), ``pretrained_backbone="timm"`` for timm's ImageNet weights, other
keywords ModelConfig fields (``aux=True``, ``attention="reference"``, ...).
"""

from __future__ import annotations

from pathlib import Path as _Path

from danet.models.danet import DANet as _DANet
from danet.models.danet import create_model as _create_model

dependencies = ["torch", "timm", "huggingface_hub", "safetensors", "yaml"]


def _entry(name: str):
    def build(nclass: int | None = None, weights: str | _Path | None = None, **overrides: object) -> _DANet:
        return _create_model(name, nclass, weights, **overrides)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"{name}: see danet.models.MODELS[{name!r}]; nclass, weights (a checkpoint file), "
                     "other ModelConfig fields as keywords.")
    return build


danet_resnet101 = _entry("danet_resnet101")
danet_resnet101s = _entry("danet_resnet101s")
danet_resnet50 = _entry("danet_resnet50")
danet_resnet152 = _entry("danet_resnet152")
danet_resnet_tiny = _entry("danet_resnet_tiny")


def from_pretrained(name_or_path: str, **kwargs: object) -> _DANet:
    """``DANet.from_pretrained``: a directory written by ``save_pretrained``, or a Hugging Face repo id."""
    return _DANet.from_pretrained(name_or_path, **kwargs)
