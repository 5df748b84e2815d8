"""Shared machinery of the benchmark suite: the case grid, inputs, timing, peak memory, OOM handling.

The one-call GPU check (``scripts/gpu_check``) measures with the same helpers: the inputs
(:func:`pam_inputs`, :func:`cam_inputs`), the SDPA layout (:func:`to_sdpa_layout`) and its
refusal (:func:`is_sdpa_refusal`), :func:`peak_memory_bytes`, :func:`median_ms`
(``triton.testing.do_bench``), :func:`median_step_ms` (CUDA events over a fixed number of long
steps), :func:`timed` (a first call), :func:`is_oom` and :func:`package_version`.

Every benchmark test builds its inputs, hands a step (one forward, or one forward+backward)
to :func:`run_benchmark`, and gets back timing from pytest-benchmark plus the facts the
report needs in ``benchmark.extra_info``:

* ``peak_mem_bytes``: the peak memory one step allocates above what existed before it
  (the inputs and the output gradient), measured once, outside the timed rounds. On CUDA
  that is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on the
  CPU it is the running sum of the CPU allocator's allocation and free events recorded by
  ``torch.profiler`` with ``profile_memory=True`` (tracemalloc does not see torch's
  allocator, and the process RSS mixes in the interpreter and freed-but-cached pages).
  ``peak_mem_method`` names the method; ``None`` where none worked.
* ``flops``: the operation count of one step (see :func:`pam_flops`, :func:`cam_flops`).
* ``oom``: whether the case ran out of memory. Such cases are skipped with a reason that
  starts with "OOM" and are listed, with every other case that could not run, in the JSON
  output under ``"danet_not_run"`` (see ``benchmarks/conftest.py``), because
  pytest-benchmark itself drops skipped tests from its JSON.

On CUDA each timed round is bracketed by ``torch.cuda.synchronize()`` (the setup syncs
before the round, the target after its work), so a round's wall time is the GPU time.
"""

from __future__ import annotations

import gc
import importlib.metadata
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch

__all__ = [
    "DEVICE",
    "DTYPES",
    "NOT_RUN",
    "ON_CUDA",
    "PASSES",
    "AttentionShape",
    "attention_shapes",
    "cam_flops",
    "cam_inputs",
    "dtype_name",
    "error_vs_float64",
    "free_memory",
    "from_sdpa_layout",
    "identity",
    "is_oom",
    "is_sdpa_refusal",
    "largest_batch",
    "make_step",
    "max_rel_err",
    "median_ms",
    "median_step_ms",
    "package_version",
    "pam_flops",
    "pam_inputs",
    "peak_memory_bytes",
    "quick_mode",
    "record_not_run",
    "run_benchmark",
    "skip_case",
    "synchronize",
    "timed",
    "to_sdpa_layout",
]

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")

PASSES = ("forward", "forward+backward")
# Half precision on the CPU is emulated and not what anyone would deploy there.
DTYPES = (torch.float32, torch.bfloat16, torch.float16) if ON_CUDA else (torch.float32,)

# FLOP convention (stated in the report): a backward pass of an attention costs 2.5x its
# forward in FlashAttention's accounting (two matmuls for dV/dP, two for dQ/dK, plus the
# recomputed QK^T of a fused kernel), so forward+backward counts 3.5x the forward FLOPs.
# CAM's backward has no recomputation: four C x C x N matmuls, twice the forward.
PAM_BACKWARD_FACTOR = 2.5
CAM_BACKWARD_FACTOR = 2.0

# Cases that could not run (OOM, no SDPA kernel for the shape, ...): one dict per case,
# written into the JSON output by conftest.pytest_benchmark_update_json.
NOT_RUN: list[dict[str, Any]] = []

# The smoke-run switch: one timed round per case and the smallest grids. ``--bench-quick``
# sets it (conftest) before the test modules, which read it to build their grids, are imported.
QUICK_ENV = "DANET_BENCH_QUICK"


@dataclass(frozen=True)
class AttentionShape:
    """One attention problem of DANet's head: batch, feature map H x W, channels C, q/k dim d."""

    batch: int
    height: int
    width: int
    channels: int = 512
    qk_dim: int = 64  # DANet's query/key convolutions project C to C // 8

    @property
    def n(self) -> int:
        """Number of positions N = H * W."""
        return self.height * self.width

    @property
    def id(self) -> str:
        """Short test id, e.g. ``B2-C512-97x97``."""
        return f"B{self.batch}-C{self.channels}-{self.height}x{self.width}"


