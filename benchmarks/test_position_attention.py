"""Position attention (PAM): the bmm reference against danet_kernels and SDPA, side by side.

Run ``pytest benchmarks/test_position_attention.py --benchmark-only``. Each group of the
output is one problem (pass, variant, shape); its rows are the implementations:

* ``reference``: ``danet_kernels.reference.position_attention_reference``, the original
  module's two bmm calls around a softmax (materialises the N x N attention);
* ``triton`` (CUDA only): ``position_attention(..., backend="triton")``, the fused kernels;
* ``blockwise``: ``position_attention(..., backend="torch")``, the same algorithm in tiles of
  plain PyTorch;
* ``sdpa``: ``F.scaled_dot_product_attention(q, k, v, scale=1.0)`` on (B, 1, N, d) contiguous
  tensors (layout changes made before timing), with the math backend excluded since it is
  the reference's algorithm; skipped with PyTorch's reason where no fused backend takes
  a value dim (C) that differs from the query dim (d).

Inputs follow the peer baseline: random normal, q and k scaled by 1/8 so that the energies
are O(1). Every implementation computes the plain attention output, without DANet's
``gamma * out + x`` epilogue.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

from benchmarks.harness import (
    DEVICE,
    ON_CUDA,
    PASSES,
    VARIANTS,
    AttentionShape,
    Variant,
    attention_shapes,
    describe_case,
    error_vs_float64,
    make_step,
    pam_inputs,
    run_benchmark,
    skip_case,
)
from danet_kernels import position_attention
from danet_kernels.reference import position_attention_reference

# Above this N the float64 check uses the blockwise backend, which never holds the
# N x N matrix (the float64 reference at N = 32768, B = 2 would need ~70 GB).
REFERENCE_CHECK_MAX_N = 16384
# Fused SDPA backends only: the math backend is the reference's algorithm again.
SDPA_FUSED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
# What SDPA raises when no allowed backend takes the operands (PyTorch's words).
SDPA_REFUSALS = ("No available kernel", "No viable backend")


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel(SDPA_FUSED_BACKENDS):
        return scaled_dot_product_attention(q, k, v, scale=1.0)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _to_sdpa_layout(t: torch.Tensor) -> torch.Tensor:
    """(B, channels, N) -> contiguous (B, 1, N, channels): one head, the positions as the sequence."""
    return t.transpose(1, 2).unsqueeze(1).contiguous()


def _from_sdpa_layout(t: torch.Tensor) -> torch.Tensor:
    """(B, 1, N, channels) -> (B, channels, N): the inverse of :func:`_to_sdpa_layout`."""
    return t.squeeze(1).transpose(1, 2)


@dataclass(frozen=True)
class PamImpl:
    """One implementation of PAM and the layout of its operands."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    to_native: Callable[[torch.Tensor], torch.Tensor] = _identity
    to_canonical: Callable[[torch.Tensor], torch.Tensor] = _identity


IMPLS = [
    PamImpl("reference", position_attention_reference),
    *([PamImpl("triton", lambda q, k, v: position_attention(q, k, v, backend="triton"))] if ON_CUDA else []),
    PamImpl("blockwise", lambda q, k, v: position_attention(q, k, v, backend="torch")),
    PamImpl("sdpa", _sdpa, _to_sdpa_layout, _from_sdpa_layout),
]


def _sdpa_refusal(inputs: list[torch.Tensor]) -> str | None:
    """Why no fused SDPA backend runs these operands (PyTorch's own words), or None if one does."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.no_grad():
                _sdpa(*inputs)
        except RuntimeError as exc:
            if not any(m in str(exc) for m in SDPA_REFUSALS):
                raise
            # PyTorch explains the refusal in warnings; keep the ones that say something.
            messages = (str(w.message).split(" (Triggered")[0] for w in caught)
            why = "; ".join(dict.fromkeys(m for m in messages if not m.endswith(":")))
            return f"SDPA: no fused kernel takes this shape on {DEVICE.type}" + (f": {why}" if why else "")
    return None


def _exact_pam(n: int) -> Callable[..., torch.Tensor]:
    if n <= REFERENCE_CHECK_MAX_N:
        return position_attention_reference
    return lambda q, k, v: position_attention(q, k, v, backend="torch")


# Shapes outermost, implementations innermost: a run cut short by --bench-deadline keeps whole
# groups (every implementation of a problem) of the shapes it reached.
@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i.name)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("shape", attention_shapes(), ids=lambda s: s.id)
def test_pam(benchmark, impl: PamImpl, pass_: str, variant: Variant, shape: AttentionShape) -> None:
    """Time one PAM forward or forward+backward; record peak memory, FLOPs and the float64 error."""
    describe_case(benchmark, "pam", impl.name, pass_, variant, shape)
    torch.manual_seed(0)
    q, k, v, grad_out = pam_inputs(shape, variant.dtype)
    backward = pass_ != "forward"
    native = [impl.to_native(t).requires_grad_(backward) for t in (q, k, v)]
    native_grad_out = impl.to_native(grad_out)
    if impl.name == "sdpa" and (reason := _sdpa_refusal(native)) is not None:
        skip_case(benchmark, reason)
    with variant.active():
        run_benchmark(
            benchmark,
            make_step(impl.fn, native, pass_, native_grad_out),
            check=lambda: error_vs_float64(
                impl.fn, native, native_grad_out, pass_, _exact_pam(shape.n), (q, k, v), grad_out,
                impl.to_canonical,
            ),
        )
