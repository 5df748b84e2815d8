"""Segment your own images: colour-palette masks and overlays (PNG).

Example::

    danet predict photo1.jpg photo2.png --checkpoint runs/synthetic-<time>/checkpoint_best.pt --output pred/

For each image ``NAME.ext`` it writes ``NAME_mask.png`` (a palette PNG whose pixel values are
the class ids, coloured with the dataset's palette) and ``NAME_overlay.png`` (the mask blended
over the image). Existing outputs are never replaced unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors

from danet.data import eval_transforms
from danet.files import atomic_write
from danet.inference import (
    CommandSetup,
    add_inference_arguments,
    add_model_arguments,
    run_inference,
    setup_from_args,
)

__all__ = ["add_arguments", "colourise", "load_image", "mask_image", "normalise_image", "overlay",
           "predict_image", "run"]


def load_image(path: str | Path) -> np.ndarray:
    """Read ``path`` as RGB uint8 (H, W, 3).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an image PIL can read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))  # a writable copy (torch.from_numpy needs one)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def normalise_image(setup: CommandSetup, image: np.ndarray) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> the model's input (1, 3, H, W) on the setup's device (eval transforms)."""
    tensor = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous())
    return eval_transforms(setup.data.mean, setup.data.std)(tensor)[None].to(setup.device)


def predict_image(setup: CommandSetup, image: np.ndarray) -> torch.Tensor:
    """Class ids (H, W) int64 on the CPU for an RGB uint8 (H, W, 3) image."""
    return run_inference(setup, normalise_image(setup, image)).argmax(1)[0].cpu()


def mask_image(prediction: torch.Tensor, palette: np.ndarray) -> Image.Image:
    """A palette ("P") PIL image: pixel values are class ids, shown in the dataset's colours."""
    if len(palette) > 256:
        raise ValueError(f"a palette PNG holds at most 256 classes, got {len(palette)}")
    image = Image.fromarray(prediction.numpy().astype(np.uint8))  # mode "L"; putpalette makes it "P"
    image.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    return image


def colourise(prediction: torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) colours of the class ids ``prediction`` (H, W)."""
    return np.asarray(palette, dtype=np.uint8)[prediction.numpy()]


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * image + alpha * colours`` as uint8."""
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``danet predict``."""
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="images to segment (any PIL format)")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory for the PNGs")
    add_model_arguments(parser)
    add_inference_arguments(parser)
    parser.add_argument("--alpha", type=float, default=0.5, help="mask opacity in the overlay (default 0.5)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _output_paths(images: list[str], output: Path, overwrite: bool) -> list[tuple[Path, Path]]:
    """(mask, overlay) paths per image; checked up front so that no run stops half-way."""
    missing = [p for p in images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"image(s) not found: {', '.join(missing)}")
    stems = [Path(p).stem for p in images]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise ValueError(f"several input images are named {', '.join(duplicates)}: their outputs would "
                         f"collide; predict them into different --output directories")
    paths = [(output / f"{stem}_mask.png", output / f"{stem}_overlay.png") for stem in stems]
    existing = [str(p) for pair in paths for p in pair if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"output file(s) exist: {', '.join(existing)} (pass --overwrite to replace them)")
    return paths


def run(args: argparse.Namespace) -> int:
    """``danet predict``: write a mask and an overlay per image."""
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} exists and is not a directory")
    paths = _output_paths(args.images, output, args.overwrite)
    setup = setup_from_args(args)
    palette = setup.dataset_class.PALETTE
    for image_path, (mask_path, overlay_path) in zip(args.images, paths, strict=True):
        image = load_image(image_path)
        prediction = predict_image(setup, image)
        atomic_write(mask_path, lambda tmp, p=prediction: mask_image(p, palette).save(tmp, format="PNG"))
        blended = overlay(image, colourise(prediction, palette), args.alpha)
        atomic_write(overlay_path, lambda tmp, b=blended: Image.fromarray(b).save(tmp, format="PNG"))
        print(f"{image_path} -> {mask_path}, {overlay_path}")
    return 0
