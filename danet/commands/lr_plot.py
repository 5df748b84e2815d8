"""Draw learning-rate policies over one run into a PNG: Caffe's set, as ``danet train`` steps them.

Examples::

    danet lr-plot --preset cityscapes --log        # -> runs/lr_policies-cityscapes.png
    danet lr-plot --policies poly step inv sigmoid --iters 20000 --log --output lr.png

The curves are the real schedulers' (danet.training.schedules), for the backbone's parameter
group; the head's LR is ``optim.head_lr_mult`` times it throughout. The config's own policy
(``schedule.policy``) is drawn with its settings, exactly as ``danet train`` would run it. The
other policies' settings that the config leaves at their defaults (step_size 1000, gamma 0.1:
the scale of Caffe's examples, which over a long run make exp fall to 1e-300) are fitted to
the run's length, and their legend says which ones (danet.training.schedules.fit_to_run): set
them with ``--set schedule.gamma=...`` to draw your own.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from danet.config import DEFAULT_PRESET, LR_POLICIES, Config, check_schedule, load_config
from danet.data import build_dataset, get_dataset_class
from danet.io.atomic import atomic_write
from danet.io.output_paths import check_output_file
from danet.training.data import plan_batches
from danet.training.run_dir import RUNS_DIR
from danet.training.schedules import fit_to_run
from danet.visualization.plots import lr_policies_figure, policy_label

__all__ = ["default_output", "planned_iterations", "run"]


def default_output(cfg: Config) -> Path:
    """Where the figure goes without --output: ``runs/lr_policies-<name>.png`` (runs/ is git-ignored)."""
    return RUNS_DIR / f"lr_policies-{cfg.name}.png"


def planned_iterations(cfg: Config) -> tuple[int, str]:
    """The run length ``danet train`` would plan for ``cfg`` on one process, and how it was found.

    Uses ``train.iters`` when set, else the epochs over the training split: the published size
    of the dataset's "train" split (``TRAIN_IMAGES``) when the data is not at hand, the
    generated count for "synthetic", else the images found under ``data.root``.
    """
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
    policies = args.policies or list(LR_POLICIES)  # argparse checked the names (choices=LR_POLICIES)
    cfg = load_config(args.preset or DEFAULT_PRESET, args.config, args.overrides)
    output = check_output_file(args.output or default_output(cfg), args.overwrite)
    for policy in policies:  # the config checked its own policy's settings; these are new combinations
        check_schedule(replace(cfg.schedule, policy=policy))
    if args.iters is not None:
        iters, how = args.iters, "--iters"
    else:
        iters, how = planned_iterations(cfg)
    curves = []
    for policy in policies:
        if policy == cfg.schedule.policy:
            label = f"{policy_label(cfg.schedule, policy)}: the config's"
            curves.append((label, cfg.schedule))
            continue
        schedule, fitted = fit_to_run(cfg.schedule, policy, iters)
        note = f"; {', '.join(fitted)} fitted to the run" if fitted else ""
        label = policy_label(schedule, policy) + note
        curves.append((label, schedule))
    title = f"{cfg.name}: LR policies over {iters} iterations, base LR {cfg.optim.lr:g}\n({how})"
    fig = lr_policies_figure(curves, iters, cfg.optim.lr, head_lr_mult=cfg.optim.head_lr_mult, log=args.log,
                             title=title)
    atomic_write(output, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    print(f"{iters} iterations ({how}); wrote {output}")
    return 0
