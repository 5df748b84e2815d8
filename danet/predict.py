"""Segment your own images: colour-palette masks and overlays (PNG).

Example::

    danet predict photo1.jpg photo2.png --checkpoint runs/synthetic-<time>/checkpoint_best.pt --output pred/

For each image ``NAME.ext`` it writes ``NAME_mask.png`` (a palette PNG whose pixel values are
the class ids, coloured with the dataset's palette) and ``NAME_overlay.png`` (the mask blended
over the image). Existing outputs are never replaced unless ``--overwrite`` is given.

``--format cityscapes`` writes what the Cityscapes benchmark server takes instead: for each
``<city>_<seq>_<frame>_leftImg8bit.png`` a PNG of the same name whose pixels are Cityscapes
*label ids* (the 19 train ids mapped back through the official table), in one flat directory
(the server matches ``<city>_<seq>_<frame>*.png`` anywhere in the zip)::

    danet predict data/cityscapes/leftImg8bit/test/*/*.png --format cityscapes --output results/ \
        --checkpoint city.pt --protocol release --base-size 2048 --crop-size 768 --mode sliding --flip
    cd results && zip ../submission.zip *.png

An image above ``--max-whole-pixels`` in whole-image mode is predicted with sliding windows
instead (the attention's cost grows with the square of the pixel count), with its estimated
cost and a progress bar.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors

from danet.config import EvalConfig
from danet.data import eval_transforms
from danet.data.cityscapes import LABEL_ID_TO_TRAIN_ID
from danet.files import atomic_write
from danet.inference import (
    CommandSetup,
    add_inference_arguments,
    add_model_arguments,
    estimate_inference_cost,
    inference_plan,
    run_inference,
    setup_from_args,
    window_stride,
)

__all__ = ["CITYSCAPES_NAME", "FORMATS", "MAX_WHOLE_PIXELS", "add_arguments", "cityscapes_label_ids",
           "colourise", "image_inference", "load_image", "mask_image", "normalise_image", "overlay",
           "predict_image", "run"]

FORMATS: tuple[str, ...] = ("palette", "cityscapes")
CITYSCAPES_NAME = re.compile(r"^[a-z_]+_\d{6}_\d{6}_leftImg8bit$")
"""The stem of a Cityscapes image: ``<city>_<seq>_<frame>_leftImg8bit`` (cityscapesScripts' naming)."""
MAX_WHOLE_PIXELS = 2048 * 2048
"""Default of --max-whole-pixels: larger images are not predicted whole."""
_TRAIN_ID_TO_LABEL_ID = np.zeros(256, dtype=np.uint8)
for _label_id, _train_id in LABEL_ID_TO_TRAIN_ID.items():
    _TRAIN_ID_TO_LABEL_ID[_train_id] = _label_id
_ESTIMATE_ABOVE_PIXELS = 1 << 20  # the cost is estimated (and printed) above this size or ...
_ESTIMATE_ABOVE_FORWARDS = 16  # ... above this many forwards


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


def predict_image(setup: CommandSetup, image: np.ndarray, cfg: EvalConfig | None = None,
                  progress: bool = False) -> torch.Tensor:
    """Class ids (H, W) int64 on the CPU for an RGB uint8 (H, W, 3) image (``cfg``: the setup's)."""
    return run_inference(setup, normalise_image(setup, image), cfg, progress).argmax(1)[0].cpu()


def image_inference(setup: CommandSetup, height: int, width: int,
                    max_whole_pixels: int) -> tuple[EvalConfig, list[str]]:
    """The inference settings for one image and what to tell the user about them.

    Whole-image inference of an image above ``max_whole_pixels`` (0: no limit) becomes sliding
    windows of the setup's crop; above a megapixel or 16 forwards the cost is estimated first.
    """
    cfg, notes = setup.eval, []
    if cfg.mode == "whole" and cfg.protocol != "release" and 0 < max_whole_pixels < height * width:
        cfg = dataclasses.replace(cfg, mode="sliding")
        notes.append(f"{width}x{height} ({height * width / 1e6:.1f} MP) is above --max-whole-pixels "
                     f"{max_whole_pixels}: sliding {cfg.crop_size}x{cfg.crop_size} windows, stride "
                     f"{window_stride(cfg)}, instead of the whole image (--max-whole-pixels 0 forces it)")
    forwards = sum(stage.forwards for stage in inference_plan(height, width, cfg))
    if height * width > _ESTIMATE_ABOVE_PIXELS or forwards > _ESTIMATE_ABOVE_FORWARDS:
        cost = estimate_inference_cost(setup.model, height, width, setup.dataset_class.NUM_CLASSES, cfg,
                                       device=setup.device)
        estimate = f", estimated {cost.describe()}" if cost is not None else ""
        notes.append(f"{width}x{height}: {forwards} forward(s){estimate}")
    return cfg, notes


def cityscapes_label_ids(prediction: torch.Tensor) -> Image.Image:
    """An 8-bit ("L") PNG image of Cityscapes label ids for a (H, W) map of the 19 train ids."""
    return Image.fromarray(_TRAIN_ID_TO_LABEL_ID[prediction.numpy()])


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
    parser.add_argument("--format", choices=FORMATS, default="palette",
                        help="palette: NAME_mask.png + NAME_overlay.png; cityscapes: label-id PNGs named "
                             "as the Cityscapes benchmark server expects (default palette)")
    parser.add_argument("--max-whole-pixels", type=int, default=MAX_WHOLE_PIXELS, metavar="N",
                        help=f"predict larger images with sliding windows even in whole mode; 0: never "
                             f"(default {MAX_WHOLE_PIXELS})")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar on long inference")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _output_paths(images: list[str], output: Path, overwrite: bool, fmt: str) -> list[tuple[Path, ...]]:
    """The output paths of each image; checked up front so that no run stops half-way."""
    missing = [p for p in images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"image(s) not found: {', '.join(missing)}")
    stems = [Path(p).stem for p in images]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise ValueError(f"several input images are named {', '.join(duplicates)}: their outputs would "
                         f"collide; predict them into different --output directories")
    if fmt == "cityscapes":
        unmatched = [p for p, stem in zip(images, stems, strict=True) if not CITYSCAPES_NAME.match(stem)]
        if unmatched:
            raise ValueError(f"--format cityscapes needs Cityscapes image names "
                             f"(<city>_<seq>_<frame>_leftImg8bit.png), got {', '.join(unmatched)}")
        paths: list[tuple[Path, ...]] = [(output / f"{stem}.png",) for stem in stems]
    else:
        paths = [(output / f"{stem}_mask.png", output / f"{stem}_overlay.png") for stem in stems]
    existing = [str(p) for group in paths for p in group if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"output file(s) exist: {', '.join(existing)} (pass --overwrite to replace them)")
    return paths


def run(args: argparse.Namespace) -> int:
    """``danet predict``: write a mask and an overlay per image, or Cityscapes label-id PNGs."""
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.max_whole_pixels < 0:
        raise ValueError(f"--max-whole-pixels must be >= 0, got {args.max_whole_pixels}")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} exists and is not a directory")
    paths = _output_paths(args.images, output, args.overwrite, args.format)
    setup = setup_from_args(args)
    if args.format == "cityscapes" and setup.data.dataset != "cityscapes":
        raise ValueError(f"--format cityscapes needs a Cityscapes model (--dataset cityscapes), "
                         f"got dataset {setup.data.dataset!r}")
    palette = setup.dataset_class.PALETTE
    for image_path, outputs in zip(args.images, paths, strict=True):
        image = load_image(image_path)
        cfg, notes = image_inference(setup, image.shape[0], image.shape[1], args.max_whole_pixels)
        for note in notes:
            print(f"{image_path}: {note}")
        prediction = predict_image(setup, image, cfg, progress=args.progress)
        if args.format == "cityscapes":
            label_ids = cityscapes_label_ids(prediction)
            atomic_write(outputs[0], lambda tmp, i=label_ids: i.save(tmp, format="PNG"))
        else:
            mask_path, overlay_path = outputs
            atomic_write(mask_path, lambda tmp, p=prediction: mask_image(p, palette).save(tmp, format="PNG"))
            blended = overlay(image, colourise(prediction, palette), args.alpha)
            atomic_write(overlay_path, lambda tmp, b=blended: Image.fromarray(b).save(tmp, format="PNG"))
        print(f"{image_path} -> {', '.join(map(str, outputs))}")
    return 0
