"""Measure the blockwise PyTorch backend against the bmm reference on this machine's CPU.

For PAM (q, k of shape (1, 64, N), v of shape (1, 512, N)) and CAM (x of shape (1, 512, N))
in fp32 at 32x32, 64x64 and 97x97, forward and forward+backward (a ones gradient back to
every input), through the public functions with ``backend="torch"`` (blockwise) and
``backend="reference"``. Each case runs in its own subprocess, so that the peak resident
memory (``resource.getrusage``'s ``ru_maxrss``) belongs to that case alone: one warm-up
step, then the median of ``--repeats`` timed steps; the two backends alternate for
``--rounds`` processes each and each keeps its fastest median and its largest growth.
"Growth" is the peak RSS minus the peak reached once torch is imported, the same op has
run once at 8x8 (loading its kernels) and the inputs are built, i.e. the memory the op
itself adds (output, saved tensors, gradients, temporaries).

Usage::

    python scripts/measure_cpu.py                 # all cases, prints a markdown table
    python scripts/measure_cpu.py --sizes 32 64   # a subset
    python scripts/measure_cpu.py --case pam 64 torch full   # one case (used internally)

On a shared machine timings vary from run to run: compare the two backends within one run,
as ratios. The whole run takes about three minutes on a quiet 2-core CPU (``--rounds 1``: half).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

OPS = ("pam", "cam")
BACKENDS = ("reference", "torch")
MODES = ("fwd", "full")
CHANNELS = 512
# Run from a checkout without installing: the package lives one level up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(op: str, side: int, backend: str, mode: str, repeats: int, block_elements: int | None) -> dict:
    """Time one case in this process; return median milliseconds and memory figures."""
    import torch

    import danet_kernels
    from danet_kernels import blockwise

    if block_elements:
        blockwise.BLOCK_ELEMENTS = block_elements

    torch.manual_seed(0)
    grad = mode == "full"
    channels = (CHANNELS // 8, CHANNELS // 8, CHANNELS) if op == "pam" else (CHANNELS,)
    function = danet_kernels.position_attention if op == "pam" else danet_kernels.channel_attention

    def timed(inputs: list[torch.Tensor]) -> float:
        start = time.perf_counter()
        if grad:
            out = function(*inputs, backend=backend)
            out.backward(torch.ones_like(out))
            for t in inputs:
                t.grad = None
        else:
            with torch.no_grad():
                function(*inputs, backend=backend)
        return time.perf_counter() - start

    # The same code path at 8x8 first, so that the libraries' lazily loaded kernels and thread
    # pools count in the base, not in the op's growth.
    timed([torch.randn(1, c, 64, requires_grad=grad) for c in channels])
    inputs = [torch.randn(1, c, side * side, requires_grad=grad) for c in channels]
    base_mb = _rss_mb()
    timed(inputs)  # warm-up at full size: first-call allocations
    times = [timed(inputs) for _ in range(repeats)]
    peak_mb = _rss_mb()
    return {
        "ms": 1000 * statistics.median(times),
        "peak_mb": peak_mb,
        "growth_mb": peak_mb - base_mb,
    }


def _subprocess_case(op: str, side: int, backend: str, mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--case", op, str(side), backend, mode, "--repeats", str(args.repeats)]
    if args.block_elements:
        cmd += ["--block-elements", str(args.block_elements)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _alternating(op: str, side: int, mode: str, args: argparse.Namespace) -> tuple[dict, dict]:
    """Run reference, blockwise, reference, ... ``args.rounds`` times each, so that both see the
    same machine; keep each backend's fastest median (interference from other users of a shared
    machine only ever adds time) and its largest memory growth (the allocator varies a little)."""
    runs: dict[str, list[dict]] = {b: [] for b in BACKENDS}
    for _ in range(args.rounds):
        for backend in BACKENDS:
            runs[backend].append(_subprocess_case(op, side, backend, mode, args))
    ref, ours = ({"ms": min(r["ms"] for r in runs[b]), "growth_mb": max(r["growth_mb"] for r in runs[b])}
                 for b in BACKENDS)
    return ref, ours


def _ratio(ours: float, ref: float) -> str:
    return f"{ours / ref:.2f}x"


def main(argv: list[str] | None = None) -> int:
    """Run all cases (each in a subprocess) and print a markdown table, or run one case."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 97], help="H = W of the feature map")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case (median reported)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="processes per case, alternating the backends; the fastest median is reported")
    parser.add_argument("--block-elements", type=int, default=None,
                        help="override danet_kernels.blockwise.BLOCK_ELEMENTS (the rows x N buffer budget)")
    parser.add_argument("--case", nargs=4, metavar=("OP", "SIDE", "BACKEND", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.case:
        op, side, backend, mode = args.case
        print(json.dumps(run_case(op, int(side), backend, mode, args.repeats, args.block_elements)))
        return 0

    import torch

    from danet_kernels import blockwise

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, B=1, C={CHANNELS}, "
          f"median of {args.repeats} steps after one warm-up, best of {args.rounds} alternating rounds, "
          f"{when}, load average {os.getloadavg()[0]:.1f}, "
          f"block budget {args.block_elements or blockwise.BLOCK_ELEMENTS} elements")
    print()
    print("| op | H x W (N) | mode | reference | blockwise | time ratio | reference growth | "
          "blockwise growth | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for op in args.ops:
        for side in args.sizes:
            for mode in MODES:
                ref, ours = _alternating(op, side, mode, args)
                name = "forward" if mode == "fwd" else "fwd+bwd"
                print(
                    f"| {op.upper()} | {side}x{side} ({side * side}) | {name} "
                    f"| {ref['ms']:.1f} ms | {ours['ms']:.1f} ms | {_ratio(ours['ms'], ref['ms'])} "
                    f"| {ref['growth_mb']:.0f} MB | {ours['growth_mb']:.0f} MB "
                    f"| {_ratio(max(ours['growth_mb'], 1), max(ref['growth_mb'], 1))} |",
                    flush=True,
                )
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
