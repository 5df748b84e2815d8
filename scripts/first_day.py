"""A new user's first day, measured: a folder of 12 images and masks to ``danet predict`` elsewhere.

    PYTHONPATH=$PWD python scripts/first_day.py --workdir /tmp/first_day

1. writes ``my_data/`` as a user would have it: 12 street scenes of 256 x 256 (9 train, 3 val;
   sky, building, road, vegetation, car, with textures, noise and JPEG compression) with their
   masks and a ``classes.txt``;
2. runs ``python -m danet train --preset folder --set data.root=my_data`` there (on a machine
   without CUDA the preset's CPU variant);
3. in another directory, runs ``python -m danet predict`` on a val image with the run's
   checkpoint (``--checkpoint <workdir>/runs/latest``), nothing else;

and prints the wall time of each step, their sum, and the run's final validation line. The
README ("Your own data") quotes its result.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("sky #87ceeb", "building #8c5a46", "road #505050", "vegetation #3c8c28", "car #dc1e1e")
SKY, BUILDING, ROAD, VEGETATION, CAR = range(5)
SIDE = 256


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One street scene (H, W, 3) uint8 and its class ids (H, W) uint8 (255 on the cars' outlines)."""
    ys, xs = np.mgrid[0:SIDE, 0:SIDE]
    horizon = int(rng.integers(90, 150))
    mask = np.full((SIDE, SIDE), SKY, np.uint8)
    image = np.zeros((SIDE, SIDE, 3), np.float32)
    image[:] = np.array([120, 170, 230]) + (ys[..., None] / SIDE) * np.array([60, 50, 20])  # sky gradient
    mask[ys >= horizon] = ROAD
    road = np.array([80, 80, 85]) + rng.normal(0, 6, (SIDE, SIDE, 1))
    image[ys >= horizon] = road[ys >= horizon]
    lane = (ys >= horizon + 20) & (np.abs(xs - SIDE // 2 - (ys - horizon) // 6) < 2) & ((ys // 8) % 2 == 0)
    image[lane] = 230
    for _ in range(int(rng.integers(2, 5))):  # buildings on the horizon, with windows
        left, width = int(rng.integers(0, SIDE - 40)), int(rng.integers(40, 100))
        top = int(rng.integers(15, horizon - 20))
        block = (xs >= left) & (xs < left + width) & (ys >= top) & (ys < horizon)
        mask[block] = BUILDING
        image[block] = rng.integers(90, 180, 3)
        windows = block & ((xs - left) % 12 >= 4) & ((xs - left) % 12 < 9) & ((ys - top) % 14 >= 5) & \
            ((ys - top) % 14 < 11)
        image[windows] = np.array([40, 50, 70]) + rng.normal(0, 8, 3)
    for _ in range(int(rng.integers(1, 4))):  # trees: noisy green blobs
        cx, cy = int(rng.integers(0, SIDE)), horizon - int(rng.integers(0, 30))
        radius = int(rng.integers(15, 35))
        blob = (xs - cx) ** 2 + ((ys - cy) * 1.3) ** 2 < radius ** 2
        mask[blob] = VEGETATION
        image[blob] = (np.array([50, 130, 40]) + rng.normal(0, 20, (SIDE, SIDE, 1)))[blob]
    for _ in range(int(rng.integers(1, 4))):  # cars on the road, their outline ignored (255)
        width, height = int(rng.integers(30, 60)), int(rng.integers(18, 28))
        left = int(rng.integers(0, SIDE - width))
        top = int(rng.integers(horizon + 5, SIDE - height))
        body = (xs >= left) & (xs < left + width) & (ys >= top) & (ys < top + height)
        mask[body] = CAR
        image[body] = rng.integers(60, 255, 3)
        for wheel_x in (left + width // 5, left + 4 * width // 5):
            wheel = (xs - wheel_x) ** 2 + (ys - top - height) ** 2 < 25
            image[wheel] = 20
            mask[wheel] = CAR
        inside = (xs >= left + 1) & (xs < left + width - 1) & (ys >= top + 1) & (ys < top + height - 1)
        outline = body & ~inside
        mask[outline] = 255
    image += rng.normal(0, 4, image.shape)  # sensor noise
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_dataset(root: Path, train: int = 9, val: int = 3, seed: int = 0) -> None:
    """``root``/classes.txt, images/{train,val}/*.jpg, masks/{train,val}/*.png (see the module docstring)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for split, count in (("train", train), ("val", val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = _scene(rng)
            Image.fromarray(image).save(root / "images" / split / f"street{i:02d}.jpg", quality=90)
            Image.fromarray(mask).save(root / "masks" / split / f"street{i:02d}.png")


def _timed(command: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return seconds, done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="an empty (or new) directory")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", help="extra train --set overrides")
    args = parser.parse_args()
    project, elsewhere = args.workdir / "project", args.workdir / "elsewhere"
    elsewhere.mkdir(parents=True, exist_ok=True)
    write_dataset(project / "my_data")
    python = [sys.executable, "-m", "danet"]
    train_s, train_log = _timed([*python, "train", "--preset", "folder", "--set", "data.root=my_data",
                                 *args.overrides], project)
    image = project / "my_data" / "images" / "val" / "street00.jpg"
    predict_s, predict_log = _timed([*python, "predict", str(image), "--checkpoint",
                                     str(project / "runs" / "latest"), "--output", "pred/"], elsewhere)
    print(train_log.strip())
    print(predict_log.strip())
    load = os.getloadavg()[0]
    print(f"train {train_s:.1f} s, predict elsewhere {predict_s:.1f} s, total {train_s + predict_s:.1f} s "
          f"(load average {load:.1f}, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
