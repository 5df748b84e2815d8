"""Figures of numbers: the confusion matrix of an evaluation, learning-rate policies over a run.

Each function returns a matplotlib :class:`~matplotlib.figure.Figure` (the object-oriented
API, no pyplot state, no display needed); the commands save them.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from danet.config import ScheduleConfig
from danet.evaluation.metrics import ConfusionMatrix
from danet.training.schedules import lr_curve

__all__ = ["MAX_ANNOTATED_CLASSES", "confusion_figure", "lr_policies_figure", "policy_label"]

MAX_ANNOTATED_CLASSES = 40
"""Up to this many classes each cell of the confusion matrix has its percentage written in it."""


def confusion_figure(matrix: ConfusionMatrix, names: Sequence[str], title: str) -> Figure:
    """The confusion matrix in percent of each row (target class), each cell's value written in it (up
    to :data:`MAX_ANNOTATED_CLASSES` classes).

    The layout is matplotlib's constrained one, so that the tick names, the colour bar and its
    label fit the canvas whatever the class names; a long title is wrapped to the figure's width.
    """
    k = matrix.num_classes
    counts = matrix.counts()
    percent = (100.0 * counts / counts.sum(1, keepdim=True).clamp(min=1)).numpy()
    side = max(4.0, 0.4 * k + 2.5)
    fig = Figure(figsize=(side + 1.5, side + 0.5), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(percent, cmap="viridis", vmin=0.0, vmax=100.0)
    ax.set_xticks(range(k), names, rotation=90, fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("target class")
    if k <= MAX_ANNOTATED_CLASSES:
        cell_font = 8 if k <= 20 else 6
        for target, predicted in np.ndindex(k, k):
            share = percent[target, predicted]
            # light text on the dark end of viridis, dark text on the light end
            ax.text(predicted, target, f"{share:.0f}", ha="center", va="center", fontsize=cell_font,
                    color="white" if share < 60 else "black")
    characters = max(30, int(9 * (side + 1.5)))  # about 9 characters of a 9-point title per inch
    ax.set_title("\n".join(textwrap.wrap(title, characters)), fontsize=9)
    colour_bar = fig.colorbar(image, ax=ax, shrink=0.8)
    colour_bar.set_label("% of the target class's pixels (each row sums to 100)", fontsize=8)
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


def lr_policies_figure(curves: Sequence[tuple[str, ScheduleConfig]], iters: int, base_lr: float, *,
                       head_lr_mult: float, log: bool, title: str) -> Figure:
    """The LR of each ``(label, schedule)`` of ``curves`` over ``iters`` iterations (one line each).

    On the log axis the lowest LR shown is the smallest positive one drawn, but at least
    ``1e-6 x base_lr``: a curve that falls below (poly's last iteration is exactly 0) leaves the
    frame there instead of squeezing every other curve into a flat line at the top.
    """
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    ax = fig.subplots()
    every = max(1, iters // 12)
    lowest = highest = base_lr
    for index, (label, schedule) in enumerate(curves):
        curve = lr_curve(schedule, iters, base_lr)
        lowest = min([lowest, *(lr for lr in curve if lr > 0)])
        highest = max(highest, *curve)
        linestyle, marker = _STYLES[schedule.policy]
        # markers staggered per policy, so that a curve under another still shows its own
        offset = index * every // len(curves)
        ax.plot(curve, label=label, linestyle=linestyle, marker=marker, markevery=(offset, every),
                linewidth=1.6, alpha=0.9)
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"learning rate (backbone group; the head's is {head_lr_mult:g}x)"
                  + (", log scale" if log else ""))
    if log:
        ax.set_yscale("log")
        ax.set_ylim(max(lowest, base_lr * 1e-6) / 2, highest * 2)
    else:
        ax.set_ylim(0.0, highest * 1.05)
    ax.set_xlim(0, iters)
    ax.set_title(title, fontsize="medium")
    # below the axes: inside, it would hide a part of some curve on one of the two scales
    fig.legend(loc="outside lower center", ncols=2, fontsize="small")
    ax.grid(alpha=0.3)
    return fig
