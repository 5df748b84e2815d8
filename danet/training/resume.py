"""Continuing a run: from which checkpoint, with which settings, on which LR schedule.

``danet train --resume RUN`` continues from ``RUN/last.pt`` *in RUN* (or in an explicit
``--output``; never in a directory named inside the file) with the stored config plus any
``--set``. What a resumed run may change:

* how it runs (``data.workers``, ``train.progress``, intervals, ``train.amp``, ``dist.*``, ...): freely;
* what shapes the LR schedule (``optim.lr``, ``head_lr_mult``, ``momentum``, ``nesterov``,
  ``weight_decay``, every ``schedule.*``, ``train.epochs`` / ``train.iters``): only with
  ``--rebase-schedule``, which recomputes the schedule from the new settings *as if the run had
  used them from the start* and continues it at the checkpoint's iteration. Lengthening a finished
  run this way stretches its schedule: a poly run of 1000 iterations extended to 2000 continues
  at iteration 1000 with ``lr * (1 - 1000/2000) ** power``, not at the old schedule's end (LR 0);
* the optimiser (``optim.name``) and the epoch length (``train.batch_size``, the training set):
  never (the stored optimiser state and the position in the epoch would no longer mean anything);
  start a new run from the weights instead, ``--set model.pretrained=RUN/last.pt``.

A checkpoint at or past the run's last iteration, a stored config without the settings that
decide the schedule and the run length (a file not written by ``danet train``), and a schedule
that would train at LR 0 are refused with a message that says what to do.

Which checkpoint to continue from after a divergence: :class:`LossHealth` judges the training
loss against its recent healthy level; :class:`RunCheckpoints` keeps ``last_good.pt``, the newest
checkpoint that training continued from with a healthy loss, and the NaN stop names it.
"""

from __future__ import annotations

import math
import os
import statistics
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from danet.config import Config, config_to_dict, missing_keys
from danet.io.checkpoint import (
    BEST,
    LAST,
    LAST_GOOD,
    atomic_save,
    check_regular_file,
    keep_as,
    load_checkpoint,
)

# settings that shape the LR schedule (and the optimiser's hyperparameters): --rebase-schedule
REBASE_KEYS = ("optim.lr", "optim.head_lr_mult", "optim.momentum", "optim.nesterov", "optim.weight_decay",
               "schedule.*", "train.epochs", "train.iters")
# settings a resumed run cannot change
FIXED_KEYS = ("optim.name", "train.batch_size")
# settings that decide the weights' shapes: the stored weights fit the stored model only
ARCHITECTURE_KEYS = ("model.backbone", "model.aux", "data.dataset")
# a stored config must hold these (or --set must give them): they decide the run's schedule and length
REQUIRED_KEYS = ("optim.*", "schedule.*", "train.epochs", "train.iters", "train.batch_size",
                 "train.accum_steps", "train.seed", "model.backbone", "data.dataset")


def resolve_resume_path(resume: str | Path) -> Path:
    """A checkpoint file, or a run directory whose last.pt is meant."""
    path = Path(resume)
    if path.is_dir():
        path = path / LAST
    if not os.path.lexists(path):
        raise FileNotFoundError(f"nothing to resume: {path} does not exist")
    return check_regular_file(path, "checkpoint")


class LoadedCheckpoint:
    """A checkpoint read once: ``danet train --resume`` reads its config, the trainer its state.

    :meth:`take` hands the state over once and drops this reference to it, so that the CPU copy
    of the weights and the optimiser state is not kept through the run.
    """

    def __init__(self, path: Path, state: dict[str, Any]) -> None:
        self.path, self._state = path, state

    def take(self) -> dict[str, Any] | None:
        """The state read (None once it was taken: then the file is read again)."""
        state, self._state = self._state, None
        return state


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in patterns)


def _flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_stored_config(stored: Any, overrides: Mapping[str, Any], path: Path) -> None:
    """Refuse a stored config that lacks what decides the schedule and the run's length.

    Keys missing elsewhere (settings newer than the checkpoint) take their defaults, with a
    warning that names them.

    Raises:
        ValueError: naming the missing keys.
    """
    if not isinstance(stored, Mapping):
        raise ValueError(f"{path} has no stored config (a {type(stored).__name__}); it was not written "
                         f"by danet train. Start a new run from its weights: --set model.pretrained={path}")
    not_overridden = set(missing_keys(overrides))
    missing = [key for key in missing_keys(stored) if key in not_overridden]
    required = [key for key in missing if _matches(key, REQUIRED_KEYS)]
    if required:
        shown = ", ".join(_summarised(required, missing_keys({})))
        raise ValueError(
            f"{path}'s stored config has no {shown}: it was not written by danet train, or was edited. "
            "These settings decide the LR schedule and the run's length, so it is not resumed on "
            "defaults; give them with --set, or start a new run from its weights: "
            f"--set model.pretrained={path}")
    if missing:
        warnings.warn(f"{path}'s stored config has no {', '.join(missing)} (settings newer than the "
                      "checkpoint?): their defaults are used", stacklevel=2)


