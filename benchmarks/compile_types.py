"""The compile report's vocabulary (problems, work, op and kernel specs, rows), shared by the report,
the ops' specs and the targets: a leaf, importing nothing of theirs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CHANNELS", "HEAD_DIM", "PLAIN_CALL", "PRECISIONS", "SIZES", "KernelSpec", "OpSpec", "Problem",
           "Row", "Work"]

# DANet's shapes: q, k of 64 channels, v of 512; N of a 128 x 256 map and of a 97 x 97 one (a
# 769 x 769 crop at output stride 8), which is not a multiple of 16.
SIZES = (32768, 9409)
HEAD_DIM = 64
CHANNELS = 512
# Names the report uses for (dtype, fp32 dot precision); 16-bit inputs ignore the precision.
PRECISIONS = {
    "bf16": ("bfloat16", "tf32"),
    "fp16": ("float16", "tf32"),
    "fp32-tf32": ("float32", "tf32"),
    "fp32-tf32x3": ("float32", "tf32x3"),
    "fp32-ieee": ("float32", "ieee"),
}
# The variant of a plain call (no gamma, no residual: the attention output alone), the call the
# benchmark suite times; without it an op's launch is DANet's training call, with gamma.
PLAIN_CALL = "plain"


@dataclass(frozen=True)
class Problem:
    """One call of an op: B, d, C, N, the precision name (a key of :data:`PRECISIONS`) and a
    variant, a tag the op's launch reads (e.g. ``"int64 offsets"``: the forward's switch forced
    on, to measure it at an ordinary size); ops run only the variants they name."""

    n: int
    precision: str
    batch: int = 1
    head_dim: int = HEAD_DIM
    channels: int = CHANNELS
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Problem:
        """``N:PRECISION[:B=..][:d=..][:C=..][:VARIANT]``, e.g. ``1024:bf16:d=256:C=2048``."""
        n, precision, *rest = text.split(":")
        sizes = {"B": "batch", "d": "head_dim", "C": "channels"}
        fields: dict[str, Any] = {}
        for part in rest:
            key, _, value = part.partition("=")
            if key in sizes and value.isdigit():
                fields[sizes[key]] = int(value)
            else:
                fields["variant"] = part
        if precision not in PRECISIONS:
            raise ValueError(f"{text!r}: unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")
        return cls(int(n), precision, **fields)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, PRECISIONS[self.precision][0])

    @property
    def dot_precision(self) -> str:
        return PRECISIONS[self.precision][1]

    @property
    def label(self) -> str:
        shape = "" if (self.batch, self.head_dim, self.channels) == (1, HEAD_DIM, CHANNELS) else (
            f" (B={self.batch}, d={self.head_dim}, C={self.channels})")
        variant = f" [{self.variant}]" if self.variant else ""
        return f"N={self.n} {self.precision}{shape}{variant}"


@dataclass(frozen=True)
class Work:
    """Executed work of a launch: FLOPs (tensor-core or FMA), exp2 evaluations, operand bytes
    streamed from L2 into the SMs."""

    flops: float = 0.0
    exp2: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.exp2 + other.exp2, self.bytes + other.bytes)

    def __mul__(self, factor: float) -> Work:
        return Work(self.flops * factor, self.exp2 * factor, self.bytes * factor)


@dataclass(frozen=True)
class KernelSpec:
    """What the report knows about one kernel beyond its compile: its ``@triton.jit`` ``name``;
    ``work(meta, programs) -> (score, rest)``, the work of the whole launch (``meta``: every argument
    by name, the config's num_warps and num_stages included), ``score`` the part on the exp2 tile
    (its dot and exp2, which a replicated layout executes that many times over); ``iterations(meta)``,
    the trips of a program's main loop (1 without one); ``exp2_tile(meta)``, the elements whose exp2
    one iteration computes (None without such a tile)."""

    name: str
    work: Callable[[dict[str, Any], int], tuple[Work, Work]]
    iterations: Callable[[dict[str, Any]], float]
    exp2_tile: Callable[[dict[str, Any]], int] | None = None


@dataclass(frozen=True)
class OpSpec:
    """One op of the report: ``name`` (``--ops``) and ``title``; ``launch`` calls the op's launcher
    for a problem; ``kernels``, the specs of the kernels it launches; ``minimal``, its minimal work
    (FLOPs and exp2) for a problem; ``unit``, ``(name, problem -> value)``, what the work is divided
    by (e.g. N^2); ``sizes`` x ``precisions`` then ``extra_problems``, the full report's problems;
    ``variants``, the problem variants ``launch`` understands; ``targets``, what must hold for its
    kernels (benchmarks/compile_targets.py); ``notes``, markdown under its heading."""

    name: str
    title: str
    launch: Callable[[Problem], None]
    kernels: tuple[KernelSpec, ...]
    minimal: Callable[[Problem], Work]
    unit: tuple[str, Callable[[Problem], float]]
    sizes: tuple[int, ...] = SIZES
    precisions: tuple[str, ...] = tuple(PRECISIONS)
    extra_problems: tuple[Problem, ...] = ()
    variants: tuple[str, ...] = ()
    targets: tuple[Any, ...] = ()
    notes: tuple[str, ...] = ()

    def problems(self) -> list[Problem]:
        """The problems of the full report: the op's sizes x precisions, then the extra ones."""
        return [Problem(n, p) for p in self.precisions for n in self.sizes] + list(self.extra_problems)

    def runs(self, problem: Problem) -> bool:
        """Whether the op runs a problem: one of its precisions (its launch may have tiles for no
        other) and no variant or one it names."""
        return problem.precision in self.precisions and problem.variant in ("", *self.variants)

    def kernel(self, name: str) -> KernelSpec | None:
        return next((k for k in self.kernels if k.name == name), None)


@dataclass
class Row:
    """One kernel, config and problem of the report."""

    op: str
    problem: str  # its label
    n: int
    precision: str
    batch: int
    head_dim: int
    channels: int
    variant: str
    kernel: str
    launch: str  # the launch's flags (non-tile constexprs), to tell launches of one kernel apart
    config: str
    tuned: bool = True  # among the configs the autotuner benchmarks
    preferred: bool = False  # the launch's choice here: see ``choice``
    choice: str = ""  # why preferred: "fixed" (a plain launch), "perf model" (ranked first), or
    # "first tuned" (no perf model: the first config the autotuner benchmarks stands in)
    registers: int | None = None
    spill_bytes: int | None = None
    shared: int | None = None
    num_warps: int | None = None
    mma: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    loop_ex2: int | None = None  # per thread, one iteration of the main loop
    loop_cp_async: int | None = None  # cp.async in the main loop: its loads software-pipelined
    ex2_share: float | None = None  # the exp2 tile's elements over the threads
    replication: float | None = None
    specialisation: str = ""  # the binary's key (specialisation_key): equal keys, one binary
    programs: int | None = None
    resident: int | None = None  # programs one SM holds at a time (registers, shared memory)
    waves: float | None = None  # programs over (SMs x resident) of an H100
    num_stages: int = 1
    iterations: float = 1.0  # trips of a program's main loop; per trip and program:
    loop_flops: float = 0.0  # its tensor-core (or FMA) FLOPs,
    loop_bytes: float = 0.0  # its operand bytes from L2,
    loop_instructions: int = 0  # its other instructions per thread (PTX),
    serial: bool = True  # and whether it waits for all its MMAs before the other work
    flops: float | None = None  # per op unit (e.g. N^2), the whole launch
    exp2: float | None = None
    bytes: float | None = None
    model_us: float | None = None  # the perf model's time of the launch on an H100 (compile_report.model_us)
    error: str | None = None
