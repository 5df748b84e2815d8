"""Figures of numbers: the confusion matrix of an evaluation, learning-rate policies over a run.

Each function returns a matplotlib :class:`~matplotlib.figure.Figure` (the object-oriented
API, no pyplot state, no display needed); the commands save them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from matplotlib.figure import Figure

from danet.config import ScheduleConfig
from danet.evaluation.metrics import ConfusionMatrix
from danet.training.schedules import lr_curve

__all__ = ["confusion_figure", "lr_policies_figure", "policy_label"]


def confusion_figure(matrix: ConfusionMatrix, names: Sequence[str], title: str) -> Figure:
    """The confusion matrix, each row (target class) normalised to 1."""
    k = matrix.num_classes
    counts = matrix.counts()
    rows = counts / counts.sum(1, keepdim=True).clamp(min=1)
    side = max(4.0, 0.35 * k + 2.5)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    image = ax.imshow(rows.numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k), names, rotation=90, fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("target class")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="share of the target class's pixels")
    fig.tight_layout()
    return fig


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


def lr_policies_figure(schedule: ScheduleConfig, policies: Sequence[str], iters: int, base_lr: float, *,
                       head_lr_mult: float, log: bool, title: str) -> Figure:
    """The LR of each of ``policies`` (``schedule`` with its policy replaced) over ``iters`` iterations."""
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.subplots()
    every = max(1, iters // 12)
    for index, policy in enumerate(policies):
        policy_schedule = replace(schedule, policy=policy)
        curve = lr_curve(policy_schedule, iters, base_lr)
        linestyle, marker = _STYLES[policy]
        # markers staggered per policy, so that a curve under another still shows its own
        offset = index * every // len(policies)
        ax.plot(curve, label=policy_label(policy_schedule, policy), linestyle=linestyle, marker=marker,
                markevery=(offset, every), linewidth=1.6, alpha=0.9)
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"learning rate (backbone group; the head's is {head_lr_mult:g}x)"
                  + (", log scale" if log else ""))
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return fig
