"""The compile report: what a Hopper GPU will execute, measured on a machine without one.

Usage, from the repository root (no GPU, no TRITON_INTERPRET)::

    python -m benchmarks.compile_report --tutorial PATH         # everything -> docs/compile_report.md
    python -m benchmarks.compile_report --ops pam_forward --problems 9409:bf16 9409:bf16:B=2 --out -
    python -m benchmarks.compile_report --ops pam_backward --problems 9409:fp32-tf32x3 \
        1024:bf16:d=256:C=2048 --check --out -                 # exit status 1 on a target not met

How it measures. Each op's launcher (the code a user's call runs) is called on CPU tensors of the
problem's shapes with Triton's launch recorded instead of run (:func:`recorded_launches`); an
autotuned launch is expanded into every config its prune keeps, each through the autotuner's own
chain down to the ``JITFunction`` launch it would make, and specialised as Triton's launcher
specialises a real one (its binder over the recorded arguments: 16-byte divisibility, integers
equal to 1 as constants; :func:`specialise`), then compiled for sm_90a with Triton's ptxas, once
per binary (:func:`compile_launch`). A :class:`~benchmarks.compile_types.Row` per kernel, config
and problem holds ptxas's registers and spills, the shared memory, the PTX's instruction counts
(the main loop's too: the loop with the most MMAs), the exp2 tile's layout replication (TTGIR),
the work of the whole launch from the op's work model (``benchmarks/compile_specs/<op>.py``), and
the perf model's time (:func:`model_us`, kernels/common.py's ``launch_clocks``, which the autotuners
rank by), calibrated on Triton's fused-attention tutorial (benchmarks/compile_calibration.py,
``--tutorial``). Every run checks the ops' targets (benchmarks/compile_targets.py) on its rows;
tests/danet_kernels/test_hopper_compile.py asserts them in CI on a small set.

``--pass-times PATH``: the model's time per problem and pass as JSON (:func:`pass_times`), what the
benchmark suite's pam / cam predictor reads (benchmarks/kernel_model_times.json, docs/performance.md).
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

from benchmarks import compile_calibration, compile_specs, compile_targets
from benchmarks.compile_types import PRECISIONS, SIZES, OpSpec, Problem, Row, Work
from danet_kernels.kernels.common import (
    CALIBRATION,
    H100_CLOCK_HZ,
    H100_SMS,
    MATMUL_LEVEL_PRECISIONS,
    MAX_SHARED_BYTES,
    Calibration,
    LoopCost,
    launch_clocks,
    operand_class,
    resident_programs,
)

__all__ = ["Compiled", "Launch", "all_specs", "calibrate", "compile_launch", "layout_replication", "main",
           "measure", "measure_op", "model_us", "pass_times", "ptx_loops", "recorded_launches",
           "render_markdown", "specialise"]


def all_specs() -> dict[str, OpSpec]:
    """Every op the report knows, by name (one module per op under ``benchmarks/compile_specs``)."""
    return {spec.name: spec for spec in compile_specs.SPECS}


# ---- Recording launches ----------------------------------------------------------------------


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
    """Within the block, a Triton launch (``kernel[grid](...)``) is recorded instead of run, at the
    outermost kernel object (an autotuner before it tunes), the launchers unchanged; under
    TRITON_INTERPRET=1 (the tests) too, so that launchers can be called on "meta" tensors."""
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
    """An autotuned launch's configs: those its early prune keeps, those the autotuner would
    benchmark (its own ``prune_configs``: the prune, then the perf model's top-k) and the perf
    model's first among them (None without a perf model, unless one alone is benchmarked)."""
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
    """``(config, JIT launch)`` for each config of an autotuned launch, run through the autotuner's
    chain (heuristics included) to the ``JITFunction`` launch it would make."""
    expanded = []
    for config in configs:
        with recorded_launches() as inner:
            launch.kernel.fn.run(*launch.args, grid=launch.grid, warmup=False,
                                 **launch.kwargs, **config.all_kwargs())
        expanded.append((config, inner[-1]))
    return expanded


# The torch float32 matmul level that kernels/common.py's dot_input_precision reads as each
# fp32 dot precision.
_MATMUL_LEVELS = {precision: level for level, precision in MATMUL_LEVEL_PRECISIONS.items()}


@contextlib.contextmanager
def dot_precision(precision: str) -> Iterator[None]:
    """Within the block the launchers pick ``precision`` for fp32 dots: torch's float32 matmul
    precision, which they read (``dot_input_precision``), is set to its level, then restored."""
    matmul = torch.backends.cuda.matmul
    saved = torch.get_float32_matmul_precision(), matmul.fp32_precision
    torch.set_float32_matmul_precision(_MATMUL_LEVELS[precision])
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        matmul.fp32_precision = saved[1]


# ---- Specialising and compiling as a real launch ---------------------------------------------


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
    spill_bytes: int | None = None  # stores and loads
    shared: int | None = None
    num_warps: int | None = None
    counts: dict[str, int] = field(default_factory=dict)  # ptx_counts of the whole kernel
    loop: dict[str, int] | None = None  # ptx_counts of the main loop (main_loop), None without loops
    replication: float | None = None  # exp2_replication of the TTGIR
    error: str | None = None
    specialisation: str = ""  # what the binary depends on, hashed (see specialisation_key)


def specialisation_key(source: Any) -> str:
    """A short hash of what Triton compiles a kernel for (the function, its argument types,
    constexprs, per-argument attributes): launches with one key (and options) run one binary."""
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
        spill_bytes=int(spills.group(1)) + int(spills.group(2)) if spills else None,
        shared=kernel.metadata.shared,
        num_warps=kernel.metadata.num_warps,
        counts=ptx_counts(kernel.asm["ptx"]),
        loop=main_loop(kernel.asm["ptx"]),
        replication=exp2_replication(kernel.asm["ttgir"]),
    )


