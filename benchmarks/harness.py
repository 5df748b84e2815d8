"""Shared machinery of the benchmark suite: the case grid, inputs, timing, peak memory, OOM handling.

Every benchmark test builds its inputs, hands a step (one forward, or one forward+backward)
to :func:`run_benchmark`, and gets back timing from pytest-benchmark (each round bracketed
by ``torch.cuda.synchronize()`` on CUDA, so that its wall time is the GPU time) plus, in
``benchmark.extra_info``:

* ``peak_mem_bytes``: the peak memory one step allocates above what existed before it
  (the inputs and the output gradient), measured once, outside the timed rounds: on CUDA
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on the CPU the
  running sum of the allocator's events recorded by ``torch.profiler`` (tracemalloc does not
  see torch's allocator, and the process RSS mixes in the interpreter and cached pages).
* ``first_call_s`` (compilation and autotuning, where it is the first call at its key),
  ``flops`` (:func:`pam_flops`, :func:`cam_flops`), and ``predicted``: what the project
  predicts for the case, where :data:`PREDICTORS` holds a predictor for its op that answers.
* ``oom``: the case ran out of memory. It is skipped with a reason that starts with "OOM" and
  listed, with every case that could not run, under ``"danet_not_run"`` in the JSON output
  (benchmarks/conftest.py): pytest-benchmark drops skipped tests from its JSON.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.compile_types import PLAIN_CALL

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")

PASSES = ("forward", "forward+backward")

# FLOP convention (stated in the report): a backward pass of an attention costs 2.5x its
# forward in FlashAttention's accounting (two matmuls for dV/dP, two for dQ/dK, plus the
# recomputed QK^T of a fused kernel), so forward+backward counts 3.5x the forward FLOPs.
# CAM's backward has no recomputation: four C x C x N matmuls, twice the forward.
PAM_BACKWARD_FACTOR = 2.5
CAM_BACKWARD_FACTOR = 2.0

# Cases that could not run (OOM, no SDPA kernel for the shape, the deadline, ...): one dict per
# case, written into the JSON output by conftest.pytest_benchmark_update_json.
NOT_RUN: list[dict[str, Any]] = []

# op -> a function of a case's extra_info that returns what the project predicts for the case
# ({"median_ms": ..., "peak_mem_bytes": ..., "by": "what predicted it, with its stated error"}),
# or None where it predicts nothing; run_benchmark records it as extra_info["predicted"], beside
# the measured figures. "pam" and "cam": the compile report's calibrated kernel model
# (predict_kernel_time, below); "train_step": the training-memory model (registered by
# benchmarks/test_training_memory.py, predict_train_step).
PREDICTORS: dict[str, Callable[[Mapping[str, Any]], Mapping[str, Any] | None]] = {}

# The compile report's model time per pass and problem of the plain calls the suite times
# (python -m benchmarks.compile_report --pass-times; its command is in the file).
KERNEL_MODEL_TIMES = Path(__file__).with_name("kernel_model_times.json")
# A case's dtype, or for fp32 its matmul precision (Variant), as the report names the precision.
_REPORT_PRECISIONS = {"bfloat16": "bf16", "float16": "fp16", "highest": "fp32-ieee", "high": "fp32-tf32x3",
                      "medium": "fp32-tf32"}


@functools.cache
def _kernel_model_times() -> tuple[dict[tuple[Any, ...], float], str]:
    found = json.loads(KERNEL_MODEL_TIMES.read_text())
    times = {(t["op"], t["pass"], t["B"], t["N"], t["C"], t["d"], t["precision"]): t["model_us"]
             for t in found["times"] if t["variant"] == PLAIN_CALL}
    triton = found["versions"]["triton"]
    by = (f"the compile report's calibrated kernel model (sm_90 code of triton {triton}): an H100's time "
          f"(the H200's SMs and clocks are the same, its memory faster), ± {found['calibration_error']:.0%}, "
          "the calibration's largest error; our 8-warp programs are outside what it covers")
    return times, by


def predict_kernel_time(info: Mapping[str, Any]) -> dict[str, Any] | None:
    """PREDICTORS["pam"] and ["cam"]: the model's time of a case of the fused kernels (``impl``
    "triton") whose problem :data:`KERNEL_MODEL_TIMES` holds exactly; None for any other case."""
    if info.get("impl") != "triton":
        return None
    precision = _REPORT_PRECISIONS.get(info["dtype"]) or _REPORT_PRECISIONS[info["precision"]]
    times, by = _kernel_model_times()
    model_us = times.get((info["op"], info["pass"], info["B"], info["N"], info["C"], info["d"], precision))
    return None if model_us is None else {"median_ms": model_us / 1000, "by": by}


PREDICTORS.update(pam=predict_kernel_time, cam=predict_kernel_time)


@dataclass
class Settings:
    """The suite's switches, set by benchmarks/conftest.py from the command line before the test
    modules (which read ``quick`` to build their grids) are imported."""

    quick: bool = False  # --bench-quick: the smallest case of each grid, one timed round
    seconds: float | None = None  # --bench-seconds: timing per case (default 0.5 s on CUDA, 1 s on the CPU)


SETTINGS = Settings()


@dataclass(frozen=True)
class Variant:
    """A dtype and the fp32 matmul precision it runs at (``torch.set_float32_matmul_precision``:
    "highest" is IEEE fp32; "high" is 3xTF32 in the kernels, TF32 in cuBLAS; "medium" TF32)."""

    name: str
    dtype: torch.dtype
    precision: str = "highest"

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The variant's matmul precision inside, the previous one restored after."""
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.precision)
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)


