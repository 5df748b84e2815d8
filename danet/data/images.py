"""Reading an image file as the model sees it: RGB, 8 bit, upright.

One loader for every command and dataset (:func:`load_rgb`). PIL's ``convert("RGB")`` is
right for the 8-bit modes (L, P, RGBA, CMYK, YCbCr, ...) but clips the wide ones: a 16-bit
grey PNG ("I;16") or a 32-bit integer TIFF ("I") becomes almost all white, a float TIFF ("F")
with values in [0, 1] all black. Here each wide mode is scaled by the range its type means:

====================  ==========================================================================
mode                  to 8 bit
====================  ==========================================================================
I;16, I;16L/B/N       ``round(value * 255 / 65535)``: the full 16-bit range
I (32-bit integers)   values within [0, 65535] as 16 bit (PIL opens some 16-bit files as "I");
                      other ranges have no standard meaning and are refused
F (32-bit float)      values within [0, 1] times 255; other ranges (or NaN/Inf) are refused
====================  ==========================================================================

Grey images are repeated over the three channels; an alpha channel is dropped (the model sees
the colour values, transparent pixels included; ``danet predict`` and ``danet attention`` say so,
:func:`has_alpha`). The EXIF
orientation tag is applied (``ImageOps.exif_transpose``), as cameras and OpenCV's reader (and
so mmsegmentation's) do, so that a photo taken upright is segmented upright. Images larger than
PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS`` times 2) are refused with their
size in the message.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ALPHA_IGNORED", "has_alpha", "image_size", "image_suffixes", "load_rgb"]

ALPHA_IGNORED = "its alpha channel is ignored (the model sees the colours, transparent pixels included)"
"""What the commands say about an image with transparency (:func:`has_alpha`)."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


@functools.cache
def image_suffixes() -> frozenset[str]:
    """Suffixes (lower case, with the dot) of the formats PIL opens: what a directory of images holds."""
    return frozenset(suffix for suffix, name in Image.registered_extensions().items() if name in Image.OPEN)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


def _wide_to_uint8(values: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """Scale the grey values of a 16-bit, 32-bit integer or float image to uint8 (see the table)."""
    if mode == "F":
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (np.isfinite(values).all() and 0.0 <= low and high <= 1.0):
            raise ValueError(f"cannot read image {path}: a float (mode F) image with values in [{low:g}, "
                             f"{high:g}]; only [0, 1] has a standard 8-bit meaning: save it as 8 or 16 bit")
        return np.rint(values * 255.0).astype(np.uint8)
    wide = values.astype(np.int64)
    if mode == "I":
        low, high = (int(wide.min()), int(wide.max())) if wide.size else (0, 0)
        if low < 0 or high > 65535:
            raise ValueError(f"cannot read image {path}: a 32-bit integer (mode I) image with values in "
                             f"[{low}, {high}]; only 0..65535 (16 bit) has a standard 8-bit meaning: "
                             "save it as 8 or 16 bit")
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """PIL's image at ``path``, with its errors turned into the ones :func:`load_rgb` documents."""
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            # above MAX_IMAGE_PIXELS PIL only warns; above twice that it raises (handled below)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                yield image
    except Image.DecompressionBombError as err:  # PIL's text names the pixel count and the limit
        raise ValueError(f"cannot read image {path}: {err} Downscale or tile it first.") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the image at ``path`` after EXIF orientation, from its header alone.

    Raises what :func:`load_rgb` raises for a missing, unreadable or oversized file, so that a
    command can check all its inputs before it starts.
    """
    with _opened(Path(path)) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)  # 5 to 8: rotated by 90 degrees
        return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def has_alpha(path: str | Path) -> bool:
    """Whether the image at ``path`` has transparency (an alpha channel or a transparent palette
    entry), which :func:`load_rgb` drops: the commands say so (from the header alone)."""
    with _opened(Path(path)) as image:
        return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def load_rgb(path: str | Path) -> np.ndarray:
    """Read ``path`` as an upright RGB uint8 array (H, W, 3), writable (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an image PIL can read, a mode with no 8-bit meaning, or an image over
            PIL's decompression-bomb limit.
    """
    path = Path(path)
    with _opened(path) as opened:
        image = ImageOps.exif_transpose(opened)
        mode = image.mode
        if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
            return _grey_to_rgb(_wide_to_uint8(np.asarray(image), mode, path))
        return np.array(image.convert("RGB"))  # a writable copy (torch.from_numpy needs one)
