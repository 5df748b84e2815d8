"""The training data: datasets with seeded augmentation, and the batch plan.

Each training sample's augmentation is a pure function of (seed, epoch, index)
(:class:`SeededAugmentation`), so neither worker count, process rank nor a resume changes it;
:func:`plan_batches` splits the global batch into micro-batches per process and accumulation
steps and derives the run length in optimiser iterations.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from danet.config import Config, usable_cpus
from danet.data import (
    SegmentationDataset,
    build_dataset,
    eval_transforms,
    get_dataset_class,
    train_transforms,
)
from danet.data.classes import DatasetClasses

__all__ = ["BatchPlan", "SeededAugmentation", "check_data_source", "get_datasets", "micro_batch",
           "plan_batches"]


class SeededAugmentation(Dataset):
    """Wrap a dataset so each item's random transform is a pure function of (seed, epoch, index).

    The transforms draw from torch's global generator; each item runs under a forked generator
    seeded from (seed, epoch, index), so neither worker count nor process rank nor a resume
    changes the augmentation, and the caller's random stream (dropout) is left untouched.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentations (call before creating the epoch's iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item_seed = int(np.random.SeedSequence((self.seed, self.epoch, index)).generate_state(1)[0])
        python_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(item_seed)  # the CPU one: CUDA streams stay untouched
                random.seed(item_seed)
                return self.dataset[index]
        finally:
            random.setstate(python_state)


def _limit(dataset: Dataset, count: int | None) -> Dataset:
    if count is None or count >= len(dataset):  # type: ignore[arg-type]
        return dataset
    return Subset(dataset, range(count))


def check_data_source(cfg: Config) -> None:
    """A dataset read from disk needs ``data.root``: say how to give it, before anything is built."""
    if cfg.data.root is None and issubclass(get_dataset_class(cfg.data.dataset), SegmentationDataset):
        raise ValueError(f"the {cfg.data.dataset} dataset is read from disk: pass its directory with "
                         f"--set data.root=/path/to/{cfg.data.dataset}")


def get_datasets(cfg: Config) -> tuple[Dataset, Dataset, DatasetClasses]:
    """(train dataset with the training transform, val dataset with the eval transform, the classes)."""
    d = cfg.data
    extra: dict[str, dict[str, Any]] = {"train": {}, "val": {}}
    if d.dataset == "synthetic":  # generated: the sample counts and size are constructor arguments
        extra = {split: {"num_samples": n, "image_size": d.image_size}
                 for split, n in (("train", d.train_samples), ("val", d.val_samples))}
    train_tf = train_transforms(d.base_size, d.crop_size, d.mean, d.std, ignore_index=d.ignore_index,
                                scale_range=d.scale_range)
    train_set = build_dataset(d.dataset, d.root, "train", transform=train_tf, **extra["train"])
    val_tf = eval_transforms(d.mean, d.std)
    val_set = build_dataset(d.dataset, d.root, "val", transform=val_tf, **extra["val"])
    for dataset in (train_set, val_set):
        if getattr(dataset, "CHECK_MASKS_BEFORE_TRAINING", False):  # before the run directory exists
            dataset.check_masks(threads=min(8, usable_cpus()))  # type: ignore[attr-defined]
    if d.dataset != "synthetic":
        train_set, val_set = _limit(train_set, d.train_samples), _limit(val_set, d.val_samples)
    return train_set, val_set, DatasetClasses.of(d.dataset, get_dataset_class(d.dataset, d.root))


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch splits: micro-batch per process x processes x accumulation steps."""

    micro_batch: int
    accum_steps: int
    iters_per_epoch: int
    total_iters: int
    epochs: int


def micro_batch(cfg: Config, world_size: int) -> int:
    """The images per process per micro-step: ``train.batch_size`` (global) over ``world_size``
    processes and ``train.accum_steps``.

    Raises:
        ValueError: the global batch does not divide evenly.
    """
    t = cfg.train
    if t.batch_size % (world_size * t.accum_steps):
        raise ValueError(f"train.batch_size={t.batch_size} (global) is not divisible by {world_size} "
                         f"processes x {t.accum_steps} accumulation steps")
    return t.batch_size // (world_size * t.accum_steps)


def plan_batches(cfg: Config, num_train: int, world_size: int) -> BatchPlan:
    """Check the batch arithmetic and derive the run length in optimiser iterations."""
    t = cfg.train
    micro = micro_batch(cfg, world_size)
    per_rank = math.ceil(num_train / world_size)  # DistributedSampler pads to equal shares
    iters_per_epoch = per_rank // (micro * t.accum_steps)
    if iters_per_epoch < 1:
        raise ValueError(f"{num_train} training samples do not fill one global batch of {t.batch_size}")
    if t.iters is not None:
        total, epochs = t.iters, math.ceil(t.iters / iters_per_epoch)
    else:
        total, epochs = t.epochs * iters_per_epoch, t.epochs
    return BatchPlan(micro, t.accum_steps, iters_per_epoch, total, epochs)

