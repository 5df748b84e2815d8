"""What the Triton kernels of both ops share: the fp32 dot precision that follows torch, the
operand classes their tile lists are chosen by, the row alignment and size buckets of their
launchers, their in-image int64 offsets, the SMs a launch fills (:func:`device_sms`), and the
model of a Hopper SM that their autotuners' perf models (and the compile report) weigh work by."""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from danet_kernels._dispatch import triton_interpreting

__all__ = ["ALIGN", "DOT_PRECISIONS", "EXP2_PER_CLOCK", "FLOPS_PER_CLOCK", "H100_CLOCK_HZ", "H100_SMS",
           "L2_BYTES_PER_CLOCK", "MAX_SHARED_BYTES", "OPERAND_CLASSES", "device_sms", "dot_input_precision",
           "launch_clocks", "offsets_2d", "operand_class", "padded_length", "program_clocks", "size_bucket"]

# tl.dot's input_precision values the kernels use, from the most to the least exact. All three
# are accepted by tl.dot for NVIDIA GPUs and by the interpreter in triton 3.6 to 3.9.
DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")
# Read once at import, like Triton itself: TRITON_INTERPRET must be set before triton is imported.
_INTERPRETING = triton_interpreting()


def _legacy_matmul_precision() -> str | None:
    """``torch.get_float32_matmul_precision()``, or None where torch refuses to answer: after the
    new API set TF32 explicitly, the legacy getter raises ("mix of the legacy and new APIs")."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


def dot_input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for operands of ``dtype``: "ieee", "tf32x3" or "tf32".

    16-bit operands always run on the tensor cores (the value is ignored for them; "tf32").
    fp32 follows torch's float32 matmul precision:

    * "highest" (the default): "ieee", exact fp32 FMAs, as exact as the reference's matmuls;
    * "high": "tf32x3", each operand split into a TF32 high part and a TF32 remainder, three
      tensor-core products (the remainders' product dropped): near-fp32 accuracy at about a
      third of TF32's tensor-core rate;
    * "medium": "tf32", one TF32 product (10 mantissa bits per operand).

    Which setter was used does not matter. ``torch.backends.cuda.matmul.fp32_precision`` (the
    newer API, also set by ``torch.backends.fp32_precision``, by
    ``torch.set_float32_matmul_precision`` and by ``allow_tf32``) says IEEE or TF32; it wins.
    Where it says TF32, the legacy level refines it: "high" (what ``allow_tf32 = True`` and
    ``set_float32_matmul_precision("high")`` give) means 3xTF32, "medium" plain TF32, and an
    explicit ``fp32_precision = "tf32"`` of the new API (whose legacy getter then raises) plain
    TF32, the datatype it names. "none" (unset, or a torch without the new API) leaves the
    choice to the generic ``torch.backends.fp32_precision``, then to the legacy level.
    """
    if dtype != torch.float32:
        return "tf32"
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    if precision == "ieee":
        return "ieee"
    level = _legacy_matmul_precision()
    if precision == "tf32":
        return "tf32x3" if level == "high" else "tf32"
    return {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}.get(level, "ieee")


def operand_class(dtype: torch.dtype, precision: str) -> str:
    """Which tile list (and which rate of :data:`FLOPS_PER_CLOCK`) serves a dot of ``dtype``
    operands at ``precision`` (:func:`dot_input_precision`'s): "16-bit" for fp16 and bf16,
    whatever the precision, else the fp32 precision itself: "tf32", "tf32x3" (both on the
    tensor cores) or "ieee" (FMA)."""
    return "16-bit" if dtype != torch.float32 else precision


# Triton's launcher marks a pointer that is 16-byte aligned and an integer divisible by 16 (the
# divisibility hint); the pipelined, vectorised loads and stores need every row of a (B, *, N)
# tensor to start on such a boundary and its length known to be a multiple of 16. The launchers
# read rows in place where they are, else copy them into buffers of padded_length(N).
ALIGN = 16


