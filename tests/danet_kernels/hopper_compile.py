"""Compile the kernels for Hopper (sm_90) from the tests, with the compile report's instrument.

Triton's interpreter forgives what its compiler rejects (a plain global read inside a kernel, a
type mismatch, a register-hungry tile), so the tests also compile the kernels for sm_90 with
the ptxas that ships with Triton, specialised as a real launch specialises them. There is one
compile instrument, benchmarks/compile_report.py (Triton's own binder derives the
specialisation from the launchers' real arguments), and one definition of what its figures must
meet, the targets of each op's spec (benchmarks/compile_targets.py); this module runs them from
the tests:

* :func:`compile_report_results` runs the report on a few sets of problems in one fresh
  process without TRITON_INTERPRET (the interpreter's configs are not the GPU's) and returns
  its rows and every target checked on them;
* :func:`run_without_interpreter` runs code in such a process (the report, and the tests of the
  GPU's autotuners).

Tests of grids, tiles and work that need no compile record a launcher's launches with the
report's own recorder, :func:`benchmarks.compile_report.recorded_launches`, which works under
the interpreter too (on "meta" tensors: nothing is allocated, nothing runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_REPORT_SCRIPT = """
import dataclasses, json, sys
from benchmarks import compile_report as report

runs = json.loads(sys.argv[1])
rows = []
for ops, configs, problems in runs:
    rows += report.measure(ops, configs=configs, problems=[report.Problem.parse(p) for p in problems])
results = report.check_targets(rows)
with open(sys.argv[2], "w") as out:
    json.dump({"rows": [dataclasses.asdict(r) for r in rows],
               "targets": [dataclasses.asdict(t) for t in results]}, out)
"""


def compile_report_results(runs: Sequence[tuple[Sequence[str], str, Sequence[str]]]) -> dict[str, list]:
    """Measure ``runs``, each ``(ops, configs, problems)`` as the report's ``--ops``,
    ``--configs`` and ``--problems`` take them, in one fresh process (a binary two runs share is
    compiled once). Returns ``{"rows": [...], "targets": [...]}``: dicts of
    :class:`benchmarks.compile_report.Row` and of :class:`benchmarks.compile_targets.TargetResult`,
    the targets checked on all rows together."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "report.json"
        given = json.dumps([[list(ops), configs, list(problems)] for ops, configs, problems in runs])
        result = run_without_interpreter(_REPORT_SCRIPT, given, str(out), timeout=1800)
        assert result.returncode == 0, result.stderr[-4000:]
        return json.loads(out.read_text())


def run_without_interpreter(code: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """Run ``python -c code *args`` in a fresh process from the repository root, without
    TRITON_INTERPRET (the kernel modules then build the GPU's configs and tuners, and Triton
    compiles), its output captured; the calling test is skipped where Triton's ptxas is missing."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    return result
