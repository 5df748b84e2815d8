"""Turn the benchmark suite's pytest-benchmark JSON into a markdown report and a plot.

Usage, from the repository root::

    pytest benchmarks/ --benchmark-only --torch-threads 1 --benchmark-json=results.json
    python -m benchmarks.report results.json --out results/benchmarks.md --plot results/benchmarks.png

Without ``--out`` the markdown goes to standard output. A file that exists is replaced only
with ``--overwrite`` (docs/benchmarks.md and .png are the committed results: regenerating them
is a deliberate ``--out docs/benchmarks.md --plot docs/benchmarks.png --overwrite``); every file
written is named on standard error.

Several JSON files (e.g. the kernel and the training benchmarks run separately) may be
given; their cases are merged. The report has one table per attention op, pass and variant
(time, ratio to the reference of the same group, peak memory, achieved TFLOP/s, error
against float64, and the predicted figures where a case carries them), the training step and
largest-batch tables, the cases that could not run and why, and the conventions behind each
number. The plot shows time and peak memory against N on log-log axes for each implementation.
The GPU check (scripts/gpu_check) renders its kernel and training tables with the same functions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danet.io.atomic import atomic_write

IMPL_ORDER = ("reference", "triton", "blockwise", "sdpa", "fused")
PASS_ORDER = ("forward", "forward+backward")
VARIANT_ORDER = ("fp32", "fp32-high", "fp32-medium", "bf16", "fp16")
OP_TITLES = {"pam": "Position attention (PAM)", "cam": "Channel attention (CAM)"}


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
    def variant(self) -> str:
        """The dtype and matmul precision (``fp32``, ``fp32-high``, ``bf16``, ...; older files: the dtype)."""
        return str(self.info.get("variant") or self.info.get("dtype", "?"))

    @property
    def peak(self) -> int | None:
        """Peak memory in bytes, if measured."""
        value = self.info.get("peak_mem_bytes")
        return None if value is None else int(value)

    @property
    def oom(self) -> bool:
        """Whether the case ran out of memory."""
        return bool(self.info.get("oom")) or (self.reason or "").startswith("OOM")


def case_from_entry(entry: Mapping[str, Any]) -> Case:
    """A case from a pytest-benchmark JSON entry, a ``danet_not_run`` one, or a line of
    ``--bench-stream`` (either of the two)."""
    stats = entry.get("stats") or {}
    return Case(entry["name"], entry.get("group") or "", dict(entry.get("extra_info", {})),
                stats.get("median"), stats.get("rounds"), stats.get("min"),
                None if stats else entry.get("reason", "not run"))


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


def load_run(path: str | Path) -> Run:
    """Read a pytest-benchmark JSON file written by this suite."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if "benchmarks" not in data:
        raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' key)")
    machine = data.get("machine_info", {})
    danet = machine.get("danet", {})
    commit_info = data.get("commit_info", {})
    commit = str(commit_info.get("id", "?"))[:12]
    commit += " (with uncommitted changes)" if commit_info.get("dirty") else ""
    device = danet.get("device") or machine.get("cpu", {}).get("brand_raw", "unknown device")
    return Run(str(path), device, {k: danet.get(k) for k in ("torch", "triton", "cuda", "python")},
               str(data.get("datetime", "?")), commit, bool(danet.get("quick")), danet.get("command"),
               [case_from_entry(e) for e in (*data["benchmarks"], *data.get("danet_not_run", []))])


def order_key(value: str, order: Sequence[str]) -> tuple[int, str]:
    """A sort key placing ``value`` by its place in ``order``, values not in it last, by name."""
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


