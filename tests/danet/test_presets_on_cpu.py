"""Presets that fit the machine: the folder preset's CPU variant, the time a CPU run will take said
before it starts, DataLoader workers no more than the cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from danet.cli import main
from danet.config import load_config
from danet.evaluation.cost import estimate_forward_cost
from danet.models import DANet
from danet.training.cpu_time import estimate_iteration
from tests.danet.training_helpers import TINY, write_folder_dataset


def test_the_folder_preset_on_a_cpu_is_its_cpu_variant() -> None:
    """DANet-101 at 480 px took about 170 s per iteration and 15.9 GB on 2 cores, without a word."""
    gpu = load_config("folder", overrides=["train.device=cuda"])
    assert (gpu.model.backbone, gpu.data.crop_size, gpu.train.iters) == ("resnet101", 480, None)
    cpu = load_config("folder", overrides=["train.device=cpu"])
    assert (cpu.model.backbone, cpu.model.multi_grid, cpu.data.crop_size, cpu.data.workers) == \
        ("resnet_tiny", False, 192, 0)
    assert (cpu.train.iters, cpu.train.val_interval, cpu.optim.lr) == (100, 0, 0.01)
    auto = load_config("folder")  # auto: the variant where there is no CUDA
    assert auto.model.backbone == ("resnet101" if torch.cuda.is_available() else "resnet_tiny")
    mine = load_config("folder", overrides=["train.device=cpu", "model.backbone=resnet18", "train.iters=7"])
    assert (mine.model.backbone, mine.train.iters, mine.data.crop_size) == ("resnet18", 7, 192)  # --set wins
    weights = load_config("folder", overrides=["train.device=cpu", "model.pretrained_backbone=/w/r101.pth"])
    assert (weights.model.backbone, weights.train.iters) == ("resnet101", 100)  # the weights' backbone kept


def test_a_cpu_run_says_its_variant_and_its_time_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    write_folder_dataset(tmp_path / "mine", {"train": 4, "val": 2})
    small = ["train.batch_size=2", "data.crop_size=32", "data.base_size=32"]
    assert main(["train", "--preset", "folder", "--set", "data.root=mine", "train.device=cpu",
                 "train.iters=2", *small]) == 0
    out = capsys.readouterr().out
    assert "train.device=cpu: the folder preset's CPU variant (model.backbone=resnet_tiny" in out
    assert "on this CPU: about" in out and "2 iterations: about" in out
    monkeypatch.setattr("danet.training.trainer._LONG_CPU_RUN_S", 0.0)  # every run is "long" now
    assert main(["train", "--set", *TINY, "train.iters=1", "train.progress=true", "--output", "long"]) == 0
    assert "on this CPU (resnet_tiny, 32 px crops: a GPU recipe?)" in capsys.readouterr().err


def test_the_estimate_is_flops_over_the_measured_speed() -> None:
    model = DANet(3, backbone="resnet_tiny", multi_grid=False).train()
    estimate = estimate_iteration(model, images=4, crop_size=64)
    assert model.training  # left in its mode
    forward = estimate_forward_cost(model.eval(), 1, 64, 64).flops
    assert estimate.flops == pytest.approx(3 * 4 * forward)
    assert estimate.seconds == pytest.approx(estimate.flops / estimate.speed) and estimate.speed > 1e8
    assert "300 iterations: about" in estimate.describe(300)


def test_workers_are_no_more_than_the_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    """torch warned (twice: the train and val loaders) about more workers than cores."""
    monkeypatch.setattr("danet.training.trainer.usable_cpus", lambda: 1)
    monkeypatch.chdir(tmp_path)
    write_folder_dataset(tmp_path / "mine", {"train": 4, "val": 2})
    assert main(["train", "--preset", "folder", "--set", "data.root=mine", "train.device=cpu",
                 "train.iters=1", "train.batch_size=2", "data.crop_size=32", "data.base_size=32",
                 "data.workers=3", "train.progress=false"]) == 0
    printed = capfd.readouterr()
    assert "data.workers=3, but this process has 1 CPU core(s): 1 DataLoader worker(s)" in printed.out
    assert "worker processes in total" not in printed.err


def test_loading_a_backbone_is_confirmed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "resnet_tiny.pth"
    torch.save(DANet(3, backbone="resnet_tiny", multi_grid=False).backbone.state_dict(), weights)
    assert main(["train", "--set", *TINY, "train.iters=1", f"model.pretrained_backbone={weights}",
                 "--output", str(tmp_path / "run")]) == 0
    assert f"backbone resnet_tiny: weights loaded from {weights}" in capsys.readouterr().out
