"""The GPU check's sections: what each runs, its budget, its deadline. Pure Python (no torch).

Nothing here measures: every section is one or more commands, each a fresh process, of the GPU
tests (``pytest -m gpu``) or of the benchmark suite (``pytest benchmarks/ --benchmark-only``)
on the cases the check needs (``-k``). The time plan:

* Every section has a nominal budget (:data:`SECTIONS`, seconds, full and ``--quick``).
  :func:`make_plan` keeps the selected sections in their run order and scales their budgets
  down, all by one factor, when their sum does not fit the run's budget less a reserve for
  starting and for the last report.
* A section that starts at ``now`` must end by :func:`section_deadline`: at most ``STRETCH``
  times its budget after it starts (time left by earlier sections that ended early is used),
  and never so late that the sections after it lose any of their budgets. Its commands share
  that time equally. The benchmark suite starts no case that no longer fits before its
  command's end (``--bench-deadline``); the supervisor kills a command that overruns its end
  by more than the grace (a hung kernel or compilation cannot check the clock).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["FULL_TOTAL_S", "QUICK_TOTAL_S", "RESERVE_S", "SECTIONS", "STRETCH", "Command", "Plan",
           "make_plan", "parse_sections", "section_commands", "section_deadline"]

# Run order; (full, --quick) budgets in seconds. What takes the time is in the package docstring.
SECTIONS: Mapping[str, tuple[float, float]] = {
    "tests": (100.0, 60.0), "autotune": (60.0, 30.0), "pam": (130.0, 50.0), "cam": (45.0, 20.0),
    "train": (90.0, 45.0),
}
FULL_TOTAL_S = 465.0
QUICK_TOTAL_S = 240.0
# Kept free of section budgets: the processes' start (torch, triton, CUDA) and the last report.
RESERVE_S = 20.0
# A section may use up to this multiple of its budget from time earlier sections left unused.
STRETCH = 2.0

# The benchmark cases of each section, as pytest -k expressions over the test ids
# (shape-variant-pass-impl, e.g. test_pam[B1-C512-128x256-fp32-high-forward-triton]). Kernels:
# the fused kernels, the bmm reference and SDPA (not the blockwise backend, the CPU's fallback)
# in bf16, fp32 and fp32 "high" at every shape; fp16 and fp32 "medium", for their errors
# against float64, at B = 1, 97x97 and 128x256 only.
_KERNELS = {False: "not blockwise and (not (fp16 or fp32-medium) or B1- and (97x97 or 128x256))",
            True: "not blockwise and B1- and (97x97 or 128x256) and not (fp16 or fp32-medium)"}
# First calls (compilation and autotuning) of the fused kernels at N = 9409 and 32768.
_AUTOTUNE = {False: "triton and B1- and (97x97 or 128x256) and not (fp16 or fp32-medium)",
             True: "triton and B1-C512-97x97-bf16"}
_TRAIN = "test_train_step and B1-1024x2048"  # a whole Cityscapes frame, both attentions
_FILES = {"pam": "benchmarks/test_position_attention.py", "cam": "benchmarks/test_channel_attention.py",
          "train": "benchmarks/test_training_memory.py"}


@dataclass(frozen=True)
class Command:
    """One process of a section: the interpreter's arguments, extra environment, and a label
    its records carry (e.g. autotuning's "cold" and "warm" caches)."""

    label: str
    args: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    benchmarks: bool = True  # the benchmark suite: it gets --bench-deadline and --bench-stream


def _suite(label: str, files: Iterable[str], select: str, extra: Iterable[str] = (),
           env: Mapping[str, str] | None = None) -> Command:
    args = ("-m", "pytest", *files, "--benchmark-only", "-q", "-p", "no:cacheprovider", "-k", select, *extra)
    return Command(label, args, dict(env or {}))


def section_commands(section: str, *, quick: bool, test_workers: int, scratch: str) -> list[Command]:
    """The commands of ``section``; ``scratch`` is an empty folder for fresh caches."""
    if section == "tests":
        workers = ("-n", str(test_workers)) if test_workers > 0 else ()
        marker = "gpu and not slow" if quick else "gpu"
        args = ("-m", "pytest", "-m", marker, "-x", "-q", "-p", "no:cacheprovider", *workers, "tests")
        return [Command("tests", args, benchmarks=False)]
    if section == "autotune":
        # An empty Triton cache (compiled kernels, the autotuners' cache_results) for the cold process;
        # the warm one finds what it left. HOME stays: packages may live in the user's site-packages.
        caches = {name: f"{scratch}/{name.lower()}" for name in ("TRITON_CACHE_DIR", "TRITON_HOME")}
        env = {**caches, "TRITON_PRINT_AUTOTUNING": "1"}  # the configs chosen, in autotune.log
        files = (_FILES["pam"], _FILES["cam"])
        return [_suite(label, files, _AUTOTUNE[quick], ("--bench-seconds", "0.05"), env)
                for label in ("cold", "warm")]
    if section in ("pam", "cam"):
        seconds = "0.05" if quick else "0.1"
        return [_suite(section, [_FILES[section]], _KERNELS[quick], ("--bench-seconds", seconds))]
    if section == "train":
        return [_suite(amp, [_FILES["train"]], _TRAIN, ("--train-amp", amp))
                for amp in (("bf16",) if quick else ("none", "bf16"))]
    raise ValueError(f"unknown section {section!r}")


def parse_sections(text: str | None, *, skip: str | None = None) -> list[str]:
    """The sections to run, in run order, from ``--only`` / ``--skip`` comma lists.

    Raises:
        ValueError: an unknown or empty name, or nothing left to run.
    """

    def names(value: str, option: str) -> set[str]:
        given = [part.strip() for part in value.split(",")]
        if any(not part for part in given):
            raise ValueError(f"{option}: empty section name in {value!r}")
        unknown = [part for part in given if part not in SECTIONS]
        if unknown:
            raise ValueError(f"{option}: unknown section {', '.join(unknown)}; "
                             f"choose from {', '.join(SECTIONS)}")
        return set(given)

    chosen = names(text, "--only") if text is not None else set(SECTIONS)
    if skip is not None:
        chosen -= names(skip, "--skip")
    if not chosen:
        raise ValueError("no section left to run")
    return [s for s in SECTIONS if s in chosen]


@dataclass(frozen=True)
class Plan:
    """Sections in run order, their budgets (seconds), and the run's absolute end (``time.time``)."""

    order: tuple[str, ...]
    budgets: Mapping[str, float]
    hard_end: float


def make_plan(sections: Iterable[str], *, total_s: float, quick: bool, start: float) -> Plan:
    """Budgets for ``sections`` fitting in ``total_s`` seconds from ``start`` (less the reserve).

    Raises:
        ValueError: a total too small for the reserve plus a few seconds per section.
    """
    order = tuple(sections)
    nominal = {s: SECTIONS[s][quick] for s in order}
    available = total_s - RESERVE_S
    if available < 5.0 * len(order):
        raise ValueError(f"--budget {total_s:g} s is too small: {RESERVE_S:g} s are reserved for starting "
                         f"and reporting, plus at least 5 s per section ({len(order)} selected)")
    scale = min(1.0, available / sum(nominal.values()))
    return Plan(order, {s: nominal[s] * scale for s in order}, start + total_s)


def section_deadline(plan: Plan, section: str, now: float) -> float:
    """When ``section``, starting at ``now``, must end (see the module docstring)."""
    later = plan.order[plan.order.index(section) + 1:]
    latest = plan.hard_end - RESERVE_S / 2 - sum(plan.budgets[s] for s in later)
    return max(now, min(now + STRETCH * plan.budgets[section], latest))
