"""The model and settings that eval, predict, attention and export run, from a checkpoint and flags.

Their options are defined in danet/cli.py. An option left at None means "not given": the value
then comes from the checkpoint's stored config, else from the dataclasses in danet/config.py.

The classes (names, palette) are the checkpoint's own record when it has one (every checkpoint
``danet train`` writes), so that a model trained on a folder of the user's works from any
directory; ``--dataset`` naming another dataset takes that dataset's classes instead; a
checkpoint without the record (from elsewhere, or an older danet) takes its stored dataset's,
which for the folder dataset are read from its root (``--root``).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision import tv_tensors

from danet.config import DataConfig, EvalConfig, ModelConfig, resolve_eval_config
from danet.data import DatasetClasses, eval_transforms, get_dataset_class
from danet.data.folder import CLASS_LIST
from danet.distributed import resolve_device
from danet.evaluation.cost import ForwardCost, format_duration, measured_conv_speed
from danet.evaluation.engine import scores_of_resolved
from danet.models import Checkpoint, build_from_checkpoint, read_checkpoint
from danet.runtime import check_attention_backend

__all__ = ["EVAL_FIELDS", "LONG_INFERENCE_PIXELS", "CommandSetup", "describe_forward", "normalise_image",
           "predict_image", "run_inference", "setup_from_args"]


EVAL_FIELDS: tuple[str, ...] = ("protocol", "mode", "crop_size", "stride_ratio", "stride", "scales",
                                "base_size", "flip", "batch_size", "window_memory_mb", "amp", "channels_last")
"""EvalConfig fields that command-line flags of the same name override."""
LONG_INFERENCE_PIXELS = 1 << 20
"""Above this many pixels an image's inference counts as long: its cost is printed first, a bar shown."""


def _section(cls: type, stored: Mapping[str, Any] | None) -> Any:
    """A ``cls`` dataclass from a stored (asdict) section, ignoring fields this version lacks."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in (stored or {}).items() if k in names}
    return cls(**values)


@dataclasses.dataclass
class CommandSetup:
    """What eval/predict/attention/export need: the model, its classes, the resolved config sections."""

    model: nn.Module  # on ``device``, in eval mode
    device: torch.device
    classes: DatasetClasses  # what the model's outputs mean
    data: DataConfig  # the dataset (name, root) and the normalisation (mean, std) of the checkpoint
    eval: EvalConfig


def setup_from_args(args: argparse.Namespace, device: torch.device | None = None) -> CommandSetup:
    """Read the checkpoint, resolve every option (flag > checkpoint config > default), load the model.

    ``device`` (e.g. a distributed process's own GPU) replaces ``args.device`` when given.

    Raises:
        FileNotFoundError: missing checkpoint.
        ValueError: unknown dataset or backbone, a checkpoint that does not fit the model.
    """
    checkpoint = read_checkpoint(args.checkpoint)
    stored = checkpoint.config or {}
    data = _section(DataConfig, stored.get("data"))
    eval_cfg = _section(EvalConfig, stored.get("eval"))
    other_dataset = args.dataset is not None and args.dataset != data.dataset
    if other_dataset:
        data.root = None  # the stored root belongs to the stored dataset
    for section, fields in ((data, ("dataset", "root")), (eval_cfg, EVAL_FIELDS)):
        for name in fields:
            value = getattr(args, name, None)
            if value is not None:
                setattr(section, name, tuple(value) if isinstance(value, list) else value)
    eval_cfg = resolve_eval_config(eval_cfg, data)
    classes = _classes(checkpoint, data, other_dataset)
    overrides = {"backbone": args.backbone, "output_stride": args.output_stride, "attention": args.attention,
                 "aux": args.aux, "multi_grid": args.multi_grid}
    model = build_from_checkpoint(checkpoint, classes.num_classes, overrides)
    if device is None:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but no CUDA device is available")
        device = resolve_device(args.device)
    if (args.attention or (stored.get("model") or {}).get("attention", ModelConfig.attention)) == "fused":
        check_attention_backend(device)  # e.g. DANET_KERNELS_BACKEND=triton without CUDA: one line, now
    return CommandSetup(model.to(device).eval(), device, classes, data, eval_cfg)


def _classes(checkpoint: Checkpoint, data: DataConfig, other_dataset: bool) -> DatasetClasses:
    """The checkpoint's own classes, unless ``--dataset`` named another dataset (module docstring)."""
    if checkpoint.classes is not None and not other_dataset:
        return DatasetClasses.from_record(checkpoint.classes, checkpoint.path)
    try:
        return DatasetClasses.of(data.dataset, get_dataset_class(data.dataset, data.root))
    except FileNotFoundError as err:  # the folder dataset's class list, where the checkpoint has none
        raise FileNotFoundError(f"{checkpoint.path} does not carry its class names, and the {data.dataset} "
                                f"dataset's {CLASS_LIST} is not where its config says ({data.root}): give "
                                f"the dataset's directory with --root DIR\n{err}") from None


def run_inference(setup: CommandSetup, images: torch.Tensor, cfg: EvalConfig | None = None,
                  progress: bool = False) -> torch.Tensor:
    """The "sum" scores of danet.evaluation.engine.predict_scores with the setup's model, classes,
    normalisation and EvalConfig (or ``cfg``, checked like the setup's)."""
    scores = scores_of_resolved(setup.model, images.to(setup.device), setup.classes.num_classes,
                                cfg or setup.eval, mean=setup.data.mean, std=setup.data.std,
                                progress=progress)
    return scores["sum"]


def normalise_image(setup: CommandSetup, image: np.ndarray) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> the model's input (1, 3, H, W) on the setup's device (eval transforms)."""
    tensor = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous())
    return eval_transforms(setup.data.mean, setup.data.std)(tensor)[None].to(setup.device)


def predict_image(setup: CommandSetup, image: np.ndarray, cfg: EvalConfig | None = None,
                  progress: bool = False) -> torch.Tensor:
    """Class ids (H, W) int64 on the CPU for an RGB uint8 (H, W, 3) image (``cfg``: the setup's)."""
    return run_inference(setup, normalise_image(setup, image), cfg, progress).argmax(1)[0].cpu()


def describe_forward(setup: CommandSetup, cost: ForwardCost) -> str:
    """A forward's estimated cost in words, with its time where it runs on the CPU (the measured speed)."""
    text = cost.describe()
    if setup.device.type == "cpu":
        text += f", about {format_duration(cost.flops / measured_conv_speed())} on this CPU"
    return text
