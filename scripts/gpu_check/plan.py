"""The time plan of the GPU check: sections, their budgets, their deadlines, and cases cut to fit.

Pure Python (no torch), so that the CPU tests exercise exactly the logic the GPU run uses.

* Every section has a nominal budget (:data:`FULL_BUDGETS`, :data:`QUICK_BUDGETS`, seconds).
  :func:`make_plan` keeps the selected sections in their run order and scales their budgets
  down, all by one factor, when their sum does not fit the run's budget less a reserve for the
  worker's start and the last report.
* A section that starts at ``now`` must end by :func:`section_deadline`: at most ``STRETCH``
  times its budget after it starts (time left by earlier sections that ended early is used),
  and never so late that the sections after it lose any of their budgets.
* Inside a section, :class:`CaseRunner` runs one case at a time and skips a case when the time
  left before the deadline is less than the last case of its group took: a slow section is cut
  case by case and says which cases it left out. The supervisor kills a worker that overruns a
  deadline by more than the grace (a hung kernel or compilation cannot check the clock).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FULL_BUDGETS",
    "FULL_SIZING",
    "QUICK_BUDGETS",
    "QUICK_SIZING",
    "SECTIONS",
    "VARIANT_SETTINGS",
    "CaseRunner",
    "Deadline",
    "Plan",
    "Sizing",
    "make_plan",
    "parse_sections",
    "section_deadline",
]

# The variants the kernel sections measure, in report order: name -> (dtype, the fp32 matmul
# precision, torch.set_float32_matmul_precision: "highest" is IEEE fp32; 16-bit dtypes ignore it).
VARIANT_SETTINGS: Mapping[str, tuple[str, str]] = {
    "bf16": ("bfloat16", "highest"),
    "fp16": ("float16", "highest"),
    "fp32-highest": ("float32", "highest"),
    "fp32-high": ("float32", "high"),
    "fp32-medium": ("float32", "medium"),
}

# Run order. "tests" runs the GPU tests in a pytest subprocess; the others run in one worker.
SECTIONS: tuple[str, ...] = ("tests", "accuracy", "autotune", "pam", "cam", "train", "eval")

# Seconds per section. Full: about 440 s of sections in a 465 s run (7 min 45 s); see the
# package docstring for what each holds and why it takes that long.
FULL_BUDGETS: Mapping[str, float] = {
    "tests": 100.0, "accuracy": 45.0, "autotune": 60.0, "pam": 100.0, "cam": 30.0, "train": 60.0,
    "eval": 45.0,
}
QUICK_BUDGETS: Mapping[str, float] = {
    "tests": 60.0, "accuracy": 20.0, "autotune": 30.0, "pam": 30.0, "cam": 15.0, "train": 30.0, "eval": 25.0,
}
FULL_TOTAL_S = 465.0
QUICK_TOTAL_S = 240.0
# Kept free of section budgets: the supervisor's and the worker's start (torch, triton, CUDA),
# a worker restart, and the last report.
RESERVE_S = 20.0
# A section may use up to this multiple of its budget from time earlier sections left unused.
STRETCH = 2.0
# Statuses of a case that could not be measured but is a result, not a failure of the check.
RESULT_STATUSES = ("oom", "refused")


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
    """Sections in run order, their budgets (seconds), and the run's absolute end (``clock`` time)."""

    order: tuple[str, ...]
    budgets: Mapping[str, float]
    hard_end: float

    def to_json(self) -> dict[str, Any]:
        """The plan as the worker receives it on its command line."""
        return {"order": list(self.order), "budgets": dict(self.budgets), "hard_end": self.hard_end}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        """Inverse of :meth:`to_json`."""
        return cls(tuple(data["order"]), dict(data["budgets"]), float(data["hard_end"]))


def make_plan(sections: Iterable[str], *, total_s: float, quick: bool, start: float) -> Plan:
    """Budgets for ``sections`` fitting in ``total_s`` seconds from ``start`` (less the reserve).

    Raises:
        ValueError: a total too small for the reserve plus a few seconds per section.
    """
    order = tuple(sections)
    nominal = QUICK_BUDGETS if quick else FULL_BUDGETS
    available = total_s - RESERVE_S
    if available < 5.0 * len(order):
        raise ValueError(f"--budget {total_s:g} s is too small: {RESERVE_S:g} s are reserved for starting "
                         f"and reporting, plus at least 5 s per section ({len(order)} selected)")
    wanted = sum(nominal[s] for s in order)
    scale = min(1.0, available / wanted)
    return Plan(order, {s: nominal[s] * scale for s in order}, start + total_s)


def section_deadline(plan: Plan, section: str, now: float) -> float:
    """When ``section``, starting at ``now``, must end (see the module docstring)."""
    later = plan.order[plan.order.index(section) + 1:]
    reserved_after = sum(plan.budgets[s] for s in later)
    latest = plan.hard_end - RESERVE_S / 2 - reserved_after
    return max(now, min(now + STRETCH * plan.budgets[section], latest))


class Deadline:
    """A point in ``clock`` time (``time.time`` by default: the same clock in every process)."""

    def __init__(self, at: float, clock: Callable[[], float] = time.time) -> None:
        self.at = at
        self.clock = clock

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.at - self.clock())

    def allows(self, seconds: float) -> bool:
        """Whether ``seconds`` of work still fit before the deadline."""
        return self.remaining() >= seconds


