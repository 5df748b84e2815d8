"""Inference modes against brute-force recomputations, on dummy models and the tiny DANet."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional

from danet.evaluation.engine import predict_logits
from danet.evaluation.protocols import sliding_window_starts
from danet.models import DANet


def _conv_model(num_classes: int = 3) -> nn.Module:
    """A 3x3 conv with zero padding: its output near a window border depends on the window."""
    return nn.Conv2d(3, num_classes, 3, padding=1).double().eval()


def _brute_force_sliding(model: nn.Module, x: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """Per-pixel mean over every window covering the pixel, windows enumerated independently."""
    _, _, h, w = x.shape
    tops = sorted(set(range(0, max(h - crop, 0) + 1, stride)) | {max(h - crop, 0)})
    lefts = sorted(set(range(0, max(w - crop, 0) + 1, stride)) | {max(w - crop, 0)})
    predictions: dict[tuple[int, int], list[torch.Tensor]] = {}
    for top in tops:
        for left in lefts:
            window = x[:, :, top:top + crop, left:left + crop]
            out = model(window)
            for i in range(window.shape[-2]):
                for j in range(window.shape[-1]):
                    predictions.setdefault((top + i, left + j), []).append(out[:, :, i, j])
    result = torch.empty(x.shape[0], out.shape[1], h, w, dtype=x.dtype)
    for (i, j), values in predictions.items():
        result[:, :, i, j] = torch.stack(values).mean(0)
    return result


@pytest.mark.parametrize(("length", "crop", "stride", "expected"), [
    (10, 4, 2, [0, 2, 4, 6]), (7, 4, 2, [0, 2, 3]), (4, 4, 2, [0]), (3, 4, 2, [0]), (9, 4, 4, [0, 4, 5]),
])
def test_window_starts(length: int, crop: int, stride: int, expected: list[int]) -> None:
    assert sliding_window_starts(length, crop, stride) == expected


@pytest.mark.parametrize(("size", "crop", "ratio"),
                         [((10, 7), 4, 0.5), ((13, 9), 5, 2 / 3), ((6, 17), 8, 1.0)])
def test_sliding_matches_brute_force_average(size: tuple[int, int], crop: int, ratio: float) -> None:
    model = _conv_model()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    got = predict_logits(model, x, 3, mode="sliding", crop_size=crop, stride_ratio=ratio)
    expected = _brute_force_sliding(model, x, crop, max(1, int(crop * ratio)))
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, model(x))  # the windows did matter


def test_whole_equals_sliding_when_the_crop_covers_the_image() -> None:
    model = DANet(3, backbone="resnet_tiny").double().eval()
    with torch.no_grad():
        model.head.sa.gamma.fill_(0.5)
        model.head.sc.gamma.fill_(0.5)
    x = torch.randn(1, 3, 40, 56, dtype=torch.float64)
    whole = predict_logits(model, x, 3, mode="whole")
    torch.testing.assert_close(whole, model(x))
    torch.testing.assert_close(predict_logits(model, x, 3, mode="sliding", crop_size=56), whole)
    torch.testing.assert_close(
        predict_logits(model, x, 3, mode="multiscale", crop_size=64, scales=(1.0,)), whole)


def test_flip_averaging() -> None:
    equivariant = nn.Conv2d(3, 4, 1).double().eval()  # per-pixel: flip in, flip out
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    for mode in ("whole", "sliding", "multiscale"):
        got = predict_logits(equivariant, x, 4, mode=mode, crop_size=5, scales=(1.0,), flip=True)
        torch.testing.assert_close(got, equivariant(x))
    model = nn.Conv2d(3, 4, (1, 3), padding=(0, 1)).double().eval()  # not flip-equivariant
    expected = (model(x) + model(x.flip(-1)).flip(-1)) / 2
    assert not torch.allclose(expected, model(x))
    torch.testing.assert_close(predict_logits(model, x, 4, flip=True), expected)


def test_multiscale_averages_resized_predictions() -> None:
    model = _conv_model()
    x = torch.randn(1, 3, 12, 10, dtype=torch.float64)
    crop, scales = 8, (0.5, 1.0, 1.5)
    expected = []
    for scale in scales:
        size = (round(12 * scale), round(10 * scale))
        scaled = functional.interpolate(x, size=size, mode="bilinear", align_corners=True)
        logits = _brute_force_sliding(model, scaled, crop, int(crop * 2 / 3))
        expected.append(functional.interpolate(logits, size=(12, 10), mode="bilinear", align_corners=True))
    got = predict_logits(model, x, 3, mode="multiscale", crop_size=crop, scales=scales)
    torch.testing.assert_close(got, torch.stack(expected).mean(0))


@pytest.mark.parametrize("mode", ["whole", "sliding", "multiscale"])
def test_odd_sizes_on_the_tiny_danet(mode: str) -> None:
    model = DANet(5, backbone="resnet_tiny").eval()
    size = (37, 53)
    x = torch.randn(1, 3, *size)
    logits = predict_logits(model, x, 5, mode=mode, crop_size=32, scales=(0.75, 1.25), flip=True)
    assert logits.shape == (1, 5, *size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_training_mode_tuple_output_uses_the_sum() -> None:
    model = DANet(2, backbone="resnet_tiny").train()
    for module in model.modules():  # deterministic training-mode forward
        if isinstance(module, nn.Dropout2d):
            module.p = 0.0
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(predict_logits(model, x, 2), model(x)[0])


def test_bad_arguments() -> None:
    model = _conv_model()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown inference mode 'tiles'"):
        predict_logits(model, x, 3, mode="tiles")
    with pytest.raises(ValueError, match="needs a crop_size"):
        predict_logits(model, x, 3, mode="sliding")
    with pytest.raises(ValueError, match="stride_ratio"):
        predict_logits(model, x, 3, mode="sliding", crop_size=4, stride_ratio=0.0)
    with pytest.raises(ValueError, match="scales"):
        predict_logits(model, x, 3, mode="multiscale", crop_size=4, scales=(1.0, -0.5))
    with pytest.raises(ValueError, match="shape"):
        predict_logits(model, x[0], 3)
    with pytest.raises(ValueError, match=r"expected \(1, 4, 8, 8\)"):
        predict_logits(model, x, 4)
