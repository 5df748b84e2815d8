"""Shared by the tests: the tiny training recipe, its configs, subprocess environments, logs; a tiny
DANet and its checkpoint for the commands that load one (eval, predict, attention, export)."""

import dataclasses
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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


class TerminalStream(io.StringIO):
    """A text stream that says it is a terminal: progress bars draw on it (and only on terminals)."""

    def isatty(self) -> bool:
        return True


def write_folder_dataset(root: Path, sizes: dict[str, int], side: int = 32) -> None:
    """Two classes: dark background (0) and a bright square (1), the square's border ignored (255)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("# my classes\nbackground\nbright square #ff8000\n")
    for split, count in sizes.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(count):
            image = rng.integers(0, 60, (side, side, 3), dtype=np.uint8)
            mask = np.zeros((side, side), dtype=np.uint8)
            top, left = rng.integers(0, side // 2, size=2)
            image[top:top + side // 3, left:left + side // 3] = 230
            mask[top:top + side // 3, left:left + side // 3] = 1
            mask[top, left:left + side // 3] = 255
            suffix = ".jpg" if i % 2 else ".png"
            Image.fromarray(image).save(root / "images" / split / f"img{i}{suffix}", quality=95)
            Image.fromarray(mask).save(root / "masks" / split / f"img{i}.png")
