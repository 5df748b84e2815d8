"""What DANet attends to: position-attention rows for chosen pixels, channel-attention maps, the figure.

For a chosen pixel (x, y) the position-attention map is that pixel's row of PAM's softmax,
``softmax_j(q_i . k_j)`` over every position j: only the chosen queries are computed
((points x N), never N x N), from PAM's input captured by a forward hook on ``head.sa``. The
channel-attention maps are channels of CAM's output (``head.sc``). ``danet attention`` is
danet.commands.attention.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import nn
from torch.nn import functional

from danet.runtime import progress_bar
from danet.visualization.masks import colourise, overlay

__all__ = [
    "AttentionMaps",
    "attention_figure",
    "attention_maps",
    "position_attention_rows",
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


def _stages(model: nn.Module) -> list[nn.Module]:
    """The modules whose ends mark the progress of a DANet inference forward: the backbone's stages,
    then the head's parts that inference runs (not the PAM-only and CAM-only classifiers)."""
    head = model.head
    return [*model.backbone.children(), head.conv5a, head.sa, head.conv51, head.conv5c, head.sc, head.conv52,
            head.conv8]


@torch.no_grad()
def attention_maps(model: nn.Module, image: torch.Tensor, points: Sequence[tuple[int, int]],
                   channels: Sequence[int] | None = None, num_channels: int = 4,
                   progress: bool = False) -> AttentionMaps:
    """Run ``model`` (a DANet, eval mode) on ``image`` (1, 3, H, W) and collect attention maps.

    ``progress`` shows a bar over the forward's stages (the backbone's, then the head's), for
    a large image whose forward takes minutes on a CPU.

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

    stages = _stages(model)
    # redrawn at every stage (mininterval 0): a stage of a large image takes seconds, not microseconds
    bar = progress_bar(total=len(stages), enabled=progress, desc="attention", unit="stage", leave=False,
                       mininterval=0)

    def advance(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        bar.update(1)  # (a hook that returned a value would replace the module's output)

    hooks = [model.head.sa.register_forward_hook(keep_pam_input),
             model.head.sc.register_forward_hook(keep_cam_output),
             *(stage.register_forward_hook(advance) for stage in stages)]
    try:
        logits = model(image)
    finally:
        for hook in hooks:
            hook.remove()
        bar.close()
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


def _panel_slots(panels: int, columns: int) -> list[tuple[int, slice]]:
    """(row, half-column slice) of each panel: full rows of ``columns``, the last row centred.

    The grid has ``2 * columns`` half-columns and every panel spans two, so a short last row is
    centred instead of leaving empty cells at its end.
    """
    slots = []
    for index in range(panels):
        row, position = divmod(index, columns)
        in_row = min(columns, panels - row * columns)
        start = (columns - in_row) + 2 * position
        slots.append((row, slice(start, start + 2)))
    return slots


def attention_figure(image: np.ndarray, maps: AttentionMaps, points: Sequence[tuple[int, int]],
                     palette: np.ndarray, class_names: Sequence[str] | None = None,
                     columns: int = 4) -> Figure:
    """One figure: the image with the points, the prediction, one panel per point, one per channel.

    Every attention panel has its own colourbar (each map has its own range: a softmax row sums
    to 1 over N positions, a CAM channel is an activation). With ``class_names``, the prediction
    panel gets a legend of the classes it shows. A short last row is centred (no empty cells).
    """
    panels = 2 + len(points) + len(maps.channels)
    columns = min(columns, panels)
    rows = math.ceil(panels / columns)
    height, width = image.shape[:2]
    panel_width = 4.0
    fig = Figure(figsize=(panel_width * columns * 1.15, panel_width * rows * height / width + 0.5 * rows),
                 layout="constrained")
    grid = fig.add_gridspec(rows, 2 * columns)
    axes = [fig.add_subplot(grid[row, cols]) for row, cols in _panel_slots(panels, columns)]
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
        shown_map = ax.imshow(maps.position[i].numpy(), cmap="jet", alpha=0.55)
        ax.plot(x, y, marker="+", markersize=14, markeredgewidth=2.5, color="white")
        ax.set_title(f"position attention of ({x}, {y})", color=colour)
        fig.colorbar(shown_map, ax=ax, shrink=0.8, label="attention weight")
    for j, channel in enumerate(maps.channels):
        ax = axes[2 + len(points) + j]
        shown_map = ax.imshow(maps.channel[j].numpy(), cmap="viridis")
        ax.set_title(f"channel attention: channel {channel}")
        fig.colorbar(shown_map, ax=ax, shrink=0.8, label="CAM output")
    fig.suptitle(f"DANet attention (feature map {maps.feature_size[0]}x{maps.feature_size[1]})")
    return fig
