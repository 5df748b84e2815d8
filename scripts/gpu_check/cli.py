"""The command line of the GPU check: parsing, the refusal without CUDA, and the three process roles.

* the supervisor (a user's call): checks for CUDA, plans the run, runs it (``supervisor.py``);
* ``--worker`` (started by the supervisor): the measuring sections (``worker.py``);
* ``--probe`` (started by the autotune section): first calls in a fresh process.

Nothing here imports torch before it is needed, so parsing and refusing stay fast.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scripts.gpu_check.events import EVENTS_NAME, JSON_NAME, MARKDOWN_NAME, PYTEST_LOG, WORKER_LOG
from scripts.gpu_check.plan import (
    FULL_TOTAL_S,
    QUICK_TOTAL_S,
    SECTIONS,
    Plan,
    make_plan,
    parse_sections,
)

__all__ = ["build_parser", "checkout_info", "cuda_problem", "main", "parse_args"]

EXIT_REFUSED = 2
COMMIT_ENV = "GPU_CHECK_COMMIT"  # the commit, where the checkout travelled without its .git
OUR_FILES = (JSON_NAME, MARKDOWN_NAME, EVENTS_NAME, WORKER_LOG, PYTEST_LOG)


def build_parser() -> argparse.ArgumentParser:
    """The parser; the worker's and the probe's options are hidden from ``--help``."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.gpu_check",
        description="The one-call GPU check of danet-fused: GPU tests, accuracy against float64, autotuning, "
                    "kernel timings and memory, a DANet-ResNet101 training step and evaluation throughput, "
                    "written as gpu_check.json and gpu_check.md into --out.")
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
                        help="seconds a section may overrun its deadline before its worker is killed "
                             "(default 20; 10 with --quick)")
    parser.add_argument("--test-workers", type=int, default=4,
                        help="pytest-xdist workers for the GPU tests (0: no xdist; default 4)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier run in --out")
    hidden = argparse.SUPPRESS
    parser.add_argument("--worker", action="store_true", help=hidden)
    parser.add_argument("--sections", help=hidden)
    parser.add_argument("--plan", help=hidden)
    parser.add_argument("--probe", help=hidden)
    parser.add_argument("--probe-cache", default="cold", help=hidden)
    parser.add_argument("--probe-deadline", type=float, default=None, help=hidden)
    parser.add_argument("--probe-channels", type=int, default=512, help=hidden)
    return parser


def parse_args(argv: Sequence[str] | None = None, start: float | None = None) -> argparse.Namespace:
    """Parse and check the arguments: ``args.sections`` is the list of sections to run, in order,
    and ``args.plan`` their :class:`Plan` from ``start`` (default now)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        if not args.sections or args.plan is None:
            parser.error("--worker needs --sections and --plan")
        args.sections = args.sections.split(",")
        unknown = [s for s in args.sections if s not in SECTIONS or s == "tests"]
        if unknown:
            parser.error(f"--sections: not a worker section: {', '.join(unknown)}")
        args.plan = Plan.from_json(json.loads(args.plan))
        return args
    if args.probe is not None:
        if args.probe_deadline is None:
            parser.error("--probe needs --probe-deadline")
        args.probe = json.loads(args.probe)
        return args
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
    import torch

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


def _run_supervisor(args: argparse.Namespace, start: float, argv: Sequence[str] | None) -> int:
    from scripts.gpu_check.events import new_results
    from scripts.gpu_check.supervisor import REPO, Supervisor

    out: Path = args.out
    earlier = [name for name in OUR_FILES if (out / name).exists()]
    if earlier and not args.overwrite:
        print(f"gpu_check: {out} holds the results of an earlier run ({', '.join(earlier)}); "
              "give another --out or --overwrite", file=sys.stderr)
        return EXIT_REFUSED
    out.mkdir(parents=True, exist_ok=True)
    for name in earlier:
        (out / name).unlink()
    command = shlex.join(["python", "-m", "scripts.gpu_check", *(sys.argv[1:] if argv is None else argv)])
    results = new_results(sections=args.plan.order, budgets=args.plan.budgets, total_s=args.budget,
                          quick=args.quick, command=command, started_at=start, checkout=checkout_info(REPO))
    supervisor = Supervisor(out, results, args.plan, quick=args.quick, test_workers=args.test_workers,
                            grace_s=args.grace)
    code = supervisor.run()
    print((out / MARKDOWN_NAME).read_text())
    print(f"gpu_check: {'all sections done' if code == 0 else 'see the report: not everything passed'}; "
          f"{time.time() - start:.0f} s; results in {out / JSON_NAME} and {out / MARKDOWN_NAME}")
    return code


def _run_probe(args: argparse.Namespace) -> int:
    from scripts.gpu_check.events import EventWriter
    from scripts.gpu_check.measure_kernels import autotune_probe

    events = EventWriter(args.out / EVENTS_NAME)
    autotune_probe(args.probe, args.probe_deadline, args.probe_cache, args.probe_channels,
                   lambda record: events.emit("record", section="autotune", data=record))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the supervisor, or the worker / probe role the hidden options select."""
    start = time.time()
    args = parse_args(argv, start)
    if args.worker:
        from scripts.gpu_check.worker import run_worker

        return run_worker(args)
    if args.probe is not None:
        return _run_probe(args)
    problem = cuda_problem()
    if problem is not None:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return EXIT_REFUSED
    return _run_supervisor(args, start, argv)