# extra_info["predicted"] keys shown as columns where some case of a table carries them.
PREDICTED = (("median_ms", "predicted ms", format_number), ("peak_mem_bytes", "predicted peak", format_bytes))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a markdown table (cells written with ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _not_run_cell(case: Case) -> str:
    return "OOM" if case.oom else "not run"


def _reference_of(cases: Iterable[Case]) -> dict[str, Case]:
    """group -> the reference case of that group, where it ran."""
    return {c.group: c for c in cases if c.impl == "reference" and c.median_s is not None}


def _predicted_columns(cases: Sequence[Case]) -> list[tuple[str, str, Callable[[Any], str]]]:
    """The predicted figures (harness.PREDICTORS) that some of ``cases`` carry, as extra columns."""
    return [col for col in PREDICTED if any((c.info.get("predicted") or {}).get(col[0]) is not None
                                            for c in cases)]


def _predicted_by(cases: Sequence[Case]) -> list[str]:
    """The lines under a table with predicted figures: what predicted them, with its stated error."""
    found = dict.fromkeys((c.info.get("predicted") or {}).get("by") for c in cases)
    return [line for by in found if by for line in (f"Predicted by {by}.", "")]


def _predicted_cells(case: Case, columns: Sequence[tuple[str, str, Callable[[Any], str]]]) -> list[str]:
    predicted = case.info.get("predicted") or {}
    return [format_fn(predicted.get(key)) for key, _, format_fn in columns]


def kernel_section(op: str, cases: Sequence[Case]) -> list[str]:
    """The tables of one attention op (``pam``, ``cam``), one per pass and variant."""
    mine = [c for c in cases if c.op == op]
    if not mine:
        return []
    references = _reference_of(mine)
    lines = [f"## {OP_TITLES[op]}", ""]
    keys = sorted({(c.info.get("pass", "?"), c.variant) for c in mine},
                  key=lambda k: (order_key(k[0], PASS_ORDER), order_key(k[1], VARIANT_ORDER)))
    for pass_, variant in keys:
        selected = sorted((c for c in mine if (c.info.get("pass"), c.variant) == (pass_, variant)),
                          key=lambda c: (c.info.get("N", 0), c.info.get("B", 0),
                                         order_key(c.impl, IMPL_ORDER)))
        predicted = _predicted_columns(selected)
        rows = []
        for c in selected:
            ref = references.get(c.group)
            measured = c.median_s is not None
            tflops = c.info.get("flops") / c.median_s / 1e12 if measured and c.info.get("flops") else None
            err = c.info.get("rel_err")
            rows.append([
                c.info.get("B", "?"), f"{c.info.get('H')}x{c.info.get('W')}", c.info.get("N", "?"), c.impl,
                format_ms(c.median_s) if measured else _not_run_cell(c),
                format_ms(c.min_s) if measured else "—",
                format_ratio(ref.median_s, c.median_s) if measured and ref else "—",
                format_bytes(c.peak),
                format_ratio(c.peak, ref.peak) if measured and ref else "—",
                f"{tflops:.3g}" if tflops is not None else "—",
                f"{err:.1e}" if err is not None else "—",
                c.rounds or "—", *_predicted_cells(c, predicted),
            ])
        lines += [f"### {pass_}, {variant}", ""]
        lines += markdown_table(["B", "HxW", "N", "impl", "median ms", "min ms", "speed-up vs reference",
                                 "peak memory", "memory vs reference", "TFLOP/s", "max rel. err", "rounds",
                                 *(title for _, title, _ in predicted)], rows)
        lines += ["", *_predicted_by(selected)]
    return lines


def training_sections(cases: Sequence[Case]) -> list[str]:
    """The training step's table and the largest batch under each memory cap."""
    steps = [c for c in cases if c.op == "train_step"]
    searches = [c for c in cases if c.op == "train_max_batch"]
    if not steps and not searches:
        return []
    lines = ["## Training: one full DANet step (forward, loss, backward, SGD)", ""]
    sample = (steps or searches)[0].info
    lines += [f"Backbone `{sample.get('backbone')}`, output stride 8; `fused` runs the attention backend "
              "named in brackets.", ""]
    if steps:
        references = _reference_of(steps)
        predicted = _predicted_columns(steps)
        rows = []
        for c in sorted(steps, key=lambda c: (c.info.get("precision", ""), c.info.get("N", 0),
                                               c.info.get("B", 0), order_key(c.impl, IMPL_ORDER))):
            ref = references.get(c.group)
            measured = c.median_s is not None
            batch = c.info.get("B") or 0
            backend = c.info.get("attention_backend")
            rows.append([
                f"{c.info.get('H')}x{c.info.get('W')}", c.info.get("N", "?"), batch, c.info.get("precision"),
                f"{c.impl} ({backend})" if backend and backend != c.impl else c.impl,
                format_ms(c.median_s) if measured else _not_run_cell(c),
                f"{batch / c.median_s:.3g}" if measured and batch else "—",
                format_bytes(c.peak),
                format_ratio(c.peak, ref.peak) if measured and ref else "—",
                c.rounds or "—", *_predicted_cells(c, predicted),
            ])
        lines += ["### Step time and peak memory", ""]
        lines += markdown_table(["input HxW", "N (feature map)", "batch", "precision", "attention", "step ms",
                                 "images/s", "peak memory", "memory vs reference", "rounds",
                                 *(title for _, title, _ in predicted)], rows)
        lines += ["", *_predicted_by(steps)]
    if searches:
        lines += _max_batch_section(searches)
    return lines


def _max_batch_section(searches: list[Case]) -> list[str]:
    by_key: dict[tuple[int, int, int], dict[str, Case]] = defaultdict(dict)
    for c in searches:
        by_key[(c.info.get("H", 0), c.info.get("W", 0), c.info.get("cap_bytes", 0))][c.impl] = c

    def best(c: Case | None) -> int | None:
        return None if c is None else int(c.info.get("max_batch", 0) or 0)

    rows, claims = [], []
    for (h, w, cap), impls in sorted(by_key.items()):
        ref, fused = impls.get("reference"), impls.get("fused")
        cells = ["—" if c is None else f">= {best(c)}" if best(c) and best(c) == c.info.get("search_limit")
                 else str(best(c)) for c in (ref, fused)]
        rows.append([f"{h}x{w}", format_bytes(cap), *cells,
                     format_ms(fused.median_s) if fused and fused.median_s else "—",
                     format_bytes(fused.peak) if fused else "—"])
        if ref is not None and fused is not None and best(fused) > best(ref):
            claims.append(f"{h}x{w} under {format_bytes(cap)}: fused batch {best(fused)}, "
                          f"reference {best(ref)}")
    enforced = all(c.info.get("cap_enforced") for c in searches)
    how = ("enforced with torch.cuda.set_per_process_memory_fraction on PyTorch's caching allocator (the "
           "CUDA context and library workspaces come on top)" if enforced
           else "compared with the measured peak of each batch (the CPU allocator cannot be capped)")
    lines = ["### Largest batch under a memory cap", "", f"Caps {how}; a search over batch sizes "
             "(doubling, then bisecting; `>=` marks the search's upper limit).", ""]
    lines += markdown_table(["input HxW", "cap", "reference: max batch", "fused: max batch",
                             "fused step ms at its max batch", "fused peak at its max batch"], rows)
    lines.append("")
    if claims:
        return [*lines, f"Where the fused model fits a batch the reference cannot: {'; '.join(claims)}.", ""]
    return [*lines, "In these runs the fused model fit no larger batch than the reference.", ""]


def _not_run_section(cases: list[Case]) -> list[str]:
    by_reason: dict[str, list[str]] = defaultdict(list)
    for c in cases:
        if c.median_s is None:
            by_reason[c.reason or "not run"].append(c.name)
    lines = ["## Cases that did not run", ""] if by_reason else []
    for reason, names in sorted(by_reason.items()):
        lines.append(f"- {reason} ({len(names)} case{'s' * (len(names) != 1)}): "
                     + ", ".join(f"`{n}`" for n in sorted(names)))
    return [*lines, ""] if lines else []


CONVENTIONS = """\
## How to read the numbers

- **median ms**: the median of the timed rounds of one call (pytest-benchmark's pedantic mode,
  after warm-up; on CUDA every round is bracketed by `torch.cuda.synchronize()`). **min ms**:
  the fastest round, the least disturbed by other processes on a shared machine.
- **variant**: the dtype, and for fp32 the matmul precision (`torch.set_float32_matmul_precision`:
  `fp32` is "highest", exact fp32; `fp32-high` 3xTF32 in the kernels, TF32 in cuBLAS;
  `fp32-medium` TF32).
- **speed-up vs reference**: the reference's median divided by this row's, in the same group
  (same op, pass, variant and shape); above 1 is faster. **memory vs reference**: this row's
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


REPRODUCING = """\
## Reproducing

From the repository root, with no install and no network (`PYTHONPATH=.`). The grid is the
machine's: reduced on a CPU, the full one on CUDA (where the kernels and the training
benchmarks are best run as separate commands, `-k` selecting fewer cases, e.g. `-k 128x256`;
the report merges the JSON files). `python -m scripts.gpu_check` runs the GPU's selection
within a time budget (docs/performance.md, "GPU check").

