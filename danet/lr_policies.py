"""Learning-rate policies: Caffe's set, stepped per iteration, on torch.optim.lr_scheduler.

Draw policies side by side: ``danet lr-plot --preset cityscapes`` (the preset's run length and
settings), ``danet lr-plot --policies poly step inv sigmoid --iters 20000 --log``.

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

from danet.choices import LR_POLICIES as POLICIES
from danet.config import Config, ScheduleConfig, check_schedule, load_config
from danet.files import atomic_write


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
    """Raise ValueError naming the first setting of ``cfg`` that cannot drive ``total_iters`` iterations.

    The settings alone are checked by danet.config.check_schedule (validate_config runs it for
    every Config; here it is run again for a ScheduleConfig built by hand); this adds the run length.
    """
    check_schedule(cfg)
    if total_iters < 1:
        raise ValueError(f"the run has {total_iters} iterations; it needs at least 1")
    if cfg.policy == "poly" and cfg.warmup_iters >= total_iters:
        raise ValueError(
            f"schedule.warmup_iters ({cfg.warmup_iters}) leaves no iterations of the {total_iters} for poly"
        )


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

# what each policy reads besides base_lr (ScheduleConfig's docstring), for the legend
_POLICY_FIELDS: dict[str, tuple[str, ...]] = {
    "fixed": (), "step": ("gamma", "step_size"), "exp": ("gamma",), "inv": ("gamma", "power"),
    "multistep": ("gamma", "milestones"), "poly": ("power",), "sigmoid": ("gamma", "step_size"),
}
# one line style and marker per policy, so that policies whose curves coincide (fixed and a
# multistep without milestones, say) stay visible on top of each other
_STYLES: dict[str, tuple[str, str]] = {
    "fixed": ("-", "o"), "step": ("--", "s"), "exp": (":", "v"), "inv": ("-.", "^"),
    "multistep": ((0, (5, 3, 1, 3)), "D"), "poly": ("-", "x"), "sigmoid": ("--", "*"),
}


def policy_label(cfg: ScheduleConfig, policy: str) -> str:
    """``policy`` and the settings of ``cfg`` it reads, e.g. ``step (gamma 0.1, step_size 1000)``."""
    parts = []
    for name in _POLICY_FIELDS[policy]:
        value = getattr(cfg, name)
        if name == "milestones":
            parts.append(f"milestones {list(value)}" if value else "no milestones: constant")
        else:
            parts.append(f"{name} {value:g}")
    if cfg.warmup_iters:
        parts.append(f"warm-up {cfg.warmup_iters}")
    return f"{policy} ({', '.join(parts)})" if parts else policy


def planned_iterations(cfg: Config) -> tuple[int, str]:
    """The run length ``danet train`` would plan for ``cfg`` on one process, and how it was found.

    Uses ``train.iters`` when set, else the epochs over the training split: the published size
    of the dataset's "train" split (``TRAIN_IMAGES``) when the data is not at hand, the
    generated count for "synthetic", else the images found under ``data.root``.
    """
    from danet.data import build_dataset, get_dataset_class
    from danet.train import plan_batches

    if cfg.train.iters is not None:
        return cfg.train.iters, "train.iters"
    dataset_class = get_dataset_class(cfg.data.dataset, cfg.data.root)
    if cfg.data.dataset == "synthetic":
        images = cfg.data.train_samples or dataset_class.DEFAULT_NUM_SAMPLES["train"]  # type: ignore[attr-defined]
        source = "generated"
    elif getattr(dataset_class, "TRAIN_IMAGES", None) is not None:
        images = dataset_class.TRAIN_IMAGES  # type: ignore[attr-defined]
        source = f"{cfg.data.dataset}'s published train split"
    else:
        images = len(build_dataset(cfg.data.dataset, cfg.data.root, "train"))  # type: ignore[arg-type]
        source = f"found under {cfg.data.root}"
    if cfg.data.train_samples is not None:
        images = min(images, cfg.data.train_samples)
    plan = plan_batches(cfg, images, world_size=1)
    return plan.total_iters, (f"{plan.epochs} epochs x {plan.iters_per_epoch} iterations: {images} training "
                              f"images ({source}), global batch {cfg.train.batch_size}")


def run(args: argparse.Namespace) -> int:
    """Draw the chosen policies over one run into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from danet.config import DEFAULT_PRESET
    from danet.outputs import check_output_file

    output = check_output_file(args.output, args.overwrite)
    policies = args.policies or list(POLICIES)  # argparse checked the names (choices=POLICIES)
    cfg = load_config(args.preset or DEFAULT_PRESET, args.config, args.overrides)
    if args.iters is not None:
        if args.iters < 1:
            raise ValueError(f"--iters must be >= 1, got {args.iters}")
        iters, how = args.iters, "--iters"
    else:
        iters, how = planned_iterations(cfg)
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.subplots()
    every = max(1, iters // 12)
    for index, policy in enumerate(policies):
        schedule = replace(cfg.schedule, policy=policy)
        curve = lr_curve(schedule, iters, cfg.optim.lr)
        linestyle, marker = _STYLES[policy]
        # markers staggered per policy, so that a curve under another still shows its own
        offset = index * every // len(policies)
        ax.plot(curve, label=policy_label(schedule, policy), linestyle=linestyle, marker=marker,
                markevery=(offset, every), linewidth=1.6, alpha=0.9)
    ax.set_xlabel("iteration")
    ax.set_ylabel("learning rate (backbone group; the head's is "
                  f"{cfg.optim.head_lr_mult:g}x)" + (", log scale" if args.log else ""))
    if args.log:
        ax.set_yscale("log")
    ax.set_title(f"{cfg.name}: LR policies over {iters} iterations, base LR {cfg.optim.lr:g}\n({how})",
                 fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    atomic_write(output, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    print(f"{iters} iterations ({how}); wrote {output}")
    return 0


__all__: Sequence[str] = (
    "POLICIES",
    "InvDecay",
    "SigmoidDecay",
    "build_scheduler",
    "lr_curve",
    "planned_iterations",
    "policy_label",
    "run",
    "validate_schedule",
)
