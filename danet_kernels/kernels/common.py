"""What the Triton kernels of both ops share: the fp32 dot precision that follows torch, and a
fix that lets triton 3.6's interpreter run loops whose bounds are kernel arguments."""

from __future__ import annotations

import torch

from danet_kernels._dispatch import triton_interpreting

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


def _fix_interpreter_scalar_index() -> None:
    """Let triton 3.6's interpreter use scalar tensors as ``range()`` bounds with numpy >= 2.4.

    The interpreter holds every scalar (a kernel argument, ``program_id`` and anything computed
    from them) as a one-element numpy array, and converts a loop bound with ``int(array)``,
    which numpy 2.4 refuses for arrays of one dimension: every ``for i in range(0, N, BLOCK)``
    over a runtime N fails ("only 0-dimensional arrays can be converted to Python scalars"),
    kernel argument or not. Triton 3.7 converts with ``int(array.squeeze())``; this installs
    the same conversion into 3.6's interpreter, wrapping the function that patches tl.tensor
    for each interpreted launch. Compiled kernels are not concerned.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_danet_scalar_index", False):
        return

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._danet_scalar_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def _needs_interpreter_fix() -> bool:
    import triton

    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return (major, minor) < (3, 7)


if triton_interpreting() and _needs_interpreter_fix():
    _fix_interpreter_scalar_index()
