"""Datasets: tiny fixtures in each real on-disk layout (label mapping, splits, errors), the registry."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from danet.data import (
    ADE20K,
    DATASETS,
    Cityscapes,
    COCOStuff,
    PascalContext,
    PascalContext59,
    SyntheticShapes,
    VOCSegmentation,
    build_dataset,
    eval_transforms,
    get_dataset_class,
)
from danet.data.voc import voc_palette

H, W = 8, 12
REAL_DATASETS = ["cityscapes", "ade20k", "voc", "pcontext", "pcontext59", "cocostuff"]


def _write_image(path: Path, seed: int) -> np.ndarray:
    """A random RGB image; returns what a lossless reader gets back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def _write_mask(path: Path, values: list[int], palette: bool = False) -> np.ndarray:
    """A label PNG holding ``values`` tiled over the image (grey "L", or palette "P" as VOC stores it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = np.resize(np.asarray(values, dtype=np.uint8), H * W).reshape(H, W)
    image = Image.fromarray(stored, mode="L")
    if palette:
        image = image.convert("P")
        image.putpalette(voc_palette(256).ravel().tolist())
    image.save(path)
    return stored


def _check_item(item, stored: np.ndarray, expected: dict[int, int]) -> None:
    image, mask = item
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, H, W)
    assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64 and mask.shape == (H, W)
    want = np.vectorize(expected.__getitem__)(stored)
    np.testing.assert_array_equal(mask.numpy(), want)


# --------------------------------------------------------------------------- Cityscapes


def _cityscapes(root: Path, split: str = "train") -> dict[str, np.ndarray]:
    stored = {}
    for i, city in enumerate(["aachen", "bremen"]):
        stem = f"{city}_000000_0000{i}9"
        _write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", seed=i)
        stored[stem] = _write_mask(
            root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", [7, 26, 0, 33, 9, 24, 1, 23]
        )
    return stored


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    stored = _cityscapes(tmp_path)
    ds = Cityscapes(tmp_path, "train")
    assert len(ds) == 2
    # road 7->0, car 26->13, unlabelled 0->255, bicycle 33->18, parking 9->255 (not evaluated),
    # person 24->11, ego vehicle 1->255, sky 23->10
    expected = {7: 0, 26: 13, 0: 255, 33: 18, 9: 255, 24: 11, 1: 255, 23: 10}
    for item, name in zip(ds, sorted(stored), strict=True):
        _check_item(item, stored[name], expected)
    image = ds[0][0]
    np.testing.assert_array_equal(
        image.permute(1, 2, 0).numpy(), _write_image(tmp_path / "again.png", seed=0)
    )


def test_cityscapes_errors(tmp_path):
    _cityscapes(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/\{train,val,test\}"):
        Cityscapes(tmp_path, "val")
    (tmp_path / "gtFine/train/bremen/bremen_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"bremen_000000_000019_gtFine_labelIds\.png"):
        Cityscapes(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown split 'training'"):
        Cityscapes(tmp_path, "training")


def test_invalid_label_value_and_size_mismatch_are_reported(tmp_path):
    _cityscapes(tmp_path)
    mask_path = tmp_path / "gtFine/train/aachen/aachen_000000_000009_gtFine_labelIds.png"
    _write_mask(mask_path, [7, 40])  # 40 is no Cityscapes labelId
    with pytest.raises(ValueError, match=r"label values \[40\]"):
        Cityscapes(tmp_path, "train")[0]
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(mask_path)
    with pytest.raises(ValueError, match="differs from image size"):
        Cityscapes(tmp_path, "train")[0]
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(mask_path)
    with pytest.raises(ValueError, match="single-channel"):
        Cityscapes(tmp_path, "train")[0]


# --------------------------------------------------------------------------- ADE20K


def test_ade20k_reduces_zero_label(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    stored = {}
    for split, folder in [("train", "training"), ("val", "validation")]:
        name = f"ADE_{split}_00000001"
        _write_image(base / "images" / folder / f"{name}.jpg", seed=3)
        stored[split] = _write_mask(base / "annotations" / folder / f"{name}.png", [0, 1, 150, 13])
    for split in ("train", "val"):
        ds = ADE20K(tmp_path, split)
        assert len(ds) == 1
        _check_item(ds[0], stored[split], {0: 255, 1: 0, 150: 149, 13: 12})
    _write_mask(base / "annotations/training/ADE_train_00000001.png", [151])
    with pytest.raises(ValueError, match=r"label values \[151\]"):
        ADE20K(tmp_path, "train")[0]


# --------------------------------------------------------------------------- PASCAL VOC


def _voc(root: Path) -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    for i, image_id in enumerate(["2007_000032", "2007_000039", "2008_000001"]):
        _write_image(base / "JPEGImages" / f"{image_id}.jpg", seed=i)
        _write_mask(base / "SegmentationClass" / f"{image_id}.png", [0, 15, 255, i], palette=True)
    lists = base / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("2007_000032\n2007_000039\n")
    (lists / "val.txt").write_text("2008_000001\n")
    (lists / "trainval.txt").write_text("2007_000032\n2007_000039\n2008_000001\n")
    return base


def test_voc_reads_palette_masks_and_split_files(tmp_path):
    _voc(tmp_path)
    train = VOCSegmentation(tmp_path, "train")
    assert train.resolved_split == "train"
    assert [p.stem for p, _ in train.samples] == ["2007_000032", "2007_000039"]
    assert [p.stem for p, _ in VOCSegmentation(tmp_path, "val").samples] == ["2008_000001"]
    assert len(VOCSegmentation(tmp_path, "trainval")) == 3
    stored = np.resize(np.asarray([0, 15, 255, 1], np.uint8), H * W).reshape(H, W)
    _check_item(train[1], stored, {0: 0, 15: 15, 255: 255, 1: 1})
    with pytest.raises(FileNotFoundError, match=r"trainaug\.txt"):
        VOCSegmentation(tmp_path, "train", augmented=True)


def test_voc_uses_sbd_trainaug_for_train_when_present(tmp_path):
    base = _voc(tmp_path)
    _write_image(base / "JPEGImages" / "2008_000002.jpg", seed=9)
    sbd = _write_mask(base / "SegmentationClassAug" / "2008_000002.png", [20, 0])
    # SBD annotated VOC's train image 2007_000039 too (coarser): mmseg's recipe trains on VOC's own mask
    _write_mask(base / "SegmentationClassAug" / "2007_000039.png", [0, 4])
    (base / "ImageSets/Segmentation/trainaug.txt").write_text("2007_000032\n2007_000039\n2008_000002\n")
    train = VOCSegmentation(tmp_path, "train")
    assert train.resolved_split == "trainaug"
    assert [(p.stem, m.parent.name) for p, m in train.samples] == [
        ("2007_000032", "SegmentationClass"),
        ("2007_000039", "SegmentationClass"),
        ("2008_000002", "SegmentationClassAug"),
    ]
    voc_own = np.resize(np.asarray([0, 15, 255, 1], np.uint8), H * W).reshape(H, W)
    _check_item(train[1], voc_own, {0: 0, 15: 15, 255: 255, 1: 1})
    _check_item(train[2], sbd, {20: 20, 0: 0})
    assert VOCSegmentation(tmp_path, "train", augmented=False).resolved_split == "train"
    assert len(VOCSegmentation(tmp_path, "trainaug")) == 3


def test_voc_palette_is_the_bit_pattern_colour_map():
    palette = VOCSegmentation.PALETTE
    assert palette[1].tolist() == [128, 0, 0] and palette[15].tolist() == [192, 128, 128]
    assert palette[20].tolist() == [0, 64, 128]
    assert voc_palette(256)[255].tolist() == [224, 224, 192]  # the border colour of VOC's PNGs


# --------------------------------------------------------------------------- PASCAL Context


def _pcontext(root: Path) -> dict[str, np.ndarray]:
    base = root / "VOCdevkit" / "VOC2010"
    stored = {}
    for i, image_id in enumerate(["2008_000002", "2008_000003"]):
        _write_image(base / "JPEGImages" / f"{image_id}.jpg", seed=i)
        stored[image_id] = _write_mask(
            base / "SegmentationClassContext" / f"{image_id}.png", [0, 1, 59, 30 + i]
        )
    lists = base / "ImageSets" / "SegmentationContext"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("2008_000002\n")
    (lists / "val.txt").write_text("2008_000003\n")
    return stored


def test_pascal_context_60_and_59_classes(tmp_path):
    stored = _pcontext(tmp_path)
    ds60, ds59 = PascalContext(tmp_path, "val"), PascalContext59(tmp_path, "val")
    assert len(ds60) == len(ds59) == 1
    _check_item(ds60[0], stored["2008_000003"], {0: 0, 1: 1, 59: 59, 31: 31})
    _check_item(ds59[0], stored["2008_000003"], {0: 255, 1: 0, 59: 58, 31: 30})
    assert ds60.CLASS_NAMES[1:] == ds59.CLASS_NAMES and ds60.CLASS_NAMES[0] == "background"
    np.testing.assert_array_equal(ds60.PALETTE[1:], ds59.PALETTE)
    (tmp_path / "VOCdevkit/VOC2010/ImageSets/SegmentationContext/train.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"SegmentationContext/train\.txt"):
        PascalContext(tmp_path, "train")


# The 59 classes by their id among the 459 labels of the PASCAL Context release (its labels.txt,
# alphabetical), as mmsegmentation's converter (tools/dataset_converters/pascal_context.py) selects them
_CONTEXT_RAW_IDS = {
    2: "aeroplane", 9: "bag", 18: "bed", 19: "bedclothes", 22: "bench", 23: "bicycle", 25: "bird", 31: "boat",
    33: "book", 34: "bottle", 44: "building", 45: "bus", 46: "cabinet", 59: "car", 65: "cat", 68: "ceiling",
    72: "chair", 80: "cloth", 85: "computer", 98: "cow", 104: "cup", 105: "curtain", 113: "dog", 115: "door",
    144: "fence", 158: "floor", 159: "flower", 162: "food", 187: "grass", 189: "ground", 207: "horse",
    220: "keyboard", 232: "light", 258: "motorbike", 259: "mountain", 260: "mouse", 284: "person",
    295: "plate", 296: "platform", 308: "pottedplant", 324: "road", 326: "rock", 347: "sheep",
    349: "shelves", 354: "sidewalk", 355: "sign", 360: "sky", 366: "snow", 368: "sofa", 397: "table",
    415: "track", 416: "train", 420: "tree", 424: "truck", 427: "tvmonitor", 440: "wall", 445: "water",
    454: "window", 458: "wood",
}


def test_pascal_context_names_follow_the_converters_order():
    """The converter stores raw id r as np.digitize(r, sorted mapping) (0 = background), so stored value
    k is the k-th smallest raw id: the names must be in that order (they were in 59_labels.txt's: 54 of
    59 wrong, e.g. stored 2 is 'bag', not 'bicycle')."""
    mapping = np.sort(np.array([0, *_CONTEXT_RAW_IDS]))
    stored = np.digitize(np.array(sorted(_CONTEXT_RAW_IDS)), mapping, right=True)
    assert stored.tolist() == list(range(1, 60))
    expected = tuple(_CONTEXT_RAW_IDS[raw] for raw in sorted(_CONTEXT_RAW_IDS))
    assert PascalContext.CLASS_NAMES == ("background", *expected)
    assert PascalContext59.CLASS_NAMES == expected
    assert PascalContext.CLASS_NAMES[2] == "bag" and PascalContext59.CLASS_NAMES[5] == "bicycle"


# --------------------------------------------------------------------------- COCO-Stuff


def test_cocostuff_164k_train_ids_used_as_stored(tmp_path):
    base = tmp_path / "coco_stuff164k"
    stored = {}
    for split in ("train2017", "val2017"):
        _write_image(base / "images" / split / "000000000139.jpg", seed=5)
        # the converter also leaves the raw ids next to the train ids; those must not be read
        _write_mask(base / "annotations" / split / "000000000139.png", [181])
        stored[split] = _write_mask(
            base / "annotations" / split / "000000000139_labelTrainIds.png", [0, 170, 255]
        )
    ds = COCOStuff(tmp_path, "val")
    assert len(ds) == 1 and ds.samples[0][1].name == "000000000139_labelTrainIds.png"
    _check_item(ds[0], stored["val2017"], {0: 0, 170: 170, 255: 255})
    _write_mask(base / "annotations/train2017/000000000139_labelTrainIds.png", [171])
    with pytest.raises(ValueError, match=r"label values \[171\]"):
        COCOStuff(tmp_path, "train")[0]


# --------------------------------------------------------------------------- all real datasets


@pytest.mark.parametrize("name", REAL_DATASETS)
def test_missing_root_names_the_expected_layout(tmp_path, name):
    cls = get_dataset_class(name)
    for root in (None, tmp_path / "nowhere", tmp_path):  # no root, absent root, empty root
        with pytest.raises(FileNotFoundError) as info:
            build_dataset(name, root, "train")
        assert "expected layout" in str(info.value)
        assert cls.LAYOUT.splitlines()[0].strip() in str(info.value)


@pytest.mark.parametrize("name", [*REAL_DATASETS, "synthetic"])
def test_class_metadata(name):
    cls = get_dataset_class(name)
    assert len(cls.CLASS_NAMES) == cls.NUM_CLASSES
    assert cls.PALETTE.dtype == np.uint8 and cls.PALETTE.shape == (cls.NUM_CLASSES, 3)
    # one colour per class, except where the standard palette itself repeats some: ADE20K's
    # (and so PASCAL Context's, mmseg's first 60 of it) has [140, 140, 140] twice, mmseg's
    # COCO-Stuff palette has 162 distinct colours for 171 classes
    repeats = {"ade20k": 1, "pcontext": 1, "pcontext59": 1, "cocostuff": 9}.get(name, 0)
    assert len({tuple(c) for c in cls.PALETTE.tolist()}) == cls.NUM_CLASSES - repeats
    expected = {
        "cityscapes": 19,
        "ade20k": 150,
        "voc": 21,
        "pcontext": 60,
        "pcontext59": 59,
        "cocostuff": 171,
    }
    assert cls.NUM_CLASSES == expected.get(name, SyntheticShapes.NUM_CLASSES)


def test_standard_palettes_spot_checks():
    assert Cityscapes.PALETTE[0].tolist() == [128, 64, 128]  # road
    assert Cityscapes.PALETTE[13].tolist() == [0, 0, 142]  # car
    assert Cityscapes.CLASS_NAMES[13] == "car" and Cityscapes.CLASS_NAMES[18] == "bicycle"
    assert ADE20K.PALETTE[0].tolist() == [120, 120, 120] and ADE20K.CLASS_NAMES[149] == "flag"
    assert COCOStuff.CLASS_NAMES[170] == "wood"


def test_registry_and_build_dataset(tmp_path):
    # the folder dataset has its own tests (tests/danet/test_folder_dataset.py)
    assert set(DATASETS) == {*REAL_DATASETS, "folder", "synthetic"}
    with pytest.raises(ValueError, match=r"unknown dataset 'kitti'.*cityscapes.*synthetic"):
        get_dataset_class("kitti")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("kitti", tmp_path, "train")
    _cityscapes(tmp_path)
    ds = build_dataset(
        "cityscapes", str(tmp_path), "train", transform=eval_transforms((0.5,) * 3, (0.5,) * 3)
    )
    image, mask = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W) and mask.dtype == torch.int64
    assert image.min() >= -1.0 and image.max() <= 1.0
    synthetic = build_dataset("synthetic", "/ignored", "val", num_samples=3, image_size=40, seed=2)
    assert (
        isinstance(synthetic, SyntheticShapes)
        and len(synthetic) == 3
        and synthetic[2][0].shape == (3, 40, 40)
    )


# --------------------------------------------------------------------------- SyntheticShapes


def test_synthetic_items_are_deterministic_per_seed_split_and_index():
    a = SyntheticShapes("train", num_samples=6, image_size=48, seed=1)
    b = SyntheticShapes(split="train", num_samples=6, image_size=48, seed=1)
    for i in (0, 5, -1):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[0][0], SyntheticShapes("train", num_samples=6, image_size=48, seed=2)[0][0])
    assert not torch.equal(a[0][0], SyntheticShapes("val", num_samples=6, image_size=48, seed=1)[0][0])
    with pytest.raises(IndexError):
        a[6]


def test_synthetic_shape_class_follows_the_marker_colour_not_the_shape():
    ds = SyntheticShapes("train", num_samples=40, image_size=64, seed=0)
    grey_gap = {2: [], 3: []}
    scenes = set()
    for image, mask in ds:
        assert (
            isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 64, 64)
        )
        assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64
        labels = set(mask.unique().tolist())
        assert labels <= {0, 1, 2, 3} and 1 in labels and not {2, 3} <= labels  # one scene type per image
        rgb = image.permute(1, 2, 0).double()
        red, _, blue = rgb[mask == 1].mean(0).tolist()  # the marker
        scene = 2 if red > blue else 3
        scenes.add(scene)
        assert labels - {0, 1} <= {scene}
        shapes = rgb[mask == scene]
        if len(shapes):
            # shapes are grey in both scene types: their own pixels do not tell the class
            grey_gap[scene].append((shapes.max(1).values - shapes.min(1).values).mean().item())
    assert scenes == {2, 3}
    assert max(grey_gap[2] + grey_gap[3]) < 20
    counts = torch.stack([m for _, m in ds]).flatten().bincount(minlength=4)
    assert (counts > 0).all() and counts[2] + counts[3] > 0.05 * counts.sum()


def test_synthetic_rejects_bad_arguments():
    for kwargs, message in [
        ({"split": "dev"}, "unknown split"),
        ({"num_samples": 0}, "num_samples"),
        ({"image_size": 16}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"max_shapes": 0}, "max_shapes"),
    ]:
        with pytest.raises(ValueError, match=message):
            SyntheticShapes(**kwargs)
