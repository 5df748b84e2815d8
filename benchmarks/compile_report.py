"""The compile report: what a Hopper GPU will execute, measured on a machine without one.

Usage, from the repository root (no GPU, no TRITON_INTERPRET)::

    python -m benchmarks.compile_report                         # everything -> docs/compile_report.md
    python -m benchmarks.compile_report --ops pam_forward --sizes 9409 --precisions bf16 --out -
    python -m benchmarks.compile_report --configs preferred --json report.json
    python -m benchmarks.compile_report --ops pam_backward --problems 9409:fp32-tf32x3 \
        1024:bf16:d=256:C=2048 --check --out -                 # exit status 1 on a target not met

How it measures. Each op's launcher (the code a user's call runs, unchanged) is called on real
CPU tensors of DANet's shapes with Triton's launch replaced by a recorder
(:func:`recorded_launches`). A launch of an autotuned kernel is expanded into every config its
prune keeps, each run through the autotuner's own chain (heuristics included) down to the
``JITFunction`` launch it would make. Every such launch is then specialised exactly as Triton's
launcher specialises a real one: Triton's own binder reads the recorded arguments, so a pointer
or an integer divisible by 16 gets the divisibility hint, an integer equal to 1 (a stride-1 axis)
becomes a constant, and N = 9409 loses the hints a real launch loses (:func:`specialise`). It is
compiled for sm_90a with the ptxas that ships with Triton (:func:`compile_launch`), once per
binary: launches that specialise alike (:func:`specialisation_key`) share one compile.

What it reports, per kernel, config and problem (:class:`Row`):

* from ptxas: registers per thread, spill bytes, and from Triton's metadata the shared memory;
* from the PTX: the MMA kind (wgmma, mma.sync or none: FMA), and counts of wgmma, mma.sync,
  fp32 FMA, cp.async and TMA (cp.async.bulk.tensor) instructions; the ex2 per thread in one
  iteration of the main loop (the loop with the most MMA instructions), beside the tile's
  share, i.e. the exp2 tile's elements (the kernel's :class:`KernelSpec` says how many) over
  the threads;
* from the TTGIR: the replication of the exp2 tile's layout, the factor by which the warps
  cover more than the tile (2 means two warpgroups compute the same scores);
* from the grid and the tiles (the kernel's work model): the executed FLOPs, exp2 and operand
  bytes streamed into the SMs for a whole pass, in units of the op (N^2 for PAM, C^2 N for
  CAM), the score part multiplied by the replication; the op's totals against its minimal;
* the programs one SM holds (registers, shared memory) and the waves of an H100, and the perf
  model's time of the launch (:func:`model_time`: the SM model of kernels/common.py that the
  autotuners rank configs by), a ranking and a scale, not a measurement.

Each op is described by an :class:`OpSpec` in ``benchmarks/compile_specs/<op>.py``: how to call
its launcher for a :class:`Problem`, per kernel a :class:`KernelSpec` (work model, exp2 tile),
the problems of the full report, and the op's targets (benchmarks/compile_targets.py), which
every run checks on its rows: the report prints each one met or not, ``--check`` exits with
status 1 on one not met, and tests/danet_kernels/test_hopper_compile.py asserts them in CI on a
small set. A kernel without a spec still gets its compile figures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import platform
import re
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton
from torch._library.triton import set_wrap_triton_enabled
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas_version
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, create_function_from_signature

from benchmarks import compile_specs, compile_targets
from benchmarks.compile_types import CHANNELS, HEAD_DIM, PRECISIONS, SIZES, OpSpec, Problem, Row, Work
from danet_kernels.kernels.common import (
    H100_CLOCK_HZ,
    H100_SMS,
    MAX_SHARED_BYTES,
    launch_clocks,
    program_clocks,
)

__all__ = [
    "Compiled",
    "Launch",
    "all_specs",
    "compile_launch",
    "layout_replication",
    "main",
    "measure",
    "ptx_loops",
    "recorded_launches",
    "render_markdown",
    "specialise",
]

def all_specs() -> dict[str, OpSpec]:
    """Every op the report knows, by name (one module per op under ``benchmarks/compile_specs``)."""
    return {spec.name: spec for spec in compile_specs.SPECS}


# ----------------------------------------------------------------------------------------------
# Recording launches
# ----------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """A kernel launch the launcher made: the kernel object (an ``Autotuner`` or a
    ``JITFunction``, or under TRITON_INTERPRET=1 an ``InterpretedFunction``), its arguments and
    its grid."""

    kernel: Any
    args: tuple
    kwargs: dict[str, Any]
    grid: Any

    @property
    def jit_function(self) -> Any:
        """The ``JITFunction`` (``InterpretedFunction``) under any autotuner and heuristics."""
        fn = self.kernel
        while not isinstance(fn, (JITFunction, InterpretedFunction)):
            fn = fn.fn
        return fn

    def named(self) -> dict[str, Any]:
        return {**dict(zip(self.jit_function.arg_names, self.args, strict=False)), **self.kwargs}

    def programs(self) -> int:
        grid = self.grid(self.named()) if callable(self.grid) else self.grid
        return math.prod(int(g) for g in grid)


_recording: list[Launch] | None = None


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Within the block, a Triton launch (``kernel[grid](...)``) is recorded instead of run.

    Launches go through the launchers unchanged, as the eager ``torch.library`` op dispatch
    makes them (``wrap_triton`` passes straight to the kernel), and end at the outermost
    kernel object: an autotuner is recorded before it tunes. Under TRITON_INTERPRET=1 (the
    tests) the launches of interpreted kernels are recorded alike, and nothing runs: the
    launchers can be called on "meta" tensors.
    """
    global _recording

    def record(self: Any, *args: Any, grid: Any = None, warmup: bool = False, **kwargs: Any) -> None:
        assert _recording is not None
        _recording.append(Launch(self, args, kwargs, grid))

    saved = {cls: cls.run for cls in (JITFunction, InterpretedFunction, Autotuner)}
    previous, _recording = _recording, []
    try:
        for cls in saved:
            cls.run = record
        with set_wrap_triton_enabled(False):
            yield _recording
    finally:
        for cls, run in saved.items():
            cls.run = run
        _recording = previous


