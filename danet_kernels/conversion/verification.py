"""Whether a reading computes what its module computes (:mod:`danet_kernels.convert`, "Verifying").

On two deep copies of the module (the module itself is never run nor changed, its hooks do not
see the runs, and the caller's random state is restored), both given the same fresh random
weights, the original and the fused replacement run on a small random input in training and in
eval mode; outputs, the input's gradient and every parameter's gradient must agree within
:data:`VERIFY_TOLERANCE`: float64 where the module computes it, else in its own dtype.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from danet_kernels.conversion.recognition import probe_channels
from danet_kernels.conversion.replacements import PositionReading, Reading, replacement

__all__ = ["VERIFY_TOLERANCE", "DisagreementError", "first_agreeing"]

VERIFY_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 3e-2,
    torch.bfloat16: 3e-2,
}
"""Largest relative difference (to the original's largest magnitude) at which a reading agrees."""

# the verification input: (B, C, H, W) with C the module's; H, W small, W odd, H even (so that
# sub-sampling halves it)
_PROBE_BATCH, _PROBE_HEIGHT, _PROBE_WIDTH = 2, 6, 5
_WEIGHT_HOOKS = (SpectralNorm, WeightNorm)  # forward pre-hooks that compute a module's weight


class DisagreementError(Exception):
    """The fused reading computes something else than the module (the message says what)."""


class _ReturnsAttentionMapError(DisagreementError):
    """The module returns (output, N x N attention map), as SAGAN's Self_Attn does."""


_MAP_HINT = ("it returns (output, N x N attention map), as SAGAN's Self_Attn does, and the fused "
             "kernel never forms the map: convert(..., drop_attention_maps=True) swaps it, returning "
             "(output, None)")


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.detach().double().abs().max().item()
    difference = (actual.detach().double() - expected.detach().double()).abs().max().item()
    return difference / scale if scale > 0 else difference


def _without_observers(probe: nn.Module) -> None:
    """Remove the hooks of a verification copy, but those that compute weights (the old spectral and
    weight norm): a caller's hooks must not see the probe runs."""
    for module in probe.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
                      module._backward_pre_hooks):
            for key in [key for key, hook in hooks.items() if not isinstance(hook, _WEIGHT_HOOKS)]:
                del hooks[key]


def _randomise_alike(first: nn.Module, second: nn.Module, generator: torch.Generator) -> None:
    """Give both copies the same fresh weights: O(1) activations, no zero gamma or output conv."""
    with torch.no_grad():
        for a, b in zip(first.parameters(), second.parameters(), strict=True):
            if not a.is_floating_point():
                continue
            if a.numel() == 1:  # gamma-like scalars: well away from zero
                value = 0.5 + torch.rand(a.shape, generator=generator, dtype=torch.float64)
            elif a.dim() >= 2:
                value = torch.randn(a.shape, generator=generator, dtype=torch.float64) / a[0].numel() ** 0.5
            else:
                value = 0.5 * torch.randn(a.shape, generator=generator, dtype=torch.float64)
            a.copy_(value)
            b.copy_(value)


def _original_output(output: object, reading: Reading, batch: int, n: int) -> torch.Tensor:
    """The original's output tensor; _ReturnsAttentionMapError / DisagreementError when it returns more."""
    returns_map = isinstance(reading, PositionReading) and reading.returns_attention_map
    is_map_pair = (isinstance(output, tuple) and len(output) == 2
                   and all(isinstance(t, torch.Tensor) for t in output) and output[1].shape[:2] == (batch, n))
    if is_map_pair:
        if returns_map:
            return output[0]
        raise _ReturnsAttentionMapError(_MAP_HINT)
    if isinstance(output, torch.Tensor) and not returns_map:
        return output
    raise DisagreementError(f"it returns a {type(output).__name__}, where the fused module returns "
                        + ("(output, None)" if returns_map else "one tensor"))


def _gradient_errors(original: nn.Module, fused: nn.Module) -> dict[str, float]:
    """Each parameter gradient's error, relative to the largest one of the original."""
    expected = dict(original.named_parameters())
    largest = max((p.grad.abs().max().item() for p in expected.values() if p.grad is not None), default=0.0)
    errors = {}
    for name, p in fused.named_parameters():
        if (p.grad is None) != (expected[name].grad is None):
            raise DisagreementError(f"the gradient of {name} is missing on one side")
        if p.grad is not None:
            difference = (p.grad.double() - expected[name].grad.double()).abs().max().item()
            errors[f"gradient of {name}"] = difference / largest if largest > 0 else difference
    return errors


