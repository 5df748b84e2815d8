"""The first day with your own data: a model of a folder dataset used from anywhere with nothing but its
checkpoint, bad masks found before anything is written, a stop before the first iteration leaving nothing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from danet.cli import main
from danet.config import load_config
from danet.io.checkpoint import BEST, LAST, load_checkpoint
from danet.training.run_dir import LATEST, check_run_dir
from danet.training.stopping import StopFlag
from danet.training.trainer import train
from tests.danet.training_helpers import write_folder_dataset

# the folder preset on the tiny backbone and 32 px crops: seconds on a CPU
_SMALL = ["model.backbone=resnet_tiny", "model.multi_grid=false", "data.base_size=32", "data.crop_size=32",
          "data.workers=0", "train.iters=2", "train.batch_size=2", "train.progress=false", "train.device=cpu"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`danet train --preset folder --set data.root=mine` run from a project directory (a relative root)."""
    project = tmp_path_factory.mktemp("project")
    write_folder_dataset(project / "mine", {"train": 4, "val": 2})
    cwd = Path.cwd()
    os.chdir(project)
    try:
        assert main(["train", "--preset", "folder", "--output", "runs/mine", "--set", "data.root=mine",
                     *_SMALL]) == 0
    finally:
        os.chdir(cwd)
    return project / "runs" / "mine"


