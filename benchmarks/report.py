"""Turn the benchmark suite's pytest-benchmark JSON into a markdown report and a plot.

Usage, from the repository root::

    pytest benchmarks/ --benchmark-only --torch-threads 1 --benchmark-json=results.json
    python -m benchmarks.report results.json --out results/benchmarks.md --plot results/benchmarks.png

Without ``--out`` the markdown goes to standard output. A file that exists is replaced only
with ``--overwrite`` (docs/benchmarks.md and .png are the committed results: regenerating them
is a deliberate ``--out docs/benchmarks.md --plot docs/benchmarks.png --overwrite``); every file
written is named on standard error.

Several JSON files (e.g. the kernel and the training benchmarks run separately) may be
given; their cases are merged. The report has one table per attention op, pass and dtype
(time, ratio to the reference of the same group, peak memory, achieved TFLOP/s, error
against float64), the training step and largest-batch tables, the cases that could not
run and why, and the conventions behind each number. The plot shows time and peak memory
against N on log-log axes for each implementation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PASS_ORDER",
    "Case",
    "Run",
    "format_bytes",
    "format_ms",
    "format_number",
    "format_ratio",
    "load_cases",
    "main",
    "markdown_table",
    "render_markdown",
    "render_plot",
]

IMPL_ORDER = ("reference", "triton", "blockwise", "sdpa", "fused")
PASS_ORDER = ("forward", "forward+backward")
DTYPE_ORDER = ("float32", "bfloat16", "float16")
OP_TITLES = {"pam": "Position attention (PAM)", "cam": "Channel attention (CAM)"}
GPU_COMMANDS = """\
# On the CUDA machine, from the repository root. It needs no install and no network
# (PYTHONPATH=. instead of pip install; torch >= 2.11 and triton >= 3.6 as installed there).
# The kernel and the training benchmarks run as separate commands (shorter runs; -k selects
# fewer cases, e.g. -k "128x256"); the report merges their JSON files.
PYTHONPATH=. python -m pytest benchmarks/test_position_attention.py benchmarks/test_channel_attention.py \\
    --benchmark-only --benchmark-json=kernels-gpu.json
PYTHONPATH=. python -m pytest benchmarks/test_training_memory.py --benchmark-only \\
    --benchmark-json=training-gpu.json