def _compare(original: nn.Module, fused: nn.Module, reading: Reading, dtype: torch.dtype,
             device: torch.device, channels: int) -> float:
    """Run both in training and eval mode; the largest relative error, or DisagreementError."""
    generator = torch.Generator().manual_seed(0)
    shape = (_PROBE_BATCH, channels, _PROBE_HEIGHT, _PROBE_WIDTH)
    returns_map = isinstance(reading, PositionReading) and reading.returns_attention_map
    worst = 0.0
    for training in (True, False):
        original.train(training)
        fused.train(training)
        x = (0.5 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(device, dtype)
        x_original, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected = _original_output(original(x_original), reading, _PROBE_BATCH, _PROBE_HEIGHT * _PROBE_WIDTH)
        actual = fused(x_fused)[0] if returns_map else fused(x_fused)
        if actual.shape != expected.shape or actual.dtype != expected.dtype:
            raise DisagreementError(f"it returns {tuple(expected.shape)} {expected.dtype}, the fused "
                                f"{reading.kind} {tuple(actual.shape)} {actual.dtype}")
        grad = torch.randn(expected.shape, generator=generator, dtype=torch.float64).to(device, dtype)
        expected.backward(grad)
        actual.backward(grad)
        errors = {"output": _relative_error(actual, expected),
                  "input gradient": _relative_error(x_fused.grad, x_original.grad),
                  **_gradient_errors(original, fused)}
        for what, error in errors.items():
            if not error <= VERIFY_TOLERANCE[dtype]:
                raise DisagreementError(
                    f"its {what} differs from the fused {reading.kind}'s by {error:.2g} (relative, "
                    f"{str(dtype).removeprefix('torch.')}, {'training' if training else 'eval'} mode)")
            worst = max(worst, error)
        original.zero_grad(set_to_none=True)
        fused.zero_grad(set_to_none=True)
    return worst


def _verify(module: nn.Module, reading: Reading) -> tuple[float, torch.dtype]:
    """Check ``reading`` against ``module`` on copies (module docstring); (error, dtype) or raise.

    Raises:
        DisagreementError: they compute different things, or the module cannot be run to tell.
    """
    tensors = [*module.parameters(), *module.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    if device.type == "meta":
        raise DisagreementError("its weights are on the meta device, where nothing can be verified "
                            "(convert once they are loaded, or pass verify=False)")
    own = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    try:
        original, fused_copy = copy.deepcopy(module), copy.deepcopy(module)
    except Exception as exc:  # a module that refuses copying cannot be run safely
        raise DisagreementError(f"it cannot be copied to verify it ({type(exc).__name__}: {exc})") from exc
    _without_observers(original)
    _without_observers(fused_copy)
    _randomise_alike(original, fused_copy, torch.Generator().manual_seed(0))
    fused = replacement(fused_copy, reading)
    channels = probe_channels(module, reading)
    failure: Exception | None = None
    for dtype in dict.fromkeys((torch.float64, own)):
        if dtype not in VERIFY_TOLERANCE:
            continue
        original.to(dtype)
        fused_copy.to(dtype)  # and so the replacement, which holds the same tensors
        try:
            return _compare(original, fused, reading, dtype, device, channels), dtype
        except DisagreementError:
            raise
        except Exception as exc:  # float64 impossible here: the module's own dtype next
            failure = exc
    raise DisagreementError(f"it could not be run to verify it ({type(failure).__name__}: {failure})")


def _verify_reading(module: nn.Module, reading: Reading, drop_attention_maps: bool) -> tuple[Reading, str]:
    try:
        error, dtype = _verify(module, reading)
    except _ReturnsAttentionMapError:
        if not (drop_attention_maps and isinstance(reading, PositionReading)):
            raise
        reading = dataclasses.replace(reading, returns_attention_map=True)
        error, dtype = _verify(module, reading)
    return reading, f"verified in {str(dtype).removeprefix('torch.')}, relative error {error:.1g}"


def first_agreeing(module: nn.Module, readings: list[Reading],
                   drop_attention_maps: bool) -> tuple[Reading, str]:
    """The first reading that agrees with ``module`` and how well; DisagreementError when none does.

    Runs with the caller's random state restored afterwards, gradients on and autocast off.
    """
    tensors = [*module.parameters(), *module.buffers()]
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    reasons = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=cuda))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        for device_type in sorted({t.device.type for t in tensors} | {"cpu"}):
            stack.enter_context(torch.autocast(device_type, enabled=False))
        for reading in readings:
            try:
                return _verify_reading(module, reading, drop_attention_maps)
            except DisagreementError as exc:
                reasons.append(str(exc))
    others = f" (nor does any of its {len(reasons) - 1} other readings)" if len(reasons) > 1 else ""
    raise DisagreementError(reasons[0] + others)


