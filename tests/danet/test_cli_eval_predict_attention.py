"""evaluate(), `danet eval`, `danet predict`, `danet attention`: end to end on a tiny checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset
from torchvision import tv_tensors

from danet.cli import main
from danet.config import DataConfig, EvalConfig
from danet.data import SyntheticShapes, eval_transforms
from danet.evaluation.engine import predict_logits
from danet.evaluation.evaluate import evaluate
from danet.models import load_model
from danet.visualization.attention import attention_maps, position_attention_rows
from danet_kernels.reference import position_attention_reference
from tests.danet.training_helpers import TerminalStream, save_checkpoint, tiny_model

NUM_CLASSES = SyntheticShapes.NUM_CLASSES


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    paths = {
        "checkpoint": save_checkpoint(root / "tiny.pt", tiny_model()),
        "cityscapes": save_checkpoint(root / "city.pt", tiny_model(19), dataset="cityscapes"),
        "image": root / "street.png",
        "image2": root / "other" / "room.jpg",
        "not_an_image": root / "notes.png",
    }
    Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)).save(paths["image"])
    paths["image2"].parent.mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(paths["image2"])
    paths["not_an_image"].write_text("hello")
    return paths


# ------------------------------------------------------------------------------ evaluate()


class _PredictsFromInput(nn.Module):
    """Per-pixel 'model': the class is the first input channel, as one-hot logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.one_hot(x[:, 0].long(), 3).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("mode", ["whole", "sliding", "multiscale"])
def test_evaluate_counts_pixels_correctly(mode: str) -> None:
    pred = torch.tensor([[[0, 1, 2, 2], [1, 1, 0, 2], [0, 0, 0, 1]]])  # (1, 3, 4)
    target = torch.tensor([[[0, 1, 2, 1], [1, 255, 0, 2], [0, 2, 255, 1]]])
    images = pred[:, None].expand(1, 3, 3, 4).float()
    loader = DataLoader(TensorDataset(images.repeat(2, 1, 1, 1), target.repeat(2, 1, 1)), batch_size=1)
    model = _PredictsFromInput().train()
    cfg = EvalConfig(mode=mode, crop_size=2, scales=(1.0,), flip=True)
    metrics = evaluate(model, loader, 3, cfg, "cpu", progress=False)
    # 10 counted pixels, 8 right, errors (target 1 -> 2) and (target 2 -> 0):
    # class 0: tp 3, fp 1; class 1: tp 3, fn 1; class 2: tp 2, fp 1, fn 1
    assert metrics["pixAcc"] == pytest.approx(8 / 10)
    assert metrics["IoU"] == pytest.approx([3 / 4, 3 / 4, 2 / 4])
    assert metrics["mIoU"] == pytest.approx((3 / 4 + 3 / 4 + 2 / 4) / 3)
    assert model.training  # left as it came