def tuning(launch: Launch) -> tuple[list[Any], list[Any], Any]:
    """An autotuned launch's configs: those its early prune keeps (all, without a prune), those
    the autotuner would benchmark (its own ``prune_configs``: that prune, then the perf model's
    top-k) and the one its perf model ranks first among them (None without a perf model, unless
    one alone is benchmarked)."""
    tuner = launch.kernel
    tuner.nargs = dict(zip(tuner.arg_names, launch.args, strict=False))
    try:
        prune = tuner.early_config_prune
        kept = list(prune(tuner.configs, tuner.nargs, **launch.kwargs) if prune else tuner.configs)
        benchmarked = list(tuner.prune_configs(launch.kwargs))
        if not tuner.perf_model:
            return kept, benchmarked, benchmarked[0] if len(benchmarked) == 1 else None
        timing = {c: tuner.perf_model(**tuner.nargs, **launch.kwargs, **c.all_kwargs()) for c in benchmarked}
        return kept, benchmarked, min(benchmarked, key=timing.__getitem__)
    finally:
        tuner.nargs = None


def expand(launch: Launch, configs: Sequence[Any]) -> list[tuple[Any, Launch]]:
    """``(config, JIT launch)`` for each config of an autotuned launch (e.g. every one its prune
    keeps, :func:`tuning`), run through the autotuner's chain (heuristics included) to the
    ``JITFunction`` launch it would make."""
    expanded = []
    for config in configs:
        with recorded_launches() as inner:
            launch.kernel.fn.run(*launch.args, grid=launch.grid, warmup=False,
                                 **launch.kwargs, **config.all_kwargs())
        expanded.append((config, inner[-1]))
    return expanded


# The torch float32 matmul level that kernels/common.py's dot_input_precision reads as each
# fp32 dot precision.
_MATMUL_LEVELS = {"ieee": "highest", "tf32x3": "high", "tf32": "medium"}