def padded_length(n: int) -> int:
    """The N axis as the kernels read (and PAM's write) it: rounded up to a multiple of ALIGN."""
    return triton.cdiv(n, ALIGN) * ALIGN


def size_bucket(n: int) -> int:
    """An autotuning key for a size (N, or the batch): its next power of two, so that a new image
    size reuses the config tuned for its bucket instead of retuning. A symbolic size
    (torch.compile with dynamic shapes) passes unchanged: bit tricks do not apply to SymInts,
    and Inductor tunes user kernels at compile time anyway."""
    return triton.next_power_of_2(n) if isinstance(n, int) else n


@triton.jit
def offsets_2d(rows, stride_rows, cols, stride_cols):
    """Element offsets ``rows[:, None] * stride_rows + cols[None, :] * stride_cols`` of a tile
    inside one image, in int64.

    An image passes 2^31 elements long before a pointer does: CAM's C x N (and C x C, C x 2C)
    matrices, PAM's (C, N) maps at C * N >= 2^31 (C = 512 at N = 4.2M, or any N with C = 2048
    and a channels_last stride of C on the N axis). A row index times its stride would wrap
    silently in int32, so every in-image offset of CAM and of PAM's backward goes through
    here, and PAM's forward's where its launcher finds that one may pass 2^31.
    """
    return rows.to(tl.int64)[:, None] * stride_rows + cols.to(tl.int64)[None, :] * stride_cols


# ----------------------------------------------------------------------------------------------
# A first-principles model of one Hopper SM (H100 SXM, dense), per clock. It ranks configs
# against each other (the autotuners keep its best few to benchmark) and explains the compile
# report; nothing asserts a time from it.
# ----------------------------------------------------------------------------------------------
# Tensor-core (or, for "ieee", FMA) FLOPs per operand class: 16-bit operands, fp32 at "tf32",
# at "tf32x3" (three TF32 products per dot) and at "ieee" (128 fp32 FMAs).
FLOPS_PER_CLOCK = {"16-bit": 4096, "tf32": 2048, "tf32x3": 2048 / 3, "ieee": 256}
OPERAND_CLASSES = tuple(FLOPS_PER_CLOCK)  # what operand_class returns, each with a tile list per kernel
EXP2_PER_CLOCK = 16  # MUFU ex2
L2_BYTES_PER_CLOCK = 32  # about L2's bandwidth into one SM (an assumption: it only ranks configs)
H100_SMS = 132
H100_CLOCK_HZ = 1.83e9  # 989 TFLOP/s of dense bf16 over 132 SMs x 4096 FLOPs per clock
MAX_SHARED_BYTES = 227 * 1024  # what one sm_90 block may use


def program_clocks(flops: float, exp2: float, operand_bytes: float, operand_class: str) -> float:
    """Clocks one program takes on an SM of its own: the longest of its tensor-core (or FMA)
    work, its exp2 and its operand traffic from L2, which overlap."""
    return max(flops / FLOPS_PER_CLOCK[operand_class], exp2 / EXP2_PER_CLOCK,
               operand_bytes / L2_BYTES_PER_CLOCK)


def launch_clocks(programs: int, per_program: float, sms: int = H100_SMS) -> float:
    """Clocks a launch of ``programs`` equal programs takes on ``sms`` SMs: the busiest SM runs
    ``ceil(programs / sms)`` of them. Programs resident together on one SM share its rates, so
    residency changes no time here (it hides latency, which the model leaves out)."""
    return math.ceil(programs / sms) * per_program


def device_sms(device: torch.device, interpreter_sms: int = H100_SMS) -> int:
    """The SMs a launch on ``device`` fills: the GPU's own count on CUDA; ``interpreter_sms``
    under the Triton interpreter (which has no SMs: the launchers pass what their small test
    shapes need); an H100's otherwise (the compile report's launches on the CPU)."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return interpreter_sms if _INTERPRETING else H100_SMS


@functools.cache
def _cuda_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
