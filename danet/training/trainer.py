"""The trainer: one training run, on one process or many (torchrun, DDP + SyncBatchNorm).

:func:`train` is the function to call (``danet train`` is danet.commands.train). It joins a
torchrun process group when the environment has one, checks the run directory, builds the
data, model and optimiser, resumes or loads pretrained weights, creates the run directory
only once all that succeeded, and runs :class:`Trainer.fit`. What each file of a run
directory holds and what a failure leaves behind: danet.commands.train's docstring and
docs/training.md.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from danet.config import Config, config_to_dict, usable_cpus
from danet.distributed import (
    DistributedContext,
    Progress,
    ResumableDistributedSampler,
    ShardSampler,
    all_gather_objects,
    all_reduce_sum,
    cleanup_distributed,
    convert_batchnorm,
    setup_distributed,
    stalled_ranks_named,
    wrap_ddp,
)
from danet.evaluation.cost import format_duration
from danet.evaluation.evaluate import evaluate
from danet.io.checkpoint import (
    LAST,
    capture_rng_state,
    load_training_state,
    non_finite_tensors,
    restore_rng_state,
)
from danet.models import build_model, load_weights
from danet.models.weights import load_state_dict_checked
from danet.runtime import AMP_DTYPES, check_attention_backend, progress_bar, set_threads
from danet.training.cpu_time import estimate_iteration
from danet.training.data import SeededAugmentation, check_data_source, get_datasets, plan_batches
from danet.training.losses import DANetLoss
from danet.training.memory import check_training_fits
from danet.training.optimizer import build_optimizer, group_settings
from danet.training.resume import (
    LoadedCheckpoint,
    RunCheckpoints,
    StateCheck,
    check_lr_alive,
    check_resume,
    resolve_resume_path,
)
from danet.training.run_dir import (
    METRICS,
    MetricsLog,
    RunDirLock,
    claim_run_dir,
    create_run_dir,
    latest_target,
    mark_latest,
    release_reservation,
    remove_unstarted_run,
    reserve_run_dir,
)
from danet.training.schedules import build_scheduler
from danet.training.stopping import StopFlag, StopSafeDataLoader

Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, 3, H, W) float, masks (B, H, W) int64

__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "train"]


class NonFiniteLossError(RuntimeError):
    """The loss (or the model state) became NaN or Inf; the message names the checkpoint to resume from."""


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


# ------------------------------------------------------------------------------ the trainer


@dataclass
class TrainState:
    """The counters a checkpoint records next to the model/optimiser/scheduler states."""

    iteration: int = 0  # optimiser steps done
    epoch: int = 0  # the epoch in progress
    iteration_in_epoch: int = 0  # its steps done
    best_miou: float = float("-inf")
    last_metrics: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """One training run; :func:`train` is the function to call.

    Reads top to bottom: building the run, starting it (resume or pretrained weights), the loop
    (:meth:`fit` > :meth:`_run_epoch` > :meth:`_step`), validation, the checkpoint. Which
    checkpoint files exist and which is safe to continue from is ``self.checkpoints``
    (danet.training.resume.RunCheckpoints); signals are ``self.stop``
    (danet.training.stopping.StopFlag).
    """

    def __init__(self, cfg: Config, ctx: DistributedContext, run_dir: Path,
                 on_step: Callable[[int, nn.Module], bool | None] | None = None,
                 stop: StopFlag | None = None) -> None:
        self.cfg, self.ctx, self.run_dir, self.on_step = cfg, ctx, run_dir, on_step
        t = cfg.train
        # seeds offset by rank: dropout differs per process; DDP broadcasts rank 0's initial weights
        torch.manual_seed(t.seed + ctx.rank)
        np.random.seed(t.seed + ctx.rank)
        random.seed(t.seed + ctx.rank)

        train_set, val_set, self.classes = get_datasets(cfg)
        self.num_classes = self.classes.num_classes
        self.plan = plan_batches(cfg, len(train_set), ctx.world_size)  # type: ignore[arg-type]
        self.train_set = SeededAugmentation(train_set, t.seed)
        self.sampler = ResumableDistributedSampler(self.train_set, ctx.world_size, ctx.rank, seed=t.seed,
                                                   shuffle=True, drop_last=False)
        # more workers than cores only compete for them (torch warns, once per loader); the
        # samples do not depend on the worker count (SeededAugmentation)
        cores = usable_cpus()
        workers = min(cfg.data.workers, cores)
        if workers < cfg.data.workers and ctx.is_main:
            print(f"data.workers={cfg.data.workers}, but this process has {cores} CPU core(s): "
                  f"{workers} DataLoader worker(s)")
        loader_kw = {"num_workers": workers, "pin_memory": ctx.device.type == "cuda",
                     "persistent_workers": False}  # fresh workers each epoch see the dataset's new epoch
        # The loaders draw their worker seeds from their own generators, not from the global one
        self.train_loader = StopSafeDataLoader(self.train_set, batch_size=self.plan.micro_batch,
                                               sampler=self.sampler, drop_last=True,
                                               generator=torch.Generator().manual_seed(t.seed), **loader_kw)
        self.val_loader = StopSafeDataLoader(val_set, batch_size=cfg.eval.batch_size,
                                             sampler=ShardSampler(len(val_set), ctx.world_size, ctx.rank),  # type: ignore[arg-type]
                                             generator=torch.Generator().manual_seed(t.seed), **loader_kw)

        self.model = build_model(cfg.model, self.num_classes).to(ctx.device)  # unwrapped: what we save
        if t.activation_checkpointing:
            self.model.set_grad_checkpointing()
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
        self.stop = stop or StopFlag()
        self.progress = Progress(ctx)  # what each process last started, to name a stalled one
        probe = self.train_set[0][0][None].to(ctx.device, memory_format=self.memory_format)  # a fixed crop
        self.checkpoints = RunCheckpoints(run_dir, writer=ctx.is_main, cfg=cfg,
                                          state_check=StateCheck(self.model, probe, self.amp_dtype))
        self.losses: list[float] = []
        self.resumed_from: Path | None = None

    # -------------------------------------------------------------- how the run starts

    def resume_from(self, path: Path, *, resumed_here: bool, rebase_schedule: bool = False,
                    state: dict[str, Any] | None = None) -> None:
        """Load the full training state of ``path`` (every rank reads it); see danet.training.resume.

        ``resumed_here``: ``path`` is in this run's directory (the run continues in place).
        ``state``: ``path``'s training state, when the caller has read it already (on the CPU).
        ``rebase_schedule``: recompute the LR schedule (and the optimiser's hyperparameters) from
        this run's settings, continuing at the checkpoint's iteration, instead of the stored one.
        """
        # on the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest to the device
        ckpt = state if state is not None else load_training_state(path, map_location="cpu")
        check_resume(ckpt, self.cfg, total_iters=self.plan.total_iters,
                     iters_per_epoch=self.plan.iters_per_epoch, rebase=rebase_schedule, path=path)
        load_state_dict_checked(self.model, ckpt["model"], source=str(path))  # one line on a mismatch
        self.optimizer.load_state_dict(ckpt["optimizer"])
        iteration = ckpt["iteration"]
        if rebase_schedule:
            self._rebase_schedule(iteration)
        else:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        check_lr_alive(lrs, self.cfg, iteration, self.plan.total_iters)
        if ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(iteration, ckpt["epoch"], ckpt["iteration_in_epoch"],
                                ckpt.get("best_miou", float("-inf")), ckpt.get("metrics", {}))
        self.resumed_from = path
        self.checkpoints.restore(ckpt, resumed_here=path if resumed_here else None)
        rng = ckpt["rng"]
        if len(rng) == self.ctx.world_size:
            restore_rng_state(rng[self.ctx.rank])
        else:
            warnings.warn(f"{path} was written by {len(rng)} processes, this run has {self.ctx.world_size}: "
                          "the LR schedule continues exactly, but the per-process data shares and dropout "
                          "masks differ from an uninterrupted run", stacklevel=2)
            torch.manual_seed(self.cfg.train.seed + self.ctx.rank + iteration)
        if self.ctx.is_main:
            how = ", LR schedule rebased on the current settings" if rebase_schedule else ""
            print(f"resumed from {path}: iteration {iteration}/{self.plan.total_iters}, "
                  f"epoch {self.state.epoch + 1}/{self.plan.epochs}, "
                  f"LR {self.optimizer.param_groups[0]['lr']:.3g}{how}")

    def _rebase_schedule(self, iteration: int) -> None:
        """A fresh scheduler for this run's settings and length, advanced to ``iteration``."""
        for group, settings in zip(self.optimizer.param_groups, group_settings(self.cfg), strict=True):
            group.update(settings)
            group["initial_lr"] = settings["lr"]
        self.scheduler = build_scheduler(self.optimizer, self.cfg.schedule, self.plan.total_iters)
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore")
            for _ in range(iteration):
                self.scheduler.step()

    def load_pretrained(self, path: str | Path) -> None:
        """Start a new run from the weights of ``path`` (``model.pretrained``): the model only."""
        load_weights(self.model, path)
        if self.ctx.is_main:
            print(f"model initialised from {path}")

    # -------------------------------------------------------------- the run

    def fit(self) -> TrainResult:
        """Train until the planned iteration count (or a stop request); validate and checkpoint.

        The signal handlers stay installed until the final checkpoint of a stop is written.
        """
        cfg, ctx, state = self.cfg, self.ctx, self.state
        self.checkpoints.begin()  # the health reference; resumed from e.g. last_good.pt: it becomes last.pt
        previous_log = self.resumed_from.parent / METRICS if self.resumed_from is not None else None
        log = MetricsLog(self.run_dir, ctx.is_main, tensorboard=cfg.train.tensorboard,
                         resume_iteration=state.iteration if self.resumed_from is not None else None,
                         previous_log=previous_log)
        stopped = False
        self.train_model.train()
        try:
            stalls_named = stalled_ranks_named(self.progress, cfg.dist.timeout_s, self._saved)
            with self.stop.handle_signals(), stalls_named:
                while not stopped and (state.iteration < self.plan.total_iters or state.iteration_in_epoch):
                    stopped = self._run_epoch(log)
                    if not stopped:
                        self._end_epoch(log)
                if stopped and self.started:
                    with self.stop.saving():
                        self.save()
                if stopped:
                    self._report_stop()
        finally:
            log.close()
        return TrainResult(self.model, self.run_dir, state.iteration, state.epoch, state.best_miou,
                           state.last_metrics, self.losses, stopped, self.stop.signal_received)

    def _run_epoch(self, log: MetricsLog) -> bool:
        """Run the rest of the current epoch; True when a stop was requested (state is consistent)."""
        cfg, ctx, plan, state = self.cfg, self.ctx, self.plan, self.state
        self.sampler.set_epoch(state.epoch)
        self.train_set.set_epoch(state.epoch)
        self.sampler.set_start(state.iteration_in_epoch * plan.micro_batch * plan.accum_steps)
        epoch_iters = min(plan.iters_per_epoch, plan.total_iters - state.iteration + state.iteration_in_epoch)
        bar = progress_bar(total=epoch_iters, initial=state.iteration_in_epoch,
                           desc=f"epoch {state.epoch + 1}/{plan.epochs}",
                           enabled=cfg.train.progress and ctx.is_main, dynamic_ncols=True, leave=False)
        batches = iter(self.train_loader)
        start, done_here = time.perf_counter(), 0
        try:
            while state.iteration_in_epoch < epoch_iters:
                if self.stop.requested and not ctx.distributed:  # e.g. a signal during validation
                    return True
                lr, lr_head = (group["lr"] for group in self.optimizer.param_groups)  # this step's LRs
                loss, terms, stop_requested = self._step(batches)
                state.iteration += 1
                state.iteration_in_epoch += 1
                self.losses.append(loss)
                self.checkpoints.record(loss)
                done_here += 1
                images_per_s = done_here * cfg.train.batch_size / max(time.perf_counter() - start, 1e-9)
                bar.update(1)  # img_s in 3 digits: a CPU run's 0.047 is no 0.0
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{images_per_s:.3g}")
                if cfg.train.log_interval and state.iteration % cfg.train.log_interval == 0:
                    log.write("train", state.iteration, epoch=state.epoch, loss=loss,
                              **{f"loss_{name}": value for name, value in terms.items()},
                              lr=lr, lr_head=lr_head, images_per_s=images_per_s)
                if self.on_step is not None and self.on_step(state.iteration, self.model):
                    self.stop.request()
                if stop_requested or (self.stop.requested and not ctx.distributed):
                    return True
                interval = cfg.train.checkpoint_interval
                if interval and state.iteration % interval == 0 and state.iteration_in_epoch < epoch_iters:
                    self.save()
        finally:
            bar.close()
        return False

    def _step(self, batches: Iterator[Batch]) -> tuple[float, dict[str, float], bool]:
        """One optimiser step over ``accum_steps`` micro-batches.

        Returns the loss and its per-output terms (averaged over micro-steps and processes) and
        whether any process asked to stop.

        Every rank returns the same values; a non-finite loss raises before the update is applied.
        """
        self.progress.mark(f"step {self.state.iteration + 1}")
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
            where = f"iteration {self.state.iteration + 1} (epoch {self.state.epoch + 1})"
            report = self.checkpoints.divergence_report(f"the loss is {mean_loss} at {where}")
            raise NonFiniteLossError(report)
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return mean_loss, mean_terms, flags[2] > 0

    def _end_epoch(self, log: MetricsLog) -> None:
        """Close the epoch: validate (every ``val_interval`` epochs and at the end) and checkpoint."""
        state = self.state
        state.epoch += 1
        state.iteration_in_epoch = 0
        final = state.iteration >= self.plan.total_iters
        interval = self.cfg.train.val_interval
        improved = False
        if final or (interval and state.epoch % interval == 0):
            improved = bool(self.validate(log)["improved"])
        self.save(best=improved)

    def _saved(self) -> str:
        """Where the newest state is, for an error message."""
        last = self.checkpoints.last_saved
        return f"the state of iteration {last} is in {self.run_dir / LAST}" if last is not None else ""

    @property
    def started(self) -> bool:
        """Whether this run holds anything to save: an iteration done, or a resumed state."""
        return self.state.iteration > 0 or self.resumed_from is not None

    def _report_stop(self) -> None:
        if self.ctx.is_main:
            received = self.stop.signal_received
            why = signal.Signals(received).name if received else "stop requested"
            if not self.started:
                print(f"{why}: stopped before the first iteration; nothing to save", file=sys.stderr)
                return
            print(f"{why}: stopped at iteration {self.state.iteration}; state saved to "
                  f"{self.run_dir / LAST}. Continue with: danet train --resume {self.run_dir}",
                  file=sys.stderr)

    # -------------------------------------------------------------- validation

    def validate(self, log: MetricsLog) -> dict[str, Any]:
        """Evaluate the unwrapped model on the validation split (metrics reduced over ranks)."""
        self.progress.mark(f"validation after iteration {self.state.iteration}")
        metrics = evaluate(self.model, self.val_loader, self.num_classes, self.cfg.eval, self.ctx.device,
                           ignore_index=self.cfg.data.ignore_index, data=self.cfg.data,
                           progress=self.cfg.train.progress and self.ctx.is_main)
        self.model.train()
        self.state.last_metrics = dict(metrics)
        miou = float(metrics["mIoU"])
        improved = miou > self.state.best_miou
        if improved:
            self.state.best_miou = miou
        log.write("val", self.state.iteration, epoch=self.state.epoch, **metrics,
                  best_mIoU=self.state.best_miou)
        if self.ctx.is_main:
            print(f"validation at iteration {self.state.iteration} (epoch {self.state.epoch}): "
                  f"mIoU {miou:.4f}  pixAcc {float(metrics['pixAcc']):.4f}  "
                  f"best mIoU {self.state.best_miou:.4f}")
        metrics["improved"] = improved
        return metrics

    # -------------------------------------------------------------- checkpoints

    def save(self, *, best: bool = False) -> None:
        """Write the full state to last.pt (rank 0; also as checkpoint_best.pt when ``best``).

        Every rank takes part: the RNG states of all ranks are gathered into the checkpoint. A
        non-finite model is never saved.
        """
        self.progress.mark(f"saving iteration {self.state.iteration}")
        rng = all_gather_objects(capture_rng_state())
        model_state = self.model.state_dict()
        bad = non_finite_tensors(model_state)  # checked on every rank, so that every rank stops
        if bad:
            raise NonFiniteLossError(self.checkpoints.divergence_report(
                f"the model holds NaN/Inf values after iteration {self.state.iteration} (in "
                f"{', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); nothing saved",
                first_loss_after_save=False))
        self.checkpoints.save({
            "model": model_state,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "iteration": self.state.iteration,
            "epoch": self.state.epoch,
            "iteration_in_epoch": self.state.iteration_in_epoch,
            "iters_per_epoch": self.plan.iters_per_epoch,
            "rng": rng,
            "config": config_to_dict(self.cfg),
            "best_miou": self.state.best_miou,
            "metrics": self.state.last_metrics,
            "num_classes": self.num_classes,
            "classes": self.classes.to_record(),  # what inference needs, with config's data.mean/std
        }, self.state.iteration, best=best)


# ------------------------------------------------------------------------------ train()

_LONG_CPU_RUN_S = 3600.0  # above this estimate, a CPU run gets a warning with what to do instead


def _say_cpu_time(trainer: Trainer) -> None:
    """Print how long the run will take on this CPU (danet.training.cpu_time), with a warning when long."""
    cfg, plan = trainer.cfg, trainer.plan
    estimate = estimate_iteration(trainer.model, plan.micro_batch * plan.accum_steps, cfg.data.crop_size)
    remaining = plan.total_iters - trainer.state.iteration
    print(f"on this CPU: {estimate.describe(remaining)}")
    if estimate.seconds * remaining > _LONG_CPU_RUN_S:
        print(f"warning: {format_duration(estimate.seconds * remaining)} on this CPU ({cfg.model.backbone}, "
              f"{cfg.data.crop_size} px crops: a GPU recipe?); run it on a machine with CUDA, or make it "
              "small enough: e.g. --set model.backbone=resnet_tiny model.multi_grid=false data.crop_size=256 "
              "(what the folder preset does on a CPU)", file=sys.stderr)



def train(cfg: Config, *, resume: str | Path | LoadedCheckpoint | None = None, overwrite: bool = False,
          rebase_schedule: bool = False, on_step: Callable[[int, nn.Module], bool | None] | None = None,
          stop: StopFlag | None = None) -> TrainResult:
    """Run training for ``cfg`` (a torchrun process group is joined when the environment has one).

    Args:
        cfg: the full configuration; ``cfg.train.output`` is the run dir (default: the resumed
            checkpoint's directory, else runs/<name>-<time>).
        resume: a checkpoint file or a run directory (its last.pt) to continue from, or the
            checkpoint :func:`resolve_config` read already.
        overwrite: allow reusing a run directory that already holds another run's outputs.
        rebase_schedule: on resume, recompute the LR schedule from ``cfg`` (danet.training.resume).
        on_step: called after every optimiser step with (iteration, unwrapped model); returning
            True stops the run as SIGTERM does (a checkpoint is written).
        stop: a StopFlag whose signal handlers the caller installed (the command line's).

    Raises:
        NonFiniteLossError: the loss became NaN/Inf (the message names the checkpoint to resume from).
        danet.distributed.DistributedError: another process stopped answering or is gone (the message
            names it).
        danet.io.atomic.FileWriteError: a full disk or a read-only directory (the checkpoints are intact).
    """
    check_data_source(cfg)
    if cfg.data.root is not None:  # stored absolute: eval and predict then find the data from anywhere
        cfg.data.root = os.path.abspath(os.path.expanduser(cfg.data.root))
    set_threads(cfg.train.threads)
    torch.set_float32_matmul_precision(cfg.train.matmul_precision)
    ctx = setup_distributed(cfg.train.device, cfg.dist.timeout_s)
    reserved, claimed, lock = False, False, None
    if cfg.model.attention == "fused":
        check_attention_backend(ctx.device)  # e.g. DANET_KERNELS_BACKEND=triton without CUDA
    try:
        if isinstance(resume, LoadedCheckpoint):
            resume_path: Path | None = resume.path
        else:
            resume_path = resolve_resume_path(resume) if resume is not None else None
        if cfg.train.output is not None:
            run_dir = Path(cfg.train.output)
        elif resume_path is not None:
            run_dir = resume_path.parent  # where the checkpoint is, never a directory named inside it
        else:  # rank 0 claims a unique runs/<name>-<time> and names the run for everyone
            run_dir, reserved = (reserve_run_dir(cfg), True) if ctx.is_main else (Path(), False)
        run_dir = Path(all_gather_objects(str(run_dir))[0])
        cfg.train.output = str(run_dir)  # config.yaml and checkpoints record where the run lives
        resuming_here = resume_path is not None and resume_path.parent.resolve() == run_dir.resolve()
        lock = RunDirLock(run_dir)
        # an existing directory is locked now (a second writer is refused before anything is built),
        # a new one once the run is ready to start
        claim = {"writer": ctx.is_main, "resuming_here": resuming_here, "overwrite": overwrite}
        claim_run_dir(lock, **claim, create=False)
        trainer = Trainer(cfg, ctx, run_dir, on_step=on_step, stop=stop)
        if resume_path is not None:
            # the state is handed over, not bound here: nothing keeps its CPU copy through the run
            trainer.resume_from(resume_path, resumed_here=resuming_here, rebase_schedule=rebase_schedule,
                                state=resume.take() if isinstance(resume, LoadedCheckpoint) else None)
        elif cfg.model.pretrained is not None:
            trainer.load_pretrained(cfg.model.pretrained)
        if cfg.model.pretrained_backbone is not None and resume_path is None and ctx.is_main:
            print(f"backbone {cfg.model.backbone}: weights loaded from {cfg.model.pretrained_backbone}")
        created, previous_latest = reserved or not run_dir.exists(), latest_target()
        claim_run_dir(lock, **claim, create=True)  # everything checked, built and loaded: the run directory
        claimed = True
        if ctx.is_main:
            create_run_dir(run_dir, cfg)
            mark_latest(run_dir)  # runs/latest -> this run
            p = trainer.plan
            print(f"training {cfg.name}: {p.total_iters} iterations ({p.epochs} epochs of "
                  f"{p.iters_per_epoch}), global batch {cfg.train.batch_size} = {ctx.world_size} "
                  f"process(es) x {p.accum_steps} accumulation step(s) x {p.micro_batch}, "
                  f"on {ctx.device}; run dir {run_dir}")
            if ctx.device.type == "cpu" and cfg.train.progress:
                _say_cpu_time(trainer)
        if ctx.device.type == "cuda" and ctx.is_main:  # before the first step: warn if it will not fit
            check_training_fits(cfg, trainer.num_classes, trainer.plan.micro_batch, ctx.device,
                                processes=ctx.world_size)
        result = trainer.fit()
        if not trainer.started and ctx.is_main:  # e.g. Ctrl-C during start-up or the first iteration
            removed = remove_unstarted_run(run_dir, created=created, previous_latest=previous_latest)
            what = "the run directory" if removed else "the config.yaml and log it wrote in"
            print(f"removed {what} {run_dir}: no iteration ran", file=sys.stderr)
        return result
    finally:
        if lock is not None:
            lock.release()
        if reserved and not claimed:
            release_reservation(run_dir)  # a failed start leaves no run directory
        cleanup_distributed()

