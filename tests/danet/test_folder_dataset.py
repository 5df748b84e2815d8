"""The folder dataset: images/ + masks/ + classes.txt, trained and predicted on without a Dataset class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from danet.cli import main
from danet.data import build_dataset, get_dataset_class
from danet.data.base import repeated_names
from danet.data.folder import FolderDataset, read_class_list
from danet.data.voc import voc_palette
from tests.danet.training_helpers import write_folder_dataset


def test_class_list_and_items(tmp_path: Path) -> None:
    write_folder_dataset(tmp_path, {"train": 3, "val": 1})
    names, palette = read_class_list(tmp_path / "classes.txt")
    assert names == ("background", "bright square")
    np.testing.assert_array_equal(palette, [voc_palette(1)[0], (255, 128, 0)])
    dataset_class = get_dataset_class("folder", tmp_path)
    assert (dataset_class.NUM_CLASSES, dataset_class.CLASS_NAMES) == (2, names)
    dataset = build_dataset("folder", tmp_path, "train")
    assert len(dataset) == 3 and dataset.NUM_CLASSES == 2
    image, mask = dataset[1]  # a JPEG with its PNG mask
    assert tuple(image.shape) == (3, 32, 32) and tuple(mask.shape) == (32, 32)
    assert set(np.unique(mask.numpy()).tolist()) == {0, 1, 255}


@pytest.mark.parametrize(("damage", "message"), [
    (lambda root: (root / "masks" / "train" / "img0.png").unlink(), "dataset file not found"),
    (lambda root: (root / "classes.txt").unlink(), "classes.txt"),
    (lambda root: (root / "classes.txt").write_text("a\nb\na\n"), "names a more than once"),
    (lambda root: (root / "classes.txt").write_text("# nothing\n"), "names no class"),
    (lambda root: Image.fromarray(np.full((32, 32), 7, np.uint8)).save(root / "masks" / "train" / "img0.png"),
     r"label values \[7\] are not valid"),
    (lambda root: Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "images" / "train" / "img1.png"),
     "several images named img1"),
])
def test_bad_folders_are_clear_errors(tmp_path: Path, damage, message: str) -> None:
    write_folder_dataset(tmp_path, {"train": 2})
    damage(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        FolderDataset(tmp_path, "train")[0]


def test_repeated_names_lists_each_repeated_name_once_sorted() -> None:
    assert repeated_names(["b", "a", "b", "c", "a", "b"]) == ["a", "b"]
    assert repeated_names(iter(["x", "y"])) == []


def test_no_root_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match=r"needs data\.root"):
        get_dataset_class("folder", None)


def test_train_and_predict_on_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`danet train --preset folder` on the user's folders, then predict with the run's class names."""
    monkeypatch.chdir(tmp_path)
    write_folder_dataset(tmp_path / "mine", {"train": 4, "val": 2})
    overrides = [f"data.root={tmp_path / 'mine'}", "model.backbone=resnet_tiny", "model.multi_grid=false",
                 "data.base_size=32", "data.crop_size=32", "data.workers=0", "train.iters=2",
                 "train.batch_size=2", "train.progress=false"]
    assert main(["train", "--preset", "folder", "--output", "runs/mine", "--set", *overrides]) == 0
    assert "done: 2 iterations" in capsys.readouterr().out
    image = tmp_path / "mine" / "images" / "val" / "img0.png"
    assert main(["predict", str(image), "--checkpoint", "latest", "--output", "pred", "--device", "cpu"]) == 0
    with Image.open(tmp_path / "pred" / "img0_mask.png") as mask:
        assert '"1": "bright square"' in mask.text["danet:classes"]
