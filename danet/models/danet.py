"""DANet: a dilated ResNet with the dual attention head (Fu et al., CVPR 2019).

:func:`build_model` turns a ``ModelConfig`` into the model (every command goes through it);
:data:`MODELS` names a few configurations (``danet_resnet101`` is the published model,
ModelConfig's defaults) for :func:`create_model` and the torch.hub entry points (``hubconf.py``);
:func:`build_from_checkpoint` and :func:`load_model` build the model a checkpoint describes.
Reading and renaming weights is :mod:`danet.models.weights`' job; it never imports this module.

The Hugging Face Hub's conventions come with huggingface_hub's ``PyTorchModelHubMixin``:
``model.save_pretrained(directory)`` writes ``config.json`` (the constructor's arguments) and
``model.safetensors``, each whole or not at all; ``DANet.from_pretrained(directory or repo id)``
builds the model from them and loads the weights checked (every key and shape); ``push_to_hub``
uploads. A repo id is read from the Hugging Face cache, and downloaded into it where the Hub is
reachable (``HF_HUB_OFFLINE=1``: the cache only).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.constants import CONFIG_NAME, SAFETENSORS_SINGLE_FILE
from safetensors.torch import load_file, save_model
from torch import nn
from torch.nn import functional

from danet.config import ModelConfig
from danet.io.atomic import atomic_write
from danet.models.backbone import create_backbone, timm_weights_tag
from danet.models.head import DANetHead, FCNHead
from danet.models.weights import (
    Checkpoint,
    load_backbone_weights,
    load_checkpoint_into,
    load_state_dict_checked,
    model_config_from,
    num_classes_in,
    read_checkpoint,
)

__all__ = ["MODELS", "DANet", "build_from_checkpoint", "build_model", "create_model", "list_models",
           "load_model"]


def _upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with align_corners=True, as the published model upsamples its outputs."""
    return functional.interpolate(logits, size=size, mode="bilinear", align_corners=True)


