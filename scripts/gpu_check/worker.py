"""The measuring worker: runs the GPU sections one after another and streams their results.

Started by the supervisor as ``python -m scripts.gpu_check --worker --sections ... --plan ...``.
Each section gets its deadline from the plan when it starts (:func:`section_deadline`), runs
its cases through a :class:`CaseRunner` (which skips what no longer fits) and ends with a
``section_end`` event. A section that raises is recorded as failed and the next one runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
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

__all__ = ["SectionContext", "classify_error", "environment", "run_sections", "run_worker"]


@dataclass
class SectionContext:
    """What a section function receives: its case runner, the grid, the output folder, the events."""

    runner: CaseRunner
    sizing: Sizing
    out: Path
    events: EventWriter
    section: str


def classify_error(exc: BaseException) -> str:
    """A failed case's status: "oom", "refused" (no kernel for the shape, SDPA's words) or "error"."""
    if harness.is_oom(exc):
        return "oom"
    message = str(exc)
    if isinstance(exc, RuntimeError) and ("No available kernel" in message or "No viable backend" in message):
        return "refused"
    return "error"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


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
        "torch": torch.__version__, "triton": _version("triton"), "timm": _version("timm"),
        "numpy": _version("numpy"), "python": platform.python_version(), "cuda": torch.version.cuda,
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


def run_sections(sections: list[str], plan: Plan, sizing: Sizing, out: Path, events: EventWriter) -> None:
    """Run ``sections`` in order, each within its deadline, reporting through ``events``."""
    functions = _section_functions()
    for section in sections:
        start = time.time()
        deadline = section_deadline(plan, section, start)
        events.emit("section_start", section=section, deadline=deadline)

        def emit(record: dict[str, Any], section: str = section) -> None:
            events.emit("record", section=section, data=record)

        runner = CaseRunner(Deadline(deadline), emit, classify=classify_error, cleanup=harness.free_memory)
        ctx = SectionContext(runner, sizing, out, events, section)
        error = None
        try:
            functions[section](ctx)
            status = "partial" if runner.skipped else "errors" if runner.failed else "done"
        except Exception:  # the section's own code failed: record it, go on with the next
            status, error = "failed", traceback.format_exc()[-3000:]
        harness.free_memory()
        note = None
        if runner.skipped:
            note = f"{len(runner.skipped)} case(s) left out: the section's deadline came first"
        if runner.failed:
            note = (note + "; " if note else "") + f"{runner.failed} case(s) failed with an error"
        events.emit("section_end", section=section, status=status, seconds=round(time.time() - start, 1),
                    note=note, error=error, skipped=runner.skipped)


def run_worker(args: argparse.Namespace) -> int:
    """The ``--worker`` entry point."""
    out = Path(args.out)
    events = EventWriter(out / EVENTS_NAME)
    events.emit("worker_start", pid=os.getpid(), sections=args.sections)
    events.emit("env", data=environment())
    run_sections(args.sections, args.plan, QUICK_SIZING if args.quick else FULL_SIZING, out, events)
    events.emit("worker_end")
    return 0
