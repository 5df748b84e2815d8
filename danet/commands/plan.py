"""Will it fit? The GPU memory of a training step and the largest batch per GPU, predicted without a GPU.

Examples::

    danet plan --preset cityscapes                       # the preset's crop and batch per GPU
    danet plan --preset cityscapes --size 1024 2048 --batch 1
    danet plan --preset cityscapes --gpus 4 --memory 48 --json

For a recipe (--preset, --config, --set, as ``danet train`` reads them) and an input size
(default the training crop), the training step is traced on fake tensors (danet.training.memory:
the forward, the three-output loss plus aux, the backward and the optimiser's update, as the
CUDA caching allocator would allocate them; no GPU, no data) for each attention (reference and
fused) and each precision (fp32 and AMP: the recipe's train.amp, else bf16). Printed per row:
the peak at batch 1 and what each further image adds, the peak at --batch (default the
recipe's micro-batch per GPU), and the largest batch that fits cards of 16, 24, 40, 80 and 141
GB and any --memory: those whose peak plus 10% (the allocator's fragmentation and library
workspaces) fits the card less 1.5 GiB (the CUDA context). Every other setting is the
recipe's: backbone, output stride, aux head, optimiser, train.channels_last,
train.activation_checkpointing, train.accum_steps (held gradients), --gpus (DDP buckets).

A row takes two traces (batch 1 and 2), a few seconds each for DANet-ResNet101 whatever the
size: the four rows of its table take 20 to 35 s of CPU time on two cores, torch's import
included.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from danet.config import DEFAULT_PRESET, Config, load_config
from danet.data import get_dataset_class
from danet.evaluation.cost import format_bytes
from danet.training.data import micro_batch
from danet.training.memory import (
    ALLOCATOR_MARGIN,
    DEVICE_RESERVE_BYTES,
    GPU_SIZES_GB,
    StepMemoryModel,
    largest_batches,
)
from danet.training.step import TrainingStep

__all__ = ["plan_rows", "run"]

_PRECISION_NAMES = {"none": "fp32", "bf16": "bf16 AMP", "fp16": "fp16 AMP"}


def _micro_batch(cfg: Config, gpus: int) -> int:
    """The recipe's images per GPU per step (danet.training.data.micro_batch), or an error that
    points to --batch."""
    try:
        return micro_batch(cfg, gpus)
    except ValueError as err:
        raise ValueError(f"{err}; give --batch") from None


def _num_classes(cfg: Config, classes: int | None) -> int:
    if classes is not None:
        return classes
    try:
        return get_dataset_class(cfg.data.dataset, cfg.data.root).NUM_CLASSES  # type: ignore[attr-defined]
    except FileNotFoundError:
        raise ValueError(f"the {cfg.data.dataset} dataset reads its classes from data.root: give --classes N "
                         f"or --set data.root=DIR") from None


def plan_rows(cfg: Config, num_classes: int, height: int, width: int, batch: int, *, gpus: int = 1,
              attentions: tuple[str, ...] = ("reference", "fused"), amps: tuple[str, ...] = ("none", "bf16"),
              sizes_gb: tuple[float, ...] = GPU_SIZES_GB) -> list[dict[str, Any]]:
    """One row per (attention, precision): peaks in bytes and the largest batch per card size."""
    rows = []
    for attention in attentions:
        recipe = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=attention))
        step = TrainingStep(recipe, num_classes, device="cuda", fake=True, processes=gpus)
        for amp in amps:
            model = StepMemoryModel(step, height, width, amp=amp)
            largest = largest_batches(model, sizes_gb)
            rows.append({"attention": attention, "amp": amp, "state_bytes": model.state_bytes,
                         "peak_bytes_batch1": model.peak_bytes(1), "per_image_bytes": model.per_image_bytes,
                         "peak_bytes": model.peak_bytes(batch),
                         "largest_batch": {f"{gb:g}": n for gb, n in largest.items()}})
    return rows


def _table(rows: list[dict[str, Any]], batch: int) -> str:
    sizes = list(rows[0]["largest_batch"])
    header = ["attention", "precision", "batch 1", "per image", *([f"batch {batch}"] if batch != 1 else []),
              *(f"{gb} GB" for gb in sizes)]
    lines = [header]
    for row in rows:
        lines.append([row["attention"], _PRECISION_NAMES[row["amp"]], format_bytes(row["peak_bytes_batch1"]),
                      format_bytes(row["per_image_bytes"]),
                      *([format_bytes(row["peak_bytes"])] if batch != 1 else []),
                      *(str(row["largest_batch"][gb]) for gb in sizes)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(line, widths, strict=True))).rstrip() for line in lines)


def _describe(cfg: Config, num_classes: int, height: int, width: int, batch: int, gpus: int) -> str:
    m = cfg.model
    extras = [f"output stride {m.output_stride}", *(["multi-grid"] if m.multi_grid else []),
              *(["aux head"] if m.aux else []), f"{cfg.optim.name.upper()}",
              *(["channels_last"] if cfg.train.channels_last else []),
              *(["activation checkpointing"] if cfg.train.activation_checkpointing else []),
              *([f"{cfg.train.accum_steps} accumulation steps"] if cfg.train.accum_steps > 1 else [])]
    return (f"{cfg.name}: DANet {m.backbone} ({', '.join(extras)}), {num_classes} classes, {gpus} GPU(s); "
            f"input {height} x {width}, batch {batch} per GPU")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``danet plan``: print the table (or JSON) of predicted peaks and batches."""
    cfg = load_config(args.preset or DEFAULT_PRESET, args.config, args.overrides)
    height, width = args.size if args.size is not None else (cfg.data.crop_size,) * 2
    extra = tuple(args.memory or ())
    if any(gb * (1 << 30) <= DEVICE_RESERVE_BYTES for gb in extra):
        raise ValueError(f"--memory must be above {DEVICE_RESERVE_BYTES / (1 << 30):g} GB (the CUDA "
                         f"context's reserve), got {' '.join(f'{gb:g}' for gb in extra)}")
    batch = args.batch if args.batch is not None else _micro_batch(cfg, args.gpus)
    num_classes = _num_classes(cfg, args.classes)
    attentions = tuple(dict.fromkeys(args.attention or ("reference", "fused")))
    amps = tuple(dict.fromkeys(args.amp or ("none", cfg.train.amp if cfg.train.amp != "none" else "bf16")))
    sizes = tuple(dict.fromkeys((*GPU_SIZES_GB, *extra)))
    rows = plan_rows(cfg, num_classes, height, width, batch, gpus=args.gpus, attentions=attentions, amps=amps,
                     sizes_gb=sizes)
    if args.json:
        print(json.dumps({"name": cfg.name, "model": dataclasses.asdict(cfg.model), "classes": num_classes,
                          "height": height, "width": width, "batch": batch, "gpus": args.gpus,
                          "allocator_margin": ALLOCATOR_MARGIN, "device_reserve_bytes": DEVICE_RESERVE_BYTES,
                          "rows": rows}, indent=2))
        return 0
    print(_describe(cfg, num_classes, height, width, batch, args.gpus))
    print(f"Predicted peak of a training step (allocated, state included; without a GPU) and the largest "
          f"batch per GPU whose peak + {ALLOCATOR_MARGIN:.0%} fits the card less "
          f"{DEVICE_RESERVE_BYTES / (1 << 30):g} GiB:\n")
    print(_table(rows, batch))
    return 0