class DANet(nn.Module, PyTorchModelHubMixin, library_name="danet-fused", license="mit",
            paper_url="https://arxiv.org/abs/1809.02983", pipeline_tag="image-segmentation",
            tags=["danet", "semantic-segmentation"]):
    """Dual Attention Network for scene segmentation.

    Args:
        nclass: number of classes.
        backbone: a name from :data:`danet.models.backbone.BACKBONES` ("resnet101" is the
            released model's; "resnet101s" has Encoding's deep stem; "resnet_tiny" is for CPUs).
        output_stride: 8 (published) or 16.
        attention: "fused" (danet_kernels) or "reference" (bmm modules); same state_dict.
        aux: add the auxiliary FCN head on the third stage (training output gains a 4th logit).
        multi_grid: dilate the last stage's blocks by (1, 2, 4) x its dilation.
        pretrained_backbone: ImageNet weights for the backbone: a local file (timm or
            torchvision naming), ``"timm"`` (or ``"timm:<tag>"``) for timm's own through the
            Hugging Face cache (downloaded into it once where huggingface.co is reachable), or
            None for random weights.

    ``forward(x)`` returns, in training mode, ``(sum, pam, cam[, aux])`` logits and, in eval
    mode, the sum logits alone; every logit map is (B, nclass, H, W), upsampled to the input.
    ``forward(x, head_outputs=True)`` returns ``(sum, pam, cam)`` in eval mode too, as the
    original release's model always does (code written for it indexes ``model(x)[0]``); the
    PAM-only and CAM-only predictions are the paper's ablation.
    """

    def __init__(self, nclass: int, backbone: str = ModelConfig.backbone,
                 output_stride: int = ModelConfig.output_stride, attention: str = ModelConfig.attention,
                 aux: bool = ModelConfig.aux, multi_grid: bool = ModelConfig.multi_grid,
                 pretrained_backbone: str | None = None) -> None:
        super().__init__()
        if nclass < 1:
            raise ValueError(f"nclass must be >= 1, got {nclass}")
        self.nclass = nclass
        timm_tag = timm_weights_tag(pretrained_backbone)
        self.backbone = create_backbone(backbone, output_stride=output_stride, multi_grid=multi_grid,
                                        pretrained=timm_tag)
        if pretrained_backbone is not None and timm_tag is None:
            load_backbone_weights(self.backbone, pretrained_backbone)
        stage3_channels, stage4_channels = self.backbone.feature_info.channels()
        self.head = DANetHead(stage4_channels, nclass, attention=attention)
        self.auxlayer = FCNHead(stage3_channels, nclass) if aux else None

    def forward(self, x: torch.Tensor, head_outputs: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Segment ``x`` (B, 3, H, W): see the class docstring for what is returned."""
        size = (x.shape[-2], x.shape[-1])
        stage3, stage4 = self.backbone(x)
        outputs = [_upsample(logits, size) for logits in self.head(stage4, all_outputs=head_outputs)]
        if not self.training:
            return tuple(outputs) if head_outputs else outputs[0]
        if self.auxlayer is not None:
            outputs.append(_upsample(self.auxlayer(stage3), size))
        return tuple(outputs)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's stages in backward instead of storing their activations
        (``train.activation_checkpointing``).

        The backbone is a timm FeatureListNet, whose ``set_grad_checkpointing`` wraps each stage
        in torch.utils.checkpoint. (BatchNorm running statistics see the recomputed forward too.)
        """
        self.backbone.set_grad_checkpointing(enable)

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Return (backbone parameters, head parameters), the latter including the aux head.

        The published recipe trains the freshly initialised heads at 10x the backbone's LR.
        """
        head = [p for name, p in self.named_parameters() if not name.startswith("backbone.")]
        return list(self.backbone.parameters()), head

    def _save_pretrained(self, save_directory: Path) -> None:
        """``save_pretrained``'s files: the weights and the constructor's arguments, each written
        whole or not at all. The ImageNet weights' source is not kept: the weights hold them."""
        config = dict(self._hub_mixin_config or {}, pretrained_backbone=None)
        atomic_write(save_directory / SAFETENSORS_SINGLE_FILE, lambda tmp: save_model(self, str(tmp)))
        atomic_write(save_directory / CONFIG_NAME,
                     lambda tmp: tmp.write_text(json.dumps(config, sort_keys=True, indent=2) + "\n"))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         map_location: str = "cpu", strict: bool = True, **model_kwargs: Any) -> DANet:
        """``from_pretrained``'s loading: build from the config, then load the weights checked.

        Raises:
            ValueError: no config naming the classes, or weights that do not fit the model.
            FileNotFoundError: a directory without weights (huggingface_hub's errors for a repo id
                that is neither cached nor downloadable).
        """
        if "nclass" not in model_kwargs:
            raise ValueError(f"{model_id} has no {CONFIG_NAME} naming the number of classes (save_pretrained "
                             "writes one); pass nclass=... and the architecture's options")
        model = cls(**{**model_kwargs, "pretrained_backbone": None})  # the weights hold the backbone
        directory = Path(model_id)
        if directory.is_dir():
            path = directory / SAFETENSORS_SINGLE_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{directory} holds no {SAFETENSORS_SINGLE_FILE} (save_pretrained "
                                        "writes one)")
        else:
            path = Path(hf_hub_download(model_id, SAFETENSORS_SINGLE_FILE, revision=revision,
                                        cache_dir=cache_dir, force_download=force_download, token=token,
                                        local_files_only=local_files_only))
        state_dict = load_file(str(path), device=str(map_location))
        if strict:
            load_state_dict_checked(model, state_dict, source=f"weights {path}")
        else:
            model.load_state_dict(state_dict, strict=False)
        return model.to(map_location).eval()