PYTHONPATH=. python -m benchmarks.report kernels-gpu.json training-gpu.json \\
    --out docs/benchmarks.md --plot docs/benchmarks.png --overwrite"""


@dataclass
class Case:
    """One benchmark case: a measured one (``median_s`` set) or one that could not run (``reason``)."""

    name: str
    group: str
    info: dict[str, Any]
    median_s: float | None = None
    rounds: int | None = None
    min_s: float | None = None
    reason: str | None = None

    @property
    def op(self) -> str:
        """``pam``, ``cam``, ``train_step`` or ``train_max_batch``."""
        return str(self.info.get("op", "?"))

    @property
    def impl(self) -> str:
        """The implementation (``reference``, ``triton``, ``blockwise``, ``sdpa``, ``fused``)."""
        return str(self.info.get("impl", "?"))

    @property
    def peak(self) -> int | None:
        """Peak memory in bytes, if measured."""
        value = self.info.get("peak_mem_bytes")
        return None if value is None else int(value)

    @property
    def oom(self) -> bool:
        """Whether the case ran out of memory."""
        return bool(self.info.get("oom")) or (self.reason or "").startswith("OOM")


@dataclass
class Run:
    """What one JSON file says about where and when it was measured."""

    path: str
    device: str
    versions: dict[str, Any]
    date: str
    commit: str
    quick: bool = False  # a --bench-quick smoke run: one round, smallest grids
    command: str | None = None  # the pytest command line that wrote the file
    cases: list[Case] = field(default_factory=list)


def _load_run(path: Path) -> Run:
    data = json.loads(path.read_text(encoding="utf-8"))
    if "benchmarks" not in data:
        raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' key)")
    machine = data.get("machine_info", {})
    danet = machine.get("danet", {})
    commit_info = data.get("commit_info", {})
    commit = str(commit_info.get("id", "?"))[:12]
    if commit_info.get("dirty"):
        commit += " (with uncommitted changes)"
    run = Run(
        path=str(path),
        device=danet.get("device") or machine.get("cpu", {}).get("brand_raw", "unknown device"),
        versions={k: danet.get(k) for k in ("torch", "triton", "cuda", "python")},
        date=str(data.get("datetime", "?")),
        commit=commit,
        quick=bool(danet.get("quick")),
        command=danet.get("command"),
    )
    for bench in data["benchmarks"]:
        stats = bench.get("stats") or {}
        info = dict(bench.get("extra_info", {}))
        median, rounds, fastest = stats.get("median"), stats.get("rounds"), stats.get("min")
        run.cases.append(Case(bench["name"], bench.get("group") or "", info, median, rounds, fastest))
    for skipped in data.get("danet_not_run", []):
        info = dict(skipped.get("extra_info", {}))
        run.cases.append(Case(skipped["name"], skipped.get("group") or "", info,
                              reason=skipped.get("reason", "not run")))
    return run


def load_cases(paths: Sequence[str | Path]) -> list[Run]:
    """Read pytest-benchmark JSON files written by this suite, one :class:`Run` per file."""
    return [_load_run(Path(p)) for p in paths]


def _order(value: str, order: Sequence[str]) -> tuple[int, str]:
    return (order.index(value), value) if value in order else (len(order), value)


def format_bytes(n: float | None) -> str:
    """``1536 * 2**20`` -> ``"1.50 GiB"``; None -> an em dash."""
    if n is None:
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def format_number(value: float | None) -> str:
    """3 significant digits below 1000, whole and comma-grouped above (``1,234``); None -> an em dash."""
    if value is None:
        return "—"
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def format_ms(seconds: float | None) -> str:
    """Seconds as milliseconds with 3 significant digits."""
    return format_number(None if seconds is None else seconds * 1e3)


def format_ratio(numerator: float | None, denominator: float | None) -> str:
    """``numerator / denominator`` as ``"2.50x"``; an em dash where either is missing or the denominator 0."""
    if numerator is None or denominator is None or denominator == 0:
        return "—"
    return f"{numerator / denominator:.2f}x"


def _not_run_cell(case: Case) -> str:
    return "OOM" if case.oom else "not run"


def _reference_of(cases: Iterable[Case]) -> dict[str, Case]:
    """group -> the reference case of that group, where it ran."""
    return {c.group: c for c in cases if c.impl == "reference" and c.median_s is not None}


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a markdown table (cells written with ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _kernel_section(op: str, cases: list[Case]) -> list[str]:
    mine = [c for c in cases if c.op == op]
    if not mine:
        return []
    references = _reference_of(mine)
    lines = [f"## {OP_TITLES[op]}", ""]
    keys = sorted({(c.info.get("pass", "?"), c.info.get("dtype", "?")) for c in mine},
                  key=lambda k: (_order(k[0], PASS_ORDER), _order(k[1], DTYPE_ORDER)))
    for pass_, dtype in keys:
        selected = sorted(
            (c for c in mine if (c.info.get("pass"), c.info.get("dtype")) == (pass_, dtype)),
            key=lambda c: (c.info.get("N", 0), c.info.get("B", 0), _order(c.impl, IMPL_ORDER)),
        )
        rows = []
        for c in selected:
            ref = references.get(c.group)
            measured = c.median_s is not None
            tflops = c.info.get("flops") / c.median_s / 1e12 if measured and c.info.get("flops") else None
            err = c.info.get("rel_err")
            rows.append([
                str(c.info.get("B", "?")), f"{c.info.get('H')}x{c.info.get('W')}", str(c.info.get("N", "?")),
                c.impl,
                format_ms(c.median_s) if measured else _not_run_cell(c),
                format_ms(c.min_s) if measured else "—",
                format_ratio(ref.median_s, c.median_s) if measured and ref else "—",
                format_bytes(c.peak),
                format_ratio(c.peak, ref.peak) if measured and ref else "—",
                f"{tflops:.3g}" if tflops is not None else "—",
                f"{err:.1e}" if err is not None else "—",
                str(c.rounds or "—"),
            ])
        lines += [f"### {pass_}, {dtype}", ""]
        lines += markdown_table(["B", "HxW", "N", "impl", "median ms", "min ms", "speed-up vs reference",
                                 "peak memory", "memory vs reference", "TFLOP/s", "max rel. err", "rounds"],
                                rows)
        lines.append("")
    return lines


def _training_sections(cases: list[Case]) -> list[str]:
    steps = [c for c in cases if c.op == "train_step"]
    searches = [c for c in cases if c.op == "train_max_batch"]
    if not steps and not searches:
        return []
    lines = ["## Training: one full DANet step (forward, loss, backward, SGD)", ""]
    sample = (steps or searches)[0].info
    lines += [f"Backbone `{sample.get('backbone')}`, output stride 8, precision {sample.get('precision')}; "
              "`fused` runs the attention backend named in brackets.", ""]
    if steps:
        references = _reference_of(steps)
        rows = []
        for c in sorted(steps, key=lambda c: (c.info.get("H", 0) * c.info.get("W", 0), c.info.get("B", 0),
                                               _order(c.impl, IMPL_ORDER))):
            ref = references.get(c.group)
            measured = c.median_s is not None
            batch = c.info.get("B") or 0
            rows.append([
                f"{c.info.get('H')}x{c.info.get('W')}", str(c.info.get("N", "?")), str(batch),
                _attention_label(c),
                format_ms(c.median_s) if measured else _not_run_cell(c),
                f"{batch / c.median_s:.3g}" if measured and batch else "—",
                format_bytes(c.peak),
                format_ratio(c.peak, ref.peak) if measured and ref else "—",
                str(c.rounds or "—"),
            ])
        lines += ["### Step time and peak memory", ""]
        lines += markdown_table(["input HxW", "N (feature map)", "batch", "attention", "step ms",
                                 "images/s", "peak memory", "memory vs reference", "rounds"], rows)
        lines.append("")
    if searches:
        lines += _max_batch_section(searches)
    return lines


def _attention_label(case: Case) -> str:
    backend = case.info.get("attention_backend")
    return f"{case.impl} ({backend})" if backend and backend != case.impl else case.impl


def _max_batch_section(searches: list[Case]) -> list[str]:
    by_key: dict[tuple[int, int, int], dict[str, Case]] = defaultdict(dict)
    for c in searches:
        key = (int(c.info.get("H", 0)), int(c.info.get("W", 0)), int(c.info.get("cap_bytes", 0)))
        by_key[key][c.impl] = c

    def batch_cell(c: Case | None) -> str:
        if c is None:
            return "—"
        best = int(c.info.get("max_batch", 0) or 0)
        return f">= {best}" if best and best == c.info.get("search_limit") else str(best)

    enforced = all(c.info.get("cap_enforced") for c in searches)
    rows, claims = [], []
    for (h, w, cap), impls in sorted(by_key.items()):
        ref, fused = impls.get("reference"), impls.get("fused")
        rows.append([f"{h}x{w}", format_bytes(cap), batch_cell(ref), batch_cell(fused),
                     format_ms(fused.median_s) if fused and fused.median_s else "—",
                     format_bytes(fused.peak) if fused else "—"])
        ref_best = int(ref.info.get("max_batch", 0) or 0) if ref else None
        fused_best = int(fused.info.get("max_batch", 0) or 0) if fused else None
        if ref_best is not None and fused_best is not None and fused_best > ref_best:
            claims.append(
                f"{h}x{w} under {format_bytes(cap)}: fused batch {fused_best}, reference {ref_best}"
            )
    how = ("enforced with torch.cuda.set_per_process_memory_fraction on PyTorch's caching allocator "
           "(the CUDA context and library workspaces come on top)" if enforced else
           "compared with the measured peak of each batch (the CPU allocator cannot be capped)")
    lines = ["### Largest batch under a memory cap", "", f"Caps {how}; a search over batch sizes "
             "(doubling, then bisecting; `>=` marks the search's upper limit).", ""]
    lines += markdown_table(["input HxW", "cap", "reference: max batch", "fused: max batch",
                             "fused step ms at its max batch", "fused peak at its max batch"], rows)
    lines.append("")
    if claims:
        lines += ["Where the fused model fits a batch the reference cannot: " + "; ".join(claims) + ".", ""]
    else:
        lines += ["In these runs the fused model fit no larger batch than the reference.", ""]
    return lines


def _not_run_section(cases: list[Case]) -> list[str]:
    skipped = [c for c in cases if c.median_s is None]
    if not skipped:
        return []
    by_reason: dict[str, list[str]] = defaultdict(list)
    for c in skipped:
        by_reason[c.reason or "not run"].append(c.name)
    lines = ["## Cases that did not run", ""]
    for reason, names in sorted(by_reason.items()):
        lines.append(f"- {reason} ({len(names)} case{'s' * (len(names) != 1)}): "
                     + ", ".join(f"`{n}`" for n in sorted(names)))
    return [*lines, ""]


CONVENTIONS = """\
## How to read the numbers

