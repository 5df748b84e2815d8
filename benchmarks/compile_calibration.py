"""The perf model's calibration: Triton's fused-attention tutorial, compiled and modelled by the
report's own instrument, beside the H100 speeds others published for it.

The tutorial (triton-lang/triton, python/tutorials/06-fused-attention.py; triton's wheel does not
ship it) is read from a copy given with ``--tutorial``, never committed here: its forward kernel
``_attn_fwd``, its inner loop and its configs are extracted from the file (the rest needs a GPU at
import) into a scratch module. Each published figure (../shared/baseline/
published_attention_h100.md: the FlashAttention-3 paper's "Triton" line, fp16 forward, non-causal,
batch x seqlen = 16k, hidden 2048; pytorch/benchmark's triton_tutorial_flash_v2) becomes a
recorded launch of that kernel, each tutorial config compiled for sm_90a and modelled like our
kernels; the model's figure is its fastest config's, as the autotuner keeps the fastest. :func:`fit`
searches the constants (kernels/common.py's ``Calibration``) minimising the largest relative
error over the figures, the error every predicted time of the report carries. The two sources'
d = 128 figures differ by up to 20% at one shape (Triton versions and tutorial revisions): no
constants can be closer than about 10% to both.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import triton

from benchmarks.compile_targets import Target
from benchmarks.compile_types import KernelSpec, OpSpec, Problem, Row, Work
from danet_kernels.kernels.common import CALIBRATION, Calibration

__all__ = ["PUBLISHED", "Figure", "calibration_rows", "calibration_section", "calibration_target", "fit",
           "load_tutorial", "modelled", "tutorial_spec"]

ModelUs = Callable[[Row, Calibration], float]  # the report's model_us


@dataclass(frozen=True)
class Figure:
    """A published forward throughput of the tutorial kernel on an H100 SXM, fp16, non-causal."""

    source: str
    head_dim: int
    batch: int
    heads: int
    seqlen: int
    tflops: float

    @property
    def problem(self) -> Problem:
        return Problem(self.seqlen, "fp16", self.batch, self.head_dim, variant=f"heads={self.heads}")

    @property
    def flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.seqlen**2 * self.head_dim


_FIGURES = (("FlashAttention-3 paper, Triton", 64, (340, 382, 396, 400, 401, 403)),
            ("FlashAttention-3 paper, Triton", 128, (323, 372, 389, 389, 392, 395)),
            ("pytorch/benchmark, triton_tutorial_flash_v2", 128, (328.9, 389.7, 433.7, 458.4, 470.7, 476.8)))
PUBLISHED = tuple(Figure(source, d, 2**14 // n, 2048 // d, n, tflops) for source, d, figures in _FIGURES
                  for n, tflops in zip((512, 1024, 2048, 4096, 8192, 16384), figures, strict=True))


def load_tutorial(path: str | Path) -> Any:
    """The tutorial's ``_attn_fwd`` (autotuned over its configs) and ``_attn_fwd_inner``, taken from
    the file with the imports and config list they need (``is_hip`` is False: the CUDA build), as a
    module written to a scratch directory (Triton reads a kernel's source from its file)."""
    wanted = {"configs", "keep", "_attn_fwd_inner", "_attn_fwd"}

    def name(node: ast.stmt) -> str | None:
        return ast.unparse(node.targets[0]) if isinstance(node, ast.Assign) else getattr(node, "name", None)

    body = ast.parse(Path(path).read_text()).body
    kept = [node for node in body if name(node) in wanted
            or (isinstance(node, (ast.Import, ast.ImportFrom)) and "triton" in ast.unparse(node))]
    if missing := wanted - {name(node) for node in kept}:
        raise ValueError(f"{path}: no {', '.join(sorted(missing))}: is it Triton's fused-attention tutorial?")
    module_path = Path(tempfile.mkdtemp(prefix="tutorial_attention_")) / "tutorial_attention.py"
    source = "\n\n\n".join(["def is_hip():\n    return False", *map(ast.unparse, kept)])
    module_path.write_text(source + "\n")
    spec = importlib.util.spec_from_file_location("tutorial_attention", module_path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _work(meta: dict[str, Any], programs: int) -> tuple[Work, Work]:
    """Every program sweeps all key blocks: S on its BLOCK_M x BLOCK_N tile, P v, a k and a v tile."""
    bm, bn, d = meta["BLOCK_M"], meta["BLOCK_N"], meta["HEAD_DIM"]
    blocks = programs * triton.cdiv(meta["N_CTX"], bn)
    score = Work(flops=blocks * 2 * bm * bn * d, exp2=blocks * bm * bn)
    return score, Work(flops=blocks * 2 * bm * bn * d, bytes=blocks * bn * 2 * d * meta["K"].element_size())


def tutorial_spec(tutorial: Any) -> OpSpec:
    """The tutorial's forward as an op of the report (fp16, non-causal, (B, H, N, d) contiguous)."""

    def launch(problem: Problem) -> None:
        heads, n = int(problem.variant.removeprefix("heads=")), problem.n
        shape = (problem.batch, heads, n, problem.head_dim)
        q, k, v, o = (torch.empty(shape, dtype=torch.float16) for _ in "qkvo")
        tutorial._attn_fwd[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), problem.batch * heads, 1)](
            q, k, v, 0.5, torch.empty(q.shape[:3]), o, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            problem.batch, heads, N_CTX=n, HEAD_DIM=problem.head_dim, CAUSAL=False)

    kernel = KernelSpec("_attn_fwd", _work, lambda meta: triton.cdiv(meta["N_CTX"], meta["BLOCK_N"]),
                        exp2_tile=lambda meta: meta["BLOCK_M"] * meta["BLOCK_N"])
    return OpSpec(name="tutorial_attention", title="Triton's fused-attention tutorial", launch=launch,
                  kernels=(kernel,), minimal=lambda p: Work(), unit=("1", lambda p: 1.0),
                  precisions=("fp16",), variants=tuple(f"heads={f.heads}" for f in PUBLISHED))