@contextlib.contextmanager
def dot_precision(precision: str) -> Iterator[None]:
    """Within the block, the launchers pick ``precision`` for fp32 dots: torch's float32 matmul
    precision, which they read (through ``dot_input_precision``), is set to its level (this
    machine's setting is irrelevant), then restored, both of torch's settings."""
    matmul = torch.backends.cuda.matmul
    saved = torch.get_float32_matmul_precision(), matmul.fp32_precision
    torch.set_float32_matmul_precision(_MATMUL_LEVELS[precision])
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        matmul.fp32_precision = saved[1]


# ----------------------------------------------------------------------------------------------
# Specialising and compiling as a real launch
# ----------------------------------------------------------------------------------------------


def _target() -> Any:
    return GPUTarget("cuda", 90, 32)


def specialise(launch: Launch) -> tuple[Any, dict[str, Any]]:
    """The ``ASTSource`` and compile options of a JIT launch, derived as Triton's launcher
    derives them (``JITFunction.run``: its binder over the real arguments, then ``_pack_args``)."""
    fn = launch.jit_function
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    backend = make_backend(_target())
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound_args, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__


@dataclass
class Compiled:
    """A kernel compiled for sm_90a: ptxas's figures and what the report reads from its PTX and
    TTGIR (or the error)."""

    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    num_warps: int | None = None
    counts: dict[str, int] = field(default_factory=dict)  # ptx_counts of the whole kernel
    loop: dict[str, int] | None = None  # ptx_counts of the main loop (main_loop), None without loops
    replication: float | None = None  # exp2_replication of the TTGIR
    error: str | None = None
    specialisation: str = ""  # what the binary depends on, hashed (see specialisation_key)


def specialisation_key(source: Any) -> str:
    """A short hash of what Triton compiles a kernel for: the function, its argument types,
    constexprs (integers equal to 1 included) and per-argument attributes (16-byte divisibility).
    Two launches with one key run the same binary (their options equal)."""
    text = repr((source.fn.__name__, sorted(source.signature.items()),
                 sorted(source.constants.items(), key=repr), sorted(source.attrs.items(), key=repr)))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


_compiled: dict[tuple, Compiled] = {}  # one compile (and reading) per binary: launches of one key share it


def compile_launch(launch: Launch) -> Compiled:
    """Compile a JIT launch for sm_90a as a real launch would specialise it (see :func:`specialise`);
    a launch whose binary this process compiled already gets that compile's figures."""
    source, options = specialise(launch)
    key = (id(source.fn), specialisation_key(source), repr(sorted(options.items())))
    if key not in _compiled:
        _compiled[key] = dataclasses.replace(_compile(source, options), specialisation=key[1])
    return _compiled[key]


def _compile(source: Any, options: dict[str, Any]) -> Compiled:
    log = io.StringIO()
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    try:
        # ptxas prints its resource usage only when it runs: never take a cached kernel.
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(source, target=_target(), options=options)
    except Exception as error:  # a config that does not compile is a finding, not a crash
        return Compiled(error=f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}")
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    text = log.getvalue()
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return Compiled(
        registers=int(registers.group(1)) if registers else None,
        spill_stores=int(spills.group(1)) if spills else None,
        spill_loads=int(spills.group(2)) if spills else None,
        shared=kernel.metadata.shared,
        num_warps=kernel.metadata.num_warps,
        counts=ptx_counts(kernel.asm["ptx"]),
        loop=main_loop(kernel.asm["ptx"]),
        replication=exp2_replication(kernel.asm["ttgir"]),
    )


# ----------------------------------------------------------------------------------------------
# Reading PTX and TTGIR
# ----------------------------------------------------------------------------------------------

_PTX_PATTERNS = {
    "wgmma": r"\bwgmma\.mma_async",
    "mma_sync": r"\bmma\.sync",
    "fma": r"\bfma\.rn(?:\.ftz)?\.f32\b",
    "cp_async": r"\bcp\.async\.c[ag]\b",
    "tma": r"\bcp\.async\.bulk\.tensor",
    "ex2": r"\bex2\.approx",
}


def ptx_counts(ptx: str) -> dict[str, int]:
    """Static counts of the instructions the report names, in the whole kernel."""
    return {name: len(re.findall(pattern, ptx)) for name, pattern in _PTX_PATTERNS.items()}