# ---- Reading PTX and TTGIR -------------------------------------------------------------------

_PTX_PATTERNS = {
    "instructions": r"^\s+(?:@!?%\w+\s+)?[a-z]",
    "barriers": r"\bbar\.sync\b",
    "mma_wait_all": r"\bwgmma\.wait_group\.sync\.aligned\s+0;",
    "wgmma": r"\bwgmma\.mma_async",
    "mma_sync": r"\bmma\.sync",
    "fma": r"\bfma\.rn(?:\.ftz)?\.f32\b",
    "cp_async": r"\bcp\.async\.c[ag]\b",
    "tma": r"\bcp\.async\.bulk\.tensor",
    "ex2": r"\bex2\.approx",
}


def ptx_counts(ptx: str) -> dict[str, int]:
    """Static counts of the instructions the report names (and of all of them), in the whole kernel."""
    return {name: len(re.findall(pattern, ptx, flags=re.MULTILINE))
            for name, pattern in _PTX_PATTERNS.items()}


def ptx_loops(ptx: str) -> list[dict[str, int]]:
    """The instruction counts of each loop of a kernel: the text from a label to a later branch back
    to it (Triton emits structured loops), nested loops included."""
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
    """By how much a layout's warps cover more than a tensor: 1 for an exact or tiled cover, 2 when
    8 warps of 16-row MMA slices lie over 64 rows (two warpgroups hold the same elements); None for
    layouts it does not model."""
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


# ---- Measuring -------------------------------------------------------------------------------


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


def measure_launch(op: OpSpec, problem: Problem, launch: Launch, configs: str = "kept") -> list[Row]:
    """Rows for one recorded launch: every kept config, or only the preferred one (``"preferred"``)."""
    scale = op.unit[1](problem)
    spec = op.kernel(launch.jit_function.__name__)
    plain = not isinstance(launch.kernel, Autotuner)
    if plain:  # its own config (None), fixed
        tuned, preferred, expanded = [None], None, [(None, launch)]
    else:
        kept, tuned, preferred = tuning(launch)
        expanded = expand(launch, kept)
    choice = "fixed" if plain else "perf model" if preferred is not None else "first tuned"
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
                  choice=choice if is_preferred else "")
        compiled = compile_launch(jit_launch)
        row.error = compiled.error
        if compiled.error is None:
            counts, loop = compiled.counts, compiled.loop
            row.registers = compiled.registers
            row.spill_bytes = compiled.spill_bytes or 0
            row.shared = compiled.shared
            row.num_warps = compiled.num_warps or meta["num_warps"]
            row.counts = counts
            row.mma = "wgmma" if counts["wgmma"] else "mma.sync" if counts["mma_sync"] else "FMA"
            row.loop_ex2 = loop["ex2"] if loop else None
            row.loop_cp_async = loop["cp_async"] if loop else 0
            body = loop or counts  # a kernel without a loop: all of it, once
            row.loop_instructions = body["instructions"] - body["wgmma"]
            row.serial = body["mma_wait_all"] > 0
            row.num_stages = meta["num_stages"]
            row.replication = compiled.replication
            row.specialisation = compiled.specialisation
            if spec is not None and spec.exp2_tile is not None:
                row.ex2_share = spec.exp2_tile(meta) / (32 * row.num_warps)
            row.resident = resident_programs(row.registers or 1, row.num_warps, row.shared or 0)
        row.programs = jit_launch.programs()
        if spec is not None:
            score, rest = spec.work(meta, row.programs)
            executed = score * (row.replication or 1.0) + rest
            row.flops, row.exp2, row.bytes = (executed.flops / scale, executed.exp2 / scale,
                                              executed.bytes / scale)
            row.iterations = spec.iterations(meta)
            per_trip = 1.0 / (row.programs * row.iterations)
            row.loop_flops, row.loop_bytes = executed.flops * per_trip, executed.bytes * per_trip
            if row.resident:
                row.waves = row.programs / (H100_SMS * row.resident)
                row.model_us = model_us(row)
        rows.append(row)
    return rows


