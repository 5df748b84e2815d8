"""Train DANet: one process on a CPU or GPU, or many through torchrun (DDP + SyncBatchNorm).

With no arguments, ``danet train`` runs the embedded default: the ``synthetic`` preset, a tiny
backbone on generated scenes, on the CPU in a few minutes (1280 iterations, about 75 s of one
core's time), ending with a validation mIoU of about 0.75 (always predicting the background
scores 0.21).

    danet train                                            # CPU demo -> runs/synthetic-<time>/
    danet train --preset cityscapes --set data.root=/data/cityscapes
    danet train --preset ade20k --config my.yaml --set optim.lr=0.01 train.epochs=120 train.amp=bf16
    danet train --resume runs/cityscapes-20260101-120000   # continue: same LR, same data order
    torchrun --standalone --nproc_per_node=4 -m danet.cli train --preset cityscapes --set data.root=...
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=host0:29500 \
        --rdzv_id=city -m danet.cli train --preset cityscapes --set data.root=...   # on every node

Configuration: dataclass defaults (danet/config.py), then ``--preset`` (danet/configs/*.yaml,
default "synthetic"), then ``--config FILE``, then ``--set section.key=value ...`` (values in
YAML syntax); unknown keys are errors. Multi-node commands: see danet.distributed.

A run directory holds ``config.yaml``, ``metrics.jsonl`` (one JSON record per line: training
loss and LR every ``train.log_interval`` iterations, every validation), ``last.pt`` (the full
state, rewritten atomically at every epoch end, every ``train.checkpoint_interval`` iterations,
on SIGTERM or Ctrl-C and at the end) and ``checkpoint_best.pt`` (the best validation mIoU). An existing
run directory is never overwritten unless ``--resume`` or ``--overwrite`` says so.

Fitting a memory budget: ``train.batch_size`` is the global batch, split over processes and
``train.accum_steps`` (gradient accumulation; DDP syncs only on the last micro-step);
``train.amp=bf16`` (autocast) or ``fp16`` (autocast + GradScaler); ``train.channels_last``;
``train.activation_checkpointing`` (recompute backbone stages in backward); ``train.compile``.

Failures: a NaN/Inf loss stops the run before the update (exit status 1) and last.pt keeps the
last good state (a non-finite model is never saved); SIGTERM (preemption) or a first Ctrl-C
finishes the current iteration, writes last.pt and exits with status 143 (130 for Ctrl-C).
``--resume`` continues with the stored config (``--set`` may change e.g. workers; the LR schedule
continues as stored).

Exact resumption: the data order is a function of (seed, epoch) (DistributedSampler), each
sample's augmentation a function of (seed, epoch, index), and the other random state (dropout)
is restored from the checkpoint, which records the iteration within the epoch; a resumed run
skips the batches already done and continues bit for bit as an uninterrupted one on the CPU
(on GPUs, up to the nondeterminism of the CUDA kernels themselves).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from danet.checkpoint import (
    BEST,
    LAST,
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    non_finite_tensors,
    restore_rng_state,
)
from danet.config import (
    DEFAULT_PRESET,
    Config,
    apply_dict,
    available_presets,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
)
from danet.distributed import (
    DistributedContext,
    ResumableDistributedSampler,
    ShardSampler,
    all_gather_objects,
    all_reduce_sum,
    cleanup_distributed,
    convert_batchnorm,
    setup_distributed,
    wrap_ddp,
)
from danet.losses import DANetLoss
from danet.lr_policies import build_scheduler

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, 3, H, W) float, masks (B, H, W) int64


class NonFiniteLossError(RuntimeError):
    """The loss (or the model state) became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves behind."""

    model: nn.Module  # the unwrapped model
    run_dir: Path
    iteration: int
    epoch: int
    best_miou: float
    metrics: dict[str, Any] = field(default_factory=dict)  # the last validation
    losses: list[float] = field(default_factory=list)  # training loss of every iteration run here
    stopped_early: bool = False  # a signal or a stop request; last.pt holds the state
    signal_received: int | None = None  # SIGTERM or SIGINT when one stopped the run


# ------------------------------------------------------------------------------ data


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
    if count < 1:
        raise ValueError(f"data.train_samples / data.val_samples must be >= 1, got {count}")
    return Subset(dataset, range(count))


def get_datasets(cfg: Config) -> tuple[Dataset, Dataset, int]:
    """(train dataset with the training transform, val dataset with the eval transform, classes)."""
    from danet.data import build_dataset, eval_transforms, get_dataset_class, train_transforms

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
    if d.dataset != "synthetic":
        train_set, val_set = _limit(train_set, d.train_samples), _limit(val_set, d.val_samples)
    return train_set, val_set, get_dataset_class(d.dataset).NUM_CLASSES  # type: ignore[attr-defined]


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch splits: micro-batch per process x processes x accumulation steps."""

    micro_batch: int
    accum_steps: int
    iters_per_epoch: int
    total_iters: int
    epochs: int