- **median ms**: the median of the timed rounds of one call (pytest-benchmark's pedantic mode,
  after warm-up; on CUDA every round is bracketed by `torch.cuda.synchronize()`). **min ms**:
  the fastest round, the least disturbed by other processes on a shared machine.
- **speed-up vs reference**: the reference's median divided by this row's, in the same group
  (same op, pass, dtype and shape); above 1 is faster. **memory vs reference**: this row's
  peak divided by the reference's; below 1 is smaller.
- **peak memory** (kernels): the most memory the call allocates above what existed before it
  (the inputs and the output gradient), outputs and gradients included. On CUDA it is
  `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`; on the CPU the peak
  of the running sum of the CPU allocator's events recorded by `torch.profiler`
  (`profile_memory=True`). **peak memory** (training): what a step needs in all: parameters,
  buffers, SGD momentum and the batch, plus the step's own peak (activations, gradients).
- **TFLOP/s**: FLOPs / median time. PAM forward counts `2*B*N*N*(d + C)` (QK^T and PV);
  forward+backward counts 3.5x that, FlashAttention's convention (backward = 2.5x forward,
  including the recomputed QK^T) whether or not an implementation recomputes. CAM forward
  counts `4*B*C*C*N` (XX^T and AX); forward+backward 3x that (backward = two matmuls per
  forward matmul).
