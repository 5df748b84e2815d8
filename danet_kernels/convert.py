"""convert(model): the fused attention in a model that computes DANet's attention, in one call.

Most models that run DANet's attention are not ours: the original release, mmsegmentation's
DAHead, the many networks that copied PAM_Module and CAM_Module, SAGAN's self-attention (from
which PAM was taken), mmcv's non-local blocks. :func:`convert` walks such a model and puts a
fused module in place of every module that computes

* **position attention**, ``gamma * v softmax(q^T k)^T + x`` with q, k, v 1x1 convolutions of
  x: the release's PAM_Module and its copies under any class name (``query_conv``,
  ``key_conv``, ``value_conv``, a scalar ``gamma``, an optional ``nn.Softmax(dim=-1)``), SAGAN
  blocks, mmsegmentation's DAHead PAM (a SelfAttentionBlock: ``query_project``,
  ``key_project``, ``value_project``, no output projection or downsampling, ``gamma`` an mmcv
  ``Scale``);
* **channel attention**, ``gamma * softmax(rowmax(E) - E) x + x`` with ``E = x x^T``: the
  release's CAM_Module, mmsegmentation's CAM and their copies (a scalar ``gamma``, nothing else
  with weights);
* **non-local attention** (embedded Gaussian), ``x + W(softmax(theta^T phi * s) g)``: mmcv's
  NonLocal2d (``theta``, ``phi``, ``g``, ``conv_out``; ``use_scale`` gives s = 1/sqrt(d),
  ``sub_sample`` max-pools phi and g, so keys and values are fewer than the queries) and its
  ancestor's layout (``W`` for the output projection).

Recognising. A module's structure proposes readings: which child is the query, the key and
the value projection (their names decide where they can, ``query``/``q``/``theta``,
``key``/``k``/``phi``, ``value``/``v``/``g``; otherwise the shapes, the value being the
projection that keeps the input's channels), and the softmax scale (``matmul_norm``,
``use_scale``). Class names play no part. With ``verify=True`` (the default) each reading is run
once against the module and the first that agrees is used; a module none agrees with is left
alone. So a look-alike that computes something else (a softmax over the other axis, CAM
without ``rowmax - E``, an extra normalisation) is never swapped. ``verify=False`` trusts the
structure alone, converts only modules with a single reading, and is meant for code whose
modules were verified before.

Verifying. On two deep copies of the module (the module itself is never run nor changed, its
hooks do not see the runs, and the caller's random state is restored), both given the same
fresh random weights (a zero ``gamma`` or zero-initialised output convolution, as in a fresh
model, would hide any difference), the original and the fused replacement run on a small
random input in training and in eval mode; outputs, the input's gradient and every parameter's
gradient must agree within :data:`VERIFY_TOLERANCE` of the dtype: float64 where the module
computes it, else the module's own dtype. A module that also returns its N x N attention map
(SAGAN's ``Self_Attn``) is swapped only with ``drop_attention_maps=True``; its replacement
returns ``(out, None)``.

Swapping. The replacement takes over the original's parameters, buffers and children (the same
objects, under the same names, in the same order), its hooks and its public attributes, so the
``state_dict`` keys and values are unchanged (checkpoints keep loading and saving in the
original format) and an optimizer built before the call keeps working. A module that appears
at several places is replaced at all of them by one replacement. The model is changed in place;
if ``model`` itself is an attention module, the replacement is :attr:`ConversionReport.model`.
Convert before wrapping in DistributedDataParallel or ``torch.compile``; ``.to(device)``,
autocast and ``torch.compile(fullgraph=True)`` work on the converted model.

The parts live in :mod:`danet_kernels.conversion`: ``recognition`` (readings from structure),
``verification`` and ``replacements`` (the fused modules).
"""

from __future__ import annotations

import dataclasses
import logging

from torch import nn

from danet_kernels.conversion.recognition import forward_takes_x_alone, readings_of
from danet_kernels.conversion.replacements import (
    FusedChannelAttention,
    FusedPositionAttention,
    Reading,
    replacement,
)
from danet_kernels.conversion.verification import VERIFY_TOLERANCE, DisagreementError, first_agreeing