def _model_class(row: Row) -> str:
    """The operand class whose rate the row's matmuls run at: the kernels' own
    (kernels/common.py's ``operand_class``), the "ieee" (FMA) rate where the compiled kernel
    has no MMAs."""
    if row.mma == "FMA":
        return "ieee"
    dtype, precision = PRECISIONS[row.precision]
    return operand_class(getattr(torch, dtype), precision)


def model_us(row: Row, calibration: Calibration = CALIBRATION) -> float:
    """The perf model's time of a row's launch on an H100 in µs (kernels/common.py's ``launch_clocks``,
    which the autotuners rank by) from the compiled main loop: its instructions, and whether it
    waits for all its MMAs before the rest (a ``wgmma.wait_group 0`` inside it)."""
    loop = LoopCost(row.loop_flops, row.loop_instructions, row.loop_ex2 or 0, row.loop_bytes, row.serial)
    clocks = launch_clocks(row.programs, row.iterations, loop, row.num_warps, row.num_stages, row.resident,
                           _model_class(row), calibration=calibration)
    return clocks / H100_CLOCK_HZ * 1e6


def measure(ops: Sequence[str] | None = None, configs: str = "kept",
            problems: Sequence[Problem] | None = None,
            progress: Callable[[str], None] | None = None) -> list[Row]:
    """Compile and measure the ops' kernels (all without ``ops``): ``problems``, or each op's full
    set (:meth:`OpSpec.problems`); an op skips a problem it does not run (:meth:`OpSpec.runs`:
    another precision, a variant it does not name)."""
    rows = []
    for name in ops or list(all_specs()):
        op = all_specs()[name]
        for problem in [p for p in (problems or op.problems()) if op.runs(p)]:
            if progress:
                progress(f"{op.name} {problem.label}")
            rows += measure_op(op, problem, configs)
    return rows


def measure_op(op: OpSpec, problem: Problem, configs: str = "kept") -> list[Row]:
    """The rows of every launch one call of an op makes for a problem (see :func:`measure_launch`)."""
    with dot_precision(problem.dot_precision), recorded_launches() as launches:
        op.launch(problem)
    return [row for launch in launches for row in measure_launch(op, problem, launch, configs)]


def minimal_work(op: OpSpec, problem: Problem) -> Work:
    return op.minimal(problem) * (1.0 / op.unit[1](problem))


# ---- The markdown report ---------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    """Four significant digits (1297, 2.031, 0.0213), or a dash."""
    return "—" if value is None else f"{value:.4g}"


def _choice(row: Row) -> str:
    marks = {"fixed": "", "perf model": "", "first tuned": " (first tuned; no perf model)"}
    return f"{row.kernel} {row.config}{marks[row.choice]}"


def _versions() -> dict[str, str]:
    release = re.search(r"release ([\d.]+)", get_ptxas_version(90))
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "ptxas": release.group(1) if release else "?"}


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
            f"{_fmt(sum(r.model_us for r in chosen)) + _ERROR if all(r.model_us for r in chosen) else '—'} |")
    return lines