def plan_batches(cfg: Config, num_train: int, world_size: int) -> BatchPlan:
    """Check the batch arithmetic and derive the run length in optimiser iterations."""
    t = cfg.train
    if t.batch_size < 1 or t.accum_steps < 1:
        raise ValueError(f"train.batch_size and train.accum_steps must be >= 1, got {t.batch_size}, "
                         f"{t.accum_steps}")
    if t.batch_size % (world_size * t.accum_steps):
        raise ValueError(f"train.batch_size={t.batch_size} (global) is not divisible by {world_size} "
                         f"processes x {t.accum_steps} accumulation steps")
    micro = t.batch_size // (world_size * t.accum_steps)
    per_rank = math.ceil(num_train / world_size)  # DistributedSampler pads to equal shares
    iters_per_epoch = per_rank // (micro * t.accum_steps)
    if iters_per_epoch < 1:
        raise ValueError(f"{num_train} training samples do not fill one global batch of {t.batch_size}")
    if t.iters is not None:
        if t.iters < 1:
            raise ValueError(f"train.iters must be >= 1, got {t.iters}")
        total, epochs = t.iters, math.ceil(t.iters / iters_per_epoch)
    else:
        if t.epochs < 1:
            raise ValueError(f"train.epochs must be >= 1, got {t.epochs}")
        total, epochs = t.epochs * iters_per_epoch, t.epochs
    return BatchPlan(micro, t.accum_steps, iters_per_epoch, total, epochs)


# ------------------------------------------------------------------------------ model and optimiser


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute the backbone's stages in backward instead of storing their activations.

    The backbone is a timm FeatureListNet, whose ``set_grad_checkpointing`` wraps each stage in
    torch.utils.checkpoint. (BatchNorm running statistics see the recomputed forward too.)
    """
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "set_grad_checkpointing"):
        raise ValueError("train.activation_checkpointing needs a timm backbone (set_grad_checkpointing)")
    backbone.set_grad_checkpointing(True)


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD or AdamW over two groups: the backbone at ``optim.lr``, the head at ``head_lr_mult`` x."""
    o = cfg.optim
    backbone_params, head_params = model.parameter_groups()  # type: ignore[operator]
    groups = [{"params": backbone_params, "lr": o.lr}, {"params": head_params, "lr": o.lr * o.head_lr_mult}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
    raise ValueError(f"unknown optimiser optim.name={o.name!r}; choose sgd or adamw")


def check_config(cfg: Config) -> None:
    """Reject settings no component would catch early (others are checked where they are used)."""
    if cfg.train.amp not in AMP_DTYPES:
        raise ValueError(f"train.amp must be one of {', '.join(AMP_DTYPES)}, got {cfg.train.amp!r}")
    low, high = cfg.data.scale_range
    if not 0 < low <= high:
        raise ValueError(f"data.scale_range must satisfy 0 < low <= high, got {list(cfg.data.scale_range)}")
    for name in ("val_interval", "checkpoint_interval", "log_interval"):
        if getattr(cfg.train, name) < 0:
            raise ValueError(f"train.{name} must be >= 0, got {getattr(cfg.train, name)}")


# ------------------------------------------------------------------------------ run directory and logs


def _default_run_dir(cfg: Config) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.name}-{stamp}"