# In report order. Half precision on the CPU is emulated and not what anyone would deploy there,
# and the CPU's fp32 matmuls have one precision.
VARIANTS = (
    (Variant("fp32", torch.float32), Variant("fp32-high", torch.float32, "high"),
     Variant("fp32-medium", torch.float32, "medium"), Variant("bf16", torch.bfloat16),
     Variant("fp16", torch.float16))
    if ON_CUDA else (Variant("fp32", torch.float32),)
)


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


# DANet's feature maps at output stride 8: a full 1024 x 2048 Cityscapes frame, 769, 512 and
# 1024 crops, in the order a run cut short by a deadline should measure them (the issues'
# targets are at 128 x 256, B = 1). The CPU grid is reduced so that the suite finishes in
# minutes on 2 cores.
CUDA_SIZES = ((128, 256), (97, 97), (64, 64), (128, 128))
CUDA_BATCHES = (1, 2)
CPU_SIZES = ((16, 16), (32, 32), (48, 48), (64, 64))
CPU_BATCHES = (1,)


def attention_shapes() -> list[AttentionShape]:
    """The kernel benchmarks' shapes, every size at B = 1 first: full on CUDA, reduced on the CPU,
    the smallest one when quick."""
    sizes, batches = (CUDA_SIZES, CUDA_BATCHES) if ON_CUDA else (CPU_SIZES, CPU_BATCHES)
    if SETTINGS.quick:
        sizes, batches = [min(sizes, key=lambda s: s[0] * s[1])], batches[:1]
    return [AttentionShape(b, h, w) for b in batches for (h, w) in sizes]


def describe_case(benchmark: Any, op: str, impl: str, pass_: str, variant: Variant, shape: AttentionShape,
                  ) -> None:
    """Group a kernel case with the other implementations of its problem; record what it is."""
    benchmark.group = f"{op} {pass_} {variant.name} {shape.id}"
    flops = (pam_flops if op == "pam" else cam_flops)(shape, pass_)
    benchmark.extra_info.update(
        op=op, impl=impl, **{"pass": pass_}, variant=variant.name, precision=variant.precision,
        dtype=str(variant.dtype).removeprefix("torch."), B=shape.batch, C=shape.channels, d=shape.qk_dim,
        H=shape.height, W=shape.width, N=shape.n, flops=flops,
    )


def pam_inputs(shape: AttentionShape, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """PAM operands: q, k (B, d, N) random normal / 8, v and an output gradient (B, C, N).

    The peer baseline's: q and k divided by 8, so that the energies q^T k are of order 1/8
    at d = 64.
    """
    b, n = shape.batch, shape.n
    q = torch.randn(b, shape.qk_dim, n, device=DEVICE).div_(8).to(dtype)
    k = torch.randn(b, shape.qk_dim, n, device=DEVICE).div_(8).to(dtype)
    v = torch.randn(b, shape.channels, n, device=DEVICE).to(dtype)
    grad_out = torch.randn(b, shape.channels, n, device=DEVICE).to(dtype)
    return q, k, v, grad_out


def cam_inputs(shape: AttentionShape, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """CAM operands: x and an output gradient (B, C, N), random normal (drawn in fp32, then cast)."""
    x = torch.randn(shape.batch, shape.channels, shape.n, device=DEVICE).to(dtype)
    grad_out = torch.randn(shape.batch, shape.channels, shape.n, device=DEVICE).to(dtype)
    return x, grad_out


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


def _rounds(probe_seconds: float, fixed: tuple[int, int] | None) -> tuple[int, int]:
    """(rounds, warmup_rounds): ``fixed`` if given, else enough rounds for ``SETTINGS.seconds``."""
    if SETTINGS.quick:
        return 1, 0
    if fixed is not None:
        return fixed
    target, lo, hi, warmup = (0.5, 5, 200, 3) if ON_CUDA else (1.0, 3, 20, 1)
    rounds = math.ceil((SETTINGS.seconds or target) / max(probe_seconds, 1e-6))
    return min(max(rounds, lo), hi), warmup


def skip_case(benchmark: Any, reason: str, **extra_info: Any) -> None:
    """Record the case in :data:`NOT_RUN`, for the report (pytest-benchmark drops skipped tests), and
    skip it (``pytest.skip`` raises)."""
    NOT_RUN.append({"name": benchmark.name, "fullname": benchmark.fullname, "group": benchmark.group,
                    "reason": reason, "extra_info": {**benchmark.extra_info, **extra_info}})
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
    predictor = PREDICTORS.get(benchmark.extra_info.get("op"))
    try:  # a prediction that fails must not cost the measurement (a GPU's time is scarce)
        predicted = predictor(benchmark.extra_info) if predictor is not None else None
    except Exception as err:
        predicted = {"by": f"no prediction: {type(err).__name__}: {err}"}
    if predicted is not None:
        benchmark.extra_info["predicted"] = predicted
    try:
        probe_seconds = math.inf
        if first_call or rounds is None:
            synchronize()
            start = time.perf_counter()
            step()
            synchronize()
            probe_seconds = time.perf_counter() - start
            benchmark.extra_info["first_call_s"] = round(probe_seconds, 4)
        start = time.perf_counter()
        peak, method = peak_memory_bytes(step)
        # The first call may include autotuning; the probe's own call is the better estimate.
        probe_seconds = min(probe_seconds, time.perf_counter() - start)
        benchmark.extra_info.update(peak_mem_bytes=peak, peak_mem_method=method, oom=False)
        timed_rounds, warmup = _rounds(probe_seconds, rounds)

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
