"""The measuring worker: runs the GPU sections one after another and streams their results.

Started by the supervisor as ``python -m scripts.gpu_check --worker --sections ... --plan ...``.
Each section gets its deadline from the plan when it starts (:func:`section_deadline`), runs
its cases through a :class:`CaseRunner` (which skips what no longer fits) and ends with a
``section_end`` event. A section that raises is recorded as failed and the next one runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import harness
from scripts.gpu_check.events import EVENTS_NAME, EventWriter
from scripts.gpu_check.plan import (
    FULL_SIZING,
    QUICK_SIZING,
    CaseRunner,
    Deadline,
    Plan,
    Sizing,
    section_deadline,
)

__all__ = ["CudaFaultError", "SectionContext", "classify_error", "environment", "run_sections", "run_worker"]


@dataclass
class SectionContext:
    """What a section function receives: its case runner, the grid and the output folder."""

    runner: CaseRunner
    sizing: Sizing
    out: Path


# Errors after which the process's CUDA context is unusable: every later call fails too.
_CUDA_FAULTS = ("illegal memory access", "unspecified launch failure", "device-side assert",
                "misaligned address", "illegal instruction", "CUDA error: unknown error",
                "uncorrectable ECC error")
CUDA_FAULT = "cuda fault"
EXIT_CUDA_FAULT = 70


class CudaFaultError(RuntimeError):
    """A case broke the CUDA context: this worker must stop; a fresh one runs the next sections."""


def classify_error(exc: BaseException) -> str:
    """A failed case's status: "oom", "refused" (no kernel for the shape, SDPA's words), "cuda fault"
    (the context is broken) or "error"."""
    if harness.is_oom(exc):
        return "oom"
    if any(fault in str(exc) for fault in _CUDA_FAULTS):
        return CUDA_FAULT
    if harness.is_sdpa_refusal(exc):
        return "refused"
    return "error"


def _nvidia_smi() -> dict[str, str]:
    """Driver, clocks, power limit, temperature and load as nvidia-smi reads them (read only)."""
    fields = ("name", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm", "clocks.mem",
              "power.limit", "temperature.gpu", "utilization.gpu", "memory.used")
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=15, check=True)
    except (OSError, subprocess.SubprocessError):
        return {}
    values = [v.strip() for v in done.stdout.splitlines()[0].split(",")] if done.stdout.strip() else []
    return dict(zip(fields, values, strict=False))


def environment() -> dict[str, Any]:
    """The device and the software the numbers belong to."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        **{package: harness.package_version(package) for package in ("triton", "timm", "numpy")},
        "python": platform.python_version(), "cuda": torch.version.cuda,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        smi = _nvidia_smi()
        info.update(device=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                    cudnn=torch.backends.cudnn.version(), driver=smi.get("driver_version"), nvidia_smi=smi)
    else:
        info.update(device=f"CPU ({platform.processor() or platform.machine()})", cuda=None)
    return info


def _section_functions() -> dict[str, Callable[[SectionContext], None]]:
    from scripts.gpu_check import measure_kernels, measure_model

    return {
        "accuracy": measure_kernels.accuracy,
        "autotune": measure_kernels.autotune,
        "pam": lambda ctx: measure_kernels.timing(ctx, "pam"),
        "cam": lambda ctx: measure_kernels.timing(ctx, "cam"),
        "train": measure_model.train_step,
        "eval": measure_model.eval_throughput,
    }


def run_sections(sections: list[str], plan: Plan, sizing: Sizing, out: Path, events: EventWriter) -> bool:
    """Run ``sections`` in order, each within its deadline, reporting through ``events``.

    Returns False when a CUDA fault stopped the run (the sections after it were not started).
    """
    functions = _section_functions()
    for section in sections:
        start = time.time()
        deadline = section_deadline(plan, section, start)
        events.emit("section_start", section=section, deadline=deadline)

        def emit(record: dict[str, Any], section: str = section) -> None:
            events.emit("record", section=section, data=record)
            if record.get("status") == CUDA_FAULT:
                raise CudaFaultError(record.get("error", ""))

        runner = CaseRunner(Deadline(deadline), emit, classify=classify_error, cleanup=harness.free_memory)
        ctx = SectionContext(runner, sizing, out)
        error, notes, faulted = None, [], False
        try:
            functions[section](ctx)
            status = "partial" if runner.skipped else "errors" if runner.failed else "done"
            harness.free_memory()
        except Exception as exc:  # the section's own code failed: record it, go on with the next
            status, error = "failed", traceback.format_exc()[-3000:]
            faulted = isinstance(exc, CudaFaultError) or classify_error(exc) == CUDA_FAULT
            if faulted:
                notes.append("a case broke the CUDA context; the next sections run in a fresh worker")
        if runner.skipped:
            notes.append(f"{len(runner.skipped)} case(s) left out: the section's deadline came first")
        if runner.failed:
            notes.append(f"{runner.failed} case(s) failed with an error")
        events.emit("section_end", section=section, status=status, seconds=round(time.time() - start, 1),
                    note="; ".join(notes) or None, error=error, skipped=runner.skipped)
        if faulted:
            return False
    return True


def run_worker(args: argparse.Namespace) -> int:
    """The ``--worker`` entry point."""
    out = Path(args.out)
    events = EventWriter(out / EVENTS_NAME)
    events.emit("worker_start", pid=os.getpid(), sections=args.sections)
    events.emit("env", data=environment())
    sizing = QUICK_SIZING if args.quick else FULL_SIZING
    completed = run_sections(args.sections, args.plan, sizing, out, events)
    events.emit("worker_end")
    return 0 if completed else EXIT_CUDA_FAULT
