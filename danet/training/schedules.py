"""Learning-rate policies: Caffe's set, stepped per iteration, on torch.optim.lr_scheduler.

``danet lr-plot`` draws them side by side (danet.commands.lr_plot); :func:`fit_to_run` gives a
policy the config does not use settings that fit the run's length.

With ``base_lr`` the LR a parameter group starts with (the head group's is 10x the backbone's),
``it`` the optimiser iteration counted from 0 and ``max_iter`` the run's total, the policies are
Caffe's (``caffe/src/caffe/solvers/sgd_solver.cpp``)::

    fixed      base_lr
    step       base_lr * gamma ** floor(it / step_size)          torch StepLR
    exp        base_lr * gamma ** it                             torch ExponentialLR
    inv        base_lr * (1 + gamma * it) ** -power              LambdaLR (torch has none)
    multistep  base_lr * gamma ** (number of milestones <= it)   torch MultiStepLR
    poly       base_lr * (1 - it / max_iter) ** power            torch PolynomialLR
    sigmoid    base_lr / (1 + exp(-gamma * (it - step_size)))    LambdaLR (torch has none)

Linear warm-up (``warmup_iters`` = W > 0, torch LinearLR chained by SequentialLR): for it < W the
LR rises linearly from ``warmup_start_factor * base_lr`` to ``base_lr``; from then on the policy
runs on its own clock, ``policy(it - W)``, and poly's horizon is ``max_iter - W`` so that it
still reaches 0 at the end of the run. Milestones and ``step_size`` therefore count from the end
of the warm-up.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from torch.optim import lr_scheduler

from danet.config import LR_POLICIES, ScheduleConfig

__all__ = ["InvDecay", "SigmoidDecay", "build_scheduler", "fit_to_run", "lr_curve", "validate_schedule"]


class InvDecay:
    """Caffe's "inv" factor ``(1 + gamma * it) ** -power`` (a class so LambdaLR checkpoints it)."""

    def __init__(self, gamma: float, power: float) -> None:
        self.gamma, self.power = gamma, power

    def __call__(self, it: int) -> float:
        return (1.0 + self.gamma * it) ** -self.power


class SigmoidDecay:
    """Caffe's "sigmoid" factor ``1 / (1 + exp(-gamma * (it - step_size)))``."""

    def __init__(self, gamma: float, step_size: int) -> None:
        self.gamma, self.step_size = gamma, step_size

    def __call__(self, it: int) -> float:
        z = -self.gamma * (it - self.step_size)
        return 0.0 if z > 700 else 1.0 / (1.0 + math.exp(z))  # exp overflows past ~709


def _policy(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, horizon: int) -> lr_scheduler.LRScheduler:
    """The bare policy scheduler, its iteration 0 being the first iteration after warm-up."""
    if cfg.policy == "fixed":
        return lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if cfg.policy == "step":
        return lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.policy == "exp":
        return lr_scheduler.ExponentialLR(optimizer, gamma=cfg.gamma)
    if cfg.policy == "inv":
        return lr_scheduler.LambdaLR(optimizer, InvDecay(cfg.gamma, cfg.power))
    if cfg.policy == "multistep":
        return lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma)
    if cfg.policy == "poly":
        return lr_scheduler.PolynomialLR(optimizer, total_iters=horizon, power=cfg.power)
    if cfg.policy == "sigmoid":
        return lr_scheduler.LambdaLR(optimizer, SigmoidDecay(cfg.gamma, cfg.step_size))
    raise ValueError(f"unknown LR policy {cfg.policy!r}; choose one of {', '.join(LR_POLICIES)}")


