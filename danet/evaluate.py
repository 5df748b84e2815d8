"""Evaluate a checkpoint: pixel accuracy, mIoU and per-class IoU on a dataset split.

Examples::

    danet eval --checkpoint runs/synthetic-<time>/checkpoint_best.pt      # the run's dataset, val split
    danet eval --checkpoint city.pt --dataset cityscapes --root data/cityscapes \\
        --mode multiscale --crop-size 768 --flip                           # multi-scale + flip testing

Options not given come from the checkpoint's stored config, else from danet/config.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from danet.config import DataConfig, EvalConfig
from danet.files import atomic_write
from danet.inference import (
    add_inference_arguments,
    add_model_arguments,
    predict_logits,
    setup_from_args,
)
from danet.metrics import ConfusionMatrix

__all__ = ["add_arguments", "evaluate", "run"]


def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, eval_cfg: EvalConfig,
             device: torch.device | str, ignore_index: int = 255, progress: bool = True) -> dict[str, Any]:
    """Run ``model`` over ``loader`` and return ``{"pixAcc", "mIoU", "IoU"}`` (see danet.metrics).

    The loader yields (images (B, 3, H, W) normalised, masks (B, H, W) int64). Inference follows
    ``eval_cfg`` (whole / sliding / multi-scale, flip); a ``crop_size`` of None means the
    DataConfig default. Under torch.distributed the confusion matrices of all processes are
    summed (every process must call this). The model is left in the mode it came in.
    """
    crop_size = eval_cfg.crop_size if eval_cfg.crop_size is not None else DataConfig.crop_size
    confmat = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, masks in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
                images = images.to(device, non_blocking=True)
                masks = masks.to(device, non_blocking=True)
                logits = predict_logits(model, images, num_classes, mode=eval_cfg.mode, crop_size=crop_size,
                                        stride_ratio=eval_cfg.stride_ratio, scales=eval_cfg.scales,
                                        flip=eval_cfg.flip)
                confmat.update(logits.argmax(1), masks.as_subclass(torch.Tensor))
    finally:
        model.train(was_training)
    confmat.reduce_from_all_processes()
    return confmat.compute()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``danet eval``."""
    add_model_arguments(parser)
    parser.add_argument("--root", default=None, metavar="DIR",
                        help="dataset root (default: the checkpoint's; not needed for 'synthetic')")
    parser.add_argument("--split", default="val", help="dataset split (default: val)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="evaluate the first N images only")
    add_inference_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"images per batch (default: the checkpoint's, else {EvalConfig.batch_size}; "
                             ">1 needs images of one size)")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"data loader processes (default: the checkpoint's, else {DataConfig.workers})")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the metrics as JSON")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


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


def _write_json(metrics: dict[str, Any], path: Path) -> None:
    """JSON has no NaN: absent classes' IoU become null."""
    clean = {k: ([None if math.isnan(x) else x for x in v] if isinstance(v, list) else
                 (None if isinstance(v, float) and math.isnan(v) else v)) for k, v in metrics.items()}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(clean, indent=2) + "\n"))


def run(args: argparse.Namespace) -> int:
    """``danet eval``: print pixAcc, mIoU and the per-class IoU table."""
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    setup = setup_from_args(args)
    dataset = _eval_dataset(setup.data, args.split, args.limit)
    workers = args.workers if args.workers is not None else setup.data.workers
    loader = DataLoader(dataset, batch_size=setup.eval.batch_size, shuffle=False, num_workers=workers,
                        pin_memory=setup.device.type == "cuda")
    cfg = dataclasses.replace(setup.eval)
    print(f"evaluating {args.checkpoint} on {setup.data.dataset}/{args.split} ({len(dataset)} images), "
          f"mode={cfg.mode}" + (f" crop={cfg.crop_size}" if cfg.mode != "whole" else "")
          + (f" scales={list(cfg.scales)}" if cfg.mode == "multiscale" else "") + f" flip={cfg.flip}")
    metrics = evaluate(setup.model, loader, setup.dataset_class.NUM_CLASSES, cfg, setup.device,
                       ignore_index=setup.data.ignore_index, progress=args.progress)
    names = setup.dataset_class.CLASS_NAMES
    width = max(len(n) for n in names)
    for name, iou in zip(names, metrics["IoU"], strict=True):
        print(f"  {name:<{width}}  IoU {'  n/a' if math.isnan(iou) else f'{100 * iou:5.1f}'}")
    print(f"pixAcc {100 * metrics['pixAcc']:.2f}  mIoU {100 * metrics['mIoU']:.2f}")
    if args.json:
        _write_json(metrics, Path(args.json))
    return 0
