"""danet.config: presets, YAML files and dotted overrides, strictly checked."""

import re

import pytest
import yaml

from danet.config import (
    DEFAULT_PRESET,
    Config,
    ModelConfig,
    apply_dict,
    available_presets,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
)


def test_presets_ship_and_load():
    from danet.data import DATASETS

    assert set(available_presets()) >= {"cityscapes", "ade20k", "voc", "pcontext", "cocostuff", "folder",
                                        "synthetic"}
    for name in available_presets():
        cfg = load_config(name)
        assert cfg.name == name
        assert cfg.data.dataset == name and name in DATASETS  # one preset per dataset, named after it


def test_cityscapes_preset_is_the_published_recipe():
    cfg = load_config("cityscapes")
    # the published model is ModelConfig's defaults: the release's 7x7 stem (--no-deepstem)
    assert cfg.model == ModelConfig() and cfg.model.backbone == "resnet101"
    assert (cfg.model.output_stride, cfg.model.multi_grid) == (8, True)
    assert (cfg.data.crop_size, cfg.data.base_size, cfg.data.scale_range) == (768, 1024, (0.5, 2.0))
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.sync_bn) == (8, 240, True)
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.lr) == ("sgd", 0.9, 0.003)
    assert cfg.optim.head_lr_mult == 10.0
    assert cfg.optim.weight_decay == 1e-4
    assert (cfg.schedule.policy, cfg.schedule.power, cfg.schedule.warmup_iters) == ("poly", 0.9, 0)


def test_default_is_the_cpu_synthetic_demo():
    cfg = load_config()
    assert DEFAULT_PRESET == "synthetic"
    assert (cfg.data.dataset, cfg.model.backbone) == ("synthetic", "resnet_tiny")


def test_sources_apply_in_order(tmp_path):
    user = tmp_path / "my.yaml"
    user.write_text("optim:\n  lr: 0.5\n  weight_decay: 1e-5\ntrain:\n  amp: bf16\n")
    cfg = load_config("cityscapes", user, ["optim.lr=0.25", "schedule.milestones=[10, 20]", "data.root=null"])
    assert cfg.optim.lr == 0.25  # the override beats the file
    assert cfg.optim.weight_decay == 1e-5  # YAML 1.1 reads 1e-5 as a string: accepted as a float
    assert cfg.train.amp == "bf16"  # the file beats the preset
    assert cfg.train.epochs == 240  # the preset beats the defaults
    assert cfg.schedule.milestones == (10, 20)
    assert cfg.data.root is None


def test_round_trip_through_dict_and_yaml():
    cfg = load_config("ade20k", overrides=["loss.weights=[1, 0.5, 0.5]", "train.iters=7"])
    plain = config_to_dict(cfg)
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(plain))) == cfg
    assert config_from_dict(config_to_dict(Config())) == Config()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
        (["optimizer.lr=0.1"], "unknown config key 'optimizer'"),
        (["optim.lr=fast"], "optim.lr: expected float"),
        (["train.epochs=1.5"], "train.epochs: expected int"),
        (["train.compile=yes please"], "train.compile: expected bool"),
        (["loss.weights=[1, 2]"], "expected 3 values"),
        (["schedule.milestones=5"], "expected a list"),
        (["optim=3"], "optim: expected a mapping"),
        (["optim.lr"], "not of the form section.key=value"),
        (["optim.lr=1", "optim.lr.x=2"], "optim.lr"),
    ],
)
def test_bad_overrides_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(overrides=overrides)


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'citiscapes'; available presets: ade20k"):
        load_config("citiscapes")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(config_file=tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping of config sections"):
        load_config(config_file=listing)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ValueError, match=r"unknown config key 'train\.epoch'"):
        load_config(config_file=typo)


def test_parse_overrides_nests_and_parses_yaml():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=x"]) == {"a": {"b": 1, "c": [1, 2]}, "d": "x"}


def test_malformed_yaml_values_name_the_key_and_the_value():
    with pytest.raises(ValueError) as caught:
        load_config(overrides=["data.crop_size=[64"])
    message = str(caught.value)
    assert message.startswith("override data.crop_size=[64: the value is not valid YAML")
    assert "\n" not in message


def test_a_malformed_config_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml is not valid YAML"):
        load_config(config_file=bad)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.amp=fp8", "train.amp must be one of none, bf16, fp16; got 'fp8'"),
        ("model.backbone=resnet9", "model.backbone must be one of resnet18"),
        ("model.attention=flash", "model.attention must be one of fused, reference"),
        ("model.output_stride=4", "model.output_stride must be one of 8, 16"),
        ("data.dataset=imagenet", "data.dataset must be one of cityscapes"),
        ("eval.mode=tiled", "eval.mode must be one of whole, sliding, multiscale"),
        ("eval.protocol=paper", "eval.protocol must be one of danet, release, mmseg"),
        ("eval.amp=fp8", "eval.amp must be one of auto, none, bf16, fp16"),
        ("eval.stride=0", "eval.stride must be >= 1, got 0"),
        ("eval.window_memory_mb=-1", "eval.window_memory_mb must be >= 0, got -1"),
        ("eval.stride_ratio=1.5", "eval.stride_ratio must be in (0, 1], got 1.5"),
        ("eval.batch_size=0", "eval.batch_size must be >= 1, got 0"),
        ("train.matmul_precision=tf32", "train.matmul_precision must be one of highest, high, medium"),
        ("train.device=tpu", "train.device must be one of auto, cpu, cuda"),
        ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
        ("data.scale_range=[2.0, 0.5]", "data.scale_range must satisfy 0 < low <= high"),
        ("dist.timeout_s=0", "dist.timeout_s must be > 0"),
        ("name=" + "x" * 250, "name must be 1 to 234 bytes"),
    ],
)
def test_the_whole_config_is_validated_when_it_is_built(override, message):
    """Not only when training starts: --print-config and every command see the same errors."""
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(overrides=[override])
    with pytest.raises(ValueError, match=re.escape(message)):
        config_from_dict(config_to_dict(apply_dict(Config(), parse_overrides([override]))))