def validate_schedule(cfg: ScheduleConfig, total_iters: int) -> None:
    """Raise ValueError naming the first setting of ``cfg`` that cannot drive ``total_iters`` iterations.

    The settings alone are checked once, with the config (danet.config.check_schedule, which
    validate_config runs); this adds what needs the run length.
    """
    if total_iters < 1:
        raise ValueError(f"the run has {total_iters} iterations; it needs at least 1")
    if cfg.policy == "poly" and cfg.warmup_iters >= total_iters:
        raise ValueError(
            f"schedule.warmup_iters ({cfg.warmup_iters}) leaves no iterations of the {total_iters} for poly"
        )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_iters: int
) -> lr_scheduler.LRScheduler:
    """The scheduler for ``cfg`` (checked: danet.config.check_schedule) over a run of ``total_iters``
    iterations; call ``step()`` per iteration.

    Every parameter group follows the policy from its own starting LR, so the head group stays
    at its multiple of the backbone's LR throughout.
    """
    validate_schedule(cfg, total_iters)
    warmup = cfg.warmup_iters
    main = _policy(optimizer, cfg, total_iters - warmup)
    if warmup == 0:
        return main
    ramp = lr_scheduler.LinearLR(
        optimizer, start_factor=cfg.warmup_start_factor, end_factor=1.0, total_iters=warmup
    )
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def lr_curve(cfg: ScheduleConfig, total_iters: int, base_lr: float = 1.0) -> list[float]:
    """The LR of each iteration 0..total_iters-1 as the real scheduler produces it (for plots)."""
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=base_lr)
    scheduler = build_scheduler(optimizer, cfg, total_iters)
    curve = []
    with warnings.catch_warnings():
        # no optimizer.step() here (it would cost 20 times the scheduler's own step: 16 s for the
        # 89,040 iterations of the Cityscapes recipe), so torch's warning about the order is moot
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        for _ in range(total_iters):
            curve.append(optimizer.param_groups[0]["lr"])
            scheduler.step()
    return curve


_DEFAULTS = ScheduleConfig()
# what the fitted policies reach at the end of the run, as a fraction of the base LR
_FITTED_END = 0.01  # step (two drops of gamma 0.1), exp
_FITTED_INV_END = 0.1


def fit_to_run(cfg: ScheduleConfig, policy: str, total_iters: int) -> tuple[ScheduleConfig, list[str]]:
    """``cfg`` run with ``policy``, its settings that ``cfg`` leaves at their defaults fitted to a run of
    ``total_iters`` iterations; returns it and the names of the fitted settings.

    ScheduleConfig's defaults (gamma 0.1, step_size 1000, no milestones) are on the scale of Caffe's
    examples; over a run of 89,040 iterations they make exp reach 1e-300 and the rising sigmoid
    start at 1e-44 (the ``danet lr-plot --log`` that showed only flat lines). Fitted, over the
    ``H`` iterations after warm-up:

    =========  ===================================================================
    step       step_size H / 3: two drops of gamma (0.1) in the run, ending at 1%
    exp        gamma 0.01 ** (1 / H): ending at 1% of the base LR
    inv        gamma (10 ** (1 / power) - 1) / H: ending at 10%
    multistep  milestones at H / 2 and 3 H / 4
    sigmoid    decaying: step_size H / 2, gamma -10 / H (from 99% to 0.7%)
    =========  ===================================================================

    Settings that ``cfg`` sets (anything but the default) are kept: they are the user's.
    """
    horizon = max(1, total_iters - cfg.warmup_iters)
    fitted: dict[str, object] = {}
    if policy == "step" and cfg.step_size == _DEFAULTS.step_size:
        fitted["step_size"] = max(1, round(horizon / 3))
    elif policy == "exp" and cfg.gamma == _DEFAULTS.gamma:
        fitted["gamma"] = _FITTED_END ** (1.0 / horizon)
    elif policy == "inv" and cfg.gamma == _DEFAULTS.gamma and cfg.power > 0:
        fitted["gamma"] = (_FITTED_INV_END ** (-1.0 / cfg.power) - 1.0) / horizon
    elif policy == "multistep" and cfg.milestones == _DEFAULTS.milestones:
        fitted["milestones"] = tuple(sorted({max(1, horizon // 2), max(2, 3 * horizon // 4)}))
    elif policy == "sigmoid":
        if cfg.step_size == _DEFAULTS.step_size:
            fitted["step_size"] = max(1, round(horizon / 2))
        if cfg.gamma == _DEFAULTS.gamma:
            fitted["gamma"] = -10.0 / horizon
    return dataclasses.replace(cfg, policy=policy, **fitted), sorted(fitted)
