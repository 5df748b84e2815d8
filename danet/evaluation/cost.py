"""What a forward pass will cost, found before running it: FLOPs and peak tensor memory.

The model runs on fake tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes and
devices, no data, no compute), under the autocast and memory format inference will use, so
the estimate follows the model's own code (backbone, head, the attention backend in use):

* **FLOPs** are counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and
  matrix products, 2 per multiply-add). The attention is counted through the blockwise
  backend, whose matrix products are the attention's own (2 N^2 (C/8 + C) for PAM, quadratic
  in the pixel count); the Triton kernels are opaque to the counter, so the estimate always
  switches the attention to that backend.
* **Time** on a CPU (:func:`measured_conv_speed`): FLOPs over the speed this process reaches on
  a 3x3 convolution; right within about 2x (danet.training.cpu_time says how it was checked).
* **Peak memory** is the largest total size of the tensors alive at once during the forward,
  followed op by op (an output is alive until its last Python reference goes). Weights are
  not included. The process needs more than this (allocator caching, convolution
  workspaces): on the CPU, the growth of peak RSS measured about 2x the tensor peak for
  DANet-101 at 512 x 512.

Up to :data:`DIRECT_LIMIT_PIXELS` the forward at the real size is traced; above it (where
tracing the blockwise attention's per-tile loop would itself take long), three traces at
reduced sizes of the same aspect ratio are fitted with ``a P + b P^2`` (FLOPs) and
``c + d P + e P^2`` (memory) in the pixel count P, and extrapolated (:class:`CostModel`; on
DANet-101 and the tiny backbone at 2048 x 2048 and 1536 x 2560 the extrapolation was within
1.5% of the direct trace in FLOPs and 0.1% in memory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import danet_kernels

__all__ = ["DIRECT_LIMIT_PIXELS", "CostModel", "ForwardCost", "LiveTensorBytes", "estimate_forward_cost",
           "fit_cost_model", "format_bytes", "format_duration", "measured_conv_speed"]

DIRECT_LIMIT_PIXELS = 1 << 20
"""Largest input (pixels per image) traced at its own size; larger ones are extrapolated."""
_PROBE_PIXELS = (1 << 17, 1 << 18, 1 << 19)  # the extrapolation's three traces (pixels per image)
_PROBE_MULTIPLE = 32  # probe sides: multiples of the backbone's largest stride


@dataclasses.dataclass(frozen=True)
class ForwardCost:
    """The estimated cost of one forward pass.

    Attributes:
        flops: floating-point operations (2 per multiply-add).
        peak_bytes: the largest total size of live tensors during the pass (weights excluded).
        extrapolated: True when fitted from reduced sizes rather than traced at this size.
    """

    flops: float
    peak_bytes: float
    extrapolated: bool = False

    def describe(self) -> str:
        """``"1.2 TFLOP, 3.4 GiB of tensors"`` (with "about" when extrapolated)."""
        about = "about " if self.extrapolated else ""
        return f"{about}{_format_flops(self.flops)}, {about}{format_bytes(self.peak_bytes)} of tensors"


def format_bytes(count: float) -> str:
    """Bytes in binary units: ``"512 MiB"``, ``"5.2 GiB"``."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count:.0f} B"


def _format_flops(count: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count:.0f} FLOP"


class LiveTensorBytes(TorchDispatchMode):
    """Follows the storages that op outputs hold and records the peak of their total size.

    A storage counts from the op that creates it until the last tensor on it is gone (a
    finalizer on each tensor; torch keeps a tensor's Python object alive while autograd still
    holds it, so saved tensors count until they are released). The same mode serves inference
    (:func:`estimate_forward_cost`) and the training step (danet.training.memory).

    Args:
        block_bytes: round every storage up to a multiple of this: 512 is the CUDA caching
            allocator's block (``torch.cuda.max_memory_allocated`` counts rounded blocks); 1
            counts exact sizes, as the CPU allocator does.
        record: keep every change in :attr:`events`, the size of the storage allocated
            (positive) or freed (negative), before rounding (two traces of one step at two batch
            sizes then give the peak at any batch: danet.training.memory).
    """

    def __init__(self, *, block_bytes: int = 1, record: bool = False) -> None:
        super().__init__()
        self.block_bytes = block_bytes
        self.current = 0
        self.peak = 0
        self.events: list[int] | None = [] if record else None
        self._storages: dict[int, list[int]] = {}  # storage id -> [bytes, live tensors on it]
        self._tensors: dict[int, int] = {}  # id(tensor) -> storage id

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and id(tensor) not in self._tensors:
                self._track(tensor)
        return out

    def hold(self, tensors: Any) -> None:
        """Count tensors that exist already (weights, optimiser state) as live from now on, so
        that in-place updates of them are known and their storages counted once."""
        for tensor in tensors:
            if id(tensor) not in self._tensors:
                self._track(tensor)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [storage.nbytes(), 0]
            self._change(entry[0])
        entry[1] += 1
        self._tensors[id(tensor)] = key
        weakref.finalize(tensor, self._release, id(tensor))

    def _release(self, tensor_id: int) -> None:
        key = self._tensors.pop(tensor_id)
        entry = self._storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self._change(-entry[0])
            del self._storages[key]

    def _change(self, nbytes: int) -> None:
        """A storage of ``abs(nbytes)`` bytes was allocated (positive) or freed (negative)."""
        rounded = -(-abs(nbytes) // self.block_bytes) * self.block_bytes
        self.current += rounded if nbytes > 0 else -rounded
        self.peak = max(self.peak, self.current)
        if self.events is not None:
            self.events.append(nbytes)


@contextlib.contextmanager
def _fake_tracing() -> Iterator[None]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), danet_kernels.use_backend("torch"):
        yield


