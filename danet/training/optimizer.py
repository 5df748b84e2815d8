"""The optimiser: SGD or AdamW over two parameter groups, the backbone and the heads."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from danet.config import Config

__all__ = ["build_optimizer", "group_settings"]


def group_settings(cfg: Config) -> list[dict[str, Any]]:
    """The optimiser's two parameter groups' settings: the backbone at ``optim.lr``, the head at
    ``head_lr_mult`` x (the published recipe trains the randomly initialised head faster)."""
    o = cfg.optim
    common: dict[str, Any] = {"weight_decay": o.weight_decay}
    if o.name == "sgd":
        common.update(momentum=o.momentum, nesterov=o.nesterov)
    return [{"lr": o.lr, **common}, {"lr": o.lr * o.head_lr_mult, **common}]


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD or AdamW over two groups (:func:`group_settings`)."""
    backbone_params, head_params = model.parameter_groups()  # type: ignore[operator]
    backbone, head = group_settings(cfg)
    groups = [{"params": backbone_params, **backbone}, {"params": head_params, **head}]
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr)