def ptx_loops(ptx: str) -> list[dict[str, int]]:
    """The loops of a kernel, as the instruction counts of each: a loop is the text from a label
    to a later branch back to it (Triton emits structured loops), nested loops included."""
    lines = ptx.splitlines()
    labels: dict[str, int] = {}
    loops = []
    for number, line in enumerate(lines):
        label = re.match(r"^\s*(\$L__BB\d+_\d+):", line)
        if label:
            labels[label.group(1)] = number
        branch = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if branch and labels.get(branch.group(1), number) < number:
            loops.append(ptx_counts("\n".join(lines[labels[branch.group(1)]: number + 1])))
    return loops


def main_loop(ptx: str) -> dict[str, int] | None:
    """The loop with the most MMA instructions (wgmma, mma.sync, then FMA): the kernel's hot loop."""
    loops = ptx_loops(ptx)
    if not loops:
        return None
    return max(loops, key=lambda counts: (counts["wgmma"] + counts["mma_sync"], counts["fma"]))


def _layouts(ttgir: str) -> dict[str, dict[str, Any]]:
    """TTGIR layout aliases (``#mma``, ``#blocked1``, ...) with their integer-list parameters."""
    layouts = {}
    for alias, kind, body in re.findall(r"^(#\w+) = #ttg\.(\w+)<\{(.*)\}>", ttgir, flags=re.MULTILINE):
        params: dict[str, Any] = {key: [int(x) for x in re.findall(r"\d+", value)]
                                  for key, value in re.findall(r"(\w+) = \[([\d, ]*)\]", body)}
        params.update((key, int(value)) for key, value in re.findall(r"(\w+) = (\d+)\b(?!\])", body))
        params["kind"] = kind
        layouts[alias] = params
    return layouts


def layout_replication(shape: Sequence[int], layout: dict[str, Any]) -> float | None:
    """By how much a layout's warps cover more than a tensor: 1 for an exact or tiled cover, 2
    when, e.g., 8 warps of 16-row MMA slices lie over 64 rows (two warpgroups hold the same
    elements). None for layouts it does not model."""
    warps = layout.get("warpsPerCTA")
    if layout["kind"] == "blocked":
        cover = [s * t * w for s, t, w in zip(layout["sizePerThread"], layout["threadsPerWarp"], warps,
                                                         strict=True)]
    elif layout["kind"] == "nvidia_mma" and len(shape) == 2:
        version = layout["versionMajor"]
        instr = layout.get("instrShape", [16, 8])
        cover = [16 * warps[0], (instr[1] if version == 3 else 8) * warps[1]]
    else:
        return None
    return math.prod(max(1.0, c / s) for c, s in zip(cover, shape, strict=True))


def exp2_replication(ttgir: str) -> float | None:
    """The largest layout replication of a 2-D ``math.exp2`` in the kernel (the score tile's)."""
    layouts = _layouts(ttgir)
    worst = None
    for dims, alias in re.findall(r"math\.exp2 .*: tensor<(\d+x\d+)xf32, (#\w+)>", ttgir):
        if alias in layouts:
            factor = layout_replication([int(d) for d in dims.split("x")], layouts[alias])
            if factor is not None:
                worst = factor if worst is None else max(worst, factor)
    return worst


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


def _describe_config(config: Any, meta: dict[str, Any]) -> str:
    if config is None:
        tiles = {k: v for k, v in meta.items() if k.startswith("BLOCK") and isinstance(v, int)}
        warps, stages = meta.get("num_warps", 4), meta.get("num_stages", 3)
    else:
        tiles, warps, stages = config.kwargs, config.num_warps, config.num_stages
    shown = "x".join(str(v) for k, v in tiles.items() if k in ("BLOCK_M", "BLOCK_N", "BLOCK_C", "BLOCK_R",
                                                               "BLOCK_K", "BLOCK"))
    return f"{shown} w{warps} s{stages}"


def _describe_launch(meta: dict[str, Any], fn: Any) -> str:
    flags = [f"{name}={meta[name]}" for name in fn.arg_names
             if name in meta and name.isupper() and not name.startswith(("BLOCK", "EVEN"))
             and isinstance(meta[name], (bool, str))]
    return " ".join(flags)


