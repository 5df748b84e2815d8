"""Show what DANet attends to: position-attention maps for chosen pixels, channel-attention maps.

Example::

    danet attention street.png --points 120,200 480,310 --checkpoint city.pt --output attention.png

The paper's figure (Fu et al., CVPR 2019, Fig. 4/5), at full resolution. For each chosen pixel
(x, y) the position-attention map is that pixel's row of PAM's softmax, ``softmax_j(q_i . k_j)``
over every position j: only the chosen queries are computed ((points x N), never N x N), from
PAM's input captured by a forward hook on ``head.sa``, then upsampled over the image. The
channel-attention maps are channels of CAM's output (``head.sc``), which the paper shows
responding to one semantic class each; by default the channels with the most spatial contrast
(largest standard deviation) are shown, or the ones ``--channels`` names.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import nn
from torch.nn import functional

from danet.files import atomic_write
from danet.inference import add_model_arguments, setup_from_args
from danet.predict import colourise, load_image, normalise_image, overlay

__all__ = [
    "AttentionMaps",
    "add_arguments",
    "attention_figure",
    "attention_maps",
    "parse_point",
    "position_attention_rows",
    "run",
]


def position_attention_rows(pam: nn.Module, features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Rows ``queries`` of PAM's attention matrix: (B, P, N) for features (B, C, H, W), N = H*W.

    ``queries`` holds P flat positions ``y * W + x``. Only those rows are formed, so memory is
    P x N; the values equal rows of the reference ``softmax(q^T k)`` (no scaling, as DANet).
    """
    q = pam.query_conv(features).flatten(2)[:, :, queries]  # (B, d, P)
    k = pam.key_conv(features).flatten(2)  # (B, d, N)
    dtype = torch.promote_types(q.dtype, torch.float32)  # half-precision energies would overflow
    energy = torch.bmm(q.transpose(1, 2).to(dtype), k.to(dtype))  # (B, P, N)
    return torch.softmax(energy, dim=-1)


def parse_point(text: str) -> tuple[int, int]:
    """``"x,y"`` -> (x, y) integers (pixel column, row)."""
    try:
        x, y = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a point is x,y in pixels (e.g. 120,45), got {text!r}") from None
    return x, y


def _feature_index(coord: int, size: int, feature_size: int) -> int:
    """Nearest feature cell of an image coordinate, with align_corners=True geometry (the model's)."""
    if size == 1 or feature_size == 1:
        return 0
    return round(coord * (feature_size - 1) / (size - 1))


@dataclasses.dataclass
class AttentionMaps:
    """What :func:`attention_maps` computes, all on the CPU at the image's resolution.

    Attributes:
        prediction: class ids (H, W).
        position: one map per point (P, H, W), each summing to 1 at feature resolution.
        channel: CAM output maps of ``channels`` (K, H, W).
        channels: the CAM channel ids shown.
        feature_size: (h, w) of the attention feature map.
    """

    prediction: torch.Tensor
    position: torch.Tensor
    channel: torch.Tensor
    channels: list[int]
    feature_size: tuple[int, int]


