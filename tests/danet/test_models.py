"""DANet model: shapes, backbones, dilations, the head's channel plan, fused == reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from danet.config import ModelConfig
from danet.models import BACKBONES, MODELS, DANet, build_model, create_backbone, create_model, list_models


def _activate_attention(model: DANet, gamma: float = 0.7) -> None:
    """gamma starts at zero, which would hide the attention paths from every comparison."""
    with torch.no_grad():
        model.head.sa.gamma.fill_(gamma)
        model.head.sc.gamma.fill_(-gamma)


@pytest.mark.parametrize("size", [(64, 64), (65, 47), (33, 97)])
@pytest.mark.parametrize("aux", [False, True])
def test_training_and_eval_outputs(size: tuple[int, int], aux: bool) -> None:
    model = DANet(5, backbone="resnet_tiny", aux=aux)
    x = torch.randn(2, 3, *size)
    outputs = model(x)
    assert isinstance(outputs, tuple) and len(outputs) == (4 if aux else 3)
    for logits in outputs:
        assert logits.shape == (2, 5, *size)
        assert torch.isfinite(logits).all()
    model.eval()
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 5, *size)


def test_upsampling_is_bilinear_align_corners() -> None:
    model = DANet(3, backbone="resnet_tiny").eval()
    x = torch.randn(1, 3, 64, 48)
    _, stage4 = model.backbone(x)
    expected = nn.functional.interpolate(model.head(stage4)[0], size=(64, 48), mode="bilinear",
                                         align_corners=True)
    torch.testing.assert_close(model(x), expected)


def test_fused_and_reference_attention_share_weights_and_outputs() -> None:
    fused = DANet(4, backbone="resnet_tiny", attention="fused", aux=True).double()
    reference = DANet(4, backbone="resnet_tiny", attention="reference", aux=True).double()
    assert list(fused.state_dict()) == list(reference.state_dict())
    _activate_attention(fused)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 48, 40, dtype=torch.float64)

    fused.eval(), reference.eval()
    torch.testing.assert_close(fused(x), reference(x))

    # training mode: same dropout masks through the same seed; compare every output and gradient
    fused.train(), reference.train()
    torch.manual_seed(1)
    out_fused = fused(x)
    torch.manual_seed(1)
    out_reference = reference(x)
    for a, b in zip(out_fused, out_reference, strict=True):
        torch.testing.assert_close(a, b)
    weights = [torch.randn_like(o) for o in out_fused]
    sum((o * w).sum() for o, w in zip(out_fused, weights, strict=True)).backward()
    sum((o * w).sum() for o, w in zip(out_reference, weights, strict=True)).backward()
    for (name, p), q in zip(fused.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m, name=name: f"{name}: {m}")
    assert fused.head.sa.gamma.grad.abs().item() > 0 and fused.head.sc.gamma.grad.abs().item() > 0


@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_stride_sets_feature_resolution(output_stride: int) -> None:
    backbone = create_backbone("resnet_tiny", output_stride=output_stride)
    stage3, stage4 = backbone(torch.randn(1, 3, 64, 96))
    assert stage4.shape[-2:] == (64 // output_stride, 96 // output_stride)
    assert stage3.shape[-2:] == stage4.shape[-2:]  # stage 4 is dilated at both strides
    assert backbone.feature_info.channels() == [64, 128]


@pytest.mark.parametrize(("output_stride", "expected"), [(8, [4, 8, 16]), (16, [2, 4, 8])])
def test_multi_grid_dilations(output_stride: int, expected: list[int]) -> None:
    plain = create_backbone("resnet50", output_stride=output_stride)
    grid = create_backbone("resnet50", output_stride=output_stride, multi_grid=True)
    # without multi-grid: first block at half the stage dilation (as Encoding), then the dilation
    assert [b.conv2.dilation[0] for b in plain.layer4] == [expected[0] // 2] + [expected[0]] * 2
    assert [b.conv2.dilation[0] for b in grid.layer4] == expected
    assert [b.conv2.padding[0] for b in grid.layer4] == expected
    assert [b.conv2.dilation[0] for b in grid.layer3] == [b.conv2.dilation[0] for b in plain.layer3]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert grid(x)[1].shape == plain(x)[1].shape == (1, 2048, 32 // output_stride, 32 // output_stride)


def test_multi_grid_on_basic_blocks() -> None:
    grid = create_backbone("resnet_tiny", multi_grid=True)
    assert grid.layer4[0].conv1.dilation == (4, 4) and grid.layer4[0].conv2.dilation == (4, 4)


def test_deep_stem_and_head_channel_plan() -> None:
    model = DANet(19, backbone="resnet50s")
    stem = model.backbone.conv1
    assert [stem[i].out_channels for i in (0, 3, 6)] == [64, 64, 128]
    assert [stem[i].kernel_size for i in (0, 3, 6)] == [(3, 3)] * 3
    assert model.backbone.feature_info.channels() == [1024, 2048]
    head = model.head
    assert head.conv5a[0].in_channels == 2048 and head.conv5a[0].out_channels == 512
    assert head.sa.query_conv.out_channels == 64 and head.sa.value_conv.out_channels == 512
    assert head.conv51[0].out_channels == 512
    for classifier in (head.conv6, head.conv7, head.conv8):
        assert isinstance(classifier[0], nn.Dropout2d) and classifier[0].p == 0.1
        assert classifier[1].in_channels == 512 and classifier[1].out_channels == 19


def test_parameter_groups_partition_the_parameters() -> None:
    model = DANet(3, backbone="resnet_tiny", aux=True)
    backbone, head = model.parameter_groups()
    assert {id(p) for p in backbone} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in head} == {id(p) for p in model.head.parameters()} | {
        id(p) for p in model.auxlayer.parameters()}
    assert len(backbone) + len(head) == len(list(model.parameters()))


def test_package_exports_the_model() -> None:
    import danet

    assert danet.DANet is DANet and danet.build_model is build_model


def test_build_model_from_config() -> None:
    cfg = ModelConfig(backbone="resnet_tiny", output_stride=16, attention="reference", aux=True)
    model = build_model(cfg, nclass=6)
    assert model.auxlayer is not None and model.head.conv8[1].out_channels == 6
    assert model.backbone(torch.randn(1, 3, 32, 32))[1].shape[-1] == 2


def test_create_model_registry() -> None:
    assert {"danet_resnet_tiny", "danet_resnet101", "danet_resnet101s"} <= set(list_models())
    assert MODELS["danet_resnet101"] == ModelConfig()  # one definition of the published model
    model = create_model("danet_resnet_tiny", 4, aux=None, output_stride=16)
    assert model.auxlayer is None
    with pytest.raises(ValueError, match=r"unknown model 'danet_vgg'.*danet_resnet_tiny"):
        create_model("danet_vgg", 4)
    with pytest.raises(ValueError, match=r"unknown model option.*depth"):
        create_model("danet_resnet_tiny", 4, depth=3)


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet7'.*resnet_tiny"):
        DANet(3, backbone="resnet7")
    with pytest.raises(ValueError, match="output_stride must be 8 or 16"):
        DANet(3, backbone="resnet_tiny", output_stride=32)
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        DANet(3, backbone="resnet_tiny", attention="flash")
    with pytest.raises(ValueError, match="nclass"):
        DANet(0, backbone="resnet_tiny")
    assert "resnet101s" in BACKBONES and "resnet_tiny" in BACKBONES