def measure_launch(op: OpSpec, problem: Problem, launch: Launch, configs: str = "kept", index: int = 0
                   ) -> list[Row]:
    """Rows for one recorded launch: every kept config (``configs="kept"``) or only the
    preferred / the first benchmarked one (``"preferred"``)."""
    scale = op.unit[1](problem)
    spec = op.kernel(launch.jit_function.__name__)
    if isinstance(launch.kernel, Autotuner):
        kept, tuned, preferred = tuning(launch)
        expanded = expand(launch, kept)
    else:  # a plain launch: its own config (None), fixed
        tuned, preferred, expanded = [None], None, [(None, launch)]
    choice = "fixed" if tuned == [None] else "perf model" if preferred is not None else "first tuned"
    stand_in = preferred if preferred is not None else tuned[0]
    rows = []
    for config, jit_launch in expanded:
        is_preferred = config is None or config == stand_in
        if configs == "preferred" and not is_preferred:
            continue
        meta = {**jit_launch.named(), **({} if config is None else config.all_kwargs())}
        meta.setdefault("num_warps", 4)
        meta.setdefault("num_stages", 3)
        row = Row(op=op.name, problem=problem.label, n=problem.n, precision=problem.precision,
                  batch=problem.batch, head_dim=problem.head_dim, channels=problem.channels,
                  variant=problem.variant, kernel=launch.jit_function.__name__,
                  launch=_describe_launch(meta, launch.jit_function), config=_describe_config(config, meta),
                  tuned=config is None or config in tuned, preferred=is_preferred,
                  choice=choice if is_preferred else "", launch_index=index)
        compiled = compile_launch(jit_launch)
        row.error = compiled.error
        if compiled.error is None:
            counts, loop = compiled.counts, compiled.loop
            row.registers = compiled.registers
            row.spill_bytes = (compiled.spill_stores or 0) + (compiled.spill_loads or 0)
            row.shared = compiled.shared
            row.num_warps = compiled.num_warps or meta["num_warps"]
            row.counts = counts
            row.mma = "wgmma" if counts["wgmma"] else "mma.sync" if counts["mma_sync"] else "FMA"
            row.loop_ex2 = loop["ex2"] if loop else None
            row.loop_cp_async = loop["cp_async"] if loop else 0
            row.replication = compiled.replication
            row.specialisation = compiled.specialisation
            if spec is not None and spec.exp2_tile is not None:
                row.ex2_share = spec.exp2_tile(meta) / (32 * row.num_warps)
            row.resident = resident_programs(row.registers, row.num_warps, row.shared)
        row.programs = jit_launch.programs()
        if spec is not None:
            score, rest = spec.work(meta, row.programs)
            executed = score * (row.replication or 1.0) + rest
            row.flops, row.exp2, row.bytes = (executed.flops / scale, executed.exp2 / scale,
                                              executed.bytes / scale)
            if row.resident:
                row.waves = row.programs / (H100_SMS * row.resident)
                row.model_us = model_time(executed, row.programs, _model_class(row))
        rows.append(row)
    return rows


# An sm_90 SM: 64K 32-bit registers (allocated per warp in units of 256), 64 resident warps,
# 32 resident blocks, 228 KiB of shared memory (1 KiB of it reserved per block).
_SM_REGISTERS, _SM_WARPS, _SM_BLOCKS, _SM_SHARED, _BLOCK_RESERVED_SHARED = 65536, 64, 32, 228 * 1024, 1024