def prepare_run_dir(run_dir: Path, *, resuming: bool, overwrite: bool) -> None:
    """Create ``run_dir``; refuse to clobber the checkpoints or log of another run."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"the run directory {run_dir} exists and is not a directory")
    existing = [name for name in (LAST, BEST, "metrics.jsonl") if (run_dir / name).exists()]
    if existing and not (resuming or overwrite):
        raise ValueError(
            f"{run_dir} already holds {', '.join(existing)} from another run; pass --resume {run_dir} to "
            "continue it, --overwrite to replace it, or choose another --output"
        )
    run_dir.mkdir(parents=True, exist_ok=True)


class MetricsLog:
    """Rank 0's JSON-lines log (and optional TensorBoard); every other rank writes nothing."""

    def __init__(self, run_dir: Path, enabled: bool, append: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self._file = open(run_dir / "metrics.jsonl", "a" if append else "w") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("train.tensorboard is on but the tensorboard package is not installed; "
                              "logging to metrics.jsonl only", stacklevel=2)
            else:
                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, kind: str, iteration: int, **values: Any) -> None:
        """Append one record (flushed at once, so a killed run keeps every line it logged)."""
        if self._file is None:
            return
        record = {"type": kind, "iteration": iteration, "time": time.time(), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, iteration)

    def close(self) -> None:
        """Flush and close the outputs."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


# ------------------------------------------------------------------------------ preemption


class StopFlag:
    """Set by SIGTERM/SIGINT or a callback; the loop checkpoints and exits after the current step.

    SIGTERM is how clusters preempt a job. The first Ctrl-C (SIGINT) also stops gracefully,
    with a checkpoint; a second one interrupts at once (KeyboardInterrupt), as usual.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_received: int | None = None

    @contextlib.contextmanager
    def handle_signals(self) -> Iterator[None]:
        """Turn SIGTERM and the first SIGINT into stop requests while the block runs (main thread)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        # getsignal gives None for a handler installed outside Python: restore the default then
        previous = {sig: signal.getsignal(sig) or signal.SIG_DFL for sig in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum: int, frame: Any) -> None:
            self.requested, self.signal_received = True, signum
            if signum == signal.SIGINT:
                print("\nCtrl-C: stopping after this iteration with a checkpoint (Ctrl-C again to abort)",
                      file=sys.stderr)
                signal.signal(signal.SIGINT, previous[signal.SIGINT])

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old_handler in previous.items():
                signal.signal(sig, old_handler)


# ------------------------------------------------------------------------------ the loop


@dataclass
class TrainState:
    """The counters a checkpoint records next to the model/optimiser/scheduler states."""

    iteration: int = 0  # optimiser steps done
    epoch: int = 0  # the epoch in progress
    iteration_in_epoch: int = 0  # its steps done
    best_miou: float = float("-inf")
    last_metrics: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """One training run; :func:`train` is the function to call."""

    def __init__(self, cfg: Config, ctx: DistributedContext, run_dir: Path,
                 on_step: Callable[[int, nn.Module], bool | None] | None = None) -> None:
        self.cfg, self.ctx, self.run_dir, self.on_step = cfg, ctx, run_dir, on_step
        t = cfg.train
        # seeds offset by rank: dropout differs per process; DDP broadcasts rank 0's initial weights
        torch.manual_seed(t.seed + ctx.rank)
        np.random.seed(t.seed + ctx.rank)
        random.seed(t.seed + ctx.rank)

        train_set, val_set, self.num_classes = get_datasets(cfg)
        self.plan = plan_batches(cfg, len(train_set), ctx.world_size)  # type: ignore[arg-type]
        self.train_set = SeededAugmentation(train_set, t.seed)
        self.sampler = ResumableDistributedSampler(self.train_set, ctx.world_size, ctx.rank, seed=t.seed,
                                                   shuffle=True, drop_last=False)
        loader_kw = {"num_workers": cfg.data.workers, "pin_memory": ctx.device.type == "cuda",
                     "persistent_workers": False}  # fresh workers each epoch see the dataset's new epoch
        # The loaders draw their worker seeds from their own generators, not from the global one
        self.train_loader = DataLoader(self.train_set, batch_size=self.plan.micro_batch, sampler=self.sampler,
                                       drop_last=True, generator=torch.Generator().manual_seed(t.seed),
                                       **loader_kw)
        self.val_loader = DataLoader(val_set, batch_size=cfg.eval.batch_size,
                                     sampler=ShardSampler(len(val_set), ctx.world_size, ctx.rank),  # type: ignore[arg-type]
                                     generator=torch.Generator().manual_seed(t.seed), **loader_kw)

        from danet.models import build_model

        self.model = build_model(cfg.model, self.num_classes).to(ctx.device)  # unwrapped: what we save
        if t.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.model = convert_batchnorm(self.model, ctx, t.sync_bn)
        self.ddp = wrap_ddp(self.model, ctx)
        # torch.compile goes around the DDP module (DDPOptimizer splits the graph at bucket boundaries)
        self.train_model: nn.Module = torch.compile(self.ddp) if t.compile else self.ddp
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.plan.total_iters)
        self.amp_dtype = AMP_DTYPES[t.amp]
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=t.amp == "fp16")
        self.criterion = DANetLoss(cfg.loss.weights, cfg.loss.aux_weight, cfg.data.ignore_index)
        self.state = TrainState()
        self.stop = StopFlag()
        self.losses: list[float] = []

    # -------------------------------------------------------------- checkpoints

    def resume_from(self, path: Path) -> None:
        """Load the full training state of ``path`` (every rank reads it)."""
        # on the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest to the device
        ckpt = load_checkpoint(path, map_location="cpu")
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            raise ValueError(f"{path} does not fit the configured model: {err}") from None
        changed = _schedule_changes(ckpt["config"], config_to_dict(self.cfg))
        if changed:
            warnings.warn(f"resuming with changed {', '.join(changed)}: the LR schedule continues as "
                          f"stored in {path}, not as the new settings would make it", stacklevel=2)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(ckpt["iteration"], ckpt["epoch"], ckpt["iteration_in_epoch"],
                                ckpt.get("best_miou", float("-inf")), ckpt.get("metrics", {}))
        rng = ckpt["rng"]
        if len(rng) == self.ctx.world_size:
            restore_rng_state(rng[self.ctx.rank])
        else:
            warnings.warn(f"{path} was written by {len(rng)} processes, this run has {self.ctx.world_size}: "
                          "the LR schedule continues exactly, but the per-process data shares and dropout "
                          "masks differ from an uninterrupted run", stacklevel=2)
            torch.manual_seed(self.cfg.train.seed + self.ctx.rank + self.state.iteration)
        if self.ctx.is_main:
            print(f"resumed from {path}: iteration {self.state.iteration}/{self.plan.total_iters}, "
                  f"epoch {self.state.epoch + 1}, LR {self.optimizer.param_groups[0]['lr']:.3g}")

    def save(self, *names: str) -> None:
        """Write the full state to ``names`` in the run dir (rank 0), refusing a non-finite model.

        Every rank takes part: the RNG states of all ranks are gathered into the checkpoint.
        """
        rng = all_gather_objects(capture_rng_state())
        model_state = self.model.state_dict()
        bad = non_finite_tensors(model_state)  # checked on every rank, so that every rank stops
        if bad:
            raise NonFiniteLossError(
                f"the model holds NaN/Inf values at iteration {self.state.iteration} (in {', '.join(bad[:5])}"
                f"{', ...' if len(bad) > 5 else ''}); nothing saved: {self._last_good()}"
            )
        if not self.ctx.is_main:
            return
        checkpoint = {
            "model": model_state,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "iteration": self.state.iteration,
            "epoch": self.state.epoch,
            "iteration_in_epoch": self.state.iteration_in_epoch,
            "rng": rng,
            "config": config_to_dict(self.cfg),
            "best_miou": self.state.best_miou,
            "metrics": self.state.last_metrics,
            "num_classes": self.num_classes,
        }
        for name in names:
            atomic_save(checkpoint, self.run_dir / name)

    def _last_good(self) -> str:
        """Where the last good state is, for error messages."""
        path = self.run_dir / LAST
        if not path.is_file():
            return "no checkpoint had been written yet"
        return f"the last good checkpoint is {path}, iteration {load_checkpoint(path)['iteration']}"

    # -------------------------------------------------------------- validation

    def validate(self, log: MetricsLog) -> dict[str, Any]:
        """Evaluate the unwrapped model on the validation split (metrics reduced over ranks)."""
        from danet.evaluate import evaluate

        metrics = evaluate(self.model, self.val_loader, self.num_classes, self.cfg.eval, self.ctx.device,
                           ignore_index=self.cfg.data.ignore_index,
                           progress=self.cfg.train.progress and self.ctx.is_main)
        self.model.train()
        self.state.last_metrics = {k: v for k, v in metrics.items()}
        miou = float(metrics["mIoU"])
        improved = miou > self.state.best_miou
        if improved:
            self.state.best_miou = miou
        log.write("val", self.state.iteration, epoch=self.state.epoch, **_jsonable(metrics),
                  best_mIoU=self.state.best_miou)
        if self.ctx.is_main:
            print(f"validation at iteration {self.state.iteration} (epoch {self.state.epoch}): "
                  f"mIoU {miou:.4f}  pixAcc {float(metrics['pixAcc']):.4f}  "
                  f"best mIoU {self.state.best_miou:.4f}")
        metrics["improved"] = improved
        return metrics

    # -------------------------------------------------------------- one iteration

    def _step(self, batches: Iterator[Batch]) -> tuple[float, dict[str, float], bool]:
        """One optimiser step over ``accum_steps`` micro-batches.

        Returns the loss and its per-output terms (averaged over micro-steps and processes) and
        whether any process asked to stop.

        Every rank returns the same values; a non-finite loss raises before the update is applied.
        """
        device, accum = self.ctx.device, self.plan.accum_steps
        ddp = self.ddp if isinstance(self.ddp, nn.parallel.DistributedDataParallel) else None
        loss_sum = torch.zeros((), device=device)
        term_sums: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            images, masks = next(batches)
            images = images.to(device, non_blocking=True, memory_format=self.memory_format)
            masks = masks.to(device, non_blocking=True)
            # gradients are all-reduced only on the last micro-step
            sync = contextlib.nullcontext() if ddp is None or micro == accum - 1 else ddp.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    outputs = self.train_model(images)
                    loss, terms = self.criterion(outputs, masks)
                self.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach()
            for name, term in terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + term
        # one all-reduce carries the loss, the non-finite count and stop requests of every rank
        flags = torch.stack([loss_sum / accum, (~torch.isfinite(loss_sum)).float(),
                             torch.tensor(float(self.stop.requested), device=device),
                             *(term / accum for term in term_sums.values())])
        flags = all_reduce_sum(flags).tolist()
        mean_loss = flags[0] / self.ctx.world_size
        mean_terms = {name: value / self.ctx.world_size
                      for name, value in zip(term_sums, flags[3:], strict=True)}
        if flags[1] > 0:
            raise NonFiniteLossError(
                f"the loss is {mean_loss} at iteration {self.state.iteration + 1} "
                f"(epoch {self.state.epoch + 1}): training stopped; {self._last_good()}. Try a lower "
                "optim.lr, a warm-up (schedule.warmup_iters), optim.grad_clip, or train.amp=bf16 "
                "instead of fp16."
            )
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return mean_loss, mean_terms, flags[2] > 0

    # -------------------------------------------------------------- the run

    def fit(self) -> TrainResult:
        """Train until the planned iteration count (or a stop request); validate and checkpoint."""
        cfg, ctx, plan, state = self.cfg, self.ctx, self.plan, self.state
        log = MetricsLog(self.run_dir, ctx.is_main, append=state.iteration > 0,
                         tensorboard=cfg.train.tensorboard)
        samples_per_iter_per_rank = plan.micro_batch * plan.accum_steps
        stopped = False
        self.train_model.train()
        try:
            with self.stop.handle_signals():
                while state.iteration < plan.total_iters and not stopped:
                    self.sampler.set_epoch(state.epoch)
                    self.train_set.set_epoch(state.epoch)
                    self.sampler.set_start(state.iteration_in_epoch * samples_per_iter_per_rank)
                    stopped = self._run_epoch(log)
                    if stopped:
                        break
                    state.epoch += 1
                    state.iteration_in_epoch = 0
                    final = state.iteration >= plan.total_iters
                    interval = cfg.train.val_interval
                    improved = False
                    if final or (interval and state.epoch % interval == 0):
                        improved = bool(self.validate(log)["improved"])
                    self.save(*((LAST, BEST) if improved else (LAST,)))
            if stopped:
                self.save(LAST)
                if ctx.is_main:
                    received = self.stop.signal_received
                    why = signal.Signals(received).name if received else "stop requested"
                    print(f"{why}: stopped at iteration {state.iteration}; state saved to "
                          f"{self.run_dir / LAST}. Continue with: danet train --resume {self.run_dir}",
                          file=sys.stderr)
        finally:
            log.close()
        return TrainResult(self.model, self.run_dir, state.iteration, state.epoch, state.best_miou,
                           state.last_metrics, self.losses, stopped, self.stop.signal_received)

    def _run_epoch(self, log: MetricsLog) -> bool:
        """Run the rest of the current epoch; True when a stop was requested (state is consistent)."""
        cfg, ctx, plan, state = self.cfg, self.ctx, self.plan, self.state
        epoch_iters = min(plan.iters_per_epoch, plan.total_iters - state.iteration + state.iteration_in_epoch)
        bar = tqdm(total=epoch_iters, initial=state.iteration_in_epoch,
                   desc=f"epoch {state.epoch + 1}/{plan.epochs}",
                   disable=not (cfg.train.progress and ctx.is_main), dynamic_ncols=True, leave=False)
        batches = iter(self.train_loader)
        start, done_here = time.perf_counter(), 0
        try:
            while state.iteration_in_epoch < epoch_iters:
                lr, lr_head = (group["lr"] for group in self.optimizer.param_groups)  # this step's LRs
                loss, terms, stop_requested = self._step(batches)
                state.iteration += 1
                state.iteration_in_epoch += 1
                self.losses.append(loss)
                done_here += 1
                images_per_s = done_here * cfg.train.batch_size / max(time.perf_counter() - start, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{images_per_s:.1f}")
                if cfg.train.log_interval and state.iteration % cfg.train.log_interval == 0:
                    log.write("train", state.iteration, epoch=state.epoch, loss=loss,
                              **{f"loss_{name}": value for name, value in terms.items()},
                              lr=lr, lr_head=lr_head, images_per_s=images_per_s)
                if self.on_step is not None and self.on_step(state.iteration, self.model):
                    self.stop.requested = True
                if stop_requested or (self.stop.requested and not ctx.distributed):
                    return True
                interval = cfg.train.checkpoint_interval
                if interval and state.iteration % interval == 0 and state.iteration_in_epoch < epoch_iters:
                    self.save(LAST)
        finally:
            bar.close()
        return False


def _schedule_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that shape the LR schedule and differ between a checkpoint's config and ``current``."""
    keys = [("optim", k) for k in current["optim"]] + [("schedule", k) for k in current["schedule"]]
    keys += [("train", "epochs"), ("train", "iters"), ("train", "batch_size")]
    return [f"{section}.{key}" for section, key in keys
            if saved.get(section, {}).get(key) != current[section][key]]


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics with NaN turned into None (JSON has no NaN)."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return {key: clean(value) for key, value in metrics.items()}


