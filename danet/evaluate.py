"""Evaluate a checkpoint on a dataset split: aAcc / mIoU / mAcc, per-class IoU and Acc, the release's numbers.

Examples::

    danet eval --checkpoint runs/synthetic-<time>/checkpoint_best.pt      # the run's dataset, val split
    danet eval --checkpoint DANet101.pth.tar --dataset cityscapes --root data/cityscapes \\
        --protocol release --base-size 2048 --crop-size 768 --mode sliding --flip   # the release's test
    danet eval --checkpoint city.pt --dataset cityscapes --root data/cityscapes \\
        --protocol mmseg --mode sliding --crop-size 769 --stride 513       # mmsegmentation's slide test
    torchrun --standalone --nproc_per_node=4 -m danet.cli eval --checkpoint city.pt ...   # 4 processes

Options not given come from the checkpoint's stored config, else from danet/config.py.
Under torchrun the images are shared out over the processes (every ``world_size``-th image)
and their confusion matrices summed; rank 0 prints and writes. docs/evaluation.md says what
each protocol and each metric convention gives.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from danet.config import DataConfig, EvalConfig
from danet.files import atomic_write
from danet.inference import (
    EVAL_FIELDS,
    predict_scores,
    resolve_eval_config,
    setup_from_args,
    window_stride,
)
from danet.metrics import ConfusionMatrix
from danet.outputs import check_output_file

__all__ = ["CONVENTIONS", "confusion_figure", "confusion_matrices", "evaluate", "metrics_of",
           "run"]

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
    ``eval_cfg`` (:func:`danet.inference.predict_scores`), with ``crop_size``/``base_size`` of
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
            for images, masks in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
                images = images.to(device, non_blocking=True)
                masks = masks.to(device, non_blocking=True).as_subclass(torch.Tensor)
                scores = predict_scores(model, images, num_classes, cfg, mean=data.mean, std=data.std,
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
    release's under ``"release"`` (see danet.metrics)."""
    return {**matrix.compute(), "release": matrix.compute_release()}


def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, eval_cfg: EvalConfig,
             device: torch.device | str, ignore_index: int = 255, progress: bool = True, *,
             data: DataConfig | None = None, heads: Sequence[str] = ("sum",)) -> dict[str, Any]:
    """:func:`metrics_of` the first head's confusion matrix; with several ``heads`` every head's
    metrics too, under ``"heads"``. Arguments as :func:`confusion_matrices`."""
    matrices = confusion_matrices(model, loader, num_classes, eval_cfg, device, ignore_index=ignore_index,
                                  data=data, heads=heads, progress=progress)
    return _head_metrics(matrices)


def _head_metrics(matrices: dict[str, ConfusionMatrix]) -> dict[str, Any]:
    first, *others = matrices
    metrics = metrics_of(matrices[first])
    if others:
        metrics["heads"] = {head: metrics_of(matrix) for head, matrix in matrices.items()}
    return metrics


def _eval_dataset(data: DataConfig, split: str, limit: int | None) -> Dataset:
    from danet.data import build_dataset, eval_transforms

    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    extra: dict[str, Any] = {}
    if data.dataset == "synthetic":  # generated: size and count are constructor arguments
        extra = {"image_size": data.image_size, "num_samples": limit or data.val_samples}
    dataset = build_dataset(data.dataset, data.root, split, transform=eval_transforms(data.mean, data.std),
                            **extra)
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    return dataset