# DANet's feature maps at output stride 8: 512, 769 and 1024 crops, and a full 1024 x 2048
# Cityscapes frame. The CPU grid is reduced so that the suite finishes in minutes on 2 cores.
CUDA_SIZES = ((64, 64), (97, 97), (128, 128), (128, 256))
CUDA_BATCHES = (1, 2)
CPU_SIZES = ((16, 16), (32, 32), (48, 48), (64, 64))
CPU_BATCHES = (1,)


def attention_shapes() -> list[AttentionShape]:
    """The shapes of the kernel benchmarks here: full on CUDA, reduced on the CPU, one when quick."""
    sizes, batches = (CUDA_SIZES, CUDA_BATCHES) if ON_CUDA else (CPU_SIZES, CPU_BATCHES)
    if quick_mode():
        sizes, batches = sizes[:1], batches[:1]
    return [AttentionShape(b, h, w) for (h, w) in sizes for b in batches]


def package_version(package: str) -> str | None:
    """The installed version of ``package``, or None where it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def pam_inputs(
    shape: AttentionShape, dtype: torch.dtype, device: torch.device = DEVICE, qk_scale: float = 1 / 8
) -> tuple[torch.Tensor, ...]:
    """PAM operands: q, k (B, d, N) random normal x ``qk_scale``, v and an output gradient (B, C, N).

    The default is the peer baseline's: q and k divided by 8, so that the energies q^T k are
    of order 1/8 at d = 64 (standard deviation ``qk_scale**2 * sqrt(d)``).
    """
    b, n = shape.batch, shape.n
    q = torch.randn(b, shape.qk_dim, n, device=device).mul_(qk_scale).to(dtype)
    k = torch.randn(b, shape.qk_dim, n, device=device).mul_(qk_scale).to(dtype)
    v = torch.randn(b, shape.channels, n, device=device).to(dtype)
    grad_out = torch.randn(b, shape.channels, n, device=device).to(dtype)
    return q, k, v, grad_out


def cam_inputs(
    shape: AttentionShape, dtype: torch.dtype, device: torch.device = DEVICE
) -> tuple[torch.Tensor, torch.Tensor]:
    """CAM operands: x and an output gradient (B, C, N), random normal (drawn in fp32, then cast)."""
    x = torch.randn(shape.batch, shape.channels, shape.n, device=device).to(dtype)
    grad_out = torch.randn(shape.batch, shape.channels, shape.n, device=device).to(dtype)
    return x, grad_out


def identity(t: torch.Tensor) -> torch.Tensor:
    """The layout of an implementation that takes DANet's (B, channels, N) operands as they are."""
    return t


def to_sdpa_layout(t: torch.Tensor) -> torch.Tensor:
    """(B, channels, N) -> contiguous (B, 1, N, channels): one head, the positions as the sequence."""
    return t.transpose(1, 2).unsqueeze(1).contiguous()


def from_sdpa_layout(t: torch.Tensor) -> torch.Tensor:
    """(B, 1, N, channels) -> (B, channels, N): the inverse of :func:`to_sdpa_layout`."""
    return t.squeeze(1).transpose(1, 2)


def pam_flops(shape: AttentionShape, pass_: str) -> float:
    """FLOPs of PAM: forward ``2*B*N*N*(d + C)`` (QK^T and PV), forward+backward 3.5x that."""
    forward = 2.0 * shape.batch * shape.n * shape.n * (shape.qk_dim + shape.channels)
    return forward if pass_ == "forward" else forward * (1.0 + PAM_BACKWARD_FACTOR)


def cam_flops(shape: AttentionShape, pass_: str) -> float:
    """FLOPs of CAM: forward ``4*B*C*C*N`` (X X^T and A X), forward+backward 3x that."""
    forward = 4.0 * shape.batch * shape.channels * shape.channels * shape.n
    return forward if pass_ == "forward" else forward * (1.0 + CAM_BACKWARD_FACTOR)


