"""What the Triton kernels of both ops share: the fp32 dot precision that follows torch."""

from __future__ import annotations

import torch

__all__ = ["dot_input_precision"]


def dot_input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision: for fp32, torch's CUDA matmul setting; 16-bit types ignore it.

    fp32 runs in IEEE fp32 (no tensor cores) by default, as exact as the reference's matmuls, and
    in TF32 where torch allows it (``torch.backends.cuda.matmul.allow_tf32 = True`` or
    ``torch.set_float32_matmul_precision("high")``). torch >= 2.9 keeps the setting in
    ``torch.backends.cuda.matmul.fp32_precision`` ("tf32", "ieee", or "none" when unset), which
    the legacy setters also update; older versions only have the legacy getter.
    """
    if dtype != torch.float32:
        return "tf32"
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision == "none":  # unset (or torch < 2.9): the process-wide setting decides
        generic = getattr(torch.backends, "fp32_precision", "none")
        if generic != "none":
            return "tf32" if generic == "tf32" else "ieee"
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "tf32" if precision == "tf32" else "ieee"