def _jsonable(value: Any) -> Any:
    """JSON has no NaN: classes without a value become null."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _settings(cfg: EvalConfig) -> str:
    parts = [f"protocol={cfg.protocol}", f"mode={cfg.mode}"]
    if cfg.mode != "whole" or cfg.protocol == "release":
        parts += [f"crop={cfg.crop_size}", f"stride={window_stride(cfg)}"]
    if cfg.mode == "multiscale":
        parts.append(f"scales={list(cfg.scales)}")
    if cfg.protocol == "release":
        parts.append(f"base_size={cfg.base_size}")
    parts.append(f"flip={cfg.flip}")
    return " ".join(parts)


def _percent(value: float) -> str:
    return "  n/a" if math.isnan(value) else f"{100 * value:5.2f}"


def _print_report(metrics: dict[str, Any], names: Sequence[str], protocol: str) -> None:
    width = max(len("class"), *(len(n) for n in names))
    print(f"  {'class':<{width}}    IoU    Acc")
    for name, iou, acc in zip(names, metrics["IoU"], metrics["Acc"], strict=True):
        print(f"  {name:<{width}}  {_percent(iou)}  {_percent(acc)}")
    mmseg = (f"aAcc {_percent(metrics['aAcc'])}  mIoU {_percent(metrics['mIoU'])}  "
             f"mAcc {_percent(metrics['mAcc'])}  (mmsegmentation's convention: classes without a value "
             "left out)")
    release = metrics["release"]
    release_line = (f"pixAcc {_percent(release['pixAcc'])}  mIoU {_percent(release['mIoU'])}  (the release's "
                    f"convention: mean over all {len(names)} classes, absent ones count as 0)")
    for line in ((mmseg, release_line) if protocol != "release" else (release_line, mmseg)):
        print(line)
    for head, scores in metrics.get("heads", {}).items():
        print(f"head {head:>3}: mIoU {_percent(scores['mIoU'])}  aAcc {_percent(scores['aAcc'])}  "
              f"mAcc {_percent(scores['mAcc'])}  release mIoU {_percent(scores['release']['mIoU'])}")


def confusion_figure(matrix: ConfusionMatrix, names: Sequence[str], title: str) -> Any:
    """A matplotlib Figure of the confusion matrix, each row (target class) normalised to 1."""
    from matplotlib.figure import Figure

    k = matrix.num_classes
    counts = matrix.counts()
    rows = counts / counts.sum(1, keepdim=True).clamp(min=1)
    side = max(4.0, 0.35 * k + 2.5)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    image = ax.imshow(rows.numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k), names, rotation=90, fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("target class")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="share of the target class's pixels")
    fig.tight_layout()
    return fig


def run(args: argparse.Namespace) -> int:
    """``danet eval``: print the per-class table and the metrics; rank 0 writes the outputs."""
    from danet.distributed import ShardSampler, cleanup_distributed, setup_distributed

    heads = list(dict.fromkeys(args.heads))
    for flag, path in (("--json", args.json), ("--confusion-matrix", args.confusion_matrix)):
        if path is not None:  # checked before the evaluation; eval replaces its outputs
            try:
                check_output_file(path, overwrite=True)
            except ValueError as error:
                raise ValueError(f"{flag}: {error}") from None
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    ctx = setup_distributed(args.device) if distributed else None
    try:
        setup = setup_from_args(args, device=ctx.device if ctx else None)
        dataset = _eval_dataset(setup.data, args.split, args.limit)
        world, rank = (ctx.world_size, ctx.rank) if ctx else (1, 0)
        workers = args.workers if args.workers is not None else setup.data.workers
        loader = DataLoader(dataset, batch_size=setup.eval.batch_size, shuffle=False, num_workers=workers,
                            sampler=ShardSampler(len(dataset), world, rank) if ctx else None,
                            pin_memory=setup.device.type == "cuda")
        cfg = setup.eval
        main = rank == 0
        if main:
            over = f", {world} processes" if world > 1 else ""
            print(f"evaluating {args.checkpoint} on {setup.data.dataset}/{args.split} "
                  f"({len(dataset)} images{over}), {_settings(cfg)}")
        matrices = confusion_matrices(setup.model, loader, setup.dataset_class.NUM_CLASSES, cfg, setup.device,
                                      ignore_index=setup.data.ignore_index, data=setup.data, heads=heads,
                                      progress=args.progress and main)
        if not main:
            return 0
        metrics = _head_metrics(matrices)
        names = list(setup.dataset_class.CLASS_NAMES)
        _print_report(metrics, names, cfg.protocol)
        if args.json:
            report = {"checkpoint": str(args.checkpoint), "dataset": setup.data.dataset, "split": args.split,
                      "images": len(dataset), "processes": world,
                      "inference": {name: getattr(cfg, name) for name in EVAL_FIELDS}, "classes": names,
                      **metrics, "conventions": CONVENTIONS}
            text = json.dumps(_jsonable(report), indent=2) + "\n"
            atomic_write(Path(args.json), lambda tmp: tmp.write_text(text))
            print(f"metrics -> {args.json}")
        if args.confusion_matrix:
            title = f"{Path(args.checkpoint).name} on {setup.data.dataset}/{args.split}: {_settings(cfg)}"
            fig = confusion_figure(matrices[heads[0]], names, title)
            atomic_write(Path(args.confusion_matrix), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
            print(f"confusion matrix -> {args.confusion_matrix}")
        return 0
    finally:
        if ctx is not None:
            cleanup_distributed()