# Out-of-memory errors that do not arrive as torch.OutOfMemoryError: the CPU allocator's, and
# those of CUDA libraries that allocate outside the caching allocator (cuBLAS, cuDNN handles).
_OOM_MESSAGES = ("can't allocate memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
                 "CUDNN_STATUS_ALLOC_FAILED")


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (the caching allocator's, a CUDA library's, the CPU's)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MESSAGES)


# What SDPA raises when no allowed backend takes the operands (PyTorch's words).
_SDPA_REFUSALS = ("No available kernel", "No viable backend")


def is_sdpa_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is SDPA saying that none of the allowed backends takes the operands."""
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _SDPA_REFUSALS)


def free_memory() -> None:
    """On CUDA, drop garbage and hand cached blocks back so that the next case starts clean.

    Nothing on the CPU: its allocator returns freed blocks at once, and a ``gc.collect()``
    costs ~0.2 s there with torch and timm loaded, more than many of the cases it separates.
    """
    if ON_CUDA:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def synchronize() -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if ON_CUDA:
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()``'s result and its wall seconds, the queued GPU work before and after it waited for
    (a first call: autotuning, compilation; too coarse for a kernel, see :func:`median_ms`)."""
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    return result, time.perf_counter() - start


def _cpu_peak_from_profiler(prof: torch.profiler.profile) -> int | None:
    """Peak of the running sum of CPU allocator events recorded by ``profile_memory=True``."""
    try:
        events = prof.profiler.kineto_results.events()
        cpu = torch.autograd.DeviceType.CPU
        records = sorted(
            (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == cpu
        )
    except (AttributeError, RuntimeError):  # profiler internals moved: report no number, not a wrong one
        return None
    running = peak = 0
    for _, nbytes in records:
        running += nbytes
        peak = max(peak, running)
    return peak


def peak_memory_bytes(step: Callable[[], object]) -> tuple[int | None, str | None]:
    """Run ``step`` once and return (bytes allocated at its peak above the starting point, method).

    The step's return value is held until it returns, so outputs count towards the peak.
    """
    if ON_CUDA:
        free_memory()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del result
        return peak, "torch.cuda.max_memory_allocated"
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        result = step()
        del result
    peak = _cpu_peak_from_profiler(prof)
    return peak, (None if peak is None else "torch.profiler CPU allocator events")


def max_rel_err(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """Largest ``max|a - e| / max|e|`` over pairs of tensors, computed in float64."""
    worst = 0.0
    for a, e in zip(actual, expected, strict=True):
        e64 = e.detach().double()
        scale = e64.abs().max().item() or 1.0
        worst = max(worst, (a.detach().double() - e64).abs().max().item() / scale)
    return worst


def median_ms(step: Callable[[], object], *, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """Median milliseconds of ``step`` for kernels: ``triton.testing.do_bench`` on CUDA.

    do_bench times each call with CUDA events, flushes the L2 cache before each one and runs
    about ``warmup_ms`` of warm-up and ``rep_ms`` of timed calls (at least one each, after
    six untimed ones). On the CPU: the median of ``time.perf_counter`` over the same budget.
    """
    if ON_CUDA:
        import triton.testing

        return float(triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    start = time.perf_counter()
    step()
    estimate_ms = max(1e-3, 1000 * (time.perf_counter() - start))
    repeats = max(1, min(1000, int(rep_ms / estimate_ms)))
    return median_step_ms(step, warmup=max(0, min(100, int(warmup_ms / estimate_ms))), repeats=repeats)


def median_step_ms(step: Callable[[], object], *, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls of a slow ``step`` (a training step, a frame).

    A fixed number of calls, unlike :func:`median_ms`, so that slow steps cost what the caller
    plans. On CUDA each call is bracketed by events (the GPU time, launch gaps included); on
    the CPU by ``time.perf_counter``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        step()
    synchronize()
    times = []
    for _ in range(repeats):
        if ON_CUDA:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            step()
            times.append(1000 * (time.perf_counter() - start))
    return float(statistics.median(times))


def make_step(
    fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], pass_: str, grad_out: torch.Tensor
) -> Callable[[], object]:
    """One forward of ``fn(*inputs)``, or one forward+backward to every input with ``grad_out``.

    The backward uses ``torch.autograd.grad`` so that nothing accumulates in ``.grad``
    between rounds; the step returns what it computed so the memory probe counts it.
    """
    if pass_ == "forward":
        return lambda: fn(*inputs)

    def forward_backward() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(fn(*inputs), inputs, grad_out)

    return forward_backward


def error_vs_float64(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_out: torch.Tensor,
    pass_: str,
    reference_fn: Callable[..., torch.Tensor],
    canonical_inputs: Sequence[torch.Tensor],
    canonical_grad_out: torch.Tensor,
    to_canonical: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> dict[str, float]:
    """``{"rel_err": ...}``: the worst error of the output (and, with a backward, every input
    gradient) against ``reference_fn`` evaluated in float64 on the same values.

    ``inputs``/``grad_out`` are in the layout ``fn`` takes; ``canonical_*`` are the same values
    in the layout of ``reference_fn``; ``to_canonical`` maps the former to the latter.
    """
    backward = pass_ != "forward"
    exact_inputs = [t.detach().double().requires_grad_(backward) for t in canonical_inputs]
    with torch.set_grad_enabled(backward):
        out = fn(*inputs)
        exact = reference_fn(*exact_inputs)
    actual, expected = [to_canonical(out)], [exact]
    if backward:
        actual += [to_canonical(g) for g in torch.autograd.grad(out, inputs, grad_out)]
        expected += list(torch.autograd.grad(exact, exact_inputs, canonical_grad_out.double()))
    return {"rel_err": max_rel_err(actual, expected)}


def largest_batch(fits: Callable[[int], bool], limit: int) -> int:
    """The largest batch ``b`` in ``[0, limit]`` with ``fits(b)``, for a ``fits`` true up to some size.

    Doubles from 1 until a batch fails (or ``limit`` fits), then bisects between the last
    success and the first failure: ``O(log b)`` trials, each a real training step.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    fitting, failing = 0, None
    batch = 1
    while failing is None:
        if not fits(batch):
            failing = batch
        elif batch == limit:
            return limit
        else:
            fitting, batch = batch, min(2 * batch, limit)
    while failing - fitting > 1:
        middle = (fitting + failing) // 2
        if fits(middle):
            fitting = middle
        else:
            failing = middle
    return fitting


def _rounds(probe_seconds: float, quick: bool, fixed: tuple[int, int] | None) -> tuple[int, int]:
    """(rounds, warmup_rounds): ``fixed`` if given, else enough rounds for about a second of timing."""
    if quick:
        return 1, 0
    if fixed is not None:
        return fixed
    target, lo, hi, warmup = (0.5, 10, 200, 3) if ON_CUDA else (1.0, 3, 20, 1)
    rounds = math.ceil(target / max(probe_seconds, 1e-6))
    return min(max(rounds, lo), hi), warmup


def quick_mode() -> bool:
    """Whether this is a smoke run of the suite (``--bench-quick``, i.e. ``DANET_BENCH_QUICK=1``)."""
    return os.environ.get(QUICK_ENV, "0") == "1"


def record_not_run(benchmark: Any, reason: str, **extra_info: Any) -> None:
    """Remember a case that could not run, for the report (pytest-benchmark drops skipped tests)."""
    info = {**benchmark.extra_info, **extra_info}
    NOT_RUN.append({"name": benchmark.name, "fullname": benchmark.fullname, "group": benchmark.group,
                    "reason": reason, "extra_info": info})


def skip_case(benchmark: Any, reason: str, **extra_info: Any) -> None:
    """Record the case as not run and skip it (``pytest.skip`` raises)."""
    record_not_run(benchmark, reason, **extra_info)
    free_memory()
    pytest.skip(reason)


def run_benchmark(
    benchmark: Any,
    step: Callable[[], object],
    *,
    check: Callable[[], dict[str, Any]] | None = None,
    rounds: tuple[int, int] | None = None,
    first_call: bool = True,
) -> None:
    """Measure ``step`` (one forward or forward+backward) with pytest-benchmark.

    First one untimed call (autotuning, lazy initialisation, and the time estimate that sets
    the number of rounds), then one call under the memory probe, then the timed rounds, then
    ``check()`` whose dict (e.g. the error against float64) joins ``benchmark.extra_info``.
    ``rounds`` fixes (timed rounds, warm-up rounds) for steps too slow for the time-based
    choice; then ``first_call=False`` may drop the untimed first call where the caller has
    warmed everything up already. An out-of-memory error at any point skips the case as
    "OOM" instead of failing it.
    """
    try:
        probe_seconds = math.inf
        if first_call or rounds is None:
            start = time.perf_counter()
            step()
            synchronize()
            probe_seconds = time.perf_counter() - start
        start = time.perf_counter()
        peak, method = peak_memory_bytes(step)
        # The first call may include autotuning; the probe's own call is the better estimate.
        probe_seconds = min(probe_seconds, time.perf_counter() - start)
        benchmark.extra_info.update(peak_mem_bytes=peak, peak_mem_method=method, oom=False)
        timed_rounds, warmup = _rounds(probe_seconds, quick_mode(), rounds)

        def target() -> None:
            step()
            synchronize()

        benchmark.pedantic(target, setup=synchronize, rounds=timed_rounds, warmup_rounds=warmup, iterations=1)
        out_of_memory = False
    except Exception as exc:
        if not is_oom(exc):
            raise
        # Skip outside the except block: the live traceback would pin the failed step's tensors.
        out_of_memory = True
    if out_of_memory:
        benchmark.extra_info.update(oom=True, peak_mem_bytes=None)
        skip_case(benchmark, "OOM: the case does not fit in memory", oom=True)
    if check is not None:
        try:
            benchmark.extra_info.update(check())
        except Exception as exc:
            if not is_oom(exc):
                raise
            benchmark.extra_info["check_note"] = "the float64 check ran out of memory"
    free_memory()
