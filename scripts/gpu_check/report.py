"""The GPU check's results (its JSON) as a markdown report: :func:`render_markdown`, a pure function.

Its own parts: the run (device, versions, commit, state), the sections (status, time, budget,
what was cut), the issues' targets checked on the recorded cases, the GPU tests' summary and
the first calls (compilation and autotuning) with cold and warm caches. The kernel and training
tables are the benchmark suite's own (``benchmarks.report``: speed-up = the reference's time /
the row's, memory = the row's peak / the reference's, the error against float64, and the
predicted figures beside the measured ones where the cases carry them). A case without a number
says why (OOM, refused, deadline, error). Renders partial results too: the report is rewritten
as the run goes.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.report import (
    PASS_ORDER,
    VARIANT_ORDER,
    Case,
    case_from_entry,
    format_bytes,
    format_number,
    kernel_section,
    markdown_table,
    order_key,
    training_sections,
)

__all__ = ["TARGETS", "main", "render_markdown"]

Results = Mapping[str, Any]
TARGET_N = 32768  # 128 x 256, a whole 1024 x 2048 frame at output stride 8


def _cases(results: Results, section: str) -> list[Case]:
    return [case_from_entry(e) for e in results.get("records", {}).get(section, [])]


def _measured(cases: Sequence[Case], op: str, impl: str, pass_: str, variant: str) -> Case | None:
    """The measured case of ``op`` at the targets' shape (N = 32768, B = 1), or None."""
    for c in cases:
        key = (c.op, c.impl, c.info.get("pass"), c.variant, c.info.get("N"), c.info.get("B"))
        if key == (op, impl, pass_, variant, TARGET_N, 1) and c.median_s is not None:
            return c
    return None


def _speedup(op: str, pass_: str, fused: str, reference: str, at_least: float) -> Callable:
    def check(cases: Sequence[Case]) -> tuple[str, bool | None]:
        ours = _measured(cases, op, "triton", pass_, fused)
        ref = _measured(cases, op, "reference", pass_, reference)
        if ours is None or ref is None:
            return "not measured", None
        ratio = ref.median_s / ours.median_s
        return (f"{ratio:.2f}x ({format_number(ours.median_s * 1e3)} ms against "
                f"{format_number(ref.median_s * 1e3)} ms)"), ratio >= at_least
    return check


def _memory(op: str, pass_: str, fused: str, reference: str, at_most: float) -> Callable:
    def check(cases: Sequence[Case]) -> tuple[str, bool | None]:
        ours = _measured(cases, op, "triton", pass_, fused)
        ref = _measured(cases, op, "reference", pass_, reference)
        if ours is None or ref is None or not ours.peak or not ref.peak:
            return "not measured", None
        return f"{ours.peak / ref.peak:.4f} ({format_bytes(ours.peak)} against {format_bytes(ref.peak)})", \
            ours.peak / ref.peak <= at_most
    return check


def _error(op: str, variant: str, at_most: float) -> Callable:
    def check(cases: Sequence[Case]) -> tuple[str, bool | None]:
        measured = [_measured(cases, op, "triton", pass_, variant) for pass_ in PASS_ORDER]
        errors = [c.info["rel_err"] for c in measured if c is not None and c.info.get("rel_err") is not None]
        if not errors:
            return "not measured", None
        return f"{max(errors):.1e} (output and every gradient)", max(errors) <= at_most
    return check


# (what, where it comes from, how it is checked on the kernel cases). N = 32768, B = 1, C = 512.
TARGETS: tuple[tuple[str, str, Callable[[Sequence[Case]], tuple[str, bool | None]]], ...] = (
    ("PAM bf16 forward: >= 2x faster than the reference", "issue 9",
     _speedup("pam", "forward", "bf16", "bf16", 2.0)),
    ("PAM bf16 forward+backward: >= 3x faster than the reference", "issue 10",
     _speedup("pam", "forward+backward", "bf16", "bf16", 3.0)),
    ("PAM bf16 forward+backward: peak memory < 1% of the reference's", "issue 10",
     _memory("pam", "forward+backward", "bf16", "bf16", 0.01)),
    ('PAM fp32 "high" forward+backward: faster than the reference\'s exact fp32 ("highest")', "issue 10",
     _speedup("pam", "forward+backward", "fp32-high", "fp32", 1.0)),
    ('PAM fp32 "high": peak memory <= 1/50 of the reference\'s exact fp32', "issue 10",
     _memory("pam", "forward+backward", "fp32-high", "fp32", 1 / 50)),
    ('PAM fp32 "high": max relative error <= 1e-5 against float64', "issue 10",
     _error("pam", "fp32-high", 1e-5)),
    ("CAM fp32 forward: >= 4x faster than the reference", "docs/performance.md",
     _speedup("cam", "forward", "fp32", "fp32", 4.0)),
    ("CAM fp32 forward+backward: >= 3x faster than the reference", "docs/performance.md",
     _speedup("cam", "forward+backward", "fp32", "fp32", 3.0)),
)