def calibration_rows(tutorial_path: str | Path, measure_op: Any) -> Points:
    """Each published figure with the report's rows of its launch (every tutorial config, compiled
    and modelled); ``measure_op(op, problem)`` is the report's measurement of one op's problem."""
    spec = tutorial_spec(load_tutorial(tutorial_path))
    return [(figure, measure_op(spec, figure.problem)) for figure in PUBLISHED]


def modelled(figure: Figure, rows: list[Row], calibration: Calibration, model_us: ModelUs) -> float:
    """The model's throughput (TFLOP/s) of a figure's launch: its fastest config by the model."""
    return figure.flops / (min(model_us(row, calibration) for row in rows) * 1e-6) / 1e12


def _error(points: Points, calibration: Calibration, model_us: ModelUs) -> float:
    return max(abs(modelled(f, rows, calibration, model_us) / f.tflops - 1) for f, rows in points)


Points = list[tuple[Figure, list[Row]]]  # each published figure with the rows of its launch


def fit(points: Points, model_us: ModelUs, start: Calibration = CALIBRATION) -> Calibration:
    """The constants minimising the largest relative error over the figures, by a coordinate search
    from ``start`` (each constant stepped up and down, the steps halved where nothing improves,
    down to 1% of the value); ``error`` is that error."""
    best = dataclasses.replace(start, error=_error(points, start, model_us))
    steps = {"mma_efficiency": 0.1, "clocks_per_instruction": 0.2, "mma_wait_clocks": 400.0,
             "program_clocks": 4000.0}
    while any(step > 0.01 * abs(getattr(best, name) or 1.0) for name, step in steps.items()):
        improved = False
        for name, step in steps.items():
            for value in (getattr(best, name) + step, getattr(best, name) - step):
                value = min(value, 1.0) if name == "mma_efficiency" else value
                candidate = dataclasses.replace(best, **{name: max(0.0, value)})
                if (error := _error(points, candidate, model_us)) < best.error:
                    best, improved = dataclasses.replace(candidate, error=error), True
        if not improved:
            steps = {name: step / 2 for name, step in steps.items()}
    return best


def calibration_target(model_us: ModelUs) -> Target:
    """The calibration's promise: the model, with the constants in use, within 20% of every published
    figure, and within the error it states (``CALIBRATION.error``)."""

    def check(rows: list[Row]) -> list[str] | None:
        found = [(f, [r for r in rows if r.problem == f.problem.label and r.error is None])
                 for f in PUBLISHED]
        if not all(figure_rows for _, figure_rows in found):
            return None
        return [f"{f.source}, d = {f.head_dim}, N = {f.seqlen}: {error:+.1%}" for f, figure_rows in found
                if abs(error := modelled(f, figure_rows, CALIBRATION, model_us) / f.tflops - 1)
                > min(0.2, CALIBRATION.error) + 5e-4]

    return Target(f"the model within 20% of each published figure and within its stated error "
                  f"({CALIBRATION.error:.0%})", check)


def calibration_section(points: Points, model_us: ModelUs, tutorial: str) -> list[str]:
    """The report's calibration table: each figure, the model's throughput with the constants in use,
    its error and its fastest config; the best constants the search finds from them."""
    lines = [f"Compiled: `_attn_fwd` of `{tutorial}` (fp16, non-causal, the tutorial's configs). "
             f"Constants in use (kernels/common.py): {CALIBRATION}; the search's best from them: "
             f"{fit(points, model_us)}.", "",
             "| source | d | batch x heads x seqlen | published TFLOP/s | model TFLOP/s | error | model's "
             "config |", "|---|---|---|---|---|---|---|"]
    for f, rows in points:
        model = modelled(f, rows, CALIBRATION, model_us)
        best = min(rows, key=lambda row: model_us(row, CALIBRATION))
        lines.append(f"| {f.source} | {f.head_dim} | {f.batch} x {f.heads} x {f.seqlen} | {f.tflops:g} | "
                     f"{model:.0f} | {model / f.tflops - 1:+.1%} | {best.config} |")
    return lines
