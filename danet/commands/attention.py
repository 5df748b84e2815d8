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

The whole image goes through the model in one forward, whose attention costs the square of the
pixel count: above a megapixel the estimated cost (FLOPs, memory, and the time on a CPU) is
printed first and a progress bar shown over the forward's stages (a 12-megapixel photo takes
minutes on a CPU; downscale it first for a quicker look).
"""
from __future__ import annotations

import argparse

from danet.commands.model_setup import (
    LONG_INFERENCE_PIXELS,
    describe_forward,
    normalise_image,
    setup_from_args,
)
from danet.data.images import ALPHA_IGNORED, has_alpha, load_rgb
from danet.evaluation.cost import estimate_forward_cost
from danet.io.atomic import atomic_write
from danet.io.output_paths import check_output_file
from danet.visualization.attention import attention_figure, attention_maps

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    """``danet attention``: write the figure."""
    image = load_rgb(args.image)  # inputs first: the image, the checkpoint; then the output
    if has_alpha(args.image):
        print(f"{args.image}: {ALPHA_IGNORED}")
    setup = setup_from_args(args)
    output = check_output_file(args.output, args.overwrite)
    height, width = image.shape[:2]
    long = height * width > LONG_INFERENCE_PIXELS
    if long:  # one forward of the whole image: its attention costs the square of the pixel count
        cost = estimate_forward_cost(setup.model, 1, height, width, device=setup.device)
        print(f"{args.image}: {width}x{height} ({height * width / 1e6:.1f} MP), one forward, estimated "
              f"{describe_forward(setup, cost)}")
    maps = attention_maps(setup.model, normalise_image(setup, image), args.points, args.channels,
                          args.num_channels, progress=long and args.progress)
    fig = attention_figure(image, maps, args.points, setup.classes.palette, setup.classes.names)
    atomic_write(output, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    print(f"attention maps of {len(args.points)} point(s) and {len(maps.channels)} channel(s) -> {output}")
    return 0
