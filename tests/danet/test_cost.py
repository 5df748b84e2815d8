"""danet.evaluation.cost: FLOPs and peak tensor memory on fake tensors, against hand counts and real runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from danet.config import EvalConfig, resolve_eval_config
from danet.evaluation import cost
from danet.evaluation.engine import estimate_inference_cost
from danet.evaluation.protocols import inference_plan
from danet.models import DANet


def test_hand_counted_conv_stack() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    b, h, w = 2, 10, 12
    estimate = cost.estimate_forward_cost(model, b, h, w)
    pixels = b * h * w
    assert estimate.flops == 2 * pixels * (8 * 3 * 9 + 4 * 8)
    # the largest live set: the first conv's output while ReLU writes its own (8 + 8 floats a pixel)
    assert estimate.peak_bytes == 4 * pixels * (8 + 8)
    assert not estimate.extrapolated
    double = cost.estimate_forward_cost(model.double(), b, h, w, dtype=torch.float64)
    assert double.peak_bytes == 8 * pixels * 16


def test_fake_estimate_equals_the_live_tensors_of_a_real_forward() -> None:
    model = DANet(5, backbone="resnet_tiny").eval()
    x = torch.randn(1, 3, 72, 88)
    live = cost.LiveTensorBytes()
    with torch.inference_mode(), live:
        model(x)
    estimate = cost.estimate_forward_cost(model, 1, 72, 88)
    assert estimate.peak_bytes == live.peak
    assert estimate.flops > 0


def test_extrapolation_follows_the_direct_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    model = DANet(3, backbone="resnet_tiny").eval()
    direct = cost.estimate_forward_cost(model, 1, 384, 640)
    assert not direct.extrapolated
    monkeypatch.setattr(cost, "DIRECT_LIMIT_PIXELS", 128 * 128)
    fitted = cost.estimate_forward_cost(model, 1, 384, 640)  # from traces at 2^17, 2^18, 2^19 pixels
    assert fitted.extrapolated and "about" in fitted.describe()
    assert fitted.flops == pytest.approx(direct.flops, rel=0.01)
    assert fitted.peak_bytes == pytest.approx(direct.peak_bytes, rel=0.03)
    # the attention's N^2: four times the pixels is more than four times the FLOPs
    assert cost.estimate_forward_cost(model, 1, 768, 1280).flops > 4.05 * fitted.flops


def test_inference_cost_counts_every_forward() -> None:
    model = DANet(3, backbone="resnet_tiny").eval()
    cfg = resolve_eval_config(EvalConfig(mode="sliding", crop_size=48, flip=True))
    (stage,) = inference_plan(100, 130, cfg)
    per_window = cost.estimate_forward_cost(model, 1, 48, 48, channels_last=True)
    total = estimate_inference_cost(model, 100, 130, 3, cfg)
    assert total.flops == pytest.approx(stage.forwards * per_window.flops, rel=0.03)
    assert total.peak_bytes > per_window.peak_bytes


def test_bad_sizes_and_formatting() -> None:
    with pytest.raises(ValueError, match="cannot estimate"):
        cost.estimate_forward_cost(nn.Identity(), 1, 0, 5)
    assert cost.format_bytes(5.2 * 2 ** 30) == "5.2 GiB" and cost.format_bytes(12) == "12 B"
    assert cost.ForwardCost(3.01e15, 41.7 * 2 ** 30).describe() == "3.01 PFLOP, 41.7 GiB of tensors"