```bash
PYTHONPATH=. python -m pytest benchmarks/ --benchmark-only --torch-threads 1 --benchmark-json=results.json
PYTHONPATH=. python -m benchmarks.report results.json --out docs/benchmarks.md --plot docs/benchmarks.png \\
    --overwrite
```
"""


def render_markdown(runs: Sequence[Run], plot_link: str | None = None) -> str:
    """The whole report as markdown; ``plot_link`` (relative to the report) embeds the plot."""
    cases = [c for run in runs for c in run.cases]
    lines = ["# Benchmarks", "",
             "<!-- Generated by `python -m benchmarks.report` from pytest-benchmark JSON; "
             "do not edit by hand. -->", ""]
    if all(run.device.startswith("CPU") for run in runs):
        lines += ["> **CPU results.** These numbers come from a CPU without a GPU: reduced shapes, the",
                  "> blockwise PyTorch backend (`backend=\"torch\"`) against the bmm reference, no Triton.",
                  "> The GPU tables come from the same commands on a CUDA machine (see *Reproducing*).", ""]
    if any(run.quick for run in runs):
        lines += ["> **Smoke run** (`--bench-quick`): one round per case on the smallest grids; the",
                  "> timings only show that the suite runs.", ""]
    rows = [[run.device, run.versions.get("torch"), run.versions.get("triton"),
             (run.versions.get("cuda") if not run.device.startswith("CPU") else None) or "—",
             run.versions.get("python"), run.date[:19].replace("T", " "), run.commit,
             f"`{Path(run.path).name}`"] for run in runs]
    header = ["measured on", "torch", "triton", "CUDA", "python", "date (UTC)", "commit", "file"]
    lines += [*markdown_table(header, rows), ""]
    for run in runs:
        if run.command:
            lines += [f"`{Path(run.path).name}` was written by `{run.command}`.", ""]
    if plot_link:
        lines += [f"![time and peak memory against N]({plot_link})", ""]
    lines += [*kernel_section("pam", cases), *kernel_section("cam", cases), *training_sections(cases),
              *_not_run_section(cases), CONVENTIONS, REPRODUCING]
    return "\n".join(lines)


def render_plot(runs: Sequence[Run], path: str | Path) -> None:
    """Log-log plot of time and peak memory against N, one line per implementation and pass.

    One row of panels per variant (PAM time, PAM memory, CAM time, CAM memory) at the smallest
    batch, and a row for the training step (time and memory against input pixels, batch 1).
    """
    import matplotlib  # here, not at the top: the markdown report needs no plotting library

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    cases = [c for run in runs for c in run.cases if c.median_s is not None]
    kernel = [c for c in cases if c.op in OP_TITLES]
    variants = sorted({c.variant for c in kernel}, key=lambda v: order_key(v, VARIANT_ORDER))
    steps = [c for c in cases if c.op == "train_step"]
    n_rows = len(variants) + bool(steps)
    if n_rows == 0:
        raise ValueError("nothing to plot: no measured case in the input")
    fig, axes = plt.subplots(n_rows, 4, figsize=(18, 3.8 * n_rows), squeeze=False)
    colours = {impl: f"C{i}" for i, impl in enumerate(IMPL_ORDER)}

    def draw(ax: Any, mine: list[Case], x: Callable[[Case], float], label: Callable[[Case], str], title: str,
             xlabel: str) -> None:
        """Time (``ax``) and peak memory (the next axes) of ``mine`` at their smallest batch."""
        batch = min(c.info.get("B", 1) for c in mine)
        for values, axis, ylabel in ((lambda c: c.median_s * 1e3, ax[0], "ms"),
                                     (lambda c: None if c.peak is None else c.peak / 2**20, ax[1], "MiB")):
            points: dict[str, list[tuple[float, float]]] = defaultdict(list)
            for c in mine:
                if c.info.get("B") == batch and values(c):
                    points[label(c)].append((x(c), values(c)))
            for name, xy in sorted(points.items()):
                impl, _, pass_ = name.partition(" ")
                style = "--" if pass_ == "forward+backward" else "-"
                axis.plot(*zip(*sorted(xy), strict=True), marker="o", label=name,
                          color=colours.get(impl, "k"), linestyle=style)
            axis.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel)
            axis.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
            axis.set_title(f"{title} {'time' if ylabel == 'ms' else 'peak memory'}, B={batch}", fontsize=10)
            axis.grid(True, which="both", alpha=0.3)
            if axis.lines:
                axis.legend(fontsize=7)

    for row, variant in enumerate(variants):
        for col, op in enumerate(("pam", "cam")):
            mine = [c for c in kernel if c.op == op and c.variant == variant]
            if mine:
                draw(axes[row][2 * col:], mine, lambda c: c.info["N"],
                     lambda c: f"{c.impl} {c.info.get('pass')}", f"{op.upper()} {variant}", "N = H x W")
            else:
                axes[row][2 * col].set_visible(False)
                axes[row][2 * col + 1].set_visible(False)
    if steps:
        draw(axes[-1], steps, lambda c: c.info["H"] * c.info["W"],
             lambda c: f"{c.impl} {c.info.get('precision', '')}".strip(),
             f"training step, {steps[0].info.get('backbone')}", "input pixels")
        axes[-1][2].set_visible(False)
        axes[-1][3].set_visible(False)
    fig.suptitle(f"DANet attention benchmarks on {', '.join(sorted({r.device for r in runs}))}", fontsize=12)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


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
        runs = [load_run(path) for path in args.results]
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
        atomic_write(args.out, lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
        print(f"wrote {args.out} ({sum(len(run.cases) for run in runs)} cases from {len(args.results)} "
              "file(s))", file=sys.stderr)
    else:
        print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