def _targets_section(results: list[Any], where: str = "CI asserts them on a small set") -> list[str]:
    """The op's targets, each met, not met (with what breaks it) or not evaluated by this run."""
    lines = [f"Targets (benchmarks/compile_targets.py; {where}):", ""]
    for result in results:
        if not result.evaluated:
            lines.append(f"- not evaluated here (no row it applies to): {result.target}")
        elif result.met:
            lines.append(f"- met: {result.target}")
        else:
            shown = "; ".join(result.failures[:6]) + ("; ..." if len(result.failures) > 6 else "")
            lines.append(f"- **NOT MET**: {result.target}: {shown}")
    return lines


_ERROR = f" ± {CALIBRATION.error:.0%}"  # what every predicted time carries (the calibration's error)
_COLUMNS = ("problem", "kernel", "launch", "config", "tuned", "pref", "regs", "spill B", "smem B", "MMA",
            "wgmma", "mma", "fma", "cp.async (loop)", "TMA", "ex2/it (share)", "repl", "instr/it", "programs",
            "waves", "FLOPs", "exp2", "bytes", f"model µs{_ERROR}")


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
            _fmt(r.replication), f"{r.loop_instructions}{'' if r.serial else ' (overlapped)'}", r.programs,
            _fmt(r.waves), _fmt(r.flops), _fmt(r.exp2), _fmt(r.bytes), _fmt(r.model_us)]


def check_targets(rows: Sequence[Row]) -> list[Any]:
    """Every target of every op that has rows, checked on them (compile_targets.TargetResult)."""
    return compile_targets.evaluate({name: op.targets for name, op in all_specs().items()}, rows)


def calibrate(tutorial: str) -> tuple[list[str], list[Any]]:
    """The calibration section (compile_calibration: Triton's fused-attention tutorial at
    ``tutorial``, its published H100 figures, the model's) and its target checked."""
    points = compile_calibration.calibration_rows(tutorial, measure_op)
    rows = [row for _, figure_rows in points for row in figure_rows]
    target = compile_calibration.calibration_target(model_us)
    results = compile_targets.evaluate({"tutorial_attention": [target]}, rows)
    lines = compile_calibration.calibration_section(points, model_us, tutorial)
    return [*lines, "", *_targets_section(results, "the report checks it when --tutorial is given")], results


def render_markdown(rows: list[Row], results: list[Any], command: str, versions: dict[str, str] | None = None,
                    calibration: list[str] | None = None) -> str:
    """docs/compile_report.md from the measured rows, the targets checked on them
    (:func:`check_targets`) and the calibration's section (:func:`calibrate`)."""
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
        "Every launch is the one the op's own launcher makes, specialised as Triton's launcher specialises "
        "a real one. Rows: every config the prune keeps; *tuned*: among those the autotuner benchmarks; "
        "*pref*: its perf model's first (a plain launch is both). *regs*, *spill B*, *smem B*: ptxas and "
        "Triton's metadata. *MMA*, *wgmma / mma / fma / cp.async / TMA*: the PTX (cp.async also in the "
        "main loop, the loop with the most MMAs). *ex2/it (share)*: ex2 per thread per iteration of the "
        "main loop beside the exp2 tile's elements over the threads; *repl*: how many times the warps of "
        "the exp2 tile's layout cover it (2: two warpgroups compute the same scores). *instr/it*: PTX "
        "instructions per thread per iteration but the MMAs (*overlapped*: the loop does not wait for "
        "all its MMAs first). *FLOPs*, *exp2*, *bytes* (operand bytes from L2): executed by the whole "
        "launch, tiles counted whole, per the op's unit. *waves*: programs over 132 SMs x the programs "
        "one SM holds.",
        "",
        "*model µs*: the perf model's time on an H100 (`model_us`: kernels/common.py's `launch_clocks`, "
        "which the autotuners rank by): per main-loop iteration the MMA phase at the calibrated "
        "efficiency, the wait for it and the other instructions in turn where the loop waits for all its "
        "MMAs first, co-resident programs filling each other's gaps, L2 traffic and latency; the busiest "
        "SM's programs at the real grid, a fixed cost each. Calibrated on Triton's fused-attention "
        f"tutorial (below); every time carries its largest error ({CALIBRATION.error:.0%}). Our kernels "
        "run 8-warp programs and wider MMAs than the tutorial's, outside what the calibration covers: "
        "their error may be larger.",
        "",
        "## Calibration: Triton's fused-attention tutorial against its published H100 speeds",
        "",
        *(calibration or ["Not run here (`--tutorial PATH` runs it: benchmarks/compile_calibration.py)."]),
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
    found = {r.problem: Problem(r.n, r.precision, r.batch, r.head_dim, r.channels, r.variant) for r in rows}
    return list(found.values())


