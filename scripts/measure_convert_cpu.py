"""Measure what danet_kernels.convert gains on this machine's CPU: the release's DANet head.

The original release's head (DANetHead with the bmm PAM_Module / CAM_Module, in_channels 2048,
so C = 512 in the attention; 19 classes) at a 97 x 97 feature map, fp32, batch 1, one thread:
forward+backward (a ones gradient into the three outputs) as it is and after
``danet_kernels.convert`` (the blockwise backend: what ``backend="auto"`` picks on a CPU).
Each variant runs in its own process so that the peak resident memory (``ru_maxrss``) is its
alone; "growth" is the peak RSS minus the peak once the head, its input and a step at 8 x 8
(loading the kernels) exist, i.e. what the step itself adds. The two variants alternate for
``--rounds`` processes each; each keeps its fastest time and its largest growth.

Usage::

    python scripts/measure_convert_cpu.py              # both variants, a markdown table
    python scripts/measure_convert_cpu.py --rounds 1   # half the time (about 6 min when idle)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("unconverted", "converted")
SIDE, IN_CHANNELS, CLASSES = 97, 2048, 19
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, not installed


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_variant(variant: str) -> dict:
    """One process: build the head, convert it or not, time one full-size step, report memory."""
    import torch

    # lazy: only the measuring processes load torch and the model; the parent stays small
    import danet_kernels
    from danet.models.head import DANetHead

    torch.set_num_threads(1)
    torch.manual_seed(0)
    head = DANetHead(IN_CHANNELS, CLASSES, attention="reference")
    if variant == "converted":
        danet_kernels.convert(head)

    def step(x: torch.Tensor) -> float:
        start = time.perf_counter()
        sum(out.sum() for out in head(x)).backward()
        head.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(torch.randn(1, IN_CHANNELS, 8, 8))
    x = torch.randn(1, IN_CHANNELS, SIDE, SIDE)
    base_mb = _rss_mb()
    seconds = step(x)
    return {"s": seconds, "growth_mb": _rss_mb() - base_mb}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="processes per variant, alternating")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant)))
        return 0
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            done = subprocess.run([sys.executable, __file__, "--variant", variant], capture_output=True,
                                  text=True, check=True)
            runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = {v: (min(r["s"] for r in runs[v]), max(r["growth_mb"] for r in runs[v])) for v in VARIANTS}
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"DANet head, {SIDE}x{SIDE}, C={IN_CHANNELS // 4}, fp32, forward+backward, 1 thread, best of "
          f"{args.rounds} alternating processes, {when}\n")
    print("| head | time | peak memory growth |\n|---|---|---|")
    for variant, (seconds, growth) in best.items():
        print(f"| {variant} | {seconds:.1f} s | {growth:.0f} MB |")
    (ref_s, ref_mb), (ours_s, ours_mb) = best["unconverted"], best["converted"]
    print(f"\nconverted / unconverted: time {ours_s / ref_s:.2f}x, memory growth {ours_mb / ref_mb:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