MODELS: dict[str, ModelConfig] = {
    "danet_resnet101": ModelConfig(),  # the published model
    "danet_resnet101s": ModelConfig(backbone="resnet101s"),  # Encoding's deep stem (ADE20K, VOC, ...)
    "danet_resnet50": ModelConfig(backbone="resnet50"),
    "danet_resnet152": ModelConfig(backbone="resnet152"),
    "danet_resnet_tiny": ModelConfig(backbone="resnet_tiny", multi_grid=False),  # the CPU demo's
}
"""Named models: the published DANet-101 (ModelConfig's defaults) and its variants, timm style."""


_NOT_ARCHITECTURE = ("pretrained", "pretrained_backbone")  # ModelConfig fields a checkpoint's weights replace


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(MODELS)


def create_model(name: str, nclass: int | None = None, weights: str | Path | None = None,
                 **overrides: object) -> DANet:
    """Build the named model of :data:`MODELS` (the torch.hub entry points call this).

    Args:
        name: a name of :data:`MODELS`.
        nclass: the number of classes; with ``weights`` it may be left out (the checkpoint's).
        weights: a checkpoint file to load, checked key by key: ours, the original release's
            (``DANet101.pth.tar``) or a plain state_dict.
        overrides: ModelConfig fields (None: keep the named model's).

    Raises:
        ValueError: unknown ``name`` (the message lists the known ones) or field, no ``nclass``
            without weights, or weights that do not fit the model.
        FileNotFoundError: no such ``weights`` file.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(unknown)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = dataclasses.replace(MODELS[name], **given)
    if weights is not None:
        checkpoint = read_checkpoint(weights)
        stored = model_config_from(checkpoint.config)
        if stored is None:  # the release's checkpoints, plain state_dicts: the named architecture
            given = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_ARCHITECTURE}
        elif stored.backbone != cfg.backbone:
            raise ValueError(f"{weights} holds a DANet on {stored.backbone}, not {name}'s {cfg.backbone} "
                             f"(use its model, or pass backbone={stored.backbone!r})")
        return build_from_checkpoint(checkpoint, nclass, given)
    if nclass is None:
        raise ValueError(f"{name}: give nclass (the number of classes), or weights to take it from")
    return build_model(cfg, nclass)


def build_model(cfg: ModelConfig, nclass: int) -> DANet:
    """Build the model a :class:`~danet.config.ModelConfig` describes, for ``nclass`` classes."""
    return DANet(nclass, backbone=cfg.backbone, output_stride=cfg.output_stride, attention=cfg.attention,
                 aux=cfg.aux, multi_grid=cfg.multi_grid, pretrained_backbone=cfg.pretrained_backbone)


def build_from_checkpoint(checkpoint: Checkpoint, nclass: int | None = None,
                          overrides: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the DANet ``checkpoint`` describes and load its weights.

    The architecture is, field by field: ``overrides`` (non-None values, e.g. command-line
    flags), else the checkpoint's stored ModelConfig, else the ModelConfig defaults, the
    published architecture (which a checkpoint in the original release's naming, carrying no
    config, has). The number of classes comes from ``nclass``
    when given (a mismatch with the checkpoint is an error), else from its classifier.

    Raises:
        ValueError: unknown backbone or option, or a checkpoint that does not fit.
    """
    cfg = model_config_from(checkpoint.config) or ModelConfig()
    cfg.pretrained_backbone = None
    for key, value in (overrides or {}).items():
        if value is not None:
            if not hasattr(cfg, key):
                raise ValueError(f"unknown model option {key!r}")
            setattr(cfg, key, value)
    model = build_model(cfg, nclass if nclass is not None else num_classes_in(checkpoint.state_dict))
    load_checkpoint_into(model, checkpoint)
    return model


def load_model(path: str | Path, nclass: int | None = None,
               overrides: Mapping[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any] | None]:
    """Read checkpoint ``path`` and :func:`build_from_checkpoint`; returns (model, stored config).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, unknown backbone, or a checkpoint that does not fit.
    """
    checkpoint = read_checkpoint(path)
    return build_from_checkpoint(checkpoint, nclass, overrides), checkpoint.config