def test_checkpoint_carries_what_inference_needs(folder_run: Path) -> None:
    state = load_checkpoint(folder_run / BEST)
    assert state["classes"] == {"dataset": "folder", "class_names": ["background", "bright square"],
                                "palette": [[0, 0, 0], [255, 128, 0]]}
    data = state["config"]["data"]
    assert data["root"] == str(folder_run.parent.parent / "mine")  # absolute: found from anywhere
    assert (data["mean"], data["std"]) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def test_a_folder_model_works_from_any_directory(folder_run: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """In another directory, without the data: predict, attention and export need only the checkpoint
    (`dataset file not found: <cwd>/mine/classes.txt` before), eval reads the data where it was."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    image = folder_run.parent.parent / "mine" / "images" / "val" / "img0.png"
    checkpoint = str(folder_run)  # the run directory: its best checkpoint
    cpu = ["--device", "cpu"]
    assert main(["predict", str(image), "--checkpoint", checkpoint, "--output", "pred", *cpu]) == 0
    with Image.open(elsewhere / "pred" / "img0_mask.png") as mask:
        assert '"1": "bright square"' in mask.text["danet:classes"]
        assert mask.getpalette()[3:6] == [255, 128, 0]  # classes.txt's colour
    assert main(["attention", str(image), "--points", "3,4", "--checkpoint", checkpoint, "--device", "cpu",
                 "--output", "attention.png"]) == 0
    assert main(["export", "--checkpoint", checkpoint, "--format", "torch-export", "--output", "m.pt2",
                 "--device", "cpu"]) == 0
    assert main(["eval", "--checkpoint", checkpoint, *cpu, "--no-progress", "--workers", "0"]) == 0


def test_eval_of_moved_data_takes_root(folder_run: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = str(folder_run / BEST)

    def evaluate(classes: str) -> int:
        moved = tmp_path / f"moved{len(classes)}"  # one directory per class list: the classes are cached
        write_folder_dataset(moved, {"val": 2})
        (moved / "classes.txt").write_text(classes)
        return main(["eval", "--checkpoint", checkpoint, "--root", str(moved), "--device", "cpu",
                     "--no-progress", "--workers", "0"])

    assert evaluate("background\nbright square\n") == 0
    assert "bright square" in capsys.readouterr().out
    assert evaluate("background\nsquare\n") == 0  # renamed: the model's names are used, with a note
    captured = capsys.readouterr()
    assert "1: 'square' here, 'bright square' in the model" in captured.err
    assert "bright square" in captured.out
    assert evaluate("background\nsquare\nsky\n") == 2
    assert "has 3 classes, the model 2" in capsys.readouterr().err


def test_a_checkpoint_without_its_classes_asks_for_root(folder_run: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint of an older danet (no classes record, a relative root) from elsewhere: --root."""
    state = load_checkpoint(folder_run / LAST)
    del state["classes"]
    state["config"]["data"]["root"] = "mine"
    old = tmp_path / "old.pt"
    torch.save(state, old)
    monkeypatch.chdir(tmp_path)
    image = folder_run.parent.parent / "mine" / "images" / "val" / "img1.jpg"
    args = ["predict", str(image), "--checkpoint", str(old), "--output", "pred", "--device", "cpu"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "does not carry its class names" in error and "--root DIR" in error
    assert main([*args, "--root", str(folder_run.parent.parent / "mine")]) == 0
    with Image.open(tmp_path / "pred" / "img1_mask.png") as mask:
        assert '"1": "bright square"' in mask.text["danet:classes"]


# ------------------------------------------------------------------------------ bad masks


def test_bad_mask_values_stop_training_before_anything_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A mask value that is no class: one error naming the files and the valid values, no run directory,
    runs/latest left where it was; fixed, the same --output trains (it was told to --resume)."""
    monkeypatch.chdir(tmp_path)
    write_folder_dataset(tmp_path / "mine", {"train": 4, "val": 2})
    args = ["train", "--preset", "folder", "--set", "data.root=mine", *_SMALL, "--output"]
    assert main([*args, "runs/first"]) == 0
    capsys.readouterr()
    for name in ("img1.png", "img2.png"):
        Image.fromarray(np.full((32, 32), 7, np.uint8)).save(tmp_path / "mine" / "masks" / "train" / name)
    assert main([*args, "runs/second"]) == 2
    error = capsys.readouterr().err
    assert "2 of the 4 train masks under" in error and "img1.png: label values [7] are not valid" in error
    assert "valid values: 0-1 (the 2 classes of" in error and "and 255 (pixels to ignore)" in error
    assert len(error.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "second").exists()
    assert os.readlink(LATEST) == "first"
    write_folder_dataset(tmp_path / "fixed", {"train": 4, "val": 2})
    assert main([*args, "runs/second", "--set", "data.root=fixed"]) == 0


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda mask: Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(mask), "saved as a colour image"),
    (lambda mask: Image.fromarray(np.zeros((16, 32), np.uint8)).save(mask), "differs from image size"),
])
def test_other_unusable_masks_are_found_before_training(tmp_path: Path, damage, problem: str) -> None:
    write_folder_dataset(tmp_path / "mine", {"train": 4, "val": 2})
    damage(tmp_path / "mine" / "masks" / "val" / "img0.png")
    cfg = load_config("folder", overrides=[f"data.root={tmp_path / 'mine'}", *_SMALL,
                                           f"train.output={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=f"1 of the 2 val masks .*{problem}"):
        train(cfg)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ an early stop


def test_a_stop_before_the_first_iteration_leaves_no_run_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C two seconds after `danet train`: no run directory, no iteration-0 checkpoint, runs/latest
    back where it was, and the same --output starts afresh."""
    monkeypatch.chdir(tmp_path)
    write_folder_dataset(tmp_path / "mine", {"train": 4, "val": 2})
    overrides = [f"data.root={tmp_path / 'mine'}", *_SMALL]
    assert train(load_config("folder", overrides=[*overrides, "train.output=runs/first"])).iteration == 2
    assert os.readlink(LATEST) == "first"
    stop = StopFlag()
    stop.request()  # as a signal during start-up does
    result = train(load_config("folder", overrides=[*overrides, "train.output=runs/second"]), stop=stop)
    assert result.stopped_early and result.iteration == 0
    assert "stopped before the first iteration; nothing to save" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "second").exists()
    assert os.readlink(LATEST) == "first"
    assert train(load_config("folder", overrides=[*overrides, "train.output=runs/second"])).iteration == 2


def test_a_directory_without_checkpoints_is_not_offered_to_resume(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="a run that wrote no checkpoint; pass --overwrite") as error:
        check_run_dir(tmp_path, resuming_here=False, overwrite=False)
    assert "--resume" not in str(error.value)
