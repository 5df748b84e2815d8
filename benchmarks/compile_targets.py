"""What the compile report checks: the targets each op's kernels must keep on sm_90.

A :class:`Target` states a property of a report run's rows: ``check(rows)`` describes the rows that
break it, or returns None when no row of the run is one it speaks about. Each op's spec
(benchmarks/compile_specs/<op>.py) lists its targets; the report prints each met or not, ``--check``
fails on one not met, and tests/danet_kernels/test_hopper_compile.py asserts them all in CI.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.compile_types import CHANNELS, HEAD_DIM, Row
from danet_kernels.kernels.common import MAX_SHARED_BYTES

__all__ = ["Target", "TargetResult", "compiles", "each_row", "evaluate", "exp2_once", "fits_shared_memory",
           "no_spills", "pipelined", "preferred_total", "same_binary_when_padded", "same_configs",
           "tensor_cores"]

Check = Callable[[list[Row]], "list[str] | None"]


@dataclass(frozen=True)
class Target:
    """One property of an op's kernels: ``text`` says it, ``check(rows)`` finds what breaks it
    (``[]``: met, ``None``: no row of the run it applies to)."""

    text: str
    check: Check


@dataclass(frozen=True)
class TargetResult:
    """A target checked on one run's rows."""

    op: str
    target: str
    evaluated: bool
    failures: tuple[str, ...] = ()

    @property
    def met(self) -> bool:
        return self.evaluated and not self.failures


def evaluate(targets_by_op: dict[str, Sequence[Target]], rows: Sequence[Row]) -> list[TargetResult]:
    """Every target of every op, checked on that op's rows (ops without rows are skipped)."""
    results = []
    for op, targets in targets_by_op.items():
        op_rows = [r for r in rows if r.op == op]
        if not op_rows:
            continue
        for target in targets:
            failures = target.check(op_rows)
            results.append(TargetResult(op, target.text, failures is not None, tuple(failures or ())))
    return results


def _where(row: Row) -> str:
    return f"{row.problem} {row.kernel} {row.config}"


def _compiled(kernels: Iterable[str] | None, applies: Callable[[Row], bool] | None = None
              ) -> Callable[[Row], bool]:
    """Rows that compiled, of the named kernels (all without names), that ``applies`` accepts."""
    names = None if kernels is None else set(kernels)
    return lambda r: (r.error is None and (names is None or r.kernel in names)
                      and (applies is None or applies(r)))


def each_row(text: str, holds: Callable[[Row], bool], why: Callable[[Row], str],
             applies: Callable[[Row], bool]) -> Target:
    """A target that every row ``applies`` accepts must meet (``why`` describes a failure)."""

    def check(rows: list[Row]) -> list[str] | None:
        relevant = [r for r in rows if applies(r)]
        if not relevant:
            return None
        return [f"{_where(r)}: {why(r)}" for r in relevant if not holds(r)]

    return Target(text, check)


def compiles() -> Target:
    return each_row("every launch compiles for sm_90a", lambda r: r.error is None,
                    lambda r: str(r.error), lambda r: True)


def no_spills(text: str = "no config spills registers") -> Target:
    return each_row(text, lambda r: r.spill_bytes == 0, lambda r: f"{r.spill_bytes} B of spills",
                    _compiled(None))


def fits_shared_memory() -> Target:
    return each_row(f"shared memory within an sm_90 block's {MAX_SHARED_BYTES // 1024} KiB",
                    lambda r: (r.shared or 0) <= MAX_SHARED_BYTES, lambda r: f"{r.shared} B of shared memory",
                    _compiled(None))


def exp2_once(kernels: Iterable[str]) -> Target:
    """No replicated scores: the exp2 tile's layout covers it once, and one iteration of the main
    loop runs fewer than twice the tile's share of ex2 per thread (the share, plus the online
    softmax's row rescale, one per row a thread holds; a score tile computed by two warpgroups
    doubles the share)."""

    def holds(r: Row) -> bool:
        share_ok = r.ex2_share is None or r.loop_ex2 is None or r.loop_ex2 < 2 * r.ex2_share
        return (r.replication or 1) == 1 and share_ok

    return each_row("no replicated S: each score and its exp2 computed by one warpgroup (ex2 per thread: "
                    "the tile's share, plus the forward's row rescale)", holds,
                    lambda r: f"replication {r.replication}, {r.loop_ex2} ex2 per thread against a share of "
                              f"{r.ex2_share}", _compiled(kernels))