__all__ = [
    "VERIFY_TOLERANCE",
    "ConversionReport",
    "FusedChannelAttention",
    "FusedPositionAttention",
    "Skipped",
    "Swapped",
    "convert",
]

_logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Swapped:
    """A module :func:`convert` replaced: where, what it was, what it became and how it was checked."""

    path: str
    original: str
    kind: str
    detail: str


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A module that looks like attention and was left alone, and why."""

    path: str
    original: str
    reason: str


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert` did. ``model`` is the converted model (the one passed in, changed in
    place, unless it was itself an attention module)."""

    model: nn.Module
    swapped: list[Swapped]
    skipped: list[Skipped]

    def __str__(self) -> str:
        lines = [f"danet_kernels.convert: {len(self.swapped)} module(s) swapped, {len(self.skipped)} skipped"]
        lines += [f"  swapped {s.path}: {s.original} -> fused {s.kind} ({s.detail})" for s in self.swapped]
        lines += [f"  skipped {s.path}: {s.original}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def _decide(module: nn.Module, verify: bool, drop_attention_maps: bool) -> tuple[Reading, str] | str | None:
    """(reading, how it was checked) to swap ``module``; a reason to leave it; None: not attention."""
    readings = readings_of(module)
    if readings is None or isinstance(readings, str):
        return readings
    why_not = forward_takes_x_alone(module)
    if why_not:
        return why_not
    if not verify:
        if len(readings) > 1:
            shown = "; ".join(r.describe() for r in readings)
            return f"its structure allows {len(readings)} readings ({shown}): verify=True tells them apart"
        return readings[0], "not verified (verify=False)"
    try:
        return first_agreeing(module, readings, drop_attention_maps)
    except DisagreementError as exc:
        return str(exc)


def convert(model: nn.Module, *, verify: bool = True, drop_attention_maps: bool = False) -> ConversionReport:
    """Swap every module of ``model`` that computes DANet's position or channel attention (or
    non-local attention) for a fused one sharing its parameters (module docstring).

    Args:
        model: any ``nn.Module``; changed in place.
        verify: run each candidate once against its replacement (on copies, in float64) and swap
            only where they agree. False trusts the structure alone.
        drop_attention_maps: swap blocks that also return their N x N attention map (SAGAN's
            Self_Attn returns ``(out, attention)``); the fused block returns ``(out, None)``.

    Returns:
        A :class:`ConversionReport`: the model, what was swapped and what was skipped and why
        (also logged at INFO on the ``danet_kernels.convert`` logger).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert takes an nn.Module, got {type(model).__name__}")
    readings: dict[int, Reading] = {}
    swapped: list[Swapped] = []
    skipped: list[Skipped] = []
    for path, module in model.named_modules():  # each module once, under the first path reaching it
        decision = _decide(module, verify, drop_attention_maps)
        where, name = path or "(the model)", type(module).__qualname__
        if isinstance(decision, str):
            skipped.append(Skipped(where, name, decision))
            _logger.info("convert: skipped %s (%s): %s", where, name, decision)
        elif decision is not None:
            reading, detail = decision
            readings[id(module)] = reading
            swapped.append(Swapped(where, name, reading.kind, f"{reading.describe()}; {detail}"))
            _logger.info("convert: swapped %s (%s) for fused %s (%s)", where, name, reading.kind, detail)
    return ConversionReport(_swap(model, readings), swapped, skipped)


def _swap(model: nn.Module, readings: dict[int, Reading]) -> nn.Module:
    """Put the replacements in place, children first (a replacement adopts its converted children)."""
    standing: dict[int, nn.Module] = {}  # id(original) -> what stands in its place

    def visit(module: nn.Module) -> nn.Module:
        key = id(module)
        if key in standing:
            return standing[key]
        standing[key] = module
        for name, child in list(module._modules.items()):
            if child is not None:
                new = visit(child)
                if new is not child:
                    module._modules[name] = new
        if key in readings:
            standing[key] = replacement(module, readings[key])
        return standing[key]

    return visit(model) if readings else model
