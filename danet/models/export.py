"""DANet for deployment: an ONNX file or a torch.export program, the attention as plain ops.

While exporting, the attention backend is ``reference`` (bmm + softmax): the Triton kernels
cannot be exported (an exporter sees an opaque custom op that no runtime knows). Which export
paths work, and how to load their files: ``danet export --help`` (danet.commands.export).

Both formats carry what a deployment needs beside the weights (:func:`export_metadata`): the
class names, palette and dataset, the normalisation and the input and output layouts; ONNX as
the model's metadata_props (onnxruntime: ``session.get_modelmeta().custom_metadata_map``),
torch.export as the archive's extra file ``danet.json`` (``torch.export.load(path,
extra_files={"danet.json": ""})``).
"""

from __future__ import annotations

import importlib.util
import io
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import danet_kernels
from danet.io.atomic import atomic_write
from danet.runtime import install_hint

__all__ = ["EXPORTERS", "METADATA_FILE", "MIN_SIDE", "SegmentationLogits", "export_metadata", "export_onnx",
           "export_program"]

MIN_SIDE = 32  # the smallest height or width the exported graph accepts
METADATA_FILE = "danet.json"
"""The extra file of a torch.export archive that holds :func:`export_metadata` (as JSON)."""


def export_metadata(class_names: Sequence[str], palette: Sequence[Sequence[int]], dataset: str,
                    mean: Sequence[float], std: Sequence[float]) -> dict[str, str]:
    """What an exported model's user needs to feed it and read its output, as string key/values.

    Keys: ``danet:classes`` (JSON list, index = class id), ``danet:palette`` (JSON list of RGB),
    ``danet:dataset``, ``danet:mean`` and ``danet:std`` (JSON lists, RGB), ``danet:input`` and
    ``danet:output`` (the layouts, in words).
    """
    return {
        "danet:classes": json.dumps(list(class_names)),
        "danet:palette": json.dumps([[int(c) for c in colour] for colour in palette]),
        "danet:dataset": dataset,
        "danet:mean": json.dumps([float(m) for m in mean]),
        "danet:std": json.dumps([float(s) for s in std]),
        "danet:input": "images: float32 (batch, 3, height, width), RGB, NCHW, each channel "
                       "(pixel / 255 - mean) / std",
        "danet:output": "logits: float32 (batch, classes, height, width); the class id of a pixel is "
                        "the argmax over dimension 1",
    }


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


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, fixed_size: bool = False,
                metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model`` as ONNX to ``path`` (atomically) with ``torch.onnx.export(dynamo=True)``,
    ``metadata`` (:func:`export_metadata`) as the model's metadata_props.

    Raises:
        ValueError: the onnx or onnxscript package is missing.
    """
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"ONNX export needs the {' and '.join(missing)} package(s): "
                         f"{install_hint('export')}")
    with danet_kernels.use_backend("reference"), torch.no_grad():
        program = torch.onnx.export(SegmentationLogits(model), (example,), input_names=["images"],
                                    output_names=["logits"], dynamic_shapes=_dynamic_shapes(fixed_size),
                                    dynamo=True, verbose=False)
    program.model.metadata_props.update(metadata or {})
    return atomic_write(path, lambda tmp: program.save(str(tmp)))


def _check_onnx(path: Path, example: torch.Tensor, expected: torch.Tensor) -> str:
    if importlib.util.find_spec("onnxruntime") is None:
        return f"not checked: onnxruntime is not installed ({install_hint('export')})"
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


class _FirstErrorKept(io.RawIOBase):
    """A file that torch's C++ archive writer can fill: an OSError of a write (ENOSPC) is kept and
    raised once the writer is done, instead of reaching the C++ writer, which aborts the process
    on it (SIGABRT, a C++ stack on stderr). An open file, not the temporary's name, also keeps
    torch from warning about a name not ending in .pt2."""

    def __init__(self, raw: io.BufferedWriter) -> None:
        super().__init__()
        self.raw, self.error = raw, None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.error is None:
            try:
                self.raw.write(data)
            except OSError as err:
                self.error = err
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.raw.seek(offset, whence) if self.error is None else 0

    def raise_kept(self) -> None:
        if self.error is not None:
            raise self.error


def _write_program(model: nn.Module, example: torch.Tensor, path: Path, fixed_size: bool,
                   metadata: Mapping[str, str] | None = None) -> Path:
    program = export_program(model, example, fixed_size)
    extra_files = {METADATA_FILE: json.dumps(dict(metadata or {}), indent=1)}

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as raw:
            sink = _FirstErrorKept(raw)
            torch.export.save(program, sink, extra_files=extra_files)
            sink.raise_kept()

    return atomic_write(path, save)


# format -> (writer(model, example, path, fixed_size, metadata), checker(path, example, expected))
EXPORTERS: dict[str, tuple[Callable[..., Path], Callable[[Path, torch.Tensor, torch.Tensor], str]]] = {
    "onnx": (export_onnx, _check_onnx),
    "torch-export": (_write_program, _check_program),
}