def pipelined(kernels: Iterable[str], copies: int = 2, applies: Callable[[Row], bool] | None = None,
              text: str | None = None) -> Target:
    """The main loop's operand tiles come by cp.async (Triton's software pipeline), ``copies``
    of them at least (one per streamed operand)."""
    return each_row(text or f"the main loop's operand tiles loaded by cp.async (at least {copies} per "
                            "iteration: software-pipelined)",
                    lambda r: (r.loop_cp_async or 0) >= copies,
                    lambda r: f"{r.loop_cp_async} cp.async in the main loop", _compiled(kernels, applies))


def tensor_cores(kernels: Iterable[str]) -> Target:
    return each_row("tensor cores (wgmma) wherever the precision allows them (all but fp32 ieee)",
                    lambda r: r.mma == "wgmma", lambda r: f"runs on {r.mma}",
                    _compiled(kernels, lambda r: r.precision != "fp32-ieee"))


def _shape(r: Row) -> tuple[Any, ...]:
    return (r.precision, r.batch, r.head_dim, r.channels, r.variant)


def same_configs(sizes: Sequence[int], preferred_only: bool = False) -> Target:
    """The launches at each of ``sizes`` keep the same configs (or prefer the same ones), per
    precision and shape: an unaligned N takes the aligned one's path."""
    which = "prefers the same configs" if preferred_only else "keeps the same configs"

    def check(rows: list[Row]) -> list[str] | None:
        configs: dict[tuple, dict[int, list[str]]] = defaultdict(dict)
        for r in rows:
            if r.n in sizes and (r.preferred or not preferred_only):
                configs[_shape(r)].setdefault(r.n, []).append(f"{r.kernel} {r.launch} {r.config}")
        compared = {shape: by_n for shape, by_n in configs.items() if len(by_n) == len(sizes)}
        if not compared:
            return None
        return [f"{shape[0]}: {by_n}" for shape, by_n in compared.items()
                if len({tuple(v) for v in by_n.values()}) > 1]

    return Target(f"N = {' and '.join(map(str, sizes))} {which}", check)


def same_binary_when_padded(kernels: Iterable[str]) -> Target:
    """A launch at an N that is not a multiple of 16 (padded by the launcher) specialises exactly
    as the same kernel, config and shape at an aligned N of the run: one binary for both."""
    names = set(kernels)

    def check(rows: list[Row]) -> list[str] | None:
        aligned = {(_shape(r), r.kernel, r.launch, r.config): r for r in rows
                   if r.kernel in names and r.error is None and r.n % 16 == 0}
        pairs = [(r, aligned[key]) for r in rows if r.kernel in names and r.error is None and r.n % 16
                 and (key := (_shape(r), r.kernel, r.launch, r.config)) in aligned]
        if not pairs:
            return None
        return [f"{_where(r)}: specialised as {r.specialisation}, at N = {a.n} as {a.specialisation}"
                for r, a in pairs if r.specialisation != a.specialisation]

    return Target(f"{', '.join(sorted(names))} at an unaligned N (padded rows) compiles to the same binary "
                  "as at an aligned N", check)


def preferred_total(text: str, precisions: Sequence[str], n: int, flops: float | None = None,
                    exp2: float | None = None) -> Target:
    """The preferred configs of one call, all kernels summed, execute at most ``flops`` and
    ``exp2`` per the op's unit, at N = ``n`` for each of ``precisions`` (d and C of DANet), up to
    0.1% (O(N) work such as the backward's row sums adds 2 C / N per N^2)."""
    def check(rows: list[Row]) -> list[str] | None:
        chosen: dict[str, list[Row]] = defaultdict(list)
        for r in rows:
            if (r.preferred and r.n == n and r.precision in precisions and not r.variant
                    and (r.batch, r.head_dim, r.channels) == (1, HEAD_DIM, CHANNELS)):
                chosen[r.problem].append(r)
        if not chosen:
            return None
        failures = []
        for problem, problem_rows in chosen.items():
            total_flops = sum(r.flops or 0 for r in problem_rows)
            total_exp2 = sum(r.exp2 or 0 for r in problem_rows)
            if flops is not None and total_flops > flops * 1.001:
                failures.append(f"{problem}: {total_flops:.4g} FLOPs per unit")
            if exp2 is not None and total_exp2 > exp2 * 1.001:
                failures.append(f"{problem}: {total_exp2:.4g} exp2 per unit")
        return failures

    return Target(text, check)
