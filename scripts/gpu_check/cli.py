"""The command line of the GPU check: parsing, the refusal without CUDA, the run's start."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scripts.gpu_check.plan import FULL_TOTAL_S, QUICK_TOTAL_S, SECTIONS, make_plan, parse_sections
from scripts.gpu_check.supervisor import JSON_NAME, MARKDOWN_NAME, REPO, Supervisor, new_results

__all__ = ["checkout_info", "cuda_problem", "main", "parse_args"]

EXIT_REFUSED = 2
COMMIT_ENV = "GPU_CHECK_COMMIT"  # the commit, where the checkout travelled without its .git


def parse_args(argv: Sequence[str] | None = None, start: float | None = None) -> argparse.Namespace:
    """Parse and check the arguments: ``args.sections`` is the list of sections to run, in order,
    and ``args.plan`` their :class:`plan.Plan` from ``start`` (default now)."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.gpu_check",
        description="The one-call GPU check of danet-fused: the GPU tests, then the benchmark suite on the "
                    "cases the issues' targets name (time, memory, error against float64, autotuning, a "
                    "DANet-ResNet101 training step), written as gpu_check.json and gpu_check.md into --out.")
    parser.add_argument("--out", type=Path, required=True,
                        help="the folder for the results (created if missing)")
    parser.add_argument("--only", help=f"comma list of sections to run (default all): {','.join(SECTIONS)}")
    parser.add_argument("--skip", help="comma list of sections to leave out")
    parser.add_argument("--quick", action="store_true",
                        help=f"the reduced grid of every section (default budget {QUICK_TOTAL_S:g} s)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for the whole run, its hard end (default {FULL_TOTAL_S:g}; "
                             f"{QUICK_TOTAL_S:g} with --quick)")
    parser.add_argument("--grace", type=float, default=None,
                        help="seconds a command may overrun its end before it is killed "
                             "(default 20; 10 with --quick)")
    parser.add_argument("--test-workers", type=int, default=4,
                        help="pytest-xdist workers for the GPU tests (0: no xdist; default 4)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier run in --out")
    args = parser.parse_args(argv)
    try:
        args.sections = parse_sections(args.only, skip=args.skip)
    except ValueError as exc:
        parser.error(str(exc))
    if args.budget is None:
        args.budget = QUICK_TOTAL_S if args.quick else FULL_TOTAL_S
    if args.grace is None:
        args.grace = 10.0 if args.quick else 20.0
    if args.grace < 0:
        parser.error(f"--grace must be >= 0, got {args.grace:g}")
    if args.test_workers < 0:
        parser.error(f"--test-workers must be >= 0, got {args.test_workers}")
    try:
        args.plan = make_plan(args.sections, total_s=args.budget, quick=args.quick,
                              start=time.time() if start is None else start)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def cuda_problem() -> str | None:
    """Why this machine cannot run the check (no CUDA device), or None."""
    import torch  # only here: parsing, --help and the report need no torch (start-up time)

    if torch.cuda.is_available():
        return None
    why = ("this torch was built without CUDA" if torch.version.cuda is None
           else "torch.cuda.is_available() is False: no GPU is visible, or no driver")
    return (f"no CUDA device: {why} (torch {torch.__version__}). The GPU check runs on a CUDA machine only; "
            "see docs/performance.md, section 'GPU check'.")


def checkout_info(repo: Path) -> dict[str, Any]:
    """The commit of the checkout and whether it has uncommitted changes (git, else $GPU_CHECK_COMMIT)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return {"commit": commit, "dirty": bool(status.strip()), "source": "git"}
    except (OSError, subprocess.SubprocessError):
        commit = os.environ.get(COMMIT_ENV)
        return {"commit": commit, "dirty": None, "source": f"${COMMIT_ENV}" if commit else None}


def _earlier_results(out: Path) -> list[Path]:
    """The files an earlier run left in ``out``."""
    if not out.is_dir():
        return []
    ours = {JSON_NAME, MARKDOWN_NAME, *(f"{s}.{ext}" for s in SECTIONS for ext in ("jsonl", "log"))}
    return sorted(p for p in out.iterdir() if p.name in ours)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: refuse without CUDA, else run the planned sections into ``--out``."""
    start = time.time()
    args = parse_args(argv, start)
    problem = cuda_problem()
    if problem is not None:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return EXIT_REFUSED
    out: Path = args.out.resolve()  # the commands run from the checkout, wherever this was called from
    earlier = _earlier_results(out)
    if earlier and not args.overwrite:
        print(f"gpu_check: {out} holds the results of an earlier run ({', '.join(p.name for p in earlier)}); "
              "give another --out or --overwrite", file=sys.stderr)
        return EXIT_REFUSED
    out.mkdir(parents=True, exist_ok=True)
    for path in earlier:
        path.unlink()
    command = shlex.join(["python", "-m", "scripts.gpu_check", *(sys.argv[1:] if argv is None else argv)])
    results = new_results(args.plan, total_s=args.budget, quick=args.quick, command=command, started_at=start,
                          checkout=checkout_info(REPO))
    code = Supervisor(out, results, args.plan, quick=args.quick, test_workers=args.test_workers,
                      grace_s=args.grace).run()
    print((out / MARKDOWN_NAME).read_text())
    print(f"gpu_check: {'all sections done' if code == 0 else 'see the report: not everything passed'}; "
          f"{time.time() - start:.0f} s; results in {out / JSON_NAME} and {out / MARKDOWN_NAME}")
    return code
