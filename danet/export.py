"""Export a trained DANet for deployment: an ONNX file, or a torch.export program.

Examples::

    danet export --checkpoint runs/latest --output danet.onnx
    danet export --checkpoint runs/latest --format torch-export --output danet.pt2

The exported model takes a normalised image batch (B, 3, H, W) float32 (the eval transform:
RGB in [0, 1], minus the mean, over the std of the checkpoint's data config) and returns the
logits (B, classes, H, W) of DANet's fused output; batch, height and width are free (at least
32 pixels) unless ``--fixed-size`` is given. After writing, the command runs the exported
model on the example input (ONNX: in onnxruntime on the CPU, when it is installed) and prints
its largest difference from the PyTorch model.

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
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import danet_kernels
from danet.files import atomic_write
from danet.inference import setup_from_args
from danet.outputs import check_output_file

__all__ = ["EXPORTERS", "SegmentationLogits", "export_onnx", "export_program", "run"]

MIN_SIDE = 32  # the smallest height or width the exported graph accepts


class SegmentationLogits(nn.Module):
    """The model in eval mode with one output: the logits of the fused head (B, classes, H, W)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.eval()  # the wrapper too: exporters warn about (and trace) a module in training mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for a normalised batch ``images`` (B, 3, H, W)."""
        out = self.model(images)
        return out[0] if isinstance(out, (tuple, list)) else out


def _dynamic_shapes(fixed: bool) -> dict[str, dict[int, Any]] | None:
    if fixed:
        return None
    side = {"min": MIN_SIDE}
    return {"images": {0: torch.export.Dim("batch", min=1, max=1024), 2: torch.export.Dim("height", **side),
                       3: torch.export.Dim("width", **side)}}


def export_program(model: nn.Module, example: torch.Tensor,
                   fixed_size: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` of ``SegmentationLogits(model)``, the attention as plain ops (module docstring)."""
    with danet_kernels.use_backend("reference"), torch.no_grad():
        return torch.export.export(SegmentationLogits(model), (example,),
                                   dynamic_shapes=_dynamic_shapes(fixed_size))


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, fixed_size: bool = False) -> Path:
    """Write ``model`` as ONNX to ``path`` (atomically) with ``torch.onnx.export(dynamo=True)``.

    Raises:
        ValueError: the onnx or onnxscript package is missing.
    """
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"ONNX export needs the {' and '.join(missing)} package(s): "
                         "pip install -c constraints.txt -e '.[export]'")
    with danet_kernels.use_backend("reference"), torch.no_grad():
        program = torch.onnx.export(SegmentationLogits(model), (example,), input_names=["images"],
                                    output_names=["logits"], dynamic_shapes=_dynamic_shapes(fixed_size),
                                    dynamo=True, verbose=False)
    return atomic_write(path, lambda tmp: program.save(str(tmp)))


def _check_onnx(path: Path, example: torch.Tensor, expected: torch.Tensor) -> str:
    if importlib.util.find_spec("onnxruntime") is None:
        return "not checked: onnxruntime is not installed"
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": example.cpu().numpy()})
    return _difference(torch.from_numpy(logits), expected, "onnxruntime")


def _check_program(path: Path, example: torch.Tensor, expected: torch.Tensor) -> str:
    with torch.no_grad():
        logits = torch.export.load(str(path)).module()(example)
    return _difference(logits, expected, "the loaded program")


def _difference(actual: torch.Tensor, expected: torch.Tensor, what: str) -> str:
    error = (actual.float().cpu() - expected.float().cpu()).abs().max().item()
    scale = expected.abs().max().item() or 1.0
    return f"checked: {what} differs from PyTorch by at most {error:.3g} ({error / scale:.2g} relative)"


def _write_program(model: nn.Module, example: torch.Tensor, path: Path, fixed_size: bool) -> Path:
    program = export_program(model, example, fixed_size)
    return atomic_write(path, lambda tmp: torch.export.save(program, str(tmp)))


# format -> (writer(model, example, path, fixed_size), checker(path, example, expected))
EXPORTERS: dict[str, tuple[Callable[..., Path], Callable[[Path, torch.Tensor, torch.Tensor], str]]] = {
    "onnx": (export_onnx, _check_onnx),
    "torch-export": (_write_program, _check_program),
}


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
    writer(setup.model, example, output, args.fixed_size)
    shape = f"1x3x{height}x{width} only" if args.fixed_size else f"any Bx3xHxW with H, W >= {MIN_SIDE}"
    print(f"wrote {output} ({args.format}, input {shape}, {setup.dataset_class.NUM_CLASSES} classes)")
    print(checker(output, example, expected))
    return 0