def _trace(model: nn.Module, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
           autocast_dtype: torch.dtype | None, channels_last: bool,
           call: dict[str, Any]) -> tuple[float, float]:
    """(FLOPs, peak live bytes) of ``model(x, **call)`` for a fake ``x`` of ``shape``."""
    with _fake_tracing():
        x = torch.empty(shape, dtype=dtype, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast, FlopCounterMode(display=False) as flops:
            live = LiveTensorBytes()
            with live:
                model(x, **call)
    return float(flops.get_total_flops()), float(live.peak)


def _probe_shapes(height: int, width: int) -> list[tuple[int, int, int, int]]:
    shapes = []
    for pixels in _PROBE_PIXELS:
        scale = math.sqrt(pixels / (height * width))
        side = [max(1, round(s * scale / _PROBE_MULTIPLE)) * _PROBE_MULTIPLE for s in (height, width)]
        shapes.append((1, 3, side[0], side[1]))
    return shapes


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Cost of one sample as a function of its pixel count P, fitted on three traced sizes:
    FLOPs ``a P + b P^2``, peak bytes ``c + d P + e P^2`` (``e = 0`` when the fit bends down,
    which is a capped buffer rather than a shrinking cost). Batches scale both linearly."""

    flops: tuple[float, float]
    peak: tuple[float, float, float]

    def estimate(self, batch: int, height: int, width: int) -> ForwardCost:
        """The extrapolated cost of a (batch, 3, height, width) forward."""
        p = float(height * width)
        flops = batch * (self.flops[0] * p + self.flops[1] * p * p)
        peak = batch * (self.peak[0] + self.peak[1] * p + self.peak[2] * p * p)
        return ForwardCost(flops, peak, extrapolated=True)


def fit_cost_model(model: nn.Module, *, height: int = 1, width: int = 1, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
                   channels_last: bool = False, call: dict[str, Any] | None = None) -> CostModel:
    """Trace ``model`` at three reduced sizes of the aspect ratio ``height : width`` and fit a
    :class:`CostModel` (arguments as :func:`estimate_forward_cost`)."""
    device = torch.device(device)
    shapes = _probe_shapes(height, width)
    traces = [_trace(model, shape, dtype, device, autocast_dtype, channels_last, call or {})
              for shape in shapes]
    pixels = np.array([s[2] * s[3] for s in shapes], dtype=np.float64)
    flops = np.array([t[0] for t in traces])
    peaks = np.array([t[1] for t in traces])
    flop_fit = np.maximum(np.linalg.lstsq(np.stack([pixels, pixels ** 2], 1), flops, rcond=None)[0], 0.0)
    ones = np.ones_like(pixels)
    peak_fit = np.linalg.solve(np.stack([ones, pixels, pixels ** 2], 1), peaks)
    if peak_fit[2] < 0:
        peak_fit = np.append(np.linalg.lstsq(np.stack([ones, pixels], 1), peaks, rcond=None)[0], 0.0)
    return CostModel((float(flop_fit[0]), float(flop_fit[1])), tuple(float(v) for v in peak_fit))


def estimate_forward_cost(model: nn.Module, batch: int, height: int, width: int, *,
                          dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                          autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
                          call: dict[str, Any] | None = None) -> ForwardCost:
    """Estimate ``model(x)`` for ``x`` of shape (batch, 3, height, width), without running it.

    ``model`` should be in the mode it will run in (eval); ``call`` holds extra keyword
    arguments of the call (e.g. ``head_outputs=True``). See the module docstring for what is
    counted and how sizes above :data:`DIRECT_LIMIT_PIXELS` are extrapolated.

    Raises:
        ValueError: a non-positive size.
    """
    if batch < 1 or height < 1 or width < 1:
        raise ValueError(f"cannot estimate a forward of shape ({batch}, 3, {height}, {width})")
    options = {"dtype": dtype, "device": device, "autocast_dtype": autocast_dtype,
               "channels_last": channels_last, "call": call}
    if height * width <= DIRECT_LIMIT_PIXELS:
        flops, peak = _trace(model, (batch, 3, height, width), dtype, torch.device(device), autocast_dtype,
                             channels_last, call or {})
        return ForwardCost(flops, peak)
    return fit_cost_model(model, height=height, width=width, **options).estimate(batch, height, width)


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"12 min"``, ``"3.5 h"``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def measured_conv_speed(seconds: float = 0.15) -> float:
    """FLOP/s of this process on a 3x3 convolution, 64 -> 64 channels at 56 x 56, float32, on the CPU."""
    # constant values: drawing random ones would move the global generator (a training run's stream)
    x, weight = torch.full((1, 64, 56, 56), 0.5), torch.full((64, 64, 3, 3), 0.01)
    flops = 2 * 64 * 64 * 9 * 56 * 56
    with torch.no_grad():
        functional.conv2d(x, weight, padding=1)  # the first call sets up the kernels
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            functional.conv2d(x, weight, padding=1)
            count += 1
        return count * flops / (time.perf_counter() - start)
