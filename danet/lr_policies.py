"""Learning-rate policies: Caffe's set, stepped per iteration, on torch.optim.lr_scheduler.

Draw policies side by side: ``danet lr-plot --policies poly step inv sigmoid --iters 20000``.

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

import argparse
import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch.optim import lr_scheduler

from danet.config import ScheduleConfig, load_config

POLICIES: tuple[str, ...] = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


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
    raise ValueError(f"unknown LR policy {cfg.policy!r}; choose one of {', '.join(POLICIES)}")


def validate_schedule(cfg: ScheduleConfig, total_iters: int) -> None:
    """Raise ValueError naming the first setting of ``cfg`` that cannot drive ``total_iters`` iterations."""
    if cfg.policy not in POLICIES:
        raise ValueError(f"unknown LR policy {cfg.policy!r}; choose one of {', '.join(POLICIES)}")
    if total_iters < 1:
        raise ValueError(f"the run has {total_iters} iterations; it needs at least 1")
    if cfg.warmup_iters < 0:
        raise ValueError(f"schedule.warmup_iters must be >= 0, got {cfg.warmup_iters}")
    if cfg.warmup_iters > 0 and not 0.0 < cfg.warmup_start_factor <= 1.0:
        raise ValueError(f"schedule.warmup_start_factor must be in (0, 1], got {cfg.warmup_start_factor}")
    if cfg.policy == "poly" and cfg.warmup_iters >= total_iters:
        raise ValueError(
            f"schedule.warmup_iters ({cfg.warmup_iters}) leaves no iterations of the {total_iters} for poly"
        )
    if cfg.policy == "step" and cfg.step_size < 1:
        raise ValueError(f"schedule.step_size must be >= 1 for the step policy, got {cfg.step_size}")
    if cfg.policy == "multistep" and list(cfg.milestones) != sorted(set(cfg.milestones)):
        raise ValueError(f"schedule.milestones must be strictly increasing, got {list(cfg.milestones)}")
    if cfg.policy == "inv" and cfg.gamma < 0:
        raise ValueError(f"schedule.gamma must be >= 0 for the inv policy, got {cfg.gamma}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_iters: int
) -> lr_scheduler.LRScheduler:
    """The scheduler for ``cfg`` over a run of ``total_iters`` iterations; call ``step()`` per iteration.

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
    for _ in range(total_iters):
        curve.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # keeps torch from warning that the scheduler stepped first
        scheduler.step()
    return curve


# ------------------------------------------------------------------------------ danet lr-plot


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``danet lr-plot``."""
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES,
                        metavar="POLICY", help=f"policies to draw (default: all of {', '.join(POLICIES)})")
    parser.add_argument("--iters", type=int, default=10000, help="iterations of the run (default: 10000)")
    parser.add_argument("--preset", default=None,
                        help="take the schedule section and base LR from this preset (default: built-in)")
    parser.add_argument("--config", default=None, help="YAML file overriding the preset")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        dest="overrides",
                        help="overrides, e.g. schedule.gamma=0.5 schedule.warmup_iters=500")
    parser.add_argument("--log", action="store_true", help="logarithmic LR axis")
    parser.add_argument("--output", "-o", default="lr_policies.png",
                        help="PNG to write (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """Draw the chosen policies over one run into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = load_config(args.preset, args.config, args.overrides)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for policy in args.policies:
        schedule = replace(cfg.schedule, policy=policy)
        ax.plot(lr_curve(schedule, args.iters, cfg.optim.lr), label=policy)
    ax.set_xlabel("iteration")
    ax.set_ylabel("learning rate (backbone group)")
    if args.log:
        ax.set_yscale("log")
    ax.set_title(f"LR policies over {args.iters} iterations, base LR {cfg.optim.lr:g}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    plt.close(fig)
    print(f"wrote {args.output}")
    return 0


__all__: Sequence[str] = (
    "POLICIES",
    "InvDecay",
    "SigmoidDecay",
    "add_arguments",
    "build_scheduler",
    "lr_curve",
    "run",
    "validate_schedule",
)