def train(cfg: Config, *, resume: str | Path | None = None, overwrite: bool = False,
          on_step: Callable[[int, nn.Module], bool | None] | None = None) -> TrainResult:
    """Run training for ``cfg`` (a torchrun process group is joined when the environment has one).

    Args:
        cfg: the full configuration; ``cfg.train.output`` is the run dir (default runs/<name>-<time>).
        resume: a checkpoint file or a run directory (its last.pt) to continue from.
        overwrite: allow reusing a run directory that already holds another run's outputs.
        on_step: called after every optimiser step with (iteration, unwrapped model); returning
            True stops the run as SIGTERM does (a checkpoint is written).

    Raises:
        NonFiniteLossError: the loss became NaN/Inf (the last good checkpoint is kept).
    """
    check_config(cfg)
    ctx = setup_distributed(cfg.train.device)
    try:
        resume_path = resolve_resume_path(resume) if resume is not None else None
        if cfg.train.output is not None:
            run_dir = Path(cfg.train.output)
        elif resume_path is not None:
            run_dir = resume_path.parent
        else:
            run_dir = _default_run_dir(cfg)
        run_dir = Path(all_gather_objects(str(run_dir))[0])  # rank 0's clock names the run for everyone
        cfg.train.output = str(run_dir)  # config.yaml and checkpoints record where the run lives
        if ctx.is_main:
            prepare_run_dir(run_dir, resuming=resume_path is not None, overwrite=overwrite)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        trainer = Trainer(cfg, ctx, run_dir, on_step=on_step)
        if resume_path is not None:
            trainer.resume_from(resume_path)
        if ctx.is_main:
            p = trainer.plan
            print(f"training {cfg.name}: {p.total_iters} iterations ({p.epochs} epochs of "
                  f"{p.iters_per_epoch}), global batch {cfg.train.batch_size} = {ctx.world_size} "
                  f"process(es) x {p.accum_steps} accumulation step(s) x {p.micro_batch}, "
                  f"on {ctx.device}; run dir {run_dir}")
        return trainer.fit()
    finally:
        cleanup_distributed()


