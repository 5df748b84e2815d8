"""What :func:`danet_kernels.convert` puts in place of an attention module, and the readings it is built from.

A reading says which children of the original play which part (query, key, value projections,
gamma, an output projection) and how the softmax is scaled. The replacement takes over the
original's parameters, buffers and children (the same objects, under the same names, in the
same order), its hooks and its public attributes, so ``state_dict`` keys and values are
unchanged and an optimizer built before keeps working.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch
from torch import nn

from danet_kernels.functional import position_attention
from danet_kernels.modules import channel_attention_residual, position_attention_residual

__all__ = ["ChannelReading", "FusedChannelAttention", "FusedPositionAttention", "PositionReading", "Reading",
           "replacement"]

# what nn.Module.__init__ sets up: the containers are copied, the hook dicts shared (so that a
# hook's RemovableHandle still removes it), ``training`` copied
_MODULE_STATE = tuple(nn.Module().__dict__)
_COPIED_CONTAINERS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


@dataclasses.dataclass(frozen=True)
class PositionReading:
    """Which children of a position (or non-local) attention module play which part."""

    query: str
    key: str
    value: str
    gamma: tuple[str, ...] | None  # ("gamma",) or ("gamma", "scale"); None for non-local blocks
    output: str | None = None  # non-local: the projection applied to the attention before "+ x"
    scale: float | None = None  # softmax(scale * q^T k); None: 1
    returns_attention_map: bool = False  # the original returns (out, map): the fused (out, None)

    @property
    def kind(self) -> str:
        return "position attention" if self.output is None else "non-local attention"

    def describe(self) -> str:
        parts = [f"query={self.query}", f"key={self.key}", f"value={self.value}"]
        if self.output is not None:
            parts.append(f"output={self.output}")
        if self.gamma is not None:
            parts.append("gamma=" + ".".join(self.gamma))
        if self.scale is not None:
            parts.append(f"scale={self.scale:.6g}")
        if self.returns_attention_map:
            parts.append("attention map -> None")
        return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class ChannelReading:
    """Where a channel attention module keeps its gamma."""

    gamma: tuple[str, ...]
    kind = "channel attention"

    def describe(self) -> str:
        return "gamma=" + ".".join(self.gamma)


Reading = PositionReading | ChannelReading


class _Adopted(nn.Module):
    """A module that takes over another's parameters, buffers, children, hooks and attributes."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        state = original.__dict__
        for name in _MODULE_STATE:
            if name not in state:
                continue
            value = state[name]
            if name in _COPIED_CONTAINERS:
                value = set(value) if isinstance(value, set) else OrderedDict(value)
            object.__setattr__(self, name, value)
        for name, value in state.items():  # plain public attributes: in_channels, chanel_in, mode, ...
            if not name.startswith("_") and name not in _MODULE_STATE and name != "forward":
                object.__setattr__(self, name, value)
        # state_dict metadata and _load_from_state_dict see the original's version
        object.__setattr__(self, "_version", getattr(original, "_version", 1))
        object.__setattr__(self, "_fused_from", type(original).__qualname__)

    def _parameter_at(self, path: tuple[str, ...]) -> torch.Tensor:
        owner: nn.Module = self
        for name in path[:-1]:
            owner = getattr(owner, name)
        return getattr(owner, path[-1])


def _check_4d(x: torch.Tensor, what: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{what} (fused by danet_kernels.convert) expects (B, C, H, W), got shape "
                         f"{tuple(x.shape)}")


class FusedPositionAttention(_Adopted):
    """Position or non-local attention, fused: what :func:`convert` puts in place of such a module.

    Holds the original's own projections (and gamma, or output projection) under their original
    names; ``forward(x)`` runs them and :func:`danet_kernels.position_attention`, never forming
    the N x N attention matrix.
    """

    def __init__(self, original: nn.Module, reading: PositionReading) -> None:
        super().__init__(original)
        object.__setattr__(self, "_fused_reading", reading)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, None]:
        """``gamma * attention + x`` (DANet, SAGAN) or ``x + output(attention)`` (non-local)."""
        _check_4d(x, self._fused_from)
        reading = self._fused_reading
        b, _, h, w = x.shape
        q = getattr(self, reading.query)(x).flatten(2)
        k = getattr(self, reading.key)(x).flatten(2)
        v = getattr(self, reading.value)(x).flatten(2)
        if reading.output is None:
            gamma = self._parameter_at(reading.gamma)
            out = position_attention_residual(q, k, v, gamma, x.flatten(2), reading.scale).reshape(x.shape)
        else:
            attention = position_attention(q, k, v, scale=reading.scale).reshape(b, -1, h, w)
            out = x + getattr(self, reading.output)(attention)
        return (out, None) if reading.returns_attention_map else out

    def extra_repr(self) -> str:
        reading = self._fused_reading
        return f"fused {reading.kind} from {self._fused_from}: {reading.describe()}"


class FusedChannelAttention(_Adopted):
    """Channel attention, fused: what :func:`convert` puts in place of a CAM module.

    ``forward(x)`` is :func:`danet_kernels.channel_attention` with the original's gamma (its
    C x C energy in fp32).
    """

    def __init__(self, original: nn.Module, reading: ChannelReading) -> None:
        super().__init__(original)
        object.__setattr__(self, "_fused_reading", reading)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``gamma * softmax(rowmax(E) - E) x + x`` for x of shape (B, C, H, W), ``E = x x^T``."""
        _check_4d(x, self._fused_from)
        gamma = self._parameter_at(self._fused_reading.gamma)
        return channel_attention_residual(x.flatten(2), gamma).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"fused channel attention from {self._fused_from}: {self._fused_reading.describe()}"


def replacement(module: nn.Module, reading: Reading) -> nn.Module:
    """The fused module that takes ``module``'s place, as ``reading`` says."""
    if isinstance(reading, ChannelReading):
        return FusedChannelAttention(module, reading)
    return FusedPositionAttention(module, reading)