@torch.no_grad()
def attention_maps(model: nn.Module, image: torch.Tensor, points: Sequence[tuple[int, int]],
                   channels: Sequence[int] | None = None, num_channels: int = 4) -> AttentionMaps:
    """Run ``model`` (a DANet, eval mode) on ``image`` (1, 3, H, W) and collect attention maps.

    Raises:
        ValueError: a point outside the image, a channel id out of range, a batch of several images.
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"attention maps are for one image (1, 3, H, W), got shape {tuple(image.shape)}")
    height, width = image.shape[-2:]
    for x, y in points:
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"point {x},{y} is outside the {width}x{height} image")
    captured: dict[str, torch.Tensor] = {}

    def keep_pam_input(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        captured["pam_in"] = args[0].detach().clone()

    def keep_cam_output(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        captured["cam_out"] = out.detach().clone()

    hooks = [model.head.sa.register_forward_hook(keep_pam_input),
             model.head.sc.register_forward_hook(keep_cam_output)]
    try:
        logits = model(image)
    finally:
        for hook in hooks:
            hook.remove()
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    features, cam_out = captured["pam_in"], captured["cam_out"]
    h, w = features.shape[-2:]
    flat = [_feature_index(y, height, h) * w + _feature_index(x, width, w) for x, y in points]
    queries = torch.tensor(flat, dtype=torch.long, device=features.device)
    rows = position_attention_rows(model.head.sa, features, queries).reshape(1, len(points), h, w)

    if channels is None:
        spread = cam_out[0].float().flatten(1).std(dim=1)
        channels = spread.topk(min(num_channels, spread.numel())).indices.tolist()
    bad = [c for c in channels if not 0 <= c < cam_out.shape[1]]
    if bad:
        raise ValueError(f"channel ids {bad} out of range: CAM has {cam_out.shape[1]} channels")
    channel_maps = cam_out[:, list(channels)]

    def full_size(maps: torch.Tensor) -> torch.Tensor:
        resized = functional.interpolate(maps, size=(height, width), mode="bilinear", align_corners=True)
        return resized[0].cpu()

    return AttentionMaps(prediction=logits.argmax(1)[0].cpu(), position=full_size(rows.float()),
                         channel=full_size(channel_maps), channels=list(channels), feature_size=(h, w))


def attention_figure(image: np.ndarray, maps: AttentionMaps, points: Sequence[tuple[int, int]],
                     palette: np.ndarray, class_names: Sequence[str] | None = None,
                     columns: int = 4) -> Figure:
    """One figure: the image with the points, the prediction, one panel per point, one per channel.

    With ``class_names``, the prediction panel gets a legend of the classes it shows.
    """
    panels = 2 + len(points) + len(maps.channels)
    columns = min(columns, panels)
    rows = math.ceil(panels / columns)
    height, width = image.shape[:2]
    panel_width = 4.0
    fig = Figure(figsize=(panel_width * columns, panel_width * rows * height / width + 0.4 * rows),
                 layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    colours = [f"C{i % 10}" for i in range(len(points))]

    axes[0].imshow(image)
    for (x, y), colour in zip(points, colours, strict=True):
        axes[0].plot(x, y, marker="+", markersize=14, markeredgewidth=2.5, color=colour)
    axes[0].set_title("image and query points")
    axes[1].imshow(overlay(image, colourise(maps.prediction, palette), 0.6))
    axes[1].set_title("prediction")
    if class_names is not None:
        shown = torch.unique(maps.prediction).tolist()
        handles = [Patch(color=np.asarray(palette[c]) / 255.0, label=class_names[c]) for c in shown]
        axes[1].legend(handles=handles, loc="lower left", fontsize="small", framealpha=0.8)
    for i, ((x, y), colour) in enumerate(zip(points, colours, strict=True)):
        ax = axes[2 + i]
        ax.imshow(image)
        ax.imshow(maps.position[i].numpy(), cmap="jet", alpha=0.55)
        ax.plot(x, y, marker="+", markersize=14, markeredgewidth=2.5, color="white")
        ax.set_title(f"position attention of ({x}, {y})", color=colour)
    for j, channel in enumerate(maps.channels):
        ax = axes[2 + len(points) + j]
        ax.imshow(maps.channel[j].numpy(), cmap="viridis")
        ax.set_title(f"channel attention: channel {channel}")
    fig.suptitle(f"DANet attention (feature map {maps.feature_size[0]}x{maps.feature_size[1]})")
    return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``danet attention``."""
    parser.add_argument("image", metavar="IMAGE", help="the image to look at")
    parser.add_argument("--points", type=parse_point, nargs="+", required=True, metavar="X,Y",
                        help="query pixels (column,row) whose position-attention maps are shown")
    parser.add_argument("--output", required=True, metavar="PNG", help="where to write the figure")
    add_model_arguments(parser)
    parser.add_argument("--channels", type=int, nargs="+", default=None, metavar="C",
                        help="CAM channels to show (default: the --num-channels most contrasted)")
    parser.add_argument("--num-channels", type=int, default=4, help="channel maps to show (default 4)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run(args: argparse.Namespace) -> int:
    """``danet attention``: write the figure."""
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise ValueError(f"{output} exists (pass --overwrite to replace it)")
    if args.num_channels < 0:
        raise ValueError(f"--num-channels must be >= 0, got {args.num_channels}")
    image = load_image(args.image)
    setup = setup_from_args(args)
    maps = attention_maps(setup.model, normalise_image(setup, image), args.points, args.channels,
                          args.num_channels)
    fig = attention_figure(image, maps, args.points, setup.dataset_class.PALETTE,
                           setup.dataset_class.CLASS_NAMES)
    atomic_write(output, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    print(f"attention maps of {len(args.points)} point(s) and {len(maps.channels)} channel(s) -> {output}")
    return 0
