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
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from danet.commands.model_setup import EVAL_FIELDS, setup_from_args
from danet.config import DataConfig, EvalConfig, check_value
from danet.data import DatasetClasses, build_dataset, eval_transforms, get_dataset_class
from danet.distributed import ShardSampler, cleanup_distributed, setup_distributed
from danet.evaluation.evaluate import CONVENTIONS, confusion_matrices, head_metrics
from danet.evaluation.protocols import window_stride
from danet.io.atomic import atomic_write
from danet.io.output_paths import check_output_file
from danet.training.stopping import StopSafeDataLoader
from danet.visualization.plots import confusion_figure

__all__ = ["run"]


def _check_classes(data: DataConfig, classes: DatasetClasses) -> None:
    """The data's classes are the model's: the same number (else ValueError), the same names (else a note).

    The folder dataset's come from its root's classes.txt, which may not be the one it was trained on.
    """
    dataset_class = get_dataset_class(data.dataset, data.root)
    names = tuple(dataset_class.CLASS_NAMES)  # type: ignore[attr-defined]
    if len(names) != classes.num_classes:
        raise ValueError(f"the {data.dataset} data at {data.root} has {len(names)} classes, the model "
                         f"{classes.num_classes} ({', '.join(classes.names)}): evaluate it on its own data")
    if names != classes.names:
        renamed = [f"{i}: {ours!r} here, {theirs!r} in the model" for i, (ours, theirs)
                   in enumerate(zip(names, classes.names, strict=True)) if ours != theirs]
        print(f"note: the data's class names differ from the model's ({'; '.join(renamed[:3])}"
              f"{'; ...' if len(renamed) > 3 else ''}); the table uses the model's", file=sys.stderr)


def _eval_dataset(data: DataConfig, split: str, limit: int | None) -> Dataset:
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


def run(args: argparse.Namespace) -> int:
    """``danet eval``: print the per-class table and the metrics; rank 0 writes the outputs."""
    heads = list(dict.fromkeys(args.heads))
    for flag, path in (("--json", args.json), ("--confusion-matrix", args.confusion_matrix)):
        if path is not None:  # checked before the evaluation
            try:
                check_output_file(path, args.overwrite)
            except ValueError as error:
                raise ValueError(f"{flag}: {error}") from None
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    ctx = setup_distributed(args.device) if distributed else None
    try:
        setup = setup_from_args(args, device=ctx.device if ctx else None)
        _check_classes(setup.data, setup.classes)
        dataset = _eval_dataset(setup.data, args.split, args.limit)
        world, rank = (ctx.world_size, ctx.rank) if ctx else (1, 0)
        workers = args.workers if args.workers is not None else setup.data.workers
        check_value("data.workers", workers, name="the checkpoint's data.workers (give --workers N)")
        # workers die with this process (a kill -9 leaves no orphans) and leave Ctrl-C to it
        loader = StopSafeDataLoader(dataset, batch_size=setup.eval.batch_size, shuffle=False,
                                    num_workers=workers,
                                    sampler=ShardSampler(len(dataset), world, rank) if ctx else None,
                                    pin_memory=setup.device.type == "cuda")
        cfg = setup.eval
        main = rank == 0
        if main:
            over = f", {world} processes" if world > 1 else ""
            print(f"evaluating {args.checkpoint} on {setup.data.dataset}/{args.split} "
                  f"({len(dataset)} images{over}), {_settings(cfg)}")
        matrices = confusion_matrices(setup.model, loader, setup.classes.num_classes, cfg, setup.device,
                                      ignore_index=setup.data.ignore_index, data=setup.data, heads=heads,
                                      progress=args.progress and main)
        if not main:
            return 0
        metrics = head_metrics(matrices)
        names = list(setup.classes.names)
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

