"""The hub conventions: torch.hub entry points (hubconf.py), save_pretrained / from_pretrained, and
timm's ImageNet weights through the Hugging Face cache. No test touches the network: the Hub is
offline (HF_HUB_OFFLINE) and its cache a directory the test prepares."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import save_file

from danet.models import MODELS, DANet, create_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache in tmp_path, and the Hub offline (huggingface_hub reads both
    settings at import: its constants are set too)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def put_in_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay ``files`` out as huggingface_hub caches a model repo's main revision."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def _tiny(nclass: int = 3, **kwargs: object) -> DANet:
    model = DANet(nclass, backbone="resnet_tiny", **kwargs)
    with torch.no_grad():  # non-default gammas and BatchNorm statistics, so a lost tensor shows
        model.head.sa.gamma.fill_(0.5)
        model.head.sc.gamma.fill_(-0.5)
        for name, tensor in model.state_dict().items():
            if name.endswith("running_mean"):
                tensor.normal_(0, 0.1)
            elif name.endswith("running_var"):
                tensor.uniform_(0.9, 1.1)
    return model.eval()


def _assert_same_outputs(a: DANet, b: DANet) -> None:
    x = torch.randn(2, 3, 40, 32)
    a.eval(), b.eval()
    with torch.no_grad():
        for got, expected in zip(a(x, head_outputs=True), b(x, head_outputs=True), strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------- torch.hub


def test_hubconf_offers_every_named_model():
    """What torch.hub.list shows (its rule: the callables whose names do not start with '_')."""
    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")]
    assert sorted(entries) == sorted([*MODELS, "from_pretrained"])
    assert all(importlib.util.find_spec(name) for name in hubconf.dependencies)


def test_torch_hub_load_local_round_trip(tmp_path: Path):
    source = _tiny(aux=True)
    path = tmp_path / "plain.pt"
    torch.save(source.state_dict(), path)  # a plain state_dict: the entry's architecture, nclass from it
    model = torch.hub.load(str(ROOT), "danet_resnet_tiny", source="local", weights=str(path), aux=True)
    _assert_same_outputs(model, source)

    ours = tmp_path / "ours.pt"  # our checkpoint: its stored architecture
    torch.save({"model": source.state_dict(), "config": {"model": {"backbone": "resnet_tiny", "aux": True,
                                                                     "multi_grid": True}}}, ours)
    loaded = torch.hub.load(str(ROOT), "danet_resnet_tiny", source="local", weights=str(ours))
    _assert_same_outputs(loaded, source)

    fresh = torch.hub.load(str(ROOT), "danet_resnet_tiny", source="local", nclass=5, attention="reference")
    assert fresh.nclass == 5 and type(fresh.head.sa).__module__ == "danet_kernels.reference"


def test_torch_hub_load_refuses_what_does_not_fit(tmp_path: Path):
    with pytest.raises(ValueError, match="give nclass"):
        torch.hub.load(str(ROOT), "danet_resnet_tiny", source="local")
    path = tmp_path / "tiny.pt"
    torch.save({"model": _tiny().state_dict(), "config": {"model": {"backbone": "resnet_tiny"}}}, path)
    with pytest.raises(ValueError, match="holds a DANet on resnet_tiny, not danet_resnet50's resnet50"):
        create_model("danet_resnet50", weights=path)
    with pytest.raises(ValueError, match="trained for 3 classes, the model has 4"):
        create_model("danet_resnet_tiny", 4, weights=path)


# ---------------------------------------------------------------------------- save / from_pretrained


def test_save_pretrained_and_from_pretrained_a_directory(tmp_path: Path):
    source = _tiny(aux=True)
    source.save_pretrained(tmp_path / "danet")
    files = sorted(p.name for p in (tmp_path / "danet").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors"]  # no temporaries left behind
    config = json.loads((tmp_path / "danet" / "config.json").read_text())
    assert config["nclass"] == 3 and config["aux"] is True and config["backbone"] == "resnet_tiny"
    assert config["pretrained_backbone"] is None
    loaded = DANet.from_pretrained(tmp_path / "danet")
    assert not loaded.training
    _assert_same_outputs(loaded, source)


def test_from_pretrained_checks_the_weights(tmp_path: Path):
    _tiny().save_pretrained(tmp_path / "danet")
    config = tmp_path / "danet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "aux": True}))
    with pytest.raises(ValueError, match="missing keys: auxlayer"):
        DANet.from_pretrained(tmp_path / "danet")
    (tmp_path / "danet" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no model\.safetensors"):
        DANet.from_pretrained(tmp_path / "danet")
    config.unlink()
    with pytest.raises(ValueError, match=r"no config\.json naming the number of classes"):
        DANet.from_pretrained(tmp_path / "danet")


def test_from_pretrained_a_repo_id_from_the_offline_cache(tmp_path: Path, offline_hub: Path):
    source = _tiny()
    source.save_pretrained(tmp_path / "saved")
    files = {name: tmp_path / "saved" / name for name in ("config.json", "model.safetensors")}
    put_in_hub_cache(offline_hub, "someone/danet-tiny", files)
    _assert_same_outputs(DANet.from_pretrained("someone/danet-tiny"), source)
    hub_loaded = torch.hub.load(str(ROOT), "from_pretrained", "someone/danet-tiny", source="local")
    _assert_same_outputs(hub_loaded, source)
    with pytest.raises(OSError, match="cannot find the requested files in the local cache"):
        DANet.from_pretrained("someone/not-cached")


# ---------------------------------------------------------------------------- timm's ImageNet weights


def test_timm_imagenet_weights_from_the_offline_cache(tmp_path: Path, offline_hub: Path):
    """pretrained_backbone="timm" reads timm's default resnet18 weights from the Hugging Face cache;
    "timm:<tag>" another of its weights."""
    imagenet = timm.create_model("resnet18").state_dict()
    save_file(imagenet, tmp_path / "model.safetensors")
    hub_id = timm.models.get_pretrained_cfg("resnet18").hf_hub_id
    put_in_hub_cache(offline_hub, hub_id, {"model.safetensors": tmp_path / "model.safetensors"})
    for spec in ("timm", "timm:" + hub_id.rpartition(".")[2]):
        model = DANet(3, backbone="resnet18", pretrained_backbone=spec)
        backbone = model.backbone.state_dict()
        for key in ("conv1.weight", "layer1.0.bn1.running_var", "layer4.1.conv2.weight"):
            torch.testing.assert_close(backbone[key], imagenet[key], rtol=0, atol=0)


def test_no_imagenet_weights_is_one_error_naming_both_ways(tmp_path: Path, offline_hub: Path):
    with pytest.raises(FileNotFoundError) as missing_in_cache:
        DANet(3, backbone="resnet18", pretrained_backbone="timm")
    with pytest.raises(FileNotFoundError) as missing_file:
        DANet(3, backbone="resnet18", pretrained_backbone=str(tmp_path / "resnet18.pth"))
    for error in (missing_in_cache, missing_file):
        message = str(error.value)
        assert "\n" not in message
        assert "model.pretrained_backbone=timm" in message and str(offline_hub) in message
        assert "model.pretrained_backbone=/path/to/resnet101.pth" in message
    assert "timm/resnet18.a1_in1k are not in the Hugging Face cache" in str(missing_in_cache.value)
    assert "resnet18.pth" in str(missing_file.value)
    with pytest.raises(ValueError, match="resnet_tiny backbone has no ImageNet weights"):
        DANet(3, backbone="resnet_tiny", pretrained_backbone="timm")
    with pytest.raises(ValueError, match=r"timm has no pretrained weights 'resnet18\.nope'"):
        DANet(3, backbone="resnet18", pretrained_backbone="timm:nope")
