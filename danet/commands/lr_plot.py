"""Draw learning-rate policies over one run into a PNG: Caffe's set, as ``danet train`` steps them.

Examples::

    danet lr-plot --preset cityscapes              # the preset's run length and settings
    danet lr-plot --policies poly step inv sigmoid --iters 20000 --log

The curves are the real schedulers' (danet.training.schedules), for the backbone's parameter
group; the head's LR is ``optim.head_lr_mult`` times it throughout.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from danet.config import DEFAULT_PRESET, LR_POLICIES, Config, check_schedule, load_config
from danet.data import build_dataset, get_dataset_class
from danet.io.atomic import atomic_write
from danet.io.output_paths import check_output_file
from danet.training.data import plan_batches
from danet.visualization.plots import lr_policies_figure

__all__ = ["planned_iterations", "run"]


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
    output = check_output_file(args.output, args.overwrite)
    policies = args.policies or list(LR_POLICIES)  # argparse checked the names (choices=LR_POLICIES)
    cfg = load_config(args.preset or DEFAULT_PRESET, args.config, args.overrides)
    for policy in policies:  # the config checked its own policy's settings; these are new combinations
        check_schedule(replace(cfg.schedule, policy=policy))
    if args.iters is not None:
        iters, how = args.iters, "--iters"
    else:
        iters, how = planned_iterations(cfg)
    title = f"{cfg.name}: LR policies over {iters} iterations, base LR {cfg.optim.lr:g}\n({how})"
    fig = lr_policies_figure(cfg.schedule, policies, iters, cfg.optim.lr, head_lr_mult=cfg.optim.head_lr_mult,
                             log=args.log, title=title)
    atomic_write(output, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    print(f"{iters} iterations ({how}); wrote {output}")
    return 0