@dataclass
class CaseRunner:
    """Runs a section's cases one by one within its deadline and reports each through ``emit``.

    ``classify(exc)`` turns an exception into a status ("oom", "refused", ... or "error"),
    so a case that fails is recorded and the section goes on. ``cleanup()`` runs after every
    case (freeing device memory). Cases are skipped once the time left is less than the
    ``min_seconds`` floor or than the last case of the same group took.
    """

    deadline: Deadline
    emit: Callable[[dict[str, Any]], None]
    classify: Callable[[BaseException], str] = lambda exc: "error"
    cleanup: Callable[[], None] = lambda: None
    min_seconds: float = 1.0
    last_seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    failed: int = 0

    def run(self, case: Mapping[str, Any], measure: Callable[[], Mapping[str, Any] | None],
            group: str = "") -> dict[str, Any] | None:
        """Measure one case (``case`` describes it) unless the deadline forbids it.

        Returns the emitted record (``case`` + what ``measure`` returned + ``status`` and
        ``seconds``), or None when the case was skipped for time.
        """
        estimate = max(self.min_seconds, self.last_seconds.get(group, 0.0))
        if not self.deadline.allows(estimate):
            self.skipped.append({**case, "status": "skipped",
                                 "reason": f"section deadline: {self.deadline.remaining():.0f} s left, "
                                           f"about {estimate:.0f} s needed"})
            return None
        start = self.deadline.clock()
        record: dict[str, Any] = dict(case)
        try:
            record.update(measure() or {})
            record.setdefault("status", "ok")
        except Exception as exc:  # a failed case is a result, not the end of the section
            self._failed(record, exc)
        try:
            self.cleanup()
        except Exception as exc:  # e.g. synchronising after a kernel that faulted
            if record["status"] == "ok":
                self._failed(record, exc)
        record["seconds"] = round(self.deadline.clock() - start, 3)
        self.last_seconds[group] = record["seconds"]
        self.emit(record)
        return record

    def adopt(self, record: Mapping[str, Any]) -> None:
        """Count a record that another runner emitted (the autotune probe's, in its own process)
        as one of this runner's: a case skipped for time joins ``skipped``, a failure ``failed``."""
        status = record.get("status")
        if status == "skipped":
            self.skipped.append(dict(record))
        elif status not in ("ok", *RESULT_STATUSES):
            self.failed += 1

    def _failed(self, record: dict[str, Any], exc: BaseException) -> None:
        status = self.classify(exc)
        self.failed += status not in RESULT_STATUSES
        record.update(status=status, error=_short_error(exc, with_traceback=status == "error"))


def _short_error(exc: BaseException, *, with_traceback: bool) -> str:
    """The exception's type and message (OOM messages run to kilobytes), with the last frames if asked."""
    text = f"{type(exc).__name__}: {exc}".strip()
    if len(text) > 600:
        text = text[:600] + " ..."
    if with_traceback:
        frames = traceback.format_tb(exc.__traceback__)[-3:]
        text += "\n" + "".join(frames)[-1500:]
    return text


@dataclass(frozen=True)
class Sizing:
    """What each section measures: the full grid (:data:`FULL_SIZING`) or ``--quick``'s.

    Variants name a dtype and, for fp32, the ``torch.set_float32_matmul_precision`` setting
    ("fp32-high"); 16-bit variants run at the default ("highest"), which they ignore.
    """

    channels: int = 512  # DANet's C; the query/key dim is C // 8
    tests_marker: str = "gpu"
    accuracy_sizes: tuple[tuple[int, int], ...] = ((97, 97), (128, 256))
    accuracy_variants: tuple[str, ...] = ("bf16", "fp16", "fp32-highest", "fp32-high", "fp32-medium")
    autotune_ns: tuple[int, ...] = (9409, 32768)
    autotune_variants: tuple[str, ...] = ("bf16", "fp32-high", "fp32-highest")
    # Priority order: every size at B = 1 (the targets are at 128x256, B = 1), then B = 2.
    timing_sizes: tuple[tuple[int, int], ...] = ((128, 256), (97, 97), (64, 64), (128, 128))
    timing_batches: tuple[int, ...] = (1, 2)
    timing_variants: tuple[str, ...] = ("bf16", "fp32-highest", "fp32-high")
    bench_warmup_ms: float = 25.0  # triton.testing.do_bench's defaults
    bench_rep_ms: float = 100.0
    num_classes: int = 19  # Cityscapes
    train_size: tuple[int, int] = (1024, 2048)
    train_batch: int = 1
    train_precisions: tuple[str, ...] = ("fp32", "bf16")
    train_repeats: int = 3
    eval_size: tuple[int, int] = (1024, 2048)
    eval_crops: tuple[int, ...] = (769, 768)
    eval_precisions: tuple[str, ...] = ("bf16", "fp32")
    eval_frames: int = 2


FULL_SIZING = Sizing()
QUICK_SIZING = Sizing(
    tests_marker="gpu and not slow",
    accuracy_sizes=((97, 97),),
    autotune_ns=(9409,),
    autotune_variants=("bf16",),
    timing_sizes=((128, 256), (97, 97)),
    timing_batches=(1,),
    timing_variants=("bf16", "fp32-high"),
    bench_warmup_ms=10.0,
    bench_rep_ms=40.0,
    train_precisions=("bf16",),
    train_repeats=2,
    eval_crops=(769,),
    eval_precisions=("bf16",),
    eval_frames=1,
)