def resident_programs(registers: int | None, num_warps: int, shared: int | None) -> int | None:
    """How many programs of a kernel one H100 SM holds at a time (None: none fits)."""
    per_warp = -(-(registers or 1) * 32 // 256) * 256
    fits = min(_SM_REGISTERS // (per_warp * num_warps), _SM_WARPS // num_warps, _SM_BLOCKS,
               _SM_SHARED // ((shared or 0) + _BLOCK_RESERVED_SHARED))
    return fits or None


def _model_class(row: Row) -> str:
    """The operand class whose rate the row's matmuls run at (FMA kernels: the "ieee" rate)."""
    if row.mma == "FMA" or row.precision == "fp32-ieee":
        return "ieee"
    return {"fp32-tf32": "tf32", "fp32-tf32x3": "tf32x3"}.get(row.precision, "16-bit")


def model_time(work: Work, programs: int, operand_class: str) -> float:
    """The perf model's time of a launch on an H100, in microseconds: each program takes the
    longest of its matmul, exp2 and operand-traffic time at one SM's rates, the busiest SM runs
    ceil(programs / SMs) of them (danet_kernels.kernels.common, the autotuners' model too).
    A ranking and a scale, not a measurement: L2 bandwidth is an assumption, DRAM, latency,
    launch overhead and the softmax's other instructions are left out."""
    per_program = program_clocks(work.flops / programs, work.exp2 / programs, work.bytes / programs,
                                 operand_class)
    return launch_clocks(programs, per_program, H100_SMS) / H100_CLOCK_HZ * 1e6


def measure(ops: Sequence[str] | None = None, sizes: Sequence[int] | None = None,
            precisions: Sequence[str] | None = None, configs: str = "kept",
            problems: Sequence[Problem] | None = None, progress: Callable[[str], None] | None = None,
            batch: int = 1, head_dim: int = HEAD_DIM, channels: int = CHANNELS) -> list[Row]:
    """Compile and measure the ops' kernels: each op's problems for the sizes, precisions and
    shape given (:meth:`OpSpec.problems`; without any, its full set), or ``problems``; an op
    skips those it does not run (:meth:`OpSpec.runs`: other precisions, variants it does not
    name)."""
    specs = all_specs()
    rows = []
    for name in ops or list(specs):
        op = specs[name]
        chosen = ([p for p in problems if op.runs(p)] if problems
                  else op.problems(sizes, precisions, batch, head_dim, channels))
        for problem in chosen:
            if progress:
                progress(f"{op.name} {problem.label}")
            with dot_precision(problem.dot_precision), recorded_launches() as launches:
                op.launch(problem)
            for index, launch in enumerate(launches):
                rows.extend(measure_launch(op, problem, launch, configs, index))
    return rows


def minimal_work(op: OpSpec, problem: Problem) -> Work:
    return op.minimal(problem) * (1.0 / op.unit[1](problem))


# ----------------------------------------------------------------------------------------------
# The markdown report
# ----------------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    """Four significant digits (1297, 2.031, 0.0213), or a dash."""
    return "—" if value is None else f"{value:.4g}"


def _choice(row: Row) -> str:
    marks = {"fixed": "", "perf model": "", "first tuned": " (first tuned; no perf model)"}
    return f"{row.kernel} {row.config}{marks[row.choice]}"


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__}
    try:
        release = re.search(r"release ([\d.]+)", get_ptxas_version(90))
        versions["ptxas"] = release.group(1) if release else "?"
    except Exception:  # the version line is informative only
        versions["ptxas"] = "?"
    return versions


def _op_summary(op: OpSpec, rows: list[Row], problems: list[Problem]) -> list[str]:
    unit = op.unit[0]
    lines = [f"| problem | preferred config (per kernel) | registers | spill B | cp.async | replicated | "
             f"FLOPs / {unit} | exp2 / {unit} | bytes / {unit} | minimal FLOPs / {unit} | "
             f"minimal exp2 / {unit} | model µs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for problem in problems:
        chosen = [r for r in rows if r.problem == problem.label and r.preferred]
        if not chosen:
            continue
        total = Work()
        known = all(r.flops is not None for r in chosen)
        for r in chosen:
            total = total + Work(r.flops or 0, r.exp2 or 0, r.bytes or 0)
        minimal = minimal_work(op, problem)
        lines.append(
            f"| {problem.label} | {'; '.join(_choice(r) for r in chosen)} | "
            f"{max((r.registers or 0) for r in chosen)} | {sum((r.spill_bytes or 0) for r in chosen)} | "
            f"{sum(r.counts.get('cp_async', 0) for r in chosen)} | "
            f"{'yes' if any((r.replication or 1) > 1 for r in chosen) else 'no'} | "
            f"{_fmt(total.flops) if known else '—'} | {_fmt(total.exp2) if known else '—'} | "
            f"{_fmt(total.bytes) if known else '—'} | {_fmt(minimal.flops)} | {_fmt(minimal.exp2)} | "
            f"{_fmt(sum(r.model_us for r in chosen)) if all(r.model_us for r in chosen) else '—'} |")
    return lines


def _targets_section(results: list[Any]) -> list[str]:
    """The op's targets, each met, not met (with what breaks it) or not evaluated by this run."""
    lines = ["Targets (benchmarks/compile_targets.py; CI asserts them on a small set of problems):", ""]
    for result in results:
        if not result.evaluated:
            lines.append(f"- not evaluated here (no row it applies to): {result.target}")
        elif result.met:
            lines.append(f"- met: {result.target}")
        else:
            shown = "; ".join(result.failures[:6]) + ("; ..." if len(result.failures) > 6 else "")
            lines.append(f"- **NOT MET**: {result.target}: {shown}")
    return lines


_COLUMNS = ("problem", "kernel", "launch", "config", "tuned", "pref", "regs", "spill B", "smem B", "MMA",
            "wgmma", "mma", "fma", "cp.async (loop)", "TMA", "ex2/it (share)", "repl", "programs", "waves",
            "FLOPs", "exp2", "bytes", "model µs")


def _cells(values: Sequence[object]) -> str:
    return "| " + " | ".join(str(v) for v in values) + " |"


def _row_cells(r: Row) -> list[object]:
    head = [r.problem, r.kernel, r.launch, r.config, "✓" if r.tuned else "", "✓" if r.preferred else ""]
    if r.error:
        return [*head, f"compile error: {r.error}", *[""] * (len(_COLUMNS) - len(head) - 1)]
    c = r.counts
    share = "—" if r.ex2_share is None else f"{r.ex2_share:g}"
    shared = r.shared if (r.shared or 0) <= MAX_SHARED_BYTES else f"{r.shared} (too much to launch)"
    return [*head, r.registers, r.spill_bytes, shared, r.mma, c["wgmma"], c["mma_sync"], c["fma"],
            f"{c['cp_async']} ({r.loop_cp_async})", c["tma"], f"{_fmt(r.loop_ex2)} ({share})",
            _fmt(r.replication), r.programs, _fmt(r.waves), _fmt(r.flops), _fmt(r.exp2), _fmt(r.bytes),
            _fmt(r.model_us)]


def check_targets(rows: Sequence[Row]) -> list[Any]:
    """Every target of every op that has rows, checked on them (compile_targets.TargetResult)."""
    return compile_targets.evaluate({name: op.targets for name, op in all_specs().items()}, rows)


def render_markdown(rows: list[Row], results: list[Any], command: str, versions: dict[str, str] | None = None
                    ) -> str:
    """docs/compile_report.md from the measured rows and the targets checked on them
    (:func:`check_targets`)."""
    versions = versions or _versions()
    specs = all_specs()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Compile report: the kernels as a Hopper GPU will run them",
        "",
        f"Generated {when} by `{command}` (triton {versions['triton']}, ptxas {versions['ptxas']}, "
        f"torch {versions['torch']}, python {versions['python']}), for sm_90a on a machine without a GPU. "
        "Do not edit: rerun the command (see benchmarks/compile_report.py for how it measures).",
        "",
        "Every launch is the one the op's own launcher makes for the problem, specialised as Triton's "
        "launcher specialises a real one (16-byte divisibility of pointers, sizes and strides where "
        "they have it, stride-1 axes as constants). Columns:",
        "",
        "- Rows: every config the prune keeps. *tuned*: among the configs the autotuner benchmarks (its "
        "perf model's top-k); *pref*: ranked first by the perf model (a plain launch is both; without a "
        "perf model the first tuned config stands in, and the GPU's autotuner decides).",
        "- *regs*, *spill B* (stores + loads), *smem B*: from ptxas and Triton's metadata.",
        "- *MMA*: wgmma, mma.sync or FMA (no tensor cores); *wgmma / mma / fma / cp.async / TMA*: static "
        "instruction counts in the PTX, cp.async also in the main loop (the loop with the most MMA "
        "instructions: its loads software-pipelined).",
        "- *ex2/it (share)*: ex2 per thread in one iteration of the main loop, beside the exp2 tile's "
        "elements over the threads; *repl*: by how much the warps of the exp2 tile's layout cover more "
        "than the tile (2: two warpgroups compute the same scores and exponentials).",
        "- *FLOPs*, *exp2*, *bytes*: executed by the whole launch (grid x tiles, the score part times the "
        "replication), per the op's unit. Tiles are counted whole, so at N = 9409 a 128-row, 64-key tile "
        "covers 9472 positions (+1.3% of N^2). exp2 counts one per score; the per-row rescale of the "
        "online softmax (one per row and key block) shows only in *ex2/it*. Bytes are the operand tiles "
        "streamed from L2 into the SMs.",
        "- *waves*: programs over an H100's 132 SMs times the programs one SM holds (registers, shared "
        "memory); *model µs*: the perf model's time on an H100 (each program the longest of its matmul, "
        "exp2 and L2 time at one SM's rates, in waves; `model_time`): a ranking and a scale, not a "
        "measurement.",
        "",
    ]
    for name, op in specs.items():
        op_rows = [r for r in rows if r.op == name]
        if not op_rows:
            continue
        problems = _problems_of(op_rows)
        out += [f"## {op.title}", ""]
        if op.notes:
            out += [*op.notes, ""]
        out += [*_targets_section([t for t in results if t.op == name]), ""]
        out += ["Preferred configs, all kernels of one call summed:", ""]
        out += _op_summary(op, op_rows, problems)
        unit = op.unit[0]
        out += ["", f"All configs (FLOPs, exp2, bytes per {unit}):", "", _cells(_COLUMNS),
                "|" + "---|" * len(_COLUMNS)]
        out += [_cells(_row_cells(r)) for r in op_rows]
        out.append("")
    return "\n".join(out)


def _problems_of(rows: list[Row]) -> list[Problem]:
    """The problems of some rows, in order of appearance."""
    problems: dict[str, Problem] = {}
    for r in rows:
        problems.setdefault(r.problem, Problem(r.n, r.precision, r.batch, r.head_dim, r.channels, r.variant))
    return list(problems.values())


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the report (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", help=f"ops to compile (default: all: {', '.join(all_specs())})")
    parser.add_argument("--sizes", nargs="+", type=int, help=f"N values (default: each op's, {SIZES} "
                        "and its extra problems)")
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), help="default: each op's")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM, help="d of q and k")
    parser.add_argument("--channels", type=int, default=CHANNELS, help="C of v (PAM) and of x (CAM)")
    parser.add_argument("--problems", nargs="+", type=Problem.parse,
                        metavar="N:PRECISION[:d=..][:C=..][:B=..][:VARIANT]",
                        help="run exactly these problems (instead of sizes x precisions)")
    parser.add_argument("--configs", choices=("kept", "preferred"), default="kept",
                        help="every config the prune keeps, or the preferred one per launch")
    parser.add_argument("--out", default="docs/compile_report.md", help="markdown file ('-': stdout)")
    parser.add_argument("--json", help="also write the rows and the targets' results as JSON here")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 when a target of the run is not met")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the report compiles the kernels the GPU would run")
    rows = measure(args.ops, args.sizes, args.precisions, args.configs, args.problems,
                   progress=lambda what: print(f"compiling {what}", file=sys.stderr),
                   batch=args.batch, head_dim=args.head_dim, channels=args.channels)
    # What made the numbers: the arguments less the output-only ones (--out, --json, --check).
    given = list(argv if argv is not None else sys.argv[1:])
    output = ("--out", "--json")
    shown = [a for i, a in enumerate(given) if a not in (*output, "--check")
             and not a.startswith(("--out=", "--json=")) and (i == 0 or given[i - 1] not in output)]
    command = "python -m benchmarks.compile_report" + "".join(f" {shlex.quote(a)}" for a in shown)
    results = check_targets(rows)
    text = render_markdown(rows, results, command)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text + "\n")
    if args.json:
        found = {"rows": [dataclasses.asdict(r) for r in rows],
                 "targets": [dataclasses.asdict(t) for t in results]}
        Path(args.json).write_text(json.dumps(found, indent=1))
    missed = [t for t in results if t.evaluated and not t.met]
    for target in missed:
        print(f"target not met ({target.op}): {target.target}: {'; '.join(target.failures)}", file=sys.stderr)
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
