"""Weight loading: our checkpoints, wrapper prefixes, the original release's naming, ImageNet files."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from timm.models.resnet import BasicBlock, ResNet

from danet.config import ModelConfig
from danet.models import DANet, load_model, load_weights
from danet.models.weights import (
    from_original_naming,
    read_checkpoint,
    to_original_naming,
)


def _tiny(nclass: int = 4, **kwargs: object) -> DANet:
    model = DANet(nclass, backbone="resnet_tiny", **kwargs)
    with torch.no_grad():  # non-default values everywhere, so a skipped key cannot go unnoticed
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor).abs() + 0.1)
    return model


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def test_our_checkpoint_round_trip_returns_config(tmp_path: Path) -> None:
    source = _tiny(aux=True)
    path = tmp_path / "ckpt.pth"
    config = {"model": {"backbone": "resnet_tiny", "aux": True}, "data": {"dataset": "synthetic"}}
    torch.save({"model": source.state_dict(), "config": config, "epoch": 3}, path)
    target = DANet(4, backbone="resnet_tiny", aux=True)
    assert load_weights(target, path) == config
    _assert_same_state(source, target)


def test_training_checkpoint_with_rng_state_loads_weights_only(tmp_path: Path) -> None:
    """The trainer stores numpy/python RNG states beside the weights: still a weights_only load."""
    source = _tiny()
    path = tmp_path / "last.pt"
    torch.save({"model": source.state_dict(), "config": {}, "iteration": 7,
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state()}}, path)
    target = DANet(4, backbone="resnet_tiny")
    load_weights(target, path)
    _assert_same_state(source, target)


class _NotAllowed:
    pass


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": _tiny().state_dict(), "payload": _NotAllowed()}, path)
    with pytest.raises(ValueError, match="cannot read weights file"):
        read_checkpoint(path)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path: Path, prefix: str) -> None:
    source = _tiny()
    path = tmp_path / "plain.pt"
    torch.save({prefix + k: v for k, v in source.state_dict().items()}, path)
    target = DANet(4, backbone="resnet_tiny")
    assert load_weights(target, path) is None
    _assert_same_state(source, target)


def test_original_release_naming_by_hand() -> None:
    """The inverse mapping gives the names the original release uses (written out here)."""
    names = set(to_original_naming(DANet(19, backbone="resnet50s", aux=True).state_dict()))
    for key in ["pretrained.conv1.0.weight", "pretrained.conv1.1.running_var", "pretrained.conv1.3.weight",
                "pretrained.conv1.4.bias", "pretrained.conv1.6.weight", "pretrained.bn1.weight",
                "pretrained.layer1.0.downsample.0.weight", "pretrained.layer1.0.downsample.1.running_mean",
                "pretrained.layer4.2.conv3.weight", "pretrained.layer4.2.bn3.bias",
                "head.conv5a.0.weight", "head.conv5a.1.running_mean", "head.conv5c.0.weight",
                "head.sa.query_conv.weight", "head.sa.key_conv.bias", "head.sa.value_conv.weight",
                "head.sa.gamma", "head.sc.gamma", "head.conv51.0.weight", "head.conv52.1.weight",
                "head.conv6.1.weight", "head.conv7.1.bias", "head.conv8.1.weight",
                "auxlayer.conv5.0.weight", "auxlayer.conv5.1.weight", "auxlayer.conv5.4.weight"]:
        assert key in names, key
    assert not any(k.startswith("backbone.") for k in names)


def test_original_release_checkpoint_loads(tmp_path: Path) -> None:
    source = _tiny(aux=True)
    original = to_original_naming(source.state_dict())
    original = {k: v for k, v in original.items() if not k.endswith("num_batches_tracked")}  # torch<0.4.1
    original["pretrained.fc.weight"] = torch.randn(1000, 128)  # the ImageNet classifier, dropped
    original["pretrained.fc.bias"] = torch.randn(1000)
    path = tmp_path / "DANet101.pth.tar"
    torch.save({"epoch": 240, "state_dict": {"module." + k: v for k, v in original.items()},
                "best_pred": 0.52}, path)
    target = DANet(4, backbone="resnet_tiny", aux=True)
    load_weights(target, path)
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0, msg=key)
    # without a config, load_model picks the published architecture unless told otherwise
    model, config = load_model(path, overrides={"backbone": "resnet_tiny", "multi_grid": False, "aux": True})
    assert config is None and model.head.conv8[1].out_channels == 4
    assert ModelConfig().backbone == "resnet101" and ModelConfig().multi_grid  # what the release loads into


def test_original_inference_only_release_loads_with_a_warning(tmp_path: Path) -> None:
    source = _tiny()
    original = {k: v for k, v in to_original_naming(source.state_dict()).items()
                if not k.startswith(("head.conv6.", "head.conv7."))}
    original["auxlayer.conv5a.0.weight"] = torch.randn(64, 256, 3, 3)  # the release's DANetHead aux
    path = tmp_path / "danet101_inference.pth"
    torch.save({"state_dict": original}, path)
    target = DANet(4, backbone="resnet_tiny")
    fresh_conv6 = target.head.conv6[1].weight.clone()
    warning = r"skipping its auxiliary head \(1 tensors\).*head\.conv6\.1\.weight"
    with pytest.warns(UserWarning, match=warning):
        load_weights(target, path)
    torch.testing.assert_close(target.head.conv8[1].weight, source.head.conv8[1].weight, rtol=0, atol=0)
    torch.testing.assert_close(target.head.conv6[1].weight, fresh_conv6, rtol=0, atol=0)
    # our own checkpoints get no such leniency
    torch.save({"model": from_original_naming(original)}, tmp_path / "ours.pt")
    with pytest.raises(ValueError, match=r"missing keys: head\.conv6\.1\.weight"):
        load_weights(DANet(4, backbone="resnet_tiny"), tmp_path / "ours.pt")


def test_unknown_original_key_is_named() -> None:
    with pytest.raises(ValueError, match=r"'pretrained_extra\.weight'"):
        from_original_naming({"pretrained.conv1.weight": torch.ones(1),
                              "pretrained_extra.weight": torch.ones(1)})


def test_class_mismatch_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "c19.pth"
    torch.save({"model": _tiny(nclass=19).state_dict()}, path)
    with pytest.raises(ValueError, match="trained for 19 classes, the model has 4"):
        load_weights(DANet(4, backbone="resnet_tiny"), path)


def test_missing_unexpected_and_shape_mismatches_are_named(tmp_path: Path) -> None:
    path = tmp_path / "aux.pth"
    torch.save(_tiny(aux=True).state_dict(), path)
    with pytest.raises(ValueError, match=r"unexpected keys: auxlayer\.conv5\.0\.weight"):
        load_weights(DANet(4, backbone="resnet_tiny"), path)
    with pytest.raises(ValueError, match=r"missing keys: auxlayer\.conv5\.0\.weight"):
        partial = _save_without(tmp_path, "auxlayer.conv5.0.weight")
        load_weights(DANet(4, backbone="resnet_tiny", aux=True), partial)
    mismatch = r"shapes.*backbone\.layer1\.0\.conv1\.weight: \(16, 16, 3, 3\) vs \(64, 64, 3, 3\)"
    with pytest.raises(ValueError, match=mismatch):
        load_weights(DANet(4, backbone="resnet18", aux=True), path)


def _save_without(tmp_path: Path, key: str) -> Path:
    state = _tiny(aux=True).state_dict()
    del state[key]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    return path


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        load_weights(DANet(4, backbone="resnet_tiny"), tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pth is not a checkpoint: it is a text file"):
        read_checkpoint(garbage)
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="holds no state_dict"):
        read_checkpoint(tmp_path / "empty.pth")


def test_load_model_rebuilds_from_stored_config(tmp_path: Path) -> None:
    source = _tiny(nclass=3, aux=True, output_stride=16)
    path = tmp_path / "ckpt.pth"
    config = {"model": {"backbone": "resnet_tiny", "aux": True, "output_stride": 16,
                        "pretrained_backbone": "/elsewhere/imagenet.pth", "future_option": 1}}
    torch.save({"model": source.state_dict(), "config": config}, path)
    model, loaded_config = load_model(path)
    assert loaded_config == config and model.auxlayer is not None
    _assert_same_state(source, model)
    with pytest.raises(ValueError, match="trained for 3 classes, the model has 5"):
        load_model(path, nclass=5)
    with pytest.raises(ValueError, match="unknown backbone"):
        load_model(path, overrides={"backbone": "vgg16"})


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_imagenet_backbone_weights_timm_naming(tmp_path: Path, suffix: str) -> None:
    imagenet = ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_type="deep",
                      stem_width=8, num_classes=10)
    state = {k: v + torch.rand_like(v) if v.is_floating_point() else v
             for k, v in imagenet.state_dict().items()}
    path = tmp_path / ("imagenet" + suffix)
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = DANet(4, backbone="resnet_tiny", pretrained_backbone=str(path))
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


def test_imagenet_backbone_weights_torchvision_naming(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18-torchvision.pth"
    torch.save(state, path)
    model = DANet(4, backbone="resnet18", pretrained_backbone=str(path))
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    with pytest.raises(ValueError, match=r"backbone weights.*shapes"):
        DANet(4, backbone="resnet_tiny", pretrained_backbone=str(path))
