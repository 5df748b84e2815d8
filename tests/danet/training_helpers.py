"""Shared by the tests: the tiny training recipe, its configs, subprocess environments, logs; a tiny
DANet and its checkpoint for the commands that load one (eval, predict, attention, export)."""

import dataclasses
import json
import os
from pathlib import Path

import torch

from danet.config import DataConfig, EvalConfig, ModelConfig, load_config
from danet.data import SyntheticShapes
from danet.models import DANet

REPO = Path(__file__).resolve().parents[2]

# 16 scenes of 32x32, global batch 4: 4 iterations per epoch, a few seconds per run
TINY = [
    "data.image_size=32", "data.base_size=32", "data.crop_size=32", "data.train_samples=16",
    "data.val_samples=4", "eval.batch_size=4", "train.batch_size=4", "train.progress=false",
    "train.val_interval=1", "train.log_interval=1", "train.checkpoint_interval=0", "train.device=cpu",
]


def tiny_config(run_dir: Path, *overrides: str):
    return load_config("synthetic", overrides=[*TINY, f"train.output={run_dir}", *overrides])


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # CPU: blockwise attention
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def tiny_model(nclass: int = SyntheticShapes.NUM_CLASSES, **kwargs: object) -> DANet:
    """A resnet_tiny DANet whose attention paths count (gamma 1.0 for PAM, 0.5 for CAM, not 0)."""
    model = DANet(nclass, backbone="resnet_tiny", **kwargs)
    with torch.no_grad():
        model.head.sa.gamma.fill_(1.0)
        model.head.sc.gamma.fill_(0.5)
    return model


def save_checkpoint(path: Path, model: DANet, dataset: str = "synthetic", crop_size: int = 32,
                    **model_cfg: object) -> Path:
    """``model`` saved at ``path`` with the config the commands read (whole-image eval, no flip)."""
    config = {"model": dataclasses.asdict(ModelConfig(backbone="resnet_tiny", **model_cfg)),
              "data": dataclasses.asdict(DataConfig(dataset=dataset, crop_size=crop_size, image_size=48,
                                                    val_samples=2)),
              "eval": dataclasses.asdict(EvalConfig(mode="whole", flip=False))}
    torch.save({"model": model.state_dict(), "config": config, "epoch": 1}, path)
    return path