# The benchmark suite's attention passes: the report's ops each runs (the default backward path).
PASS_OPS = {(op, pass_): tuple(f"{op}_{part}" for part in parts) for op in ("pam", "cam")
            for pass_, parts in (("forward", ("forward",)), ("forward+backward", ("forward", "backward")))}


def pass_times(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The model's time (µs) of each pass of :data:`PASS_OPS` at each problem whose every launch
    has one: the preferred configs' times summed, as ``{"op", "pass", "B", "N", "C", "d",
    "precision", "variant", "model_us"}``."""
    per_op: dict[tuple[Any, ...], list[float | None]] = {}  # (op, *problem) -> its launches' times
    for r in (r for r in rows if r.preferred):
        key = (r.op, r.batch, r.n, r.channels, r.head_dim, r.precision, r.variant)
        per_op.setdefault(key, []).append(r.model_us)
    times = []
    for problem in dict.fromkeys(key[1:] for key in per_op):
        for (attention, pass_), ops in PASS_OPS.items():
            launches = [us for op in ops for us in per_op.get((op, *problem), [None])]
            if all(launches):
                times.append(dict(zip(("op", "pass", "B", "N", "C", "d", "precision", "variant", "model_us"),
                                      (attention, pass_, *problem, round(sum(launches), 1)), strict=True)))
    return times


# ---- Command line ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the report (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", help=f"ops to compile (default: all: {', '.join(all_specs())})")
    parser.add_argument("--problems", nargs="+", type=Problem.parse,
                        metavar="N:PRECISION[:d=..][:C=..][:B=..][:VARIANT]",
                        help=f"run these problems (default: each op's, N in {SIZES} x precisions "
                        f"{', '.join(PRECISIONS)}, and its extra ones)")
    parser.add_argument("--configs", choices=("kept", "preferred"), default="kept",
                        help="every config the prune keeps, or the preferred one per launch")
    parser.add_argument("--out", default="docs/compile_report.md", help="markdown file ('-': stdout)")
    parser.add_argument("--json", help="also write the rows and the targets' results as JSON here")
    parser.add_argument("--pass-times", help="also write the model's time per problem and pass as JSON here "
                        "(benchmarks/kernel_model_times.json: the predictor of the benchmark suite)")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 when a target of the run is not met")
    parser.add_argument("--tutorial", help="a copy of triton-lang/triton's python/tutorials/"
                        "06-fused-attention.py: calibrate the perf model on it (compile_calibration.py)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the report compiles the kernels the GPU would run")
    rows = measure(args.ops, args.configs, args.problems,
                   progress=lambda what: print(f"compiling {what}", file=sys.stderr))
    # What made the numbers: the arguments less the output-only ones (--out, --json, --check).
    given = list(argv if argv is not None else sys.argv[1:])
    output = ("--out", "--json", "--pass-times")
    shown = [a for i, a in enumerate(given) if a not in (*output, "--check")
             and not a.startswith(tuple(f"{o}=" for o in output)) and (i == 0 or given[i - 1] not in output)]
    command = "python -m benchmarks.compile_report" + "".join(f" {shlex.quote(a)}" for a in shown)
    results = check_targets(rows)
    calibration, calibration_results = calibrate(args.tutorial) if args.tutorial else (None, [])
    results += calibration_results
    text = render_markdown(rows, results, command, calibration=calibration)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text + "\n")
    if args.json:
        found = {"rows": [dataclasses.asdict(r) for r in rows],
                 "targets": [dataclasses.asdict(t) for t in results]}
        Path(args.json).write_text(json.dumps(found, indent=1))
    if args.pass_times:  # a line per time, so that a regenerated file's diff reads
        found = {"command": command, "versions": _versions(), "calibration_error": CALIBRATION.error}
        times = ",\n".join(f"  {json.dumps(t)}" for t in pass_times(rows))
        Path(args.pass_times).write_text(f'{json.dumps(found)[:-1]}, "times": [\n{times}\n]}}\n')
    missed = [t for t in results if t.evaluated and not t.met]
    for target in missed:
        print(f"target not met ({target.op}): {target.target}: {'; '.join(target.failures)}", file=sys.stderr)
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
