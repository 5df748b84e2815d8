"""The supervisor: runs the GPU tests and the measuring worker, enforces the deadlines, writes the report.

It never touches the GPU itself. The "tests" section is a pytest subprocess with a timeout.
The other sections run in one worker process (``python -m scripts.gpu_check --worker``),
which checks its deadlines between cases and streams its results as events; the supervisor
folds them into the results and rewrites ``gpu_check.json`` and ``gpu_check.md`` (whole files,
atomically) as they come, so a run stopped at any point leaves a readable report. A worker
that overruns a section's deadline by more than the grace (a hung kernel, a compilation that
never returns) is killed with its process group; the section is marked "killed", keeps the
cases it finished, and a new worker runs the sections after it.

Files written in the output folder: gpu_check.json, gpu_check.md, events.jsonl (the raw
events), worker.log (the workers' output), pytest.log.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from danet.io.atomic import atomic_write
from scripts.gpu_check.events import (
    EVENTS_NAME,
    JSON_NAME,
    MARKDOWN_NAME,
    PYTEST_LOG,
    WORKER_LOG,
    EventReader,
    apply_event,
    end_section,
)
from scripts.gpu_check.plan import FULL_SIZING, QUICK_SIZING, Plan, section_deadline
from scripts.gpu_check.report import render_markdown

__all__ = ["REPO", "Supervisor", "parse_pytest_summary", "repo_env"]

REPO = Path(__file__).resolve().parents[2]
_SUMMARY_WORDS = ("passed", "failed", "skipped", "error", "errors", "deselected", "xfailed", "xpassed",
                  "warning", "warnings")


def repo_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with the checkout first on PYTHONPATH and unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def parse_pytest_summary(output: str) -> dict[str, Any]:
    """The last pytest summary line of ``output`` ("3 passed, 1 skipped in 12.3s") and its counts."""
    pattern = re.compile(r"(\d+) (" + "|".join(_SUMMARY_WORDS) + r")\b")
    for line in reversed(output.splitlines()):
        text = line.strip().strip("=").strip()
        counts = pattern.findall(text)
        if counts and re.search(r"\bin [\d.]+s", text):
            parsed: dict[str, int] = {}
            for number, word in counts:
                word = {"errors": "error", "warnings": "warning"}.get(word, word)
                parsed[word] = parsed.get(word, 0) + int(number)
            return {"summary": text, "counts": parsed}
    return {"summary": None, "counts": {}}


class Supervisor:
    """One GPU-check run into ``out``: see the module docstring.

    ``worker_argv`` starts a worker (the command line before ``--worker``); ``clock`` and
    ``poll_s`` are there for the tests.
    """

    def __init__(self, out: Path, results: dict[str, Any], plan: Plan, *, quick: bool, test_workers: int,
                 grace_s: float, worker_argv: Sequence[str] | None = None,
                 clock: Callable[[], float] = time.time, poll_s: float = 0.25) -> None:
        self.out = out
        self.results = results
        self.plan = plan
        self.quick = quick
        self.test_workers = test_workers
        self.grace_s = grace_s
        self.worker_argv = list(worker_argv or [sys.executable, "-m", "scripts.gpu_check"])
        self.clock = clock
        self.poll_s = poll_s
        self.reader = EventReader(out / EVENTS_NAME)
        self.child: subprocess.Popen | None = None
        self._last_write = 0.0

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> int:
        """Run every planned section; 0 when all are done and the GPU tests passed, else 1."""
        previous = signal.signal(signal.SIGTERM, _raise_system_exit)
        try:
            self.write(force=True)
            worker_sections = [s for s in self.plan.order if s != "tests"]
            if "tests" in self.plan.order:
                self.run_tests()
            self.run_workers(worker_sections)
        finally:
            self._kill_child()
            self._drain()
            now = self.clock()
            for section, state in self.results["sections"].items():
                if state["status"] == "running":
                    end_section(self.results, section, "killed", "the check was stopped in this section", now)
                elif state["status"] == "pending":
                    end_section(self.results, section, "not run", "no time was left in the run's budget", now)
            wall_s = round(now - self.results["started_at"], 1)
            self.results.update(finished=True, finished_at=now, wall_s=wall_s)
            self.write(force=True)
            signal.signal(signal.SIGTERM, previous)
        return 0 if self._all_good() else 1

    def _all_good(self) -> bool:
        tests = self.results["records"].get("tests", [])
        tests_ok = all(r.get("returncode") == 0 for r in tests)
        return tests_ok and all(s["status"] == "done" for s in self.results["sections"].values())

    def run_tests(self) -> None:
        """The GPU tests: ``python -m pytest -m gpu -x -q tests`` with the section's deadline as timeout."""
        start = self.clock()
        deadline = section_deadline(self.plan, "tests", start)
        apply_event(self.results, {"event": "section_start", "section": "tests", "t": start,
                                   "deadline": deadline})
        self.write(force=True)
        marker = (QUICK_SIZING if self.quick else FULL_SIZING).tests_marker
        command = [sys.executable, "-m", "pytest", "-m", marker, "-x", "-q",
                   "-p", "no:cacheprovider"]
        if self.test_workers > 0:
            command += ["-n", str(self.test_workers)]
        command.append("tests")
        log_path = self.out / PYTEST_LOG
        with open(log_path, "wb") as log:
            self.child = subprocess.Popen(command, cwd=REPO, env=repo_env(), stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
            timed_out = False
            try:
                returncode = self.child.wait(timeout=max(1.0, deadline - self.clock()))
            except subprocess.TimeoutExpired:
                timed_out = True
                self._kill_child()
                returncode = None
            self.child = None
        output = log_path.read_text(errors="replace")
        seconds = round(self.clock() - start, 1)
        record = {"command": shlex.join(["python", *command[1:]]), "returncode": returncode,
                  "timed_out": timed_out, "seconds": seconds, **parse_pytest_summary(output),
                  "tail": output[-4000:]}
        if timed_out:
            status, note = "killed", f"stopped after {seconds:g} s (the section's deadline)"
        elif returncode != 0:
            status, note = "errors", f"pytest exited with status {returncode}: see {PYTEST_LOG}"
        else:
            status, note = "done", None
        for event in ({"event": "record", "section": "tests", "data": record},
                      {"event": "section_end", "section": "tests", "status": status, "seconds": seconds,
                       "note": note}):
            apply_event(self.results, event)
        self.write(force=True)

    def run_workers(self, sections: list[str]) -> None:
        """Run ``sections`` in workers, one after another after a kill or a crash, while time is left."""
        remaining = list(sections)
        starts_without_progress = 0
        while remaining and self.clock() < self.plan.hard_end - 5.0:
            not_started = self.run_worker(remaining)
            if not_started == remaining:
                starts_without_progress += 1
                if starts_without_progress >= 2:
                    now = self.clock()
                    for section in remaining:
                        end_section(self.results, section, "not run",
                                    f"the worker stopped before this section twice: see {WORKER_LOG}", now)
                        self.results["sections"][section]["error"] = self._worker_log_tail()
                    return
            else:
                starts_without_progress = 0
            remaining = not_started

    def run_worker(self, sections: list[str]) -> list[str]:
        """One worker for ``sections``; returns those it never started."""
        argv = [*self.worker_argv, "--worker", "--out", str(self.out), "--sections", ",".join(sections),
                "--plan", json.dumps(self.plan.to_json())]
        if self.quick:
            argv.append("--quick")
        started: list[str] = []
        current: str | None = None
        current_deadline = self.plan.hard_end
        with open(self.out / WORKER_LOG, "ab") as log:
            self.child = subprocess.Popen(argv, cwd=REPO, env=repo_env(), stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
            while True:
                events = self.reader.read_new()
                for event in events:
                    apply_event(self.results, event)
                    if event.get("event") == "section_start" and event.get("section") in sections:
                        current = event["section"]
                        current_deadline = float(event.get("deadline", self.plan.hard_end))
                        started.append(current)
                    elif event.get("event") == "section_end" and event.get("section") == current:
                        current = None
                # Records are rewritten at most once a second; a section's start or end at once.
                self.write(force=any(event.get("event") != "record" for event in events))
                returncode = self.child.poll()
                if returncode is not None:
                    break
                now = self.clock()
                if current is not None and now > current_deadline + self.grace_s:
                    self._kill_child()
                    self._drain()
                    end_section(self.results, current, "killed",
                                f"overran its deadline by {now - current_deadline:.0f} s: the worker was "
                                "stopped (the cases it finished are kept)", now)
                    current = None
                    break
                if now > self.plan.hard_end:
                    self._kill_child()
                    self._drain()
                    if current is not None:
                        end_section(self.results, current, "killed", "the run's budget ran out", now)
                        current = None
                    break
                time.sleep(self.poll_s)
            self.child = None
        self._drain()
        if current is not None and self.results["sections"][current]["status"] == "running":
            end_section(self.results, current, "crashed",
                        f"the worker exited with status {returncode} in this section: see {WORKER_LOG}",
                        self.clock())
            self.results["sections"][current]["error"] = self._worker_log_tail()
        self.write(force=True)
        return [s for s in sections if s not in started]

    # -- helpers -----------------------------------------------------------------------------

    def _worker_log_tail(self, chars: int = 2000) -> str | None:
        """The end of the workers' log: a crash's traceback, for the report."""
        try:
            text = (self.out / WORKER_LOG).read_text(errors="replace")
        except OSError:
            return None
        return text[-chars:] or None

    def _drain(self) -> None:
        for event in self.reader.read_new():
            apply_event(self.results, event)

    def _kill_child(self) -> None:
        """Stop the running child and everything it started (its own process group)."""
        child = self.child
        if child is None or child.poll() is not None:
            return
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait()

    def write(self, force: bool = False) -> None:
        """Rewrite the JSON and the markdown (at most once a second unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._last_write < 1.0:
            return
        self._last_write = now
        self.results["updated_at"] = self.clock()
        text = json.dumps(self.results, indent=1, default=str)
        atomic_write(self.out / JSON_NAME, lambda tmp: tmp.write_text(text + "\n"))
        markdown = render_markdown(self.results)
        atomic_write(self.out / MARKDOWN_NAME, lambda tmp: tmp.write_text(markdown))


def _raise_system_exit(signum: int, frame: Any) -> None:
    """SIGTERM (the device tool's timeout, a user's kill): unwind so the report is written."""
    raise SystemExit(128 + signum)