- **max rel. err**: `max|out - exact| / max|exact|` against the reference evaluated in float64
  on the same inputs (the blockwise backend in float64 above N = 16384, where the float64
  N x N matrix would not fit), the worst over the output and, with a backward, every input
  gradient.
- Inputs: random normal; PAM's q and k are scaled by 1/8 so that the energies are O(1)
  (C = 512, d = 64: DANet's head). SDPA runs on (B, 1, N, d) contiguous tensors made before
  timing, with its math backend (the reference's algorithm) excluded.
"""


def render_markdown(runs: Sequence[Run], plot_link: str | None = None) -> str:
    """The whole report as markdown; ``plot_link`` (relative to the report) embeds the plot."""
    cases = [c for run in runs for c in run.cases]
    on_cpu = all(run.device.startswith("CPU") for run in runs)
    lines = ["# Benchmarks", "",
             "<!-- Generated by `python -m benchmarks.report` from pytest-benchmark JSON; "
             "do not edit by hand. -->", ""]
    if on_cpu:
        lines += ["> **CPU results.** These numbers come from a CPU without a GPU: reduced shapes, the",
                  "> blockwise PyTorch backend (`backend=\"torch\"`) against the bmm reference, no Triton.",
                  "> The GPU tables come from the same commands on a CUDA machine (see *Reproducing*).", ""]
    if any(run.quick for run in runs):
        lines += ["> **Smoke run** (`--bench-quick`): one round per case on the smallest grids; the",
                  "> timings only show that the suite runs.", ""]
    rows = [[run.device, str(run.versions.get("torch")), str(run.versions.get("triton")),
             (run.versions.get("cuda") if not run.device.startswith("CPU") else None) or "—",
             str(run.versions.get("python")),
             run.date[:19].replace("T", " "), run.commit, f"`{Path(run.path).name}`"] for run in runs]
    header = ["measured on", "torch", "triton", "CUDA", "python", "date (UTC)", "commit", "file"]
    lines += markdown_table(header, rows)
    lines.append("")
    for run in runs:
        if run.command:
            lines += [f"`{Path(run.path).name}` was written by `{run.command}`.", ""]
    if plot_link:
        lines += [f"![time and peak memory against N]({plot_link})", ""]
    for op in ("pam", "cam"):
        lines += _kernel_section(op, cases)
    lines += _training_sections(cases)
    lines += _not_run_section(cases)
    lines += [CONVENTIONS, "## Reproducing", "",
              "On this machine (the CPU grid is chosen automatically where there is no GPU):", "", "```bash",
              "PYTHONPATH=. python -m pytest benchmarks/ --benchmark-only --torch-threads 1 "
              "--benchmark-json=results.json",
              "PYTHONPATH=. python -m benchmarks.report results.json --out docs/benchmarks.md "
              "--plot docs/benchmarks.png --overwrite", "```", "",
              "On a CUDA machine:", "", "```bash", GPU_COMMANDS, "```", ""]
    return "\n".join(lines)


def render_plot(runs: Sequence[Run], path: str | Path) -> None:
    """Log-log plot of time and peak memory against N, one line per implementation and pass.

    One row of panels per dtype (PAM time, PAM memory, CAM time, CAM memory) at the smallest
    batch, and a row for the training step (time and memory against input pixels, batch 1).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    cases = [c for run in runs for c in run.cases if c.median_s is not None]
    kernel = [c for c in cases if c.op in OP_TITLES]
    dtypes = sorted({c.info.get("dtype") for c in kernel}, key=lambda d: _order(str(d), DTYPE_ORDER))
    steps = [c for c in cases if c.op == "train_step"]
    n_rows = len(dtypes) + bool(steps)
    if n_rows == 0:
        raise ValueError("nothing to plot: no measured case in the input")
    fig, axes = plt.subplots(n_rows, 4, figsize=(18, 3.8 * n_rows), squeeze=False)
    colours = {impl: f"C{i}" for i, impl in enumerate(IMPL_ORDER)}
    styles = {"forward": "-", "forward+backward": "--"}

    def draw(ax, points: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str) -> None:
        for label, xy in sorted(points.items()):
            xy = sorted(p for p in xy if p[1] is not None and p[1] > 0)
            if not xy:
                continue
            impl, _, pass_ = label.partition(" ")
            ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", label=label,
                    color=colours.get(impl, "k"), linestyle=styles.get(pass_, "-"))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)

    for row, dtype in enumerate(dtypes):
        for col, op in enumerate(("pam", "cam")):
            mine = [c for c in kernel if c.op == op and c.info.get("dtype") == dtype]
            if not mine:
                axes[row][2 * col].set_visible(False)
                axes[row][2 * col + 1].set_visible(False)
                continue
            batch = min(c.info.get("B", 1) for c in mine)
            times: dict[str, list] = defaultdict(list)
            memory: dict[str, list] = defaultdict(list)
            for c in mine:
                if c.info.get("B") != batch:
                    continue
                label = f"{c.impl} {c.info.get('pass')}"
                times[label].append((c.info["N"], c.median_s * 1e3))
                memory[label].append((c.info["N"], None if c.peak is None else c.peak / 2**20))
            name = op.upper()
            where = f"{dtype}, B={batch}"
            draw(axes[row][2 * col], times, f"{name} time, {where}", "N = H x W", "median ms")
            draw(axes[row][2 * col + 1], memory, f"{name} peak memory, {where}", "N = H x W", "MiB")
    if steps:
        row = len(dtypes)
        batch = min(c.info.get("B", 1) for c in steps)
        times, memory = defaultdict(list), defaultdict(list)
        for c in steps:
            if c.info.get("B") == batch:
                pixels = c.info["H"] * c.info["W"]
                times[c.impl].append((pixels, c.median_s * 1e3))
                memory[c.impl].append((pixels, None if c.peak is None else c.peak / 2**20))
        where = f"{steps[0].info.get('backbone')}, batch {batch}"
        draw(axes[row][0], times, f"training step time, {where}", "input pixels", "ms")
        draw(axes[row][1], memory, f"training step peak memory, {where}", "input pixels", "MiB")
        axes[row][2].set_visible(False)
        axes[row][3].set_visible(False)
    devices = ", ".join(sorted({run.device for run in runs}))
    fig.suptitle(f"DANet attention benchmarks on {devices}", fontsize=12)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a failed run never leaves half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m benchmarks.report results.json [...] [--out FILE] [--plot FILE]``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON files (--benchmark-json output)")
    parser.add_argument("--out", help="write the markdown here (default: print it)")
    parser.add_argument("--plot", help="write a PNG plot of time and memory against N here")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out / --plot files that exist (e.g. the committed docs/benchmarks.*)")
    args = parser.parse_args(argv)
    existing = [path for path in (args.out, args.plot) if path and Path(path).exists()]
    if existing and not args.overwrite:
        print(f"benchmarks.report: error: {', '.join(existing)} exist(s); pass --overwrite to replace "
              "(docs/benchmarks.* are the committed results)", file=sys.stderr)
        return 2
    try:
        runs = load_cases(args.results)
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        print(f"benchmarks.report: error: {exc}", file=sys.stderr)
        return 2
    plot_link = None
    if args.plot:
        render_plot(runs, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
        plot_link = os.path.relpath(args.plot, Path(args.out).parent if args.out else ".")
    markdown = render_markdown(runs, plot_link)
    if args.out:
        _write_atomically(Path(args.out), markdown)
        print(f"wrote {args.out} ({sum(len(run.cases) for run in runs)} cases from {len(args.results)} "
              "file(s))", file=sys.stderr)
    else:
        print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
