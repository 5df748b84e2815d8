"""Compile the kernels for Hopper (sm_90) from the tests, with the compile report's instrument.

Triton's interpreter forgives what its compiler rejects (a plain global read inside a kernel, a
type mismatch, a register-hungry tile), so the tests also compile the kernels for sm_90 with
the ptxas that ships with Triton, specialised as a real launch specialises them. There is one
compile helper, benchmarks/compile_report.py (see its docstring: Triton's own binder derives
the specialisation from the launchers' real arguments); this module runs it from the tests:

* :func:`compile_report_rows` runs ``python -m benchmarks.compile_report`` in a fresh process
  without TRITON_INTERPRET (the interpreter's configs are not the GPU's) and returns its rows;
* :func:`recorded_launches` records the launches a launcher makes through
  ``torch.library.wrap_triton`` (on "meta" tensors: nothing is allocated) for tests that check
  grids and tiles, and :func:`compile_launch` compiles one with the report's compiler, inside a
  script that :func:`check_compiles` runs in such a fresh process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def compile_report_rows(*args: str) -> list[dict[str, Any]]:
    """Run ``python -m benchmarks.compile_report *args`` and return its rows (dicts of
    :class:`benchmarks.compile_report.Row` fields)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as scratch:
        rows_path = Path(scratch) / "rows.json"
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.compile_report", *args, "--out", os.devnull,
             "--json", str(rows_path)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
        )
        if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr.lower():
            pytest.skip("Triton's ptxas is not available")
        assert result.returncode == 0, result.stderr[-4000:]
        return json.loads(rows_path.read_text())


@dataclass
class Launch:
    """One kernel launch as a launcher made it: the JITFunction, its grid, arguments, options."""

    kernel: Any
    grid: tuple[int, ...] | Any  # or a function of the config, as an autotuned launch passes it
    args: tuple
    kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def programs(self) -> int:
        total = 1
        for size in self.grid:
            total *= size
        return total

    def arg(self, name: str) -> Any:
        """An argument by name, positional or keyword."""
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[self.kernel.arg_names.index(name)]


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Record, instead of running, the launches made through ``torch.library.wrap_triton``
    (how the kernel modules launch everything); the launchers can then run on "meta" tensors."""
    import torch

    launches: list[Launch] = []

    class Recorder:
        def __init__(self, kernel: Any) -> None:
            self.kernel = kernel

        def __getitem__(self, grid: tuple[int, ...]) -> Any:
            def record(*args: Any, **kwargs: Any) -> None:
                # A grid may be a function of the config (an autotuned kernel's): kept as given.
                launches.append(Launch(self.kernel, grid if callable(grid) else tuple(grid), args, kwargs))
            return record

    original = torch.library.wrap_triton
    torch.library.wrap_triton = Recorder
    try:
        yield launches
    finally:
        torch.library.wrap_triton = original


def compile_launch(launch: Launch) -> dict[str, Any]:
    """Compile a recorded launch for sm_90 with the compile report's compiler (Triton's binder
    specialises its arguments as a real launch: pointers 16-byte aligned, as torch allocates,
    integers divisible by 16 marked so, integers equal to 1 turned into constants).

    Returns registers, spill bytes, ex2 instructions (one S tile's worth per thread, i.e. no
    replication, when equal to ``BLOCK_M * BLOCK_N / threads``), wgmma / mma.sync counts and the
    loads inside the main loop: asynchronous copies (software-pipelined) and plain loads, and the
    shared memory the kernel needs (a Hopper CTA may use 227 KiB).
    """
    from benchmarks import compile_report

    compiled = compile_report.compile_launch(
        compile_report.Launch(launch.kernel, launch.args, launch.kwargs, launch.grid))
    assert compiled.error is None, f"{launch.name}: {compiled.error}"
    counts = compile_report.ptx_counts(compiled.ptx)
    loop = compiled.ttgir[compiled.ttgir.find("scf.for"):]
    return {
        "kernel": launch.name,
        "registers": compiled.registers,
        "spill_bytes": compiled.spill_stores,
        "ex2": counts["ex2"],
        "wgmma": counts["wgmma"],
        "mma_sync": counts["mma_sync"],
        "loop_async_loads": len(re.findall(r"ttg\.async_copy_global_to_local", loop)),
        "loop_plain_loads": len(re.findall(r"= tt\.load ", loop)),
        "threads": 32 * compiled.num_warps,
        "shared": compiled.shared,
    }


def check_compiles(script: str) -> str:
    """Run ``script`` in a fresh process without TRITON_INTERPRET; it must print ``compiled``.

    Returns the script's standard output."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=600)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
    return result.stdout
