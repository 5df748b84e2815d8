"""danet.data.images.load_rgb: every PIL mode to 8-bit RGB, EXIF orientation, clear refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from danet.cli import main
from danet.data.images import image_size, load_rgb

RAMP = np.linspace(0.0, 1.0, 12 * 16).reshape(12, 16)  # every grey level from black to white


def _grey(array: np.ndarray) -> np.ndarray:
    """The expected RGB of a grey image: the level repeated over the channels."""
    return np.repeat(array[:, :, None], 3, axis=2)


@pytest.mark.parametrize(("mode", "to_stored", "suffix"), [
    ("I;16", lambda r: np.rint(r * 65535).astype(np.uint16), ".png"),
    ("I", lambda r: np.rint(r * 65535).astype(np.int32), ".tif"),
    ("F", lambda r: r.astype(np.float32), ".tif"),
    ("L", lambda r: np.rint(r * 255).astype(np.uint8), ".png"),
])
def test_wide_modes_scale_to_8_bit(tmp_path: Path, mode: str, to_stored, suffix: str) -> None:
    """A grey ramp stored in 16-bit, 32-bit integer and float images reads as the same 8-bit ramp."""
    path = tmp_path / f"ramp{suffix}"
    Image.fromarray(to_stored(RAMP)).save(path)
    with Image.open(path) as stored:
        assert stored.mode == mode
    rgb = load_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (12, 16, 3) and rgb.flags.writeable
    np.testing.assert_allclose(rgb.astype(float), _grey(RAMP * 255), atol=0.5 + 1e-9)


@pytest.mark.parametrize(("values", "message"), [
    (np.full((4, 4), 70000, dtype=np.int32), r"mode I\) image with values in \[70000, 70000\]"),
    (np.full((4, 4), -3, dtype=np.int32), r"values in \[-3, -3\]"),
    (np.full((4, 4), 2.5, dtype=np.float32), r"mode F\) image with values in \[2.5, 2.5\]"),
    (np.full((4, 4), np.nan, dtype=np.float32), r"mode F\)"),
])
def test_modes_without_an_8_bit_meaning_are_refused(tmp_path: Path, values: np.ndarray, message: str) -> None:
    path = tmp_path / "odd.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(ValueError, match=message):
        load_rgb(path)


def test_colour_modes_convert_as_pil_does(tmp_path: Path) -> None:
    rgba = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "a.png"), rgba[:, :, :3])
    Image.fromarray(rgba[:, :, :3]).convert("P").save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as palette_image:
        expected = np.asarray(palette_image.convert("RGB"))
    np.testing.assert_array_equal(load_rgb(tmp_path / "p.png"), expected)


@pytest.mark.parametrize(("orientation", "turn"), [(1, None), (3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, turn: int | None) -> None:
    """A camera's image stored sideways with its orientation tag reads upright (shape and pixels)."""
    pixels = np.random.default_rng(1).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.png"
    image.save(path, exif=exif)
    expected = pixels if turn is None else np.rot90(pixels, turn)
    rgb = load_rgb(path)
    np.testing.assert_array_equal(rgb, expected)
    assert image_size(path) == (rgb.shape[1], rgb.shape[0])


def test_decompression_bomb_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """An image over PIL's limit (lowered here; really ~179 megapixels) is one line, not a traceback."""
    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((60, 60, 3), dtype=np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"cannot read image .*huge.png: Image size \(3600 pixels\) exceeds"):
        load_rgb(path)
    with pytest.raises(ValueError, match="decompression bomb"):
        image_size(path)
    assert main(["predict", str(path), "--checkpoint", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("danet predict: error: cannot read image") and len(err.strip().splitlines()) == 1


def test_dataset_items_use_the_loader(tmp_path: Path) -> None:
    """A dataset of 16-bit images trains on the scaled pixels, not on white."""
    from danet.data.folder import FolderDataset

    images, masks = tmp_path / "images" / "train", tmp_path / "masks" / "train"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    Image.fromarray(np.rint(RAMP * 65535).astype(np.uint16)).save(images / "a.png")
    Image.fromarray(np.zeros((12, 16), dtype=np.uint8)).save(masks / "a.png")
    (tmp_path / "classes.txt").write_text("background\nthing\n")
    image, _ = FolderDataset(tmp_path, "train")[0]
    pixels = image.permute(1, 2, 0).numpy().astype(float)
    np.testing.assert_allclose(pixels, _grey(RAMP * 255), atol=0.5 + 1e-9)