def resolve_resume_path(resume: str | Path) -> Path:
    """A checkpoint file, or a run directory whose last.pt is meant."""
    path = Path(resume)
    if path.is_dir():
        path = path / LAST
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist")
    return path


# ------------------------------------------------------------------------------ danet train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``danet train``."""
    parser.add_argument("--preset", default=None,
                        help=f"recipe to start from: {', '.join(available_presets())} "
                             f"(default: {DEFAULT_PRESET})")
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML file overriding the preset")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        dest="overrides",
                        help="override any field, e.g. optim.lr=0.01 train.epochs=2 train.amp=bf16 "
                             "data.root=/data/cityscapes (sections: model, data, eval, optim, schedule, "
                             "loss, train; see danet/config.py)")
    parser.add_argument("--output", "-o", default=None, metavar="DIR",
                        help="run directory (default: runs/<preset>-<UTC time>; "
                             "same as --set train.output=DIR)")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR|CHECKPOINT",
                        help="continue a run from its last.pt (its stored config, plus any --set)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow writing into a run directory that holds another run's checkpoints")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")


def resolve_config(args: argparse.Namespace) -> Config:
    """The Config the command line asks for (on --resume: the checkpoint's, plus --set)."""
    if args.resume is not None:
        if args.preset is not None or args.config is not None:
            raise ValueError("--resume continues with the checkpoint's stored config; "
                             "only --set overrides can be added")
        ckpt = load_checkpoint(resolve_resume_path(args.resume))
        cfg = apply_dict(config_from_dict(ckpt["config"]), parse_overrides(args.overrides))
    else:
        cfg = load_config(args.preset or DEFAULT_PRESET, args.config, args.overrides)
    if args.output is not None:
        cfg.train.output = args.output
    return cfg


def run(args: argparse.Namespace) -> int:
    """Entry point of ``danet train``."""
    cfg = resolve_config(args)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    try:
        result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except NonFiniteLossError as err:
        print(f"danet train: error: {err}", file=sys.stderr)
        return 1
    if result.stopped_early:  # the shell's status for "terminated by SIGTERM/SIGINT": 143/130
        return 128 + (result.signal_received or signal.SIGTERM)
    if result.metrics and int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result.iteration} iterations; final mIoU {float(result.metrics['mIoU']):.4f}, "
              f"pixAcc {float(result.metrics['pixAcc']):.4f}, best mIoU {result.best_miou:.4f}; "
              f"outputs in {result.run_dir}")
    return 0