def _evaluate_shard(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    """One process of test_evaluate_reduces_across_processes: evaluates every other image."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        images, targets = _sharding_data()
        shard = TensorDataset(images[rank::world_size], targets[rank::world_size])
        metrics = evaluate(_PredictsFromInput(), DataLoader(shard), 3, EvalConfig(mode="whole", flip=False),
                           "cpu", progress=False)
        if rank == 0:
            Path(result_file).write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


def _sharding_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    pred = torch.randint(0, 3, (4, 5, 6), generator=generator)
    target = torch.where(torch.rand(4, 5, 6, generator=generator) < 0.7, pred,
                         torch.randint(0, 3, (4, 5, 6), generator=generator))
    target[0, 0] = 255
    return pred[:, None].expand(4, 3, 5, 6).float(), target


def test_evaluate_reduces_across_processes(tmp_path: Path) -> None:
    images, targets = _sharding_data()
    expected = evaluate(_PredictsFromInput(), DataLoader(TensorDataset(images, targets)), 3,
                        EvalConfig(mode="whole", flip=False), "cpu", progress=False)
    result = tmp_path / "metrics.json"
    # fork, as DataLoader workers do: spawn would re-import torch, timm, matplotlib in each child
    torch.multiprocessing.start_processes(_evaluate_shard, args=(2, str(tmp_path / "init"), str(result)),
                                          nprocs=2, start_method="fork")
    reduced = json.loads(result.read_text())
    alone = evaluate(_PredictsFromInput(), DataLoader(TensorDataset(images[::2], targets[::2])), 3,
                     EvalConfig(mode="whole", flip=False), "cpu", progress=False)
    assert alone["pixAcc"] != pytest.approx(expected["pixAcc"])  # rank 0's shard alone would differ
    assert reduced["pixAcc"] == pytest.approx(expected["pixAcc"])
    assert reduced["IoU"] == pytest.approx(expected["IoU"])


def test_evaluate_on_the_tiny_danet_matches_predict_logits() -> None:
    model = tiny_model().eval()
    dataset = SyntheticShapes("val", eval_transforms(DataConfig.mean, DataConfig.std), num_samples=2,
                              image_size=40)
    cfg = EvalConfig(mode="sliding", crop_size=32, flip=False)
    metrics = evaluate(model, DataLoader(dataset, batch_size=2), NUM_CLASSES, cfg, "cpu", progress=False)
    images, masks = next(iter(DataLoader(dataset, batch_size=2)))
    pred = predict_logits(model, images, NUM_CLASSES, mode="sliding", crop_size=32).argmax(1)
    valid = masks != 255
    assert metrics["pixAcc"] == pytest.approx(((pred == masks) & valid).sum().item() / valid.sum().item())


# ------------------------------------------------------------------------------ danet eval


def test_eval_command(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "metrics" / "eval.json"
    assert main(["eval", "--checkpoint", str(files["checkpoint"]), "--device", "cpu", "--workers", "0",
                 "--mode", "sliding", "--no-progress", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "synthetic/val (2 images)" in printed and "mode=sliding crop=32" in printed and "mIoU" in printed
    metrics = json.loads(out.read_text())
    assert 0.0 <= metrics["pixAcc"] <= 1.0 and len(metrics["IoU"]) == NUM_CLASSES
    assert all(v is None or 0.0 <= v <= 1.0 for v in metrics["IoU"])  # NaN written as null

    # the same numbers through the library, from the same checkpoint and data
    model, _ = load_model(files["checkpoint"])
    dataset = SyntheticShapes("val", eval_transforms(DataConfig.mean, DataConfig.std), num_samples=2,
                              image_size=48)
    cfg = EvalConfig(mode="sliding", crop_size=32, flip=False)
    expected = evaluate(model, DataLoader(dataset), NUM_CLASSES, cfg, "cpu", progress=False)
    assert metrics["pixAcc"] == pytest.approx(expected["pixAcc"])
    assert metrics["mIoU"] == pytest.approx(expected["mIoU"])


@pytest.mark.parametrize(("extra", "message"), [
    (["--checkpoint", "{missing}"], "checkpoint not found"),
    (["--dataset", "kitti"], "unknown dataset 'kitti'"),
    (["--backbone", "resnet7"], "unknown backbone 'resnet7'"),
    (["--dataset", "voc"], "trained for 4 classes, the model has 21"),
    (["--aux"], "missing keys: auxlayer.conv5.0.weight"),
    (["--backbone", "resnet18"], "does not match the model's shapes"),
    (["--checkpoint", "{cityscapes}", "--root", "{missing_dir}"], "expected layout"),
])
def test_eval_errors(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                     extra: list[str], message: str) -> None:
    names = {"missing": str(tmp_path / "nope.pt"), "cityscapes": str(files["cityscapes"]),
             "missing_dir": str(tmp_path / "no_cityscapes")}
    args = ["eval", "--checkpoint", str(files["checkpoint"]), "--device", "cpu", "--no-progress"]
    assert main(args + [a.format(**names) for a in extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("danet eval: error: ") and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_eval_on_missing_cuda(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--checkpoint", str(files["checkpoint"]), "--device", "cuda"]) == 2
    assert "--device cuda, but no CUDA device is available" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "predict", "attention"])
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--checkpoint" in capsys.readouterr().out


# ------------------------------------------------------------------------------ danet predict


def test_predict_writes_palette_masks_and_overlays(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "pred"
    args = ["predict", str(files["image"]), str(files["image2"]), "--checkpoint", str(files["checkpoint"]),
            "--output", str(out), "--device", "cpu", "--alpha", "0.4"]
    assert main(args) == 0
    image = np.asarray(Image.open(files["image"]).convert("RGB"))
    with Image.open(out / "street_mask.png") as mask:
        assert mask.mode == "P" and mask.size == (61, 45)
        palette = np.asarray(mask.getpalette()[: 3 * NUM_CLASSES], dtype=np.uint8).reshape(-1, 3)
        np.testing.assert_array_equal(palette, SyntheticShapes.PALETTE)
        ids = np.asarray(mask)
        assert json.loads(mask.text["danet:classes"])["3"] == SyntheticShapes.CLASS_NAMES[3]
    # the mask is the model's whole-image prediction (the checkpoint's eval config: whole, no flip)
    model, _ = load_model(files["checkpoint"])
    chw = tv_tensors.Image(torch.from_numpy(image.copy()).permute(2, 0, 1))
    x = eval_transforms(DataConfig.mean, DataConfig.std)(chw)
    np.testing.assert_array_equal(ids, model.eval()(x[None]).argmax(1)[0].numpy())
    with Image.open(out / "street_overlay.png") as overlay_png:
        assert overlay_png.mode == "RGB"
        assert overlay_png.height == 45 and overlay_png.width > 61  # the legend is to the right
        blended = np.asarray(overlay_png).astype(np.float64)
    expected = 0.6 * image + 0.4 * SyntheticShapes.PALETTE[ids]
    assert np.abs(blended[:, :61] - expected).max() <= 0.5 + 1e-6
    legend = blended[:, 61:]
    for class_id in np.unique(ids):  # a swatch of every class present, and of no other
        assert (legend == SyntheticShapes.PALETTE[class_id]).all(axis=-1).sum() > 20
    for class_id in set(range(NUM_CLASSES)) - set(np.unique(ids).tolist()):
        if SyntheticShapes.PALETTE[class_id].min() == SyntheticShapes.PALETTE[class_id].max():
            continue  # black or white: the legend's text and background
        assert not (legend == SyntheticShapes.PALETTE[class_id]).all(axis=-1).any()
    assert (out / "room_mask.png").is_file() and (out / "room_overlay.png").is_file()

    before = (out / "street_mask.png").read_bytes()
    assert main(args) == 2  # never replaces outputs silently
    assert (out / "street_mask.png").read_bytes() == before
    multiscale = ["--mode", "multiscale", "--scales", "0.5", "1", "--crop-size", "32"]
    assert main([*args, "--overwrite", *multiscale]) == 0


@pytest.mark.parametrize(("images", "message"), [
    (["{missing}"], "image(s) not found"),
    (["{not_an_image}"], "cannot read image"),
    (["{image}", "{image_copy}"], "several input images are named street"),
])
def test_predict_errors(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                        images: list[str], message: str) -> None:
    copy = tmp_path / "copy" / "street.png"
    copy.parent.mkdir()
    copy.write_bytes(files["image"].read_bytes())
    names = {"missing": str(tmp_path / "nope.png"), "not_an_image": str(files["not_an_image"]),
             "image": str(files["image"]), "image_copy": str(copy)}
    args = ["predict", *[i.format(**names) for i in images], "--checkpoint", str(files["checkpoint"]),
            "--output", str(tmp_path / "out"), "--device", "cpu"]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not any((tmp_path / "out").glob("*.png"))


# ------------------------------------------------------------------------------ danet attention


def test_position_attention_rows_are_rows_of_the_reference_softmax() -> None:
    pam = tiny_model().double().head.sa
    features = torch.randn(2, 32, 5, 7, dtype=torch.float64)
    queries = torch.tensor([0, 13, 34])
    rows = position_attention_rows(pam, features, queries)
    q, k = pam.query_conv(features).flatten(2), pam.key_conv(features).flatten(2)
    full = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)  # (B, N, N), the oracle's matrix
    torch.testing.assert_close(rows, full[:, queries])
    # the rows are the weights the reference applies: attention-weighted values agree
    v = pam.value_conv(features).flatten(2)
    weighted = torch.bmm(v, rows.transpose(1, 2))
    torch.testing.assert_close(weighted, position_attention_reference(q, k, v)[:, :, queries])


def test_attention_maps_hook_the_right_tensors() -> None:
    model = tiny_model().double().eval()
    x = torch.randn(1, 3, 41, 57, dtype=torch.float64)
    points = [(0, 0), (56, 40), (20, 10)]
    maps = attention_maps(model, x, points, num_channels=3)
    features = model.head.conv5a(model.backbone(x)[1])
    h, w = features.shape[-2:]
    assert maps.feature_size == (h, w) == (6, 8)
    queries = torch.tensor([0, h * w - 1, round(10 * (h - 1) / 40) * w + round(20 * (w - 1) / 56)])
    rows = position_attention_rows(model.head.sa, features, queries).reshape(1, 3, h, w)
    expected = functional.interpolate(rows, size=(41, 57), mode="bilinear", align_corners=True)[0]
    torch.testing.assert_close(maps.position.double(), expected, rtol=1e-5, atol=1e-7)
    cam_out = model.head.sc(model.head.conv5c(model.backbone(x)[1]))
    top = cam_out[0].flatten(1).std(dim=1).topk(3).indices.tolist()
    assert maps.channels == top and maps.channel.shape == (3, 41, 57)
    torch.testing.assert_close(maps.prediction, model(x).argmax(1)[0])
    with pytest.raises(ValueError, match="point 57,3 is outside the 57x41 image"):
        attention_maps(model, x, [(57, 3)])
    with pytest.raises(ValueError, match=r"channel ids \[99\] out of range"):
        attention_maps(model, x, [(1, 1)], channels=[1, 99])


def test_attention_command(files: dict[str, Path], tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fig.png"
    args = ["attention", str(files["image"]), "--points", "3,4", "60,44", "--checkpoint",
            str(files["checkpoint"]), "--output", str(out), "--device", "cpu", "--channels", "0", "5"]
    assert main(args) == 0
    with Image.open(out) as figure:
        assert figure.format == "PNG" and figure.size[0] > 400
    assert "2 point(s) and 2 channel(s)" in capsys.readouterr().out
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    assert main([*args[:4], "61,0", *args[5:], "--overwrite"]) == 2
    assert "outside the 61x45 image" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse rejects a malformed point itself
        main(["attention", str(files["image"]), "--points", "3;4", "--checkpoint", "x", "--output", "y"])
    assert exit_info.value.code == 2


# ------------------------------------------------------------------------------ eval outputs


def test_eval_json_confusion_matrix_and_heads(files: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "eval.json", tmp_path / "confusion.png"
    assert main(["eval", "--checkpoint", str(files["checkpoint"]), "--device", "cpu", "--workers", "0",
                 "--no-progress", "--mode", "sliding", "--heads", "sum", "pam", "cam", "--json", str(out),
                 "--confusion-matrix", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "protocol=danet mode=sliding crop=32 stride=21" in printed
    assert "mmsegmentation's convention" in printed and "the release's convention" in printed
    assert "head pam:" in printed and "head cam:" in printed
    report = json.loads(out.read_text())
    assert report["checkpoint"] == str(files["checkpoint"]) and report["dataset"] == "synthetic"
    assert report["classes"] == list(SyntheticShapes.CLASS_NAMES) and report["images"] == 2
    assert report["inference"]["protocol"] == "danet" and report["inference"]["crop_size"] == 32
    for key in ("aAcc", "mIoU", "mAcc", "pixAcc"):
        assert report[key] is None or 0.0 <= report[key] <= 1.0
    assert len(report["IoU"]) == len(report["Acc"]) == NUM_CLASSES
    assert set(report["release"]) == {"pixAcc", "mIoU", "IoU"}
    assert set(report["conventions"]) >= {"mIoU", "release"}
    assert report["heads"]["sum"]["mIoU"] == report["mIoU"]
    assert report["heads"]["pam"]["IoU"] != report["heads"]["sum"]["IoU"]  # another classifier
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 100
    # the head's numbers are evaluate()'s on the same data
    model, _ = load_model(files["checkpoint"])
    dataset = SyntheticShapes("val", eval_transforms(DataConfig.mean, DataConfig.std), num_samples=2,
                              image_size=48)
    cfg = EvalConfig(mode="sliding", crop_size=32, flip=False)
    expected = evaluate(model, DataLoader(dataset), NUM_CLASSES, cfg, "cpu", progress=False, heads=("cam",))
    assert report["heads"]["cam"]["mIoU"] == pytest.approx(expected["mIoU"])


@pytest.mark.parametrize("flag", ["--json", "--confusion-matrix"])
def test_eval_checks_its_output_files_before_evaluating(flag: str, files: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    args = ["eval", "--checkpoint", str(files["checkpoint"]), "--device", "cpu", "--workers", "0",
            "--no-progress", flag]
    folder = tmp_path / "out"
    folder.mkdir()
    assert main([*args, str(folder)]) == 2
    captured = capsys.readouterr()
    assert f"{flag}: {folder} is a directory, and a file is written here" in captured.err
    assert "evaluating" not in captured.out
    assert main([*args, str(tmp_path / ("n" * 256 + ".json"))]) == 2  # atomic_write would fail at the end
    captured = capsys.readouterr()
    assert f"{flag}: output name too long for the file system" in captured.err
    assert "evaluating" not in captured.out
    (tmp_path / "old.json").write_text("old")
    assert main([*args, str(tmp_path / "old.json")]) == 2  # a user's file is replaced only on --overwrite
    assert "old.json exists (pass --overwrite to replace it)" in capsys.readouterr().err
    assert (tmp_path / "old.json").read_bytes() == b"old"
    assert main([*args, str(tmp_path / "old.json"), "--overwrite"]) == 0
    assert (tmp_path / "old.json").read_bytes() != b"old"


def test_eval_release_protocol_prints_its_numbers_last(files: dict[str, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--checkpoint", str(files["checkpoint"]), "--device", "cpu", "--workers", "0",
                 "--no-progress", "--protocol", "release", "--base-size", "40", "--flip"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "protocol=release mode=whole crop=32 stride=21 base_size=40 flip=True" in lines[0]
    assert lines[-1].startswith("aAcc") and lines[-2].startswith("pixAcc")


def _torchrun_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = str(Path(__file__).resolve().parents[2])
    env.update(PYTHONPATH=repo + os.pathsep + env.get("PYTHONPATH", ""), DANET_KERNELS_BACKEND="torch",
               OMP_NUM_THREADS="1")
    return env


@pytest.mark.slow  # two fresh interpreters importing torch and timm: ~10-30 s on a loaded 2-core machine
def test_torchrun_eval_with_two_processes_equals_one(files: dict[str, Path], tmp_path: Path) -> None:
    args = ["eval", "--checkpoint", str(files["checkpoint"]), "--device", "cpu", "--workers", "0",
            "--no-progress", "--mode", "sliding", "--flip", "--limit", "5"]
    two = tmp_path / "two.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([*torchrun, "-m", "danet.cli", *args, "--json", str(two)], env=_torchrun_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("evaluating ") == 1  # rank 0 alone prints
    one = tmp_path / "one.json"
    assert main([*args, "--json", str(one)]) == 0
    reduced, alone = json.loads(two.read_text()), json.loads(one.read_text())
    assert reduced.pop("processes") == 2 and alone.pop("processes") == 1
    assert reduced == alone


# ------------------------------------------------------------------------------ predict outputs


def _normalised(image: np.ndarray) -> torch.Tensor:
    chw = tv_tensors.Image(torch.from_numpy(image.copy()).permute(2, 0, 1))
    return eval_transforms(DataConfig.mean, DataConfig.std)(chw)


def test_predict_cityscapes_format(files: dict[str, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from danet.data.cityscapes import LABEL_ID_TO_TRAIN_ID

    rng = np.random.default_rng(1)
    images = tmp_path / "leftImg8bit" / "test" / "berlin"
    images.mkdir(parents=True)
    names = ["berlin_000000_000019_leftImg8bit.png", "berlin_000123_000456_leftImg8bit.png"]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(images / name)
    out = tmp_path / "results"
    args = ["predict", *[str(images / n) for n in names], "--checkpoint", str(files["cityscapes"]),
            "--output", str(out), "--device", "cpu", "--format", "cityscapes"]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == names  # <city>_<seq>_<frame>*.png, as the server matches
    model, _ = load_model(files["cityscapes"])
    image = np.asarray(Image.open(images / names[0]).convert("RGB"))
    x = _normalised(image)
    train_ids = model.eval()(x[None]).argmax(1)[0].numpy()
    train_to_label = {t: lab for lab, t in LABEL_ID_TO_TRAIN_ID.items()}
    with Image.open(out / names[0]) as written:
        assert written.mode == "L" and written.size == (56, 40)
        np.testing.assert_array_equal(np.asarray(written), np.vectorize(train_to_label.get)(train_ids))
    capsys.readouterr()
    bad = tmp_path / "street.png"
    bad.write_bytes((images / names[0]).read_bytes())
    assert main(["predict", str(bad), "--checkpoint", str(files["cityscapes"]), "--output",
                 str(tmp_path / "o"), "--device", "cpu", "--format", "cityscapes"]) == 2
    assert "needs Cityscapes image names" in capsys.readouterr().err
    assert main([*args[:-4], "--checkpoint", str(files["checkpoint"]), "--output", str(tmp_path / "o2"),
                 "--device", "cpu", "--format", "cityscapes"]) == 2
    assert "needs a Cityscapes model" in capsys.readouterr().err


def test_predict_switches_large_images_to_sliding_windows(files: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pred"
    args = ["predict", str(files["image"]), "--checkpoint", str(files["checkpoint"]), "--output", str(out),
            "--device", "cpu"]
    assert main([*args, "--max-whole-pixels", "1000", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "61x45 (0.0 MP) is above --max-whole-pixels 1000: sliding 32x32 windows, stride 21" in printed
    image = np.asarray(Image.open(files["image"]).convert("RGB"))
    model, _ = load_model(files["checkpoint"])
    x = _normalised(image)
    expected = predict_logits(model.eval(), x[None], NUM_CLASSES, mode="sliding", crop_size=32).argmax(1)[0]
    with Image.open(out / "street_mask.png") as mask:
        np.testing.assert_array_equal(np.asarray(mask), expected.numpy())
    with pytest.raises(SystemExit):  # argparse checks the range (danet.config.RANGES)
        main([*args, "--overwrite", "--max-whole-pixels", "-1"])


def test_predict_shows_progress_only_for_long_inference(files: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-window image gets no progress bar; a long one (here: above 1 forward) its estimate and a bar."""
    args = ["predict", str(files["image"]), "--checkpoint", str(files["checkpoint"]), "--device", "cpu",
            "--max-whole-pixels", "1000"]
    assert main([*args, "--output", str(tmp_path / "short"), "--mode", "whole",
                 "--max-whole-pixels", "0"]) == 0
    short = capsys.readouterr()
    assert "inference" not in short.err and "forward(s)" not in short.out
    monkeypatch.setattr("danet.commands.predict._ESTIMATE_ABOVE_FORWARDS", 1)
    terminal = TerminalStream()  # bars are drawn on terminals only
    monkeypatch.setattr("sys.stderr", terminal)
    assert main([*args, "--output", str(tmp_path / "long")]) == 0
    assert "6 forward(s)" in capsys.readouterr().out and "inference" in terminal.getvalue()


def test_predict_takes_directories_and_globs(files: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    (photos / "nested").mkdir(parents=True)
    for name in ("a.png", "b.jpg", "nested/c.png"):
        (photos / name).write_bytes(files["image"].read_bytes() if name.endswith("png")
                                    else files["image2"].read_bytes())
    (photos / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    base = ["--checkpoint", str(files["checkpoint"]), "--output", str(out), "--device", "cpu", "--no-legend"]
    assert main(["predict", str(photos), *base]) == 0  # the directory's images, not its subfolders
    written = sorted(p.name for p in out.iterdir())
    assert written == ["a_mask.png", "a_overlay.png", "b_mask.png", "b_overlay.png"]
    with Image.open(out / "a_overlay.png") as plain:
        assert plain.size == (61, 45)  # --no-legend: the overlay is the image's size
    assert main(["predict", str(photos / "**" / "*.png"), *base, "--output", str(tmp_path / "globbed")]) == 0
    assert sorted(p.name for p in (tmp_path / "globbed").glob("*_mask.png")) == ["a_mask.png", "c_mask.png"]
    capsys.readouterr()
    assert main(["predict", str(photos / "*.gif"), *base]) == 2
    assert "a pattern that matches no image" in capsys.readouterr().err


def test_predict_checks_inputs_before_outputs(files: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "street_mask.png").write_bytes(b"old")
    args = ["predict", str(files["image"]), "--output", str(out), "--device", "cpu"]
    assert main([*args, "--checkpoint", str(files["image"])]) == 2  # a PNG is no checkpoint
    assert "exist" not in capsys.readouterr().err  # the checkpoint is the problem, not the output
    assert main([*args, "--checkpoint", str(files["checkpoint"])]) == 2
    assert "output file(s) exist" in capsys.readouterr().err
    long_image = tmp_path / ("x" * 250 + ".png")  # its outputs, NAME_overlay.png, would exceed 255 bytes
    long_image.write_bytes(files["image"].read_bytes())
    assert main(["predict", str(long_image), "--output", str(out), "--checkpoint", str(files["checkpoint"]),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "output name too long for the file system" in err and len(err.strip().splitlines()) == 1


def test_checkpoint_may_be_a_run_directory(files: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(files["checkpoint"].read_bytes())
    assert main(["eval", "--checkpoint", str(run), "--device", "cpu", "--no-progress", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"using {run / 'last.pt'}" in printed and "weights file not found" not in printed


def test_attention_refuses_a_directory_as_output(files: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "figure.png"
    folder.mkdir()
    args = ["attention", str(files["image"]), "--points", "3,4", "--checkpoint", str(files["checkpoint"]),
            "--output", str(folder), "--device", "cpu"]
    for extra in ([], ["--overwrite"]):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert "is a directory, and a file is written here" in err and "--overwrite" not in err


@pytest.mark.parametrize(("points", "channels"), [(1, 1), (2, 3), (3, 4)])
def test_attention_figure_has_a_colourbar_per_map_and_no_empty_cell(points: int, channels: int) -> None:
    from danet.visualization.attention import attention_figure

    model = tiny_model().eval()
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    chw = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
    x = eval_transforms(DataConfig.mean, DataConfig.std)(chw)
    chosen = [(5 * i, 3 * i) for i in range(points)]
    maps = attention_maps(model, x[None], chosen, num_channels=channels)
    fig = attention_figure(image, maps, chosen, SyntheticShapes.PALETTE, SyntheticShapes.CLASS_NAMES)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    colourbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(panels) == 2 + points + channels  # every axis holds a panel: none is empty
    assert len(colourbars) == points + channels
    assert all(ax.images for ax in panels)
