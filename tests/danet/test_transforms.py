"""The published transforms: determinism under a seed, label set, ignore padding, joint flip, scaling."""

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from danet.data import SyntheticShapes
from danet.data.transforms import PadToMinSize, RandomLongSideScale, eval_transforms, train_transforms

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _pair(height: int, width: int, labels=(0, 3, 7)) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    image = tv_tensors.Image(torch.randint(0, 256, (3, height, width), dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.tensor(labels)[torch.randint(0, len(labels), (height, width))])
    return image, mask


def _denormalise(image: torch.Tensor) -> torch.Tensor:
    """Normalised float image back to 0..255 values (as float64)."""
    mean = torch.tensor(MEAN, dtype=torch.float64)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float64)[:, None, None]
    return (image.double() * std + mean) * 255


def test_train_transforms_output_types_shapes_and_label_set():
    transform = train_transforms(base_size=40, crop_size=24, mean=MEAN, std=STD)
    for height, width in [(31, 53), (53, 31), (9, 7), (24, 24)]:
        image, mask = transform(*_pair(height, width))
        assert type(image) is torch.Tensor and image.dtype == torch.float32 and image.shape == (3, 24, 24)
        assert type(mask) is torch.Tensor and mask.dtype == torch.int64 and mask.shape == (24, 24)
        # masks are resized with NEAREST: no value between labels, only the labels and the ignore pad
        assert set(mask.unique().tolist()) <= {0, 3, 7, 255}


def test_train_transforms_are_deterministic_under_a_seed():
    transform = train_transforms(base_size=32, crop_size=20, mean=MEAN, std=STD)
    image, mask = _pair(27, 35)
    outputs = []
    for seed in (3, 3, 4, 5, 6):
        torch.manual_seed(seed)
        outputs.append(transform(image, mask))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    assert any(not torch.equal(outputs[0][0], other[0]) for other in outputs[2:])


def test_padding_uses_the_ignore_label_for_the_mask_and_zero_for_the_image():
    # scale 1: the long side becomes base_size (10) exactly, then padding to 32 on the right and bottom
    transform = train_transforms(
        base_size=10, crop_size=32, mean=MEAN, std=STD, ignore_index=99, scale_range=(1, 1)
    )
    image, mask = _pair(10, 8, labels=(1, 2))
    out_image, out_mask = transform(image, mask)
    assert (out_mask[:10, :8] != 99).all()
    assert (out_mask[10:, :] == 99).all() and (out_mask[:, 8:] == 99).all()
    padded = _denormalise(out_image)
    assert padded[:, 10:, :].abs().max() < 1e-3 and padded[:, :, 8:].abs().max() < 1e-3


def test_flip_moves_image_and_mask_together():
    # every column has its own label, and the image's red channel encodes the same number
    size = 16
    columns = torch.arange(size).expand(size, size)
    image = tv_tensors.Image(torch.stack([columns * 10, columns * 0, columns * 0]).to(torch.uint8))
    mask = tv_tensors.Mask(columns.clone())
    transform = train_transforms(base_size=size, crop_size=size, mean=MEAN, std=STD, scale_range=(1, 1))
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out_image, out_mask = transform(image, mask)
        flipped = bool(torch.equal(out_mask, columns.flip(-1)))
        assert flipped or torch.equal(out_mask, columns)
        red = _denormalise(out_image)[0]
        torch.testing.assert_close(red, (out_mask * 10).double(), atol=1e-3, rtol=0)
        seen.add(flipped)
    assert seen == {True, False}


@pytest.mark.parametrize(("height", "width"), [(30, 60), (60, 30), (17, 17)])
def test_random_scale_sets_the_long_side_and_keeps_the_aspect_ratio(height, width):
    scale = RandomLongSideScale(base_size=40, scale_range=(0.5, 2.0))
    longs = set()
    for _ in range(20):
        image, mask = scale(*_pair(height, width))
        assert image.shape[-2:] == mask.shape[-2:]
        new_h, new_w = image.shape[-2:]
        long_side, short_side = max(new_h, new_w), min(new_h, new_w)
        assert 20 <= long_side <= 80
        assert short_side == int(min(height, width) * long_side / max(height, width) + 0.5)
        assert (new_h >= new_w) == (height >= width)
        longs.add(long_side)
    # masks are resized by nearest-neighbour sampling, exactly
    torch.manual_seed(1)
    image, mask = _pair(height, width)
    _, out_mask = scale(image, mask)
    nearest = torch.nn.functional.interpolate(mask[None, None].double(), size=out_mask.shape, mode="nearest")
    assert torch.equal(out_mask, nearest[0, 0].long())
    assert len(longs) > 1


def test_batches_through_a_dataloader():
    dataset = SyntheticShapes("train", train_transforms(48, 40, MEAN, STD), num_samples=6, image_size=48)
    images, masks = next(iter(DataLoader(dataset, batch_size=3)))
    assert images.shape == (3, 3, 40, 40) and images.dtype == torch.float32
    assert masks.shape == (3, 40, 40) and masks.dtype == torch.int64


def test_eval_transforms_only_normalise():
    image, mask = _pair(13, 21)
    out_image, out_mask = eval_transforms(MEAN, STD)(image, mask)
    assert out_image.dtype == torch.float32 and out_image.shape == (3, 13, 21)
    torch.testing.assert_close(_denormalise(out_image), image.double(), atol=1e-3, rtol=0)
    assert torch.equal(out_mask, mask.as_subclass(torch.Tensor))


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="scale_range"):
        train_transforms(32, 32, MEAN, STD, scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="crop_size"):
        train_transforms(32, 0, MEAN, STD)
    with pytest.raises(ValueError, match="base_size"):
        train_transforms(0, 32, MEAN, STD)
    with pytest.raises(ValueError, match="mean and std"):
        eval_transforms((0.5, 0.5), STD)
    with pytest.raises(ValueError, match="std values"):
        eval_transforms(MEAN, (0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="size"):
        PadToMinSize(0)
    image, _ = _pair(10, 12)
    _, mask = _pair(10, 11)
    with pytest.raises(ValueError, match="one size"):
        train_transforms(16, 16, MEAN, STD)(image, mask)
