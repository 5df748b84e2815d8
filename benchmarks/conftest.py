"""pytest-benchmark wiring of the suite: the ``--bench-quick`` option and what goes into the JSON.

* ``machine_info["danet"]``: the device the numbers belong to (GPU name or CPU model),
  torch, triton and CUDA versions, and the CPU thread count; the report prints them.
* ``"danet_not_run"``: the cases that were skipped (out of memory, no SDPA kernel for the
  shape, a training size that does not fit), which pytest-benchmark leaves out of its JSON.
"""

from __future__ import annotations

import os
import platform
import shlex
from typing import Any

import pytest
import torch

from benchmarks import harness


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register ``--bench-quick`` (smoke run of the suite) and ``--train-amp`` (training precision)."""
    parser.addoption(
        "--bench-quick",
        action="store_true",
        default=False,
        help="danet benchmarks: the smallest case of each grid, one timed round, no warm-up (checks "
        "that the suite runs; the timings are not worth reading)",
    )
    parser.addoption(
        "--torch-threads",
        type=int,
        default=None,
        help="danet benchmarks: torch.set_num_threads for the CPU runs (default: torch's choice). On a "
        "shared machine 1 gives stable timings: with 2 threads each op waits in an OpenMP barrier "
        "whenever another process holds a core",
    )
    parser.addoption(
        "--train-amp",
        choices=("none", "bf16"),
        default="none",
        help="danet training benchmark: fp32 steps (none, the published recipe) or bf16 autocast",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Apply ``--torch-threads``; turn ``--bench-quick`` into the switch the test modules read at import."""
    if config.getoption("--bench-quick"):
        os.environ[harness.QUICK_ENV] = "1"
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
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "triton": harness.package_version("triton"),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if harness.ON_CUDA else None,  # a CPU run uses no CUDA
        "quick": harness.quick_mode(),
    }
    if harness.ON_CUDA:
        props = torch.cuda.get_device_properties(0)
        info["device"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
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


@pytest.fixture(autouse=True)
def _clean_device() -> None:
    """Start every case on an empty CUDA cache: a case that ran out of memory leaves its tensors
    to the garbage collector (frames of the failed step), and the next case must not pay for them."""
    harness.free_memory()
