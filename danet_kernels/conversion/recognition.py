"""Readings of a module from its structure: which children are the query, key and value
projections, where gamma is, how the softmax is scaled (:mod:`danet_kernels.convert`, "Recognising").

Each ``*_readings`` function returns None when the module does not look like that kind of
attention, a reason (str) when it does but cannot be fused, else the readings to verify.
"""

from __future__ import annotations

import inspect
import itertools
import re

from torch import nn

from danet_kernels.conversion.replacements import (
    ChannelReading,
    FusedChannelAttention,
    FusedPositionAttention,
    PositionReading,
    Reading,
)
from danet_kernels.modules import CAM_Module, PAM_Module

__all__ = ["forward_takes_x_alone", "probe_channels", "readings_of"]

# a few words per role; a child's name is split at underscores and other non-letters
_ROLE_WORDS = {"query": ("query", "q", "theta"), "key": ("key", "k", "phi"), "value": ("value", "v", "g")}
_NONLOCAL_OUTPUTS = ("conv_out", "W")
_NONLOCAL_PROJECTIONS = ("theta", "phi", "g")
_PROBE_CHANNELS_ANY = 8  # the verification's C for channel attention, which works at any C


def _scalar_gamma(module: nn.Module) -> tuple[str, ...] | None:
    """Where the module keeps a one-element ``gamma``: its own parameter, or a Scale-like child's."""
    own = module._parameters.get("gamma")
    if own is not None:
        return ("gamma",) if own.numel() == 1 else None
    child = module._modules.get("gamma")
    if child is None or list(child.children()) or list(child.buffers()):
        return None
    params = list(child.named_parameters())
    if len(params) == 1 and params[0][1].numel() == 1:
        return ("gamma", params[0][0])
    return None


def _role(name: str) -> str | None:
    """The role a child's name claims (query, key or value), or None when it claims none or several."""
    words = set(re.split(r"[^a-z0-9]+", name.lower().replace("_", " ")))
    claimed = [role for role, role_words in _ROLE_WORDS.items() if words & set(role_words)]
    return claimed[0] if len(claimed) == 1 else None


def _order_by_names(names: list[str]) -> tuple[str, str, str] | None:
    """(query, key, value) when the three names claim the three roles, one each; else None."""
    by_role = {_role(name): name for name in names}
    if set(by_role) != {"query", "key", "value"}:
        return None
    return by_role["query"], by_role["key"], by_role["value"]


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding in ((0, 0), "valid"))


def _check_other_children(module: nn.Module, used: set[str]) -> str | None:
    """A reason when a child outside the attention's parts could change what the module computes."""
    for name, child in module.named_children():
        if name in used:
            continue
        if isinstance(child, nn.Softmax):
            if child.dim not in (-1, 2):
                return f"its softmax {name!r} runs over dim {child.dim}, not over the keys (dim -1)"
        elif not isinstance(child, nn.Identity):
            return f"its child {name!r} ({type(child).__name__}) is not part of the attention"
    return None


def _check_no_other_tensors(module: nn.Module, gamma: tuple[str, ...] | None) -> str | None:
    extra = [n for n in module._parameters if gamma is None or n != gamma[0]] + list(module._buffers)
    if extra:
        return f"it holds tensors outside the attention's parts ({', '.join(extra)})"
    return None


