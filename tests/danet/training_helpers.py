"""Shared by the training tests: the tiny recipe, its configs, subprocess environments, logs."""

import json
import os
from pathlib import Path

from danet.config import load_config

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
