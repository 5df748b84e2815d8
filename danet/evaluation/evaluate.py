"""Evaluation: confusion matrices of a model over a data loader, and the metrics they give.

The images go through one of the inference protocols (danet.evaluation.engine); the
confusion matrices are summed over torchrun processes; the metrics follow mmsegmentation's
conventions and the DANet release's (:data:`CONVENTIONS`, danet.evaluation.metrics).
``danet eval`` is danet.commands.eval.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from danet.config import DataConfig, EvalConfig, resolve_eval_config
from danet.evaluation.engine import scores_of_resolved
from danet.evaluation.metrics import ConfusionMatrix
from danet.runtime import progress_bar

__all__ = ["CONVENTIONS", "confusion_matrices", "evaluate", "head_metrics", "metrics_of"]

CONVENTIONS: dict[str, str] = {
    "aAcc": "sum of true positives / labelled pixels (= pixAcc), mmsegmentation's name",
    "mIoU": "mean IoU over the classes with a non-empty union (present in the targets or predicted): "
            "absent classes left out, as mmsegmentation",
    "mAcc": "mean per-class accuracy over the classes present in the targets, as mmsegmentation",
    "release": "the DANet release's pixAcc and mIoU: mean over all classes, an absent class counts as 0",
}
"""What each reported number means (written into the eval JSON)."""


def confusion_matrices(model: nn.Module, loader: DataLoader, num_classes: int, eval_cfg: EvalConfig,
                       device: torch.device | str, *, ignore_index: int = 255, data: DataConfig | None = None,
                       heads: Sequence[str] = ("sum",), progress: bool = True) -> dict[str, ConfusionMatrix]:
    """One confusion matrix per head output over ``loader``, summed over processes.

    The loader yields (images (B, 3, H, W) normalised, masks (B, H, W) int64). Inference follows
    ``eval_cfg`` (:func:`danet.evaluation.engine.predict_scores`), with ``crop_size``/``base_size`` of
    None and the release's padding value taken from ``data``. Under torch.distributed every
    process must call this; the model is left in the mode it came in.
    """
    data = data or DataConfig()
    cfg = resolve_eval_config(eval_cfg, data)
    matrices = {head: ConfusionMatrix(num_classes, ignore_index=ignore_index) for head in heads}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batches = progress_bar(loader, enabled=progress, desc="eval", unit="batch", leave=False)
            for images, masks in batches:
                images = images.to(device, non_blocking=True)
                masks = masks.to(device, non_blocking=True).as_subclass(torch.Tensor)
                scores = scores_of_resolved(model, images, num_classes, cfg, mean=data.mean, std=data.std,
                                        heads=heads)
                for head, matrix in matrices.items():
                    matrix.update(scores[head].argmax(1), masks)
    finally:
        model.train(was_training)
    for matrix in matrices.values():
        matrix.reduce_from_all_processes()
    return matrices


def metrics_of(matrix: ConfusionMatrix) -> dict[str, Any]:
    """mmsegmentation's metrics (``aAcc``, ``mIoU``, ``mAcc``, ``IoU``, ``Acc``, ``pixAcc``) and the
    release's under ``"release"`` (see danet.evaluation.metrics)."""
    return {**matrix.compute(), "release": matrix.compute_release()}


def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, eval_cfg: EvalConfig,
             device: torch.device | str, ignore_index: int = 255, progress: bool = True, *,
             data: DataConfig | None = None, heads: Sequence[str] = ("sum",)) -> dict[str, Any]:
    """:func:`metrics_of` the first head's confusion matrix; with several ``heads`` every head's
    metrics too, under ``"heads"``. Arguments as :func:`confusion_matrices`."""
    matrices = confusion_matrices(model, loader, num_classes, eval_cfg, device, ignore_index=ignore_index,
                                  data=data, heads=heads, progress=progress)
    return head_metrics(matrices)


def head_metrics(matrices: dict[str, ConfusionMatrix]) -> dict[str, Any]:
    """:func:`metrics_of` the first head's matrix, and with several heads every head's under ``"heads"``."""
    first, *others = matrices
    metrics = metrics_of(matrices[first])
    if others:
        metrics["heads"] = {head: metrics_of(matrix) for head, matrix in matrices.items()}
    return metrics
