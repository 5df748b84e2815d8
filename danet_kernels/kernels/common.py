"""What the Triton kernels of both ops share: whether they run under the interpreter, log2(e),
the fp32 dot precision that follows torch, the operand classes their tile lists are chosen by,
how their torch.library ops are defined, the row alignment and size buckets of their launchers,
their in-image int64 offsets, the SMs a launch fills (:func:`device_sms`), and the performance
model of a Hopper SM that their autotuners (and the compile report) weigh work by."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from danet_kernels._dispatch import triton_interpreting
from danet_kernels.kernels.interpreter_compat import squeeze_scalar_index

__all__ = [
    "ALIGN",
    "CALIBRATION",
    "DOT_PRECISIONS",
    "FAKE_KERNELS",
    "FLOPS_PER_CLOCK",
    "H100_CLOCK_HZ",
    "H100_SMS",
    "INTERPRETING",
    "LOG2E",
    "MATMUL_LEVEL_PRECISIONS",
    "MAX_SHARED_BYTES",
    "OPERAND_CLASSES",
    "Calibration",
    "LoopCost",
    "aligned_rows",
    "define_op",
    "device_sms",
    "dot_input_precision",
    "is_aligned",
    "launch_clocks",
    "offsets_2d",
    "operand_class",
    "padded_length",
    "padded_rows",
    "resident_programs",
    "size_bucket",
]

# tl.dot's input_precision values the kernels use, from the most to the least exact. All three
# are accepted by tl.dot for NVIDIA GPUs and by the interpreter in triton 3.6 to 3.9.
DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")
# torch's float32 matmul precision level -> the fp32 dots' input_precision (dot_input_precision).
MATMUL_LEVEL_PRECISIONS = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}
# Read once at import, like Triton itself: TRITON_INTERPRET must be set before triton is imported.
INTERPRETING = triton_interpreting()
if INTERPRETING:
    squeeze_scalar_index()  # loop bounds under Triton 3.6's interpreter with numpy >= 2.4
# exp(x) = exp2(x log2(e)): exp2 is the native instruction (MUFU ex2), so the kernels work in base 2.
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


# op name -> the function that allocates its outputs only, for every op define_op defines: what
# fake-tensor tracing of a whole training step (danet.training.step) answers the ops with.
FAKE_KERNELS: dict[str, Callable[..., Any]] = {}


def define_op(name: str, fake: Callable[..., Any]) -> Callable[[Callable[..., Any]], Any]:
    """A decorator defining the ``danet_kernels::`` op ``name`` whose implementation launches our
    Triton kernels. On a GPU it is a ``torch.library.triton_op``: torch.compile traces through it
    and sees the kernels (Inductor schedules them like its own; the function doubles as the fake
    implementation, its launches captured by ``wrap_triton``). Under TRITON_INTERPRET=1 the kernels
    are plain Python functions that read real memory, which fake-tensor tracing would execute on
    fake data (and AOT's decomposition of a triton_op would drop): there the op is an opaque
    ``custom_op`` whose ``fake`` only allocates the outputs, one node to torch.compile. Either
    way ``fake`` is recorded in :data:`FAKE_KERNELS`."""
    FAKE_KERNELS[name] = fake

    def define(fn: Callable[..., Any]) -> Any:
        if not INTERPRETING:
            return torch.library.triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fake)
        return op

    return define


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
    return MATMUL_LEVEL_PRECISIONS.get(level, "ieee")


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


def is_aligned(t: torch.Tensor) -> bool:
    """Whether a launch specialises ``t`` for the fast path: its first element 16-byte aligned
    (torch's allocators align storages to at least 64 bytes) and every stride of an axis longer
    than 1 either 1 or a multiple of 16 elements."""
    strides = (stride for size, stride in zip(t.shape, t.stride(), strict=True) if size > 1)
    return (t.storage_offset() * t.element_size()) % ALIGN == 0 and all(
        stride == 1 or stride % ALIGN == 0 for stride in strides)


def padded_rows(t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """A contiguous copy of ``t`` (..., L) whose last axis is :func:`padded_length` long, the tail
    holding ``fill``: one read of t and one write of the copy."""
    padded = t.new_full((*t.shape[:-1], padded_length(t.shape[-1])), fill)
    padded[..., : t.shape[-1]].copy_(t)
    return padded


def aligned_rows(t: torch.Tensor, fill: float = 0.0, unit_stride: bool = False) -> torch.Tensor:
    """``t`` itself where its rows are what the pipelined loads need (:func:`is_aligned`, the last
    axis a multiple of 16 long and, with ``unit_stride``, of stride 1), else :func:`padded_rows`.
    Without the copy a row length like DANet's 97 x 97 = 9409, or an odd storage offset, leaves
    rows unaligned: the kernels compile to synchronous scalar loads, and spill."""
    keep = (t.shape[-1] % ALIGN == 0 and is_aligned(t)
            and (not unit_stride or t.stride(-1) == 1))
    return t if keep else padded_rows(t, fill)


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
# The performance model of a Hopper SM (H100 SXM, dense): what one iteration of a kernel's main
# loop costs, how loops share an SM, how launches fill the GPU. The autotuners rank their configs
# by it (estimating the loop's instructions from the tiles); the compile report evaluates it on
# the compiled loop (its PTX) and calibrates it against published H100 measurements of Triton's
# fused-attention tutorial kernel, compiled by the same instrument (docs/compile_report.md,
# "Calibration"). Its constants come from that calibration; nothing asserts a time from it.
# ----------------------------------------------------------------------------------------------
# Tensor-core (or, for "ieee", FMA) FLOPs per clock per operand class: 16-bit operands, fp32 at
# "tf32", at "tf32x3" (three TF32 products per dot) and at "ieee" (128 fp32 FMAs).
FLOPS_PER_CLOCK = {"16-bit": 4096, "tf32": 2048, "tf32x3": 2048 / 3, "ieee": 256}
OPERAND_CLASSES = tuple(FLOPS_PER_CLOCK)  # what operand_class returns, each with a tile list per kernel
H100_SMS = 132
H100_CLOCK_HZ = 1.83e9  # 989 TFLOP/s of dense bf16 over 132 SMs x 4096 FLOPs per clock
MAX_SHARED_BYTES = 227 * 1024  # what one sm_90 block may use
# An sm_90 SM: 64K 32-bit registers (allocated per warp in units of 256), 64 resident warps, 32
# resident blocks, 228 KiB of shared memory (1 KiB of it reserved per block); 4 schedulers, each
# issuing one warp-instruction per clock.
SM_REGISTERS, SM_WARPS, SM_BLOCKS, SM_SHARED, BLOCK_RESERVED_SHARED = 65536, 64, 32, 228 * 1024, 1024
ISSUE_PER_CLOCK = 4
MUFU_CLOCKS = 8  # clocks a warp's ex2 holds its scheduler's quarter of the MUFU pipe
# Assumptions, not calibrated: L2's bandwidth into one SM (about 7.7 TB/s over 132 SMs) and the
# latency of an L2 load under load, which a loop's num_stages - 1 iterations in flight must cover.
L2_BYTES_PER_CLOCK = 32
L2_LATENCY_CLOCKS = 600


@dataclass(frozen=True)
class Calibration:
    """The model's fitted constants: the fraction of the tensor cores' peak an MMA phase reaches;
    the clocks a warp's instruction takes to issue, dependencies included (per scheduler); the
    clocks a loop pays each time it waits for all its MMAs (the tensor pipe drains, the warps
    resynchronise); the clocks a program spends outside its main loop (prologue, pipeline fill,
    epilogue); and ``error``, the largest relative error of the model's throughput against the
    published figures it was fitted on, which every prediction carries."""

    mma_efficiency: float
    clocks_per_instruction: float
    mma_wait_clocks: float
    program_clocks: float
    error: float


# Fitted by benchmarks/compile_calibration.py (docs/compile_report.md, "Calibration").
CALIBRATION = Calibration(mma_efficiency=0.7, clocks_per_instruction=1.0, mma_wait_clocks=1000.0,
                          program_clocks=8000.0, error=0.13)


@dataclass(frozen=True)
class LoopCost:
    """One iteration of a program's main loop: its tensor-core (or FMA) FLOPs, its other
    instructions and its ex2 per thread, its operand bytes from L2, and whether the loop waits for
    its MMAs before the other work (``wgmma.wait_group 0`` ahead of the softmax: the phases add
    up) or lets them run under it (they overlap)."""

    flops: float
    instructions: float
    exp2: float
    bytes: float
    serial: bool = True


def resident_programs(registers: int, num_warps: int, shared: int) -> int:
    """How many programs of a kernel one SM holds at a time (at least 1: a launch that cannot fit
    fails elsewhere)."""
    per_warp = -(-registers * 32 // 256) * 256
    fits = min(SM_REGISTERS // (per_warp * num_warps), SM_WARPS // num_warps, SM_BLOCKS,
               SM_SHARED // (shared + BLOCK_RESERVED_SHARED))
    return max(1, fits)


def _round_clocks(loop: LoopCost, programs: int, num_warps: int, operand_class: str, num_stages: int,
                  calibration: Calibration) -> float:
    """Clocks for ``programs`` programs sharing an SM to run one iteration each. A program's
    instructions issue from the SM's 4 schedulers, its warps sharing them (an ex2 holds its
    scheduler's quarter of the MUFU pipe 8 clocks: 16 per clock per SM); its MMAs run at the
    calibrated fraction of the tensor cores' peak. When the loop waits for all its MMAs before the
    rest (serial), one program's iteration takes its MMA phase, the wait and its other work in
    turn; otherwise the longer of the two. Co-resident programs fill each other's gaps, so a round
    takes at least that, the tensor cores' and the schedulers' total work and the L2 traffic, and
    at least the L2 latency spread over the loads in flight (num_stages - 1 iterations)."""
    tensor = loop.flops / (FLOPS_PER_CLOCK[operand_class] * calibration.mma_efficiency)
    issue = (calibration.clocks_per_instruction * max(1.0, num_warps / ISSUE_PER_CLOCK)
             * (loop.instructions + (MUFU_CLOCKS - 1) * loop.exp2))
    own = tensor + calibration.mma_wait_clocks + issue if loop.serial else max(tensor, issue)
    traffic = programs * loop.bytes / L2_BYTES_PER_CLOCK
    clocks = max(own, programs * tensor, programs * issue, traffic)
    if num_stages <= 1:
        return clocks + L2_LATENCY_CLOCKS
    return max(clocks, (L2_LATENCY_CLOCKS + traffic) / (num_stages - 1))


def launch_clocks(programs: int, iterations: float, loop: LoopCost, num_warps: int, num_stages: int,
                  resident: int, operand_class: str, sms: int = H100_SMS,
                  calibration: Calibration = CALIBRATION) -> float:
    """Clocks of a launch of ``programs`` programs of ``iterations`` loop iterations each: the
    busiest SM runs ceil(programs / sms) of them, ``resident`` at a time, each group paying the
    program's fixed cost and its iterations at the group's round time (a last, partial group at
    its own)."""
    full, rest = divmod(math.ceil(programs / sms), resident)
    clocks = 0.0
    for group, count in ((resident, full), (rest, 1 if rest else 0)):
        if count:
            round_clocks = _round_clocks(loop, group, num_warps, operand_class, num_stages, calibration)
            clocks += count * (calibration.program_clocks + iterations * round_clocks)
    return clocks


def device_sms(device: torch.device, interpreter_sms: int = H100_SMS) -> int:
    """The SMs a launch on ``device`` fills: the GPU's own count on CUDA; ``interpreter_sms``
    under the Triton interpreter (which has no SMs: the launchers pass what their small test
    shapes need); an H100's otherwise (the compile report's launches on the CPU)."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return interpreter_sms if INTERPRETING else H100_SMS


@functools.cache
def _cuda_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