def _header(results: Results) -> list[str]:
    env, checkout = results.get("env", {}), results.get("checkout", {})
    device = env.get("device", "device not reported yet")
    details = ", ".join(filter(None, (
        f"{env['sm_count']} SMs" if env.get("sm_count") else None,
        f"compute capability {env['capability']}" if env.get("capability") else None)))
    software = ", ".join(f"{name} {env[key]}" for name, key in (
        ("torch", "torch"), ("triton", "triton"), ("CUDA", "cuda"), ("cuDNN", "cudnn"), ("Python", "python"))
        if env.get(key))
    commit = checkout.get("commit") or "unknown"
    commit += " (with uncommitted changes)" if checkout.get("dirty") else ""
    state = "finished" if results.get("finished") else "in progress (partial results)"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(results.get("started_at", 0)))
    lines = [f"# GPU check: {device}", ""]
    if results.get("synthetic"):
        lines += [f"> {results['synthetic']}", ""]
    return [*lines,
            f"- Device: {device}" + (f" ({details})" if details else ""),
            f"- Software: {software or '—'}",
            f"- Checkout: {commit}",
            f"- Run: {state}; started {started}"
            + (f", {results['wall_s']:g} s in all" if results.get("wall_s") is not None else "")
            + f", budget {results.get('budget_s', 0):g} s" + (", --quick" if results.get("quick") else ""),
            f"- Command: `{results.get('command', '')}`"]


def _sections_table(results: Results) -> list[str]:
    rows = [(name, state.get("status", "—"), "—" if state.get("seconds") is None else f"{state['seconds']:g}",
             f"{state.get('budget_s', 0):g}", (state.get("note") or "").replace("|", "/"))
            for name, state in results.get("sections", {}).items()]
    return ["## Sections", "", *markdown_table(("section", "status", "seconds", "budget s", "note"), rows)]


def _targets_section(cases: Sequence[Case]) -> list[str]:
    rows = []
    for what, source, check in TARGETS:
        measured, met = check(cases)
        rows.append((what, source, measured, {True: "met", False: "**not met**", None: "—"}[met]))
    return [f"## Targets (N = {TARGET_N}, B = 1, C = 512)", "",
            *markdown_table(("target", "from", "measured", ""), rows)]


def _tests_section(results: Results) -> list[str]:
    runs = results.get("sections", {}).get("tests", {}).get("runs", [])
    if not runs:
        return []
    run = runs[-1]
    outcome = "stopped at its deadline" if run.get("killed") else f"exit status {run.get('returncode')}"
    lines = ["## GPU tests", "", f"`{run.get('command')}`: {run.get('summary') or 'no summary line'} "
             f"({outcome}, {run.get('seconds', 0):g} s)."]
    if run.get("tail"):
        lines += ["", "```", "\n".join(run["tail"].rstrip().splitlines()[-40:]), "```"]
    return lines


def _autotune_section(cases: Sequence[Case]) -> list[str]:
    first_calls: dict[tuple, dict[str, str]] = {}
    for c in (c for c in cases if c.op in ("pam", "cam")):
        key = (c.op.upper(), c.info.get("N"), c.variant, c.info.get("pass"))
        seconds = c.info.get("first_call_s")
        first_calls.setdefault(key, {})[c.info.get("run") or "?"] = (
            format_number(seconds) if seconds is not None else c.reason or "—")
    if not first_calls:
        return []
    order = sorted(first_calls, key=lambda k: (k[0], k[1] or 0, order_key(k[2], VARIANT_ORDER), str(k[3])))
    rows = [(*key, first_calls[key].get("cold", "—"), first_calls[key].get("warm", "—")) for key in order]
    return ["## First calls: compilation and autotuning", "",
            "Seconds of the first call of the fused kernels in a fresh process (the forward case first, so "
            "the forward+backward row is the backward's first call): 'cold' with an empty Triton cache, "
            "'warm' over the cache the cold process left. B = 1, C = 512. The configs chosen are in "
            "autotune.log (TRITON_PRINT_AUTOTUNING=1).", "",
            *markdown_table(("op", "N", "variant", "pass", "cold s", "warm s"), rows)]


def _failed_section(results: Results) -> list[str]:
    lines = []
    for section, records in results.get("records", {}).items():
        for r in records:
            if str(r.get("reason", "")).startswith("error"):
                lines.append(f"- {section}: `{r.get('name')}`: {r['reason']}")
    for section, state in results.get("sections", {}).items():
        for run in state.get("runs", []):
            if run.get("tail") and section != "tests":
                tail = "\n".join(run["tail"].rstrip().splitlines()[-15:])
                lines += ["", f"{section} ({run.get('label')}, exit status {run.get('returncode')}):", "",
                          "```", tail, "```"]
    return ["## Failed", "", *lines] if lines else []


def render_markdown(results: Results) -> str:
    """The whole report for one run's results (see the module docstring)."""
    kernels = [*_cases(results, "pam"), *_cases(results, "cam")]
    parts = [_header(results), _sections_table(results), _targets_section(kernels), _tests_section(results),
             _autotune_section(_cases(results, "autotune")), kernel_section("pam", kernels),
             kernel_section("cam", kernels), training_sections(_cases(results, "train")),
             _failed_section(results)]
    return "\n\n".join("\n".join(p).strip("\n") for p in parts if p) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scripts.gpu_check.report gpu_check.json``: print the report of a saved run."""
    parser = argparse.ArgumentParser(prog="python -m scripts.gpu_check.report", description=main.__doc__)
    parser.add_argument("results", type=Path, help="a gpu_check.json")
    args = parser.parse_args(argv)
    print(render_markdown(json.loads(args.results.read_text())), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
