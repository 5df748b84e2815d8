"""pytest-benchmark wiring of the suite: its options, what goes into the JSON, a deadline, a stream.

* ``machine_info["danet"]``: the device the numbers belong to (GPU name or CPU model),
  torch, triton and CUDA versions, and the CPU thread count; the report prints them.
* ``"danet_not_run"``: the cases that were skipped (out of memory, no SDPA kernel for the
  shape, a training size that does not fit, the deadline), which pytest-benchmark leaves out
  of its JSON.
* ``--bench-deadline T`` (seconds since the epoch): a case starts only while the time left is
  at least what the previous case took; the others are skipped as "deadline". With
  ``--bench-stream FILE`` every case is appended to FILE as one JSON line as soon as it ends
  (a pytest-benchmark entry, or a not-run entry with its reason), after a first line
  ``{"machine": ...}``: what a run stopped from outside (scripts/gpu_check) has measured.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shlex
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from benchmarks import harness


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the suite's options (``--bench-*``, ``--torch-threads``, ``--train-amp``)."""
    add = parser.getgroup("danet benchmarks").addoption
    add("--bench-quick", action="store_true", default=False,
        help="the smallest case of each grid, one timed round, no warm-up (checks that the suite runs; the "
             "timings are not worth reading)")
    add("--bench-seconds", type=float, default=None,
        help="seconds of timed rounds per case (default 0.5 on CUDA, 1 on the CPU)")
    add("--bench-deadline", type=float, default=None,
        help="a time (seconds since the epoch) after which no case starts that would need more than the time "
             "left (it is skipped as 'deadline')")
    add("--bench-stream", default=None, help="append every case to this file as one JSON line when it ends")
    add("--torch-threads", type=int, default=None,
        help="torch.set_num_threads for the CPU runs (default: torch's choice). On a shared machine 1 gives "
             "stable timings: with 2 threads each op waits in an OpenMP barrier whenever another process "
             "holds a core")
    add("--train-amp", choices=("none", "bf16"), default="none",
        help="the training benchmark's precision: fp32 steps (none, the published recipe) or bf16 autocast")


def pytest_configure(config: pytest.Config) -> None:
    """Hand the switches to the harness before the test modules, which read them, are imported."""
    harness.SETTINGS.quick = config.getoption("--bench-quick")
    harness.SETTINGS.seconds = config.getoption("--bench-seconds")
    threads = config.getoption("--torch-threads")
    if threads is not None:
        if threads < 1:
            raise pytest.UsageError(f"--torch-threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description() -> dict[str, Any]:
    """The facts a reader needs to place the numbers: device, versions, threads."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    info: dict[str, Any] = {
        "torch": torch.__version__, "triton": triton, "python": platform.python_version(),
        "cpu": _cpu_model(), "cpu_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if harness.ON_CUDA else None,  # a CPU run uses no CUDA
        "quick": harness.SETTINGS.quick,
    }
    if harness.ON_CUDA:
        props = torch.cuda.get_device_properties(0)
        info.update(device=f"{props.name} ({props.total_memory / 2**30:.0f} GiB)",
                    sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                    cudnn=torch.backends.cudnn.version())
    else:
        threads = info["cpu_threads"]
        info["device"] = f"CPU: {info['cpu']}, {threads} torch thread{'s' * (threads != 1)}"
    return info


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    """Add the device, library versions and the command line under ``machine_info["danet"]``."""
    machine_info["danet"] = device_description()
    machine_info["danet"]["command"] = shlex.join(["python", "-m", "pytest", *config.invocation_params.args])


def pytest_benchmark_update_json(
    config: pytest.Config, benchmarks: list[Any], output_json: dict[str, Any]
) -> None:
    """Add the cases that could not run, so that the report can list them with their reasons."""
    output_json["danet_not_run"] = list(harness.NOT_RUN)


def _stream(config: pytest.Config, entry: dict[str, Any]) -> None:
    path = config.getoption("--bench-stream")
    if path is not None:
        with open(path, "a", encoding="utf-8") as f:  # one write per line: a reader never sees half a case
            f.write(json.dumps(entry, default=str) + "\n")


def pytest_sessionstart(session: pytest.Session) -> None:
    """The stream's first line: where the numbers come from."""
    _stream(session.config, {"machine": device_description()})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Stream each case once: measured (its stats), not run (its reason) or failed (its error)."""
    report = (yield).get_result()
    if report.when != "call" and not (report.when == "setup" and not report.passed):
        return
    not_run = [e for e in harness.NOT_RUN if e["fullname"] == item.nodeid]
    if not_run:  # skipped through harness.skip_case, which recorded it with its reason
        _stream(item.config, not_run[-1])
        return
    bench = getattr(item, "funcargs", {}).get("benchmark")
    entry = {"name": item.name, "fullname": item.nodeid, "group": getattr(bench, "group", None),
             "extra_info": dict(getattr(bench, "extra_info", {}))}
    if report.passed and getattr(bench, "stats", None) is not None:
        entry["stats"] = {key: getattr(bench.stats.stats, key) for key in ("median", "min", "rounds")}
    elif report.passed:
        entry["reason"] = "not timed (pytest-benchmark disabled)"
    elif report.skipped and isinstance(report.longrepr, tuple):
        entry["reason"] = str(report.longrepr[2]).removeprefix("Skipped: ")
    else:
        entry["reason"] = "error: " + (report.longreprtext.strip().splitlines() or ["?"])[-1][:500]
    _stream(item.config, entry)


# How long the previous case took, setup to teardown: the estimate of the next one's.
_previous_case_s = [1.0]


@pytest.fixture(autouse=True)
def _clean_device_within_deadline(request: pytest.FixtureRequest, benchmark: Any) -> Iterator[None]:
    """Start every case on an empty CUDA cache (a case that ran out of memory leaves its tensors
    to the garbage collector, and the next case must not pay for them); past ``--bench-deadline``
    skip it (see the module docstring)."""
    harness.free_memory()
    deadline = request.config.getoption("--bench-deadline")
    if deadline is not None and time.time() + _previous_case_s[0] > deadline:
        harness.skip_case(benchmark, f"deadline: {max(0.0, deadline - time.time()):.0f} s left, the previous "
                                     f"case took {_previous_case_s[0]:.0f} s")
    start = time.perf_counter()
    yield
    _previous_case_s[0] = max(1.0, time.perf_counter() - start)
