"""The errors each fp32 dot precision will give on a GPU, measured on the CPU by emulation.

The Triton interpreter computes every ``tl.dot`` in full fp32 whatever ``input_precision`` asks,
so the CPU tests cannot see what TF32 costs. This script emulates the three precisions that
:func:`danet_kernels.kernels.common.dot_input_precision` picks, matmul by matmul, the way the
tensor cores evaluate them, and runs the reference formulas of both ops (forward, and the
backward through autograd, every matmul of it emulated too) against float64:

* ``ieee``: fp32 operands, fp32 products and sums (the FMA path);
* ``tf32``: each operand rounded to TF32 (10 mantissa bits, round-to-nearest-away as the
  hardware's ``cvt.rna.tf32.f32``); the 11 x 11-bit products are exact in fp32, sums in fp32;
* ``tf32x3``: each operand split as hi = tf32(a), lo = tf32(a - hi); a b ~ hi hi + hi lo + lo hi
  (Triton's 3xTF32: the lo lo term, ~2^-22 relative, is dropped).

The tensor cores' own accumulation order and rounding differ from the CPU's fp32 matmul, so
these are expectations, not measurements; the GPU check measures the real thing.

Usage::

    python scripts/fp32_precision_errors.py           # DANet's shapes, a markdown table
    python scripts/fp32_precision_errors.py --small   # the CI test's shapes
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch

from danet_kernels.kernels.common import DOT_PRECISIONS
from danet_kernels.reference import channel_attention_reference, position_attention_reference


def round_to_tf32(a: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest TF32 value (ties away from zero), still stored as fp32."""
    bits = a.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def emulated_matmul(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """a @ b (fp32, batched) as a tensor-core dot at ``mode`` evaluates it."""
    if mode == "ieee":
        return a @ b
    a_hi, b_hi = round_to_tf32(a), round_to_tf32(b)
    if mode == "tf32":
        return a_hi @ b_hi
    if mode == "tf32x3":
        a_lo, b_lo = round_to_tf32(a - a_hi), round_to_tf32(b - b_hi)
        return (a_hi @ b_lo + a_lo @ b_hi) + a_hi @ b_hi
    raise ValueError(f"unknown mode {mode!r}; expected one of {DOT_PRECISIONS}")


class _EmulatedMatmul(torch.autograd.Function):
    """Matmul whose forward and both backward products are emulated at one precision."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.mode = mode
        return emulated_matmul(a, b, mode)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        return (emulated_matmul(grad, b.transpose(-1, -2), ctx.mode),
                emulated_matmul(a.transpose(-1, -2), grad, ctx.mode), None)


@contextlib.contextmanager
def emulated_bmm(mode: str) -> Iterator[None]:
    """Route ``torch.bmm`` on fp32 through the emulated matmul, so that the reference formulas
    (which call ``torch.bmm``) run as the kernels' dots would; float64 stays exact."""
    exact = torch.bmm

    def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return exact(a, b) if a.dtype == torch.float64 else _EmulatedMatmul.apply(a, b, mode)

    torch.bmm = bmm
    try:
        yield
    finally:
        torch.bmm = exact


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


def _results(fn, inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The output and every input's gradient of ``fn`` on ``inputs`` cast to ``dtype``."""
    leaves = {name: t.detach().to(dtype).requires_grad_() for name, t in inputs.items()}
    out = fn(**leaves)
    out.backward(torch.ones_like(out) + torch.sin(torch.arange(out.numel(), dtype=dtype)).view_as(out))
    return {"out": out.detach(), **{f"d{name}": t.grad for name, t in leaves.items()}}


def _errors(fn, inputs: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per fp32 dot precision, the relative errors (Frobenius) of the output and of every input's
    gradient against float64 (computed once: float64 matmuls are exact in every mode)."""
    exact = _results(fn, inputs, torch.float64)
    errors = {}
    for mode in DOT_PRECISIONS:
        with emulated_bmm(mode):
            found = _results(fn, inputs, torch.float32)
        errors[mode] = {name: _relative(found[name], expected) for name, expected in exact.items()}
    return errors


def channel_attention_errors(channels: int, n: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """CAM (no gamma) on unit-variance features (as after DANet's conv5c + BN + ReLU), per mode."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, n, generator=generator).relu()
    return _errors(channel_attention_reference, {"x": x})


def position_attention_errors(head_dim: int, channels: int, n: int, seed: int = 0
                              ) -> dict[str, dict[str, float]]:
    """PAM (no gamma): q and k of ``head_dim`` channels scaled so the scores have unit spread,
    per mode."""
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, head_dim, n, generator=generator) * head_dim**-0.25 for _ in range(2))
    v = torch.randn(1, channels, n, generator=generator)
    return _errors(position_attention_reference, {"q": q, "k": k, "v": v})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="the CI test's shapes (seconds)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cam_shape = (64, 1024) if args.small else (512, 4096)
    pam_shape = (16, 32, 512) if args.small else (64, 512, 4096)
    print(f"CAM: C = {cam_shape[0]}, N = {cam_shape[1]}; PAM: d = {pam_shape[0]}, C = {pam_shape[1]}, "
          f"N = {pam_shape[2]}; relative error (Frobenius) against float64, emulated matmuls\n")
    print("| op | precision | out | input gradients |")
    print("|---|---|---|---|")
    for op, errors in (("CAM", channel_attention_errors(*cam_shape)),
                       ("PAM", position_attention_errors(*pam_shape))):
        for mode, found in errors.items():
            grads = ", ".join(f"{name} {value:.1e}" for name, value in found.items() if name != "out")
            print(f"| {op} | {mode} | {found['out']:.1e} | {grads} |")


if __name__ == "__main__":
    main()