def _summarised(keys: list[str], every_key: list[str]) -> list[str]:
    """``keys`` with each section whose keys are all among them written as ``section.*``."""
    shown: list[str] = []
    for key in keys:
        section = key.rpartition(".")[0]
        whole = section and all(k in keys for k in every_key if k.rpartition(".")[0] == section)
        name = f"{section}.*" if whole else key
        if name not in shown:
            shown.append(name)
    return shown


def changed_settings(stored: Mapping[str, Any], cfg: Config,
                     patterns: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """The dotted keys matching ``patterns`` whose value in ``cfg`` differs from the stored config's,
    each with (the stored value, ``cfg``'s), in the config's order."""
    saved, current = _flat(stored), _flat(config_to_dict(cfg))
    return {key: (saved[key], value) for key, value in current.items()
            if _matches(key, patterns) and key in saved and saved[key] != value}


def check_resume(ckpt: Mapping[str, Any], cfg: Config, *, total_iters: int, iters_per_epoch: int,
                 rebase: bool, path: Path) -> None:
    """Refuse a resume that would not continue the stored run as asked (see the module docstring).

    Raises:
        ValueError: what is wrong and which flag or setting does what the user wants.
    """
    stored = ckpt["config"]
    architecture = [f"{key} ({was} -> {now})"
                    for key, (was, now) in changed_settings(stored, cfg, ARCHITECTURE_KEYS).items()]
    if architecture:
        raise ValueError(f"cannot resume with a changed {', '.join(architecture)}: the weights in {path} "
                         "belong to the stored model. Resume without that change, or start a new run")
    fixed = changed_settings(stored, cfg, FIXED_KEYS)
    if fixed:
        raise ValueError(f"cannot resume with a changed {', '.join(fixed)}: the stored optimiser state "
                         "and the position in the epoch belong to the old settings. Start a new run from "
                         f"the weights instead: --set model.pretrained={path}")
    stored_epoch_length = ckpt.get("iters_per_epoch")
    if stored_epoch_length is not None and stored_epoch_length != iters_per_epoch:
        raise ValueError(f"the epoch has {iters_per_epoch} iterations here, {stored_epoch_length} in {path} "
                         "(a changed data.train_samples, dataset or number of processes?); a resumed run "
                         f"must keep it. Start a new run from the weights: --set model.pretrained={path}")
    iteration, length = ckpt["iteration"], _length(cfg)
    schedule_changes = changed_settings(stored, cfg, REBASE_KEYS)
    if schedule_changes and not rebase:
        raise ValueError(
            f"resuming with a changed {', '.join(schedule_changes)}: the stored LR schedule was made for "
            f"the old settings (continued as stored, it would train past its end at LR 0). Pass "
            "--rebase-schedule to recompute the schedule from the new settings as if the run had used "
            f"them from the start, continuing at iteration {iteration}; or leave these settings as stored")
    if iteration > total_iters:
        raise ValueError(
            f"{path} is at iteration {iteration}, past this run's {total_iters} iterations ({length}): "
            f"nothing to train. To train longer, set train.iters above {iteration} (or train.epochs) "
            "with --rebase-schedule")
    if iteration == total_iters and ckpt["iteration_in_epoch"] == 0:
        raise ValueError(
            f"the run in {path} is finished ({iteration} of {total_iters} iterations, {length}). To "
            "train longer, raise train.epochs (or train.iters) and pass --rebase-schedule: the LR schedule "
            "is then recomputed over the longer run as if it had been planned so from the start")


def _length(cfg: Config) -> str:
    t = cfg.train
    return f"train.iters={t.iters}" if t.iters is not None else f"train.epochs={t.epochs}"


def check_lr_alive(lrs: Sequence[float], cfg: Config, iteration: int, total_iters: int) -> None:
    """Refuse to train remaining iterations at LR 0 when a positive LR is configured."""
    if iteration < total_iters and cfg.optim.lr > 0 and all(lr == 0 for lr in lrs):
        raise ValueError(
            f"the LR schedule gives LR 0 at iteration {iteration} with {total_iters - iteration} iterations "
            "to go (it has ended): pass --rebase-schedule to recompute it for this run's length")


# ------------------------------------------------------------------------------ loss health


class LossHealth:
    """Whether the training loss is in its healthy range, judged against its own past.

    The loss is averaged over each checkpoint's window (the iterations since the previous save);
    a loss (or a window's mean) is healthy when it is finite, at most ``FACTOR`` times the median
    of the last ``RECENT`` healthy windows' means (divergence raises the loss by orders of
    magnitude within a few windows, which this catches; ordinary noise and a slowly falling loss
    stay well inside), at most ``FACTOR`` times the run's best (the lowest healthy window mean: a
    loss climbing window after window stays under the median rule while it rises away from the
    best), and at most ``START_FACTOR`` times the loss of the run's very first step, which the
    untrained model gave (a model that does worse than that has trained backwards). The first
    step's loss is kept as the window of iteration 0. (The judgement is a heuristic: a slow drift
    upwards that stays within these bounds is not caught.)
    """

    FACTOR = 4.0
    RECENT = 5
    START_FACTOR = 1.5  # above the untrained model's loss by more than this: training went backwards

    def __init__(self, windows: Sequence[Sequence[float]] = ()) -> None:
        # [iteration at the save, mean loss of the window, healthy]; restored from checkpoints
        self.windows: list[list[Any]] = [list(w) for w in windows if len(w) == 3]
        self.current: list[float] = []

    def reference(self) -> float | None:
        """The healthy level: the median of the recent healthy windows' means (None before any)."""
        recent = [mean for _, mean, healthy in self.windows if healthy][-self.RECENT:]
        return statistics.median(recent) if recent else None

    def best(self) -> float | None:
        """The run's best: the lowest healthy window mean (the first step's loss among them)."""
        return min((mean for _, mean, healthy in self.windows if healthy), default=None)

    def start(self) -> float | None:
        """The loss of the run's first step (the window of iteration 0), None when unknown."""
        first = self.windows[0] if self.windows else None
        return first[1] if first is not None and first[0] == 0 and first[2] else None

    def is_healthy(self, loss: float) -> bool:
        """Whether one loss value (or a window mean) is in the healthy range."""
        if not math.isfinite(loss):
            return False
        limits = ((self.FACTOR, self.reference()), (self.FACTOR, self.best()),
                  (self.START_FACTOR, self.start()))
        return all(level is None or loss <= factor * level for factor, level in limits)

    def add(self, loss: float) -> None:
        """Count one iteration's loss into the current window (the run's first: also its start)."""
        if not self.windows and not self.current:
            self.windows.append([0, loss if math.isfinite(loss) else None, math.isfinite(loss)])
        self.current.append(loss)

    def close_window(self, iteration: int) -> None:
        """End the current window at a save (nothing to end without an iteration in it)."""
        if not self.current:
            return
        mean = math.fsum(self.current) / len(self.current)
        self.windows.append([iteration, mean if math.isfinite(mean) else None, self.is_healthy(mean)])
        self.current = []


# ------------------------------------------------------------------------------ the state's health


class StateCheck:
    """Whether a model's state is sound enough to continue from, judged on the state itself.

    Sound: every parameter finite and none larger (in absolute value) than ``WEIGHT_GROWTH``
    times the largest parameter at the run's start (the weights of a diverging run grow by many
    orders of magnitude while its loss may still look ordinary), and a forward pass of the
    unwrapped model in eval mode on a fixed batch (one training crop) finite. The forward costs
    one batch-1 inference per checkpoint and draws no random numbers (eval mode: no dropout), so
    a resumed run still continues bit for bit.
    """

    WEIGHT_GROWTH = 1000.0

    def __init__(self, model: nn.Module, probe: torch.Tensor | None,
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.model, self.probe, self.autocast_dtype = model, probe, autocast_dtype
        self.start_scale: float | None = None  # the largest |parameter| at the run's start

    def largest_weight(self) -> float:
        """The largest |parameter| of the model (NaN when one is not finite)."""
        with torch.no_grad():
            return max((float(p.detach().abs().max()) for p in self.model.parameters() if p.numel()),
                       default=0.0)

    def begin(self, start_scale: float | None = None) -> None:
        """Take the run's start: ``start_scale`` from a resumed checkpoint, else the model's now."""
        self.start_scale = start_scale if start_scale is not None else self.largest_weight()

    def problems(self) -> list[str]:
        """What is wrong with the model's state, in words (empty: sound)."""
        problems = []
        largest = self.largest_weight()
        if not math.isfinite(largest):
            problems.append("its weights hold NaN/Inf")
        elif self.start_scale and largest > self.WEIGHT_GROWTH * self.start_scale:
            growth = largest / self.start_scale
            problems.append(f"its weights reach {largest:.3g}, {growth:.3g} x the largest at the run's start "
                            f"(more than {self.WEIGHT_GROWTH:g} x: diverged)")
        if self.probe is not None and not problems and not self._forward_finite():
            problems.append("its forward pass on a fixed batch is not finite")
        return problems

    def _forward_finite(self) -> bool:
        device = self.probe.device  # type: ignore[union-attr]
        training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), torch.autocast(device.type, dtype=self.autocast_dtype,
                                                        enabled=self.autocast_dtype is not None):
                out = self.model(self.probe)
            outputs = out if isinstance(out, (tuple, list)) else (out,)
            return all(bool(torch.isfinite(o).all()) for o in outputs if isinstance(o, torch.Tensor))
        finally:
            self.model.train(training)


# ------------------------------------------------------------------------------ the run's checkpoints


class RunCheckpoints:
    """A run directory's checkpoints and the evidence about which one training can continue from.

    * ``last.pt``: written at every save (:meth:`save`);
    * ``checkpoint_best.pt``: a hard link to the last.pt of the best validation;
    * ``last_good.pt``: a hard link to the newest last.pt that training continued from with a
      healthy loss and a sound state: the loss of its own window (since the save before) and the
      loss of the very next step, computed with exactly its weights (:meth:`record`), judged by
      :class:`LossHealth`; its weights and a forward pass judged by :class:`StateCheck` when it
      was written. Finite weights that already diverged fail one or the other.

    Every process keeps the same evidence (the losses are all-reduced, the weights are the
    same); only ``writer`` (rank 0) touches files.
    """

    def __init__(self, run_dir: Path, *, writer: bool, cfg: Config | None = None,
                 state_check: StateCheck | None = None) -> None:
        self.run_dir, self.writer, self.cfg, self.state_check = run_dir, writer, cfg, state_check
        self.health = LossHealth()
        self.last_saved: int | None = None  # the iteration last.pt holds
        self.awaiting_confirmation = False  # last.pt waits for the loss of the step after it
        self.state_problems: list[str] = []  # what StateCheck found in last.pt's state
        self.good: int | None = None  # the iteration last_good.pt holds (written by this process)
        self.resumed_here: Path | None = None  # the file of this directory the run resumed from
        self.resumed_iteration: int | None = None  # the iteration of the checkpoint resumed here
        self.resumed_changes: list[str] = []  # "optim.lr=0.05 (was 1.0)": remedies this resume tried
        self._start_scale: float | None = None  # StateCheck's reference, restored from a checkpoint

    def restore(self, ckpt: Mapping[str, Any], *, resumed_here: Path | None) -> None:
        """Continue the evidence of a resumed checkpoint.

        ``resumed_here``: the checkpoint's file when it is in this run's directory (its next loss
        judges it, and :meth:`begin` makes it last.pt); None when the run continues elsewhere.
        """
        self.health = LossHealth(ckpt.get("loss_windows", ()))
        self.last_saved = ckpt["iteration"]
        self.resumed_here = resumed_here
        self.resumed_iteration = ckpt["iteration"] if resumed_here is not None else None
        self.awaiting_confirmation = resumed_here is not None
        self._start_scale = ckpt.get("weights_at_start")
        if self.cfg is not None and isinstance(ckpt.get("config"), Mapping):
            changes = changed_settings(ckpt["config"], self.cfg, _REMEDY_KEYS)
            self.resumed_changes = [f"{key}={now} (was {was})" for key, (was, now) in changes.items()]

    def begin(self) -> None:
        """The run starts (or continues): take StateCheck's reference, judge a resumed state, and
        make a file of this directory that the run resumed from (e.g. last_good.pt) its last.pt."""
        if self.state_check is not None:
            self.state_check.begin(self._start_scale)
            if self.awaiting_confirmation:
                self.state_problems = self.state_check.problems()
        if self.writer and self.resumed_here is not None and self.resumed_here.name != LAST:
            keep_as(self.resumed_here, LAST)

    @property
    def last_window_healthy(self) -> bool | None:
        """Whether the loss of the newest window (up to the save in last.pt) was healthy; None: no window."""
        return self.health.windows[-1][2] if self.health.windows else None

    def record(self, loss: float) -> None:
        """Count one step's loss; the first after a save judges that save (healthy: last_good.pt)."""
        self.health.add(loss)
        if not self.awaiting_confirmation:
            return
        self.awaiting_confirmation = False
        if self.last_window_healthy is not False and self.health.is_healthy(loss) and not self.state_problems:
            if self.writer:
                keep_as(self.run_dir / LAST, LAST_GOOD)
            self.good = self.last_saved

    def save(self, checkpoint: dict[str, Any], iteration: int, *, best: bool) -> None:
        """Write ``checkpoint`` (plus the health evidence) as last.pt, and as the best when ``best``."""
        self.health.close_window(iteration)  # none without a step since the last save: the same state
        self.state_problems = self.state_check.problems() if self.state_check is not None else []
        if self.writer:
            start = self.state_check.start_scale if self.state_check is not None else None
            evidence = {"loss_windows": self.health.windows, "weights_at_start": start}
            path = atomic_save({**checkpoint, **evidence}, self.run_dir / LAST)
            if best:
                keep_as(path, BEST)
        self.last_saved = iteration
        self.awaiting_confirmation = True

    def divergence_report(self, what: str, *, first_loss_after_save: bool | None = None) -> str:
        """``what`` happened: which checkpoint to resume from (and which not), and what to change.

        ``first_loss_after_save``: the divergence showed in the first loss after the last save
        (its weights produced it); by default, whether that save was still awaiting its check.
        Never the checkpoint this run resumed from when the run diverged again from it after a
        remedy (a lower LR, clipping, a warm-up, another amp) was tried.
        """
        if first_loss_after_save is None:
            first_loss_after_save = self.awaiting_confirmation
        cfg = self.cfg or Config()
        lr = cfg.optim.lr
        good, good_path = self.good, self.run_dir / LAST_GOOD
        # a last_good.pt written before this resume
        if good is None and self.resumed_here is not None and good_path.is_file():
            good = int(load_checkpoint(good_path)["iteration"])
        remedies = _untried_remedies(cfg)
        also = f", or try {_or_list(remedies)}" if remedies else ""
        if good is not None and self.resumed_changes and good == self.resumed_iteration:
            # diverged again from the checkpoint it resumed from, with a remedy already tried: not again
            return (f"{what}: training stopped. It resumed from {self.resumed_here} (iteration {good}) with "
                    f"{', '.join(self.resumed_changes)} and diverged again before a newer checkpoint proved "
                    "healthy: that checkpoint leads to divergence. Start a new run instead (from scratch, "
                    "or from the weights of an earlier checkpoint with --set model.pretrained=...) with "
                    f"optim.lr below {lr:g}{also}")
        if good is None:
            return (f"{what}: training stopped; no checkpoint had been followed by a healthy loss yet. "
                    f"Start again with a lower optim.lr (now {lr:g}){also}")
        avoid = ""
        if self.last_saved is not None and self.last_saved != good:
            if self.state_problems:
                why = "; ".join(self.state_problems)
            elif first_loss_after_save:
                why = "its weights gave this loss"
            else:
                why = "the loss around it was out of its healthy range"
            avoid = f"; {self.run_dir / LAST} (iteration {self.last_saved}) is not: {why}"
        others = f" (or try {_or_list(remedies)})" if remedies else ""
        return (f"{what}: training stopped. Resume from {good_path} (iteration {good}), the newest "
                f"checkpoint that training continued from with a healthy loss and sound weights{avoid}. "
                f"With a lower LR: danet train --resume {good_path} --set optim.lr={lr / 2:g} "
                f"--rebase-schedule{others}")


# the settings whose change on a resume is a remedy against divergence
_REMEDY_KEYS = ("optim.lr", "optim.head_lr_mult", "optim.grad_clip", "schedule.warmup_iters", "train.amp")


def _untried_remedies(cfg: Config) -> list[str]:
    """The remedies against divergence that ``cfg`` does not use yet, in words."""
    remedies = []
    if cfg.optim.grad_clip == 0:
        remedies.append("gradient clipping (optim.grad_clip=1.0)")
    if cfg.schedule.warmup_iters == 0:
        remedies.append("a warm-up (schedule.warmup_iters)")
    if cfg.train.amp == "fp16":
        remedies.append("train.amp=bf16 instead of fp16")
    return remedies


def _or_list(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"
