"""Export a trained DANet for deployment: an ONNX file, or a torch.export program.

Examples::

    danet export --checkpoint runs/latest --output danet.onnx
    danet export --checkpoint runs/latest --format torch-export --output danet.pt2

The exported model takes a normalised image batch (B, 3, H, W) float32 (the eval transform:
RGB in [0, 1], minus the mean, over the std of the checkpoint's data config) and returns the
logits (B, classes, H, W) of DANet's fused output; batch, height and width are free (at least
32 pixels) unless ``--fixed-size`` is given. The file says so itself: the class names, palette,
dataset, mean, std and the input and output layouts are in the ONNX model's metadata_props
(onnxruntime: ``session.get_modelmeta().custom_metadata_map``) and in the torch.export archive's
``danet.json`` (``torch.export.load(path, extra_files={"danet.json": ""})`` fills that dict).
After writing, the command runs the exported model on the example input (ONNX: in onnxruntime
on the CPU, when it is installed) and prints its largest difference from the PyTorch model.

The attention is exported as plain ops: while exporting, the attention backend is
``reference`` (bmm + softmax), on every device. The Triton kernels cannot be exported (an
exporter sees an opaque custom op that no runtime knows) and the blockwise backend's loops
would be unrolled for one size; the exported graph holds PAM's N x N attention matrix, as
any ONNX graph of DANet does. Which export paths work (torch 2.11 to 2.14):

* ``danet export --format onnx``: ``torch.onnx.export(dynamo=True)``, needs the ``onnx`` and
  ``onnxscript`` packages (the ``export`` extra); checked against onnxruntime in the tests.
* ``danet export --format torch-export``: ``torch.export.export``, saved with
  ``torch.export.save``; load with ``torch.export.load(path).module()``.
* ``torch.export`` / ``torch.onnx.export`` called directly on a DANet on the CPU (blockwise
  backend): capture the same plain ops (danet_kernels.blockwise, "Export").
* ``torch.onnx.export(dynamo=False)`` (the legacy TorchScript tracer): traces the same plain
  ops on the CPU, for the traced input size (deprecated by torch).
* on CUDA, ``torch.export`` keeps the Triton kernels as the custom ops
  ``danet_kernels::pam_forward`` / ``cam_forward``, which ONNX cannot express: export through
  this command (or under ``danet_kernels.use_backend("reference")``).
* ``torch.jit.script``: not supported (the model uses Python constructs TorchScript lacks).
"""
from __future__ import annotations

import argparse

import torch

from danet.commands.model_setup import setup_from_args
from danet.io.output_paths import check_output_file
from danet.models.export import EXPORTERS, MIN_SIDE, SegmentationLogits, export_metadata

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    """``danet export``: write the model in ``args.format`` and check it on the example input."""
    writer, checker = EXPORTERS[args.format]
    setup = setup_from_args(args)  # inputs first: the checkpoint, then the output
    output = check_output_file(args.output, args.overwrite)
    height, width = args.size if args.size is not None else (setup.data.crop_size,) * 2
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"--size must be at least {MIN_SIDE} pixels per side, got {height} {width}")
    batch = 1 if args.fixed_size else 2  # an example batch of 1 would make torch specialise the batch to 1
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(batch, 3, height, width, generator=generator).to(setup.device)
    with torch.no_grad():
        expected = SegmentationLogits(setup.model)(example)
    metadata = export_metadata(setup.classes.names, setup.classes.palette, setup.classes.dataset,
                               setup.data.mean, setup.data.std)
    writer(setup.model, example, output, args.fixed_size, metadata)
    if args.format == "torch-export" and output.suffix != ".pt2":
        print(f"note: torch.export.load warns about a file name not ending in .pt2 ({output.name})")
    shape = f"1x3x{height}x{width} only" if args.fixed_size else f"any Bx3xHxW with H, W >= {MIN_SIDE}"
    print(f"wrote {output} ({args.format}, input {shape}, {setup.classes.num_classes} classes)")
    print(checker(output, example, expected))
    return 0
