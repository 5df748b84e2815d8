"""Segment your own images: colour-palette masks and overlays with a class legend (PNG).

Examples::

    danet predict photo1.jpg photo2.png --checkpoint runs/latest --output pred/
    danet predict photos/ 'more/*.jpg' --checkpoint runs/latest --output pred/

IMAGE arguments are files, directories (every image directly inside, by file suffix) or glob
patterns (quoted, so that danet expands them, ``**`` included). For each image ``NAME.ext`` it
writes ``NAME_mask.png``, a palette PNG whose pixel values are the class ids, coloured with
the dataset's palette (its text metadata names the classes: a legend drawn into it would
change the ids), and ``NAME_overlay.png``, the mask blended over the image with a legend of
the classes present beside it. Every input and the checkpoint are checked before any output;
existing outputs are never replaced unless ``--overwrite`` is given.

``--format cityscapes`` writes what the Cityscapes benchmark server takes instead: for each
``<city>_<seq>_<frame>_leftImg8bit.png`` a PNG of the same name whose pixels are Cityscapes
*label ids* (the 19 train ids mapped back through the official table), in one flat directory
(the server matches ``<city>_<seq>_<frame>*.png`` anywhere in the zip)::

    danet predict 'data/cityscapes/leftImg8bit/test/*/*.png' --format cityscapes --output results/ \\
        --checkpoint city.pt --protocol release --base-size 2048 --crop-size 768 --mode sliding --flip
    cd results && zip ../submission.zip *.png

An image above ``--max-whole-pixels`` in whole-image mode is predicted with sliding windows
instead (the attention's cost grows with the square of the pixel count). Above a megapixel
or 16 forwards the estimated cost is printed first and a progress bar shown.

A model knows only the classes of its training data: the demo checkpoint of ``danet train``
knows the synthetic scenes, and gives meaningless masks on photographs.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from danet.commands.model_setup import (
    LONG_INFERENCE_PIXELS,
    CommandSetup,
    describe_forward,
    predict_image,
    setup_from_args,
)
from danet.config import EvalConfig
from danet.data.base import repeated_names
from danet.data.images import ALPHA_IGNORED, has_alpha, image_size, image_suffixes, load_rgb
from danet.evaluation.engine import estimate_inference_cost
from danet.evaluation.protocols import inference_plan, window_stride
from danet.io.atomic import atomic_write
from danet.io.output_paths import check_output_dir, check_output_file, occupied
from danet.visualization.masks import cityscapes_label_ids, colourise, mask_image, overlay, with_legend

__all__ = ["CITYSCAPES_NAME", "MAX_WHOLE_PIXELS", "expand_image_arguments", "image_inference", "run"]

CITYSCAPES_NAME = re.compile(r"^[a-z_]+_\d{6}_\d{6}_leftImg8bit$")
"""The stem of a Cityscapes image: ``<city>_<seq>_<frame>_leftImg8bit`` (cityscapesScripts' naming)."""
MAX_WHOLE_PIXELS = 2048 * 2048
"""Default of --max-whole-pixels: larger images are not predicted whole."""
_ESTIMATE_ABOVE_FORWARDS = 16  # the cost is estimated (and printed) above this many forwards, or pixels


def image_inference(setup: CommandSetup, height: int, width: int,
                    max_whole_pixels: int) -> tuple[EvalConfig, list[str], bool]:
    """The inference settings for one image, what to tell the user about them, and whether it is long.

    Whole-image inference of an image above ``max_whole_pixels`` (0: no limit) becomes sliding
    windows of the setup's crop; above a megapixel or 16 forwards the inference counts as long:
    its cost is estimated first and a progress bar shown.
    """
    cfg, notes = setup.eval, []
    if cfg.mode == "whole" and cfg.protocol != "release" and 0 < max_whole_pixels < height * width:
        cfg = dataclasses.replace(cfg, mode="sliding")
        notes.append(f"{width}x{height} ({height * width / 1e6:.1f} MP) is above --max-whole-pixels "
                     f"{max_whole_pixels}: sliding {cfg.crop_size}x{cfg.crop_size} windows, stride "
                     f"{window_stride(cfg)}, instead of the whole image (--max-whole-pixels 0 forces it)")
    forwards = sum(stage.forwards for stage in inference_plan(height, width, cfg))
    long = height * width > LONG_INFERENCE_PIXELS or forwards > _ESTIMATE_ABOVE_FORWARDS
    if long:
        cost = estimate_inference_cost(setup.model, height, width, setup.classes.num_classes, cfg,
                                       device=setup.device)
        estimate = f", estimated {describe_forward(setup, cost)}" if cost is not None else ""
        notes.append(f"{width}x{height}: {forwards} forward(s){estimate}")
    return cfg, notes, long


def _is_pattern(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def expand_image_arguments(arguments: Sequence[str]) -> list[Path]:
    """Files, directories (their images, sorted) and glob patterns -> image paths, in argument order.

    Raises:
        FileNotFoundError: a path that does not exist, a pattern or a directory with no image.
    """
    suffixes = image_suffixes()
    images: list[Path] = []
    problems: list[str] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_file():
            images.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                problems.append(f"{argument} (a directory without images)")
            images.extend(found)
        elif _is_pattern(argument):
            found = sorted(Path(p) for p in glob.glob(argument, recursive=True)
                           if Path(p).is_file() and Path(p).suffix.lower() in suffixes)
            if not found:
                problems.append(f"{argument} (a pattern that matches no image)")
            images.extend(found)
        else:
            problems.append(argument)
    if problems:
        raise FileNotFoundError(f"image(s) not found: {', '.join(problems)}")
    return list(dict.fromkeys(images))  # an image named twice (a file and its directory) runs once


def _output_paths(images: list[Path], output: Path, overwrite: bool, fmt: str) -> list[tuple[Path, ...]]:
    """The output paths of each image; checked up front so that no run stops half-way."""
    stems = [p.stem for p in images]
    duplicates = repeated_names(stems)
    if duplicates:
        raise ValueError(f"several input images are named {', '.join(duplicates)}: their outputs would "
                         f"collide; predict them into different --output directories")
    if fmt == "cityscapes":
        unmatched = [str(p) for p, stem in zip(images, stems, strict=True) if not CITYSCAPES_NAME.match(stem)]
        if unmatched:
            raise ValueError(f"--format cityscapes needs Cityscapes image names "
                             f"(<city>_<seq>_<frame>_leftImg8bit.png), got {', '.join(unmatched)}")
        paths: list[tuple[Path, ...]] = [(output / f"{stem}.png",) for stem in stems]
    else:
        paths = [(output / f"{stem}_mask.png", output / f"{stem}_overlay.png") for stem in stems]
    files = [path for group in paths for path in group]
    for path in files:
        check_output_file(path, overwrite=True)  # existing files: one message for all, below
    existing = [str(p) for p in files if occupied(p)]  # a dangling symbolic link too
    if existing and not overwrite:
        raise ValueError(f"output file(s) exist: {', '.join(existing)} (pass --overwrite to replace them)")
    return paths


def _save_mask(path: Path, prediction: torch.Tensor, palette: np.ndarray, class_names: Sequence[str]) -> None:
    info = PngImagePlugin.PngInfo()  # the legend of a mask: class id -> name, as PNG text
    info.add_text("danet:classes", json.dumps(dict(enumerate(class_names))))
    atomic_write(path, lambda tmp: mask_image(prediction, palette).save(tmp, format="PNG", pnginfo=info))


def run(args: argparse.Namespace) -> int:
    """``danet predict``: a mask and an overlay per image, or Cityscapes label-id PNGs."""
    max_whole_pixels = MAX_WHOLE_PIXELS if args.max_whole_pixels is None else args.max_whole_pixels
    output = check_output_dir(args.output)
    images = expand_image_arguments(args.images)  # inputs first: the images, then the checkpoint
    for path in images:
        image_size(path)  # an unreadable or oversized image stops the run before it starts
        if has_alpha(path):
            print(f"{path}: {ALPHA_IGNORED}")
    setup = setup_from_args(args)
    if args.format == "cityscapes" and setup.data.dataset != "cityscapes":
        raise ValueError(f"--format cityscapes needs a Cityscapes model (--dataset cityscapes), "
                         f"got dataset {setup.data.dataset!r}")
    paths = _output_paths(images, output, args.overwrite, args.format)
    palette, class_names = setup.classes.palette, setup.classes.names
    for image_path, outputs in zip(images, paths, strict=True):
        image = load_rgb(image_path)
        cfg, notes, long = image_inference(setup, image.shape[0], image.shape[1], max_whole_pixels)
        for note in notes:
            print(f"{image_path}: {note}")
        prediction = predict_image(setup, image, cfg, progress=args.progress and long)
        if args.format == "cityscapes":
            label_ids = cityscapes_label_ids(prediction)
            atomic_write(outputs[0], lambda tmp, i=label_ids: i.save(tmp, format="PNG"))
        else:
            mask_path, overlay_path = outputs
            _save_mask(mask_path, prediction, palette, class_names)
            blended = overlay(image, colourise(prediction, palette), args.alpha)
            if args.legend:
                blended = with_legend(blended, prediction, class_names, palette)
            atomic_write(overlay_path, lambda tmp, b=blended: Image.fromarray(b).save(tmp, format="PNG"))
        print(f"{image_path} -> {', '.join(map(str, outputs))}")
    return 0