def _position_readings(module: nn.Module) -> list[Reading] | str | None:
    """Readings of a DANet / SAGAN / mmseg PAM; None when the module does not look like one."""
    gamma = _scalar_gamma(module)
    convs = {n: c for n, c in module.named_children() if isinstance(c, nn.Conv2d)}
    if gamma is None or len(convs) != 3:
        return None
    why_not = (_check_other_children(module, {*convs, gamma[0]})
               or _check_no_other_tensors(module, gamma))
    if why_not:
        return why_not
    for name, conv in convs.items():
        if not _is_pointwise(conv):
            return f"its projection {name!r} is not a 1x1 convolution"
    channels = {c.in_channels for c in convs.values()}
    if len(channels) != 1:
        return "its three projections read different numbers of channels"
    (c_in,) = channels
    named = _order_by_names(list(convs))
    orders = [named] if named else list(itertools.permutations(convs))
    fitting = [(q, k, v) for q, k, v in orders
               if convs[v].out_channels == c_in and convs[q].out_channels == convs[k].out_channels]
    if not fitting:
        return ("no projection keeps the input's channels for the value, or the query and key "
                "widths differ")
    scale = None
    if getattr(module, "matmul_norm", False):  # mmseg's SelfAttentionBlock: softmax(q^T k / sqrt(d))
        scale = convs[fitting[0][0]].out_channels ** -0.5
    return [PositionReading(q, k, v, gamma, scale=scale) for q, k, v in fitting]


def _first_conv(module: nn.Module) -> nn.Conv2d | None:
    return next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)


def _nonlocal_readings(module: nn.Module) -> list[Reading] | str | None:
    """Readings of an embedded-Gaussian non-local block (mmcv NonLocal2d); None when not one."""
    children = dict(module.named_children())
    output = next((name for name in _NONLOCAL_OUTPUTS if name in children), None)
    if output is None or not all(name in children for name in _NONLOCAL_PROJECTIONS) \
            or _scalar_gamma(module) is not None:
        return None
    mode = getattr(module, "mode", "embedded_gaussian")
    if mode != "embedded_gaussian":
        return f"its non-local mode {mode!r} is not softmax attention (only 'embedded_gaussian' is)"
    why_not = (_check_other_children(module, {*_NONLOCAL_PROJECTIONS, output})
               or _check_no_other_tensors(module, None))
    if why_not:
        return why_not
    theta = _first_conv(children["theta"])
    if theta is None:
        return "its theta projection has no convolution"
    width = getattr(module, "inter_channels", theta.out_channels)
    use_scale = getattr(module, "use_scale", None)  # mmcv's flag; without one, let verification tell
    if use_scale is None:
        scales = [None, width ** -0.5]
    else:
        scales = [width ** -0.5 if use_scale else None]
    return [PositionReading("theta", "phi", "g", None, output=output, scale=s) for s in scales]


def _channel_readings(module: nn.Module) -> list[Reading] | str | None:
    """The reading of a CAM: a scalar gamma and nothing else with weights; None when not one."""
    gamma = _scalar_gamma(module)
    if gamma is None:
        return None
    weighted = [n for n, c in module.named_children() if n != gamma[0] and
                (any(True for _ in c.parameters()) or any(True for _ in c.buffers()))]
    if weighted or _check_no_other_tensors(module, gamma):
        return None
    why_not = _check_other_children(module, {gamma[0]})
    return why_not or [ChannelReading(gamma)]


def forward_takes_x_alone(module: nn.Module) -> str | None:
    """None when ``module.forward`` takes one positional input, as the fused modules do; else why not."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(params) == 1 and params[0].kind in positional:
        return None
    shown = ", ".join(p.name for p in params)
    return f"its forward takes ({shown}); the fused module takes one (B, C, H, W) tensor"


def probe_channels(module: nn.Module, reading: Reading) -> int:
    """The channels C of an input ``module`` accepts (verification's probe input)."""
    if isinstance(reading, ChannelReading):
        return _PROBE_CHANNELS_ANY
    return _first_conv(getattr(module, reading.query)).in_channels



def readings_of(module: nn.Module) -> list[Reading] | str | None:
    """The readings to verify for ``module``; a reason when it looks like attention but cannot be
    fused (or is fused already); None when it does not look like attention."""
    if isinstance(module, (PAM_Module, CAM_Module, FusedPositionAttention, FusedChannelAttention)):
        return "it is fused already"
    for propose in (_position_readings, _nonlocal_readings, _channel_readings):
        found = propose(module)
        if found is not None:
            return found
    return None


