"""The supervisor: runs each section's commands within its deadline and writes the results as they come.

It never touches the GPU itself. Every command is a fresh process in its own process group,
its output appended to ``<section>.log`` in the output folder. The benchmark suite's commands
append each case to ``<section>.jsonl`` as soon as it ends (``--bench-stream``); the supervisor
folds the new lines into the results and rewrites ``gpu_check.json`` and ``gpu_check.md``
(whole files, atomically) as they come, so that a run stopped at any point leaves a readable
report. A command that overruns its end by more than the grace (a hung kernel, a compilation
that never returns) is killed with its process group: its section is marked "killed" and keeps
the cases it finished, and the next section starts in fresh processes, on a fresh CUDA context.

Section statuses: pending, running, done, partial (cases left out for time), errors (pytest
failed, or cases failed with an error), killed (a command overran), not run (no time left).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from danet.io.atomic import atomic_write
from scripts.gpu_check.plan import Command, Plan, section_commands, section_deadline
from scripts.gpu_check.report import render_markdown

__all__ = ["JSON_NAME", "MARKDOWN_NAME", "REPO", "Supervisor", "new_results", "parse_pytest_summary"]

REPO = Path(__file__).resolve().parents[2]
JSON_NAME, MARKDOWN_NAME = "gpu_check.json", "gpu_check.md"
_SUMMARY_WORDS = ("passed", "failed", "skipped", "error", "errors", "deselected", "xfailed", "xpassed",
                  "warning", "warnings")


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


def new_results(plan: Plan, *, total_s: float, quick: bool, command: str, started_at: float,
                checkout: Mapping[str, Any]) -> dict[str, Any]:
    """The results of a run that has not started: every planned section pending, no records."""
    return {
        "schema": 2, "tool": "python -m scripts.gpu_check", "command": command, "started_at": started_at,
        "finished_at": None, "finished": False, "budget_s": total_s, "quick": quick,
        "checkout": dict(checkout), "env": {},
        "sections": {s: {"status": "pending", "budget_s": round(plan.budgets[s], 1), "seconds": None,
                         "note": None, "runs": []} for s in plan.order},
        "records": {s: [] for s in plan.order},
    }


class _NewLines:
    """The complete JSON lines appended to a file since the last call (a half-written one waits)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        entries = []
        for line in data[:end].splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:  # a line cut by a killed writer
                continue
        return [e for e in entries if isinstance(e, dict)]


class Supervisor:
    """One GPU-check run into ``out``: see the module docstring. ``commands`` is
    :func:`plan.section_commands`, or a stand-in in the tests."""

    def __init__(self, out: Path, results: dict[str, Any], plan: Plan, *, quick: bool, test_workers: int,
                 grace_s: float, commands: Callable[..., list[Command]] = section_commands,
                 poll_s: float = 0.25) -> None:
        self.out, self.results, self.plan = out, results, plan
        self.quick, self.test_workers, self.grace_s = quick, test_workers, grace_s
        self.commands, self.poll_s = commands, poll_s
        self.streams = {s: _NewLines(out / f"{s}.jsonl") for s in plan.order}
        self.child: subprocess.Popen | None = None
        self._last_write, self._changed = 0.0, False

    def run(self) -> int:
        """Run every planned section; 0 when every one is done (tests passed, nothing cut), else 1."""
        previous = signal.signal(signal.SIGTERM, _raise_system_exit)
        try:
            self.write(force=True)
            for section in self.plan.order:
                if time.time() > self.plan.hard_end - 5.0:
                    break
                self.run_section(section)
        finally:
            self._kill_child()
            now = time.time()
            for section, state in self.results["sections"].items():
                self._fold(section)
                if state["status"] in ("pending", "running"):
                    started = state.get("started")
                    state.update(status="killed" if started else "not run",
                                 seconds=None if started is None else round(now - started, 1),
                                 note="the check was stopped in this section" if started
                                 else "no time was left in the run's budget")
            wall_s = round(now - self.results["started_at"], 1)
            self.results.update(finished=True, finished_at=now, wall_s=wall_s)
            self.write(force=True)
            signal.signal(signal.SIGTERM, previous)
        return 0 if all(s["status"] == "done" for s in self.results["sections"].values()) else 1

    def run_section(self, section: str) -> None:
        """The section's commands, one after another, sharing its time (see plan.py)."""
        start = time.time()
        deadline = section_deadline(self.plan, section, start)
        state = self.results["sections"][section]
        state.update(status="running", started=start, deadline=deadline)
        self.write(force=True)
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
            commands = self.commands(section, quick=self.quick, test_workers=self.test_workers,
                                     scratch=scratch)
            for index, command in enumerate(commands):
                for value in command.env.values():  # the fresh cache folders a command is given
                    if value.startswith(scratch):
                        Path(value).mkdir(parents=True, exist_ok=True)
                now = time.time()
                end = now + (deadline - now) / (len(commands) - index)
                state["runs"].append(self.run_command(section, command, end))
        records = self.results["records"][section]
        left_out = sum(str(r.get("reason", "")).startswith("deadline") for r in records)
        errors = sum(str(r.get("reason", "")).startswith("error") for r in records)
        notes = [run["note"] for run in state["runs"] if run.get("note")]
        if left_out:
            notes.append(f"{left_out} case(s) left out: the deadline came first")
        if errors:
            notes.append(f"{errors} case(s) failed with an error")
        killed = any(run["killed"] for run in state["runs"])
        failed = errors or any(run["returncode"] != 0 for run in state["runs"])
        state.update(status="killed" if killed else "errors" if failed else "partial" if left_out else "done",
                     seconds=round(time.time() - start, 1), note="; ".join(notes) or None)
        self.write(force=True)

    def run_command(self, section: str, command: Command, end: float) -> dict[str, Any]:
        """Run one command until it exits or overruns ``end``; what it did, for the section's ``runs``."""
        argv = [sys.executable, *command.args]
        if command.benchmarks:
            argv += ["--bench-deadline", f"{end:.1f}", "--bench-stream", str(self.out / f"{section}.jsonl")]
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **command.env}
        log_path = self.out / f"{section}.log"
        start, killed, note = time.time(), False, None
        with open(log_path, "ab") as log:
            offset = log.tell()
            log.write(f"$ {shlex.join(argv)}\n".encode())
            log.flush()
            self.child = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
            while self.child.poll() is None:
                self._fold(section, command.label)
                self.write()  # at most once a second, and only when cases came
                now = time.time()
                if now > min(end + self.grace_s, self.plan.hard_end):
                    killed = True
                    note = (f"{command.label}: the run's budget ran out" if now > self.plan.hard_end else
                            f"{command.label}: overran its end by {now - end:.0f} s and was stopped (the "
                            "cases it finished are kept)")
                    self._kill_child()
                    break
                time.sleep(self.poll_s)
            returncode, self.child = (None if killed else self.child.returncode), None
        self._fold(section, command.label)
        with open(log_path, "rb") as log:
            log.seek(offset)
            output = log.read().decode(errors="replace")
        run = {"label": command.label, "command": shlex.join(["python", *command.args]),
               "returncode": returncode, "killed": killed, "seconds": round(time.time() - start, 1),
               **parse_pytest_summary(output)}
        if returncode not in (0, None):
            run["tail"] = output[-4000:]
            note = (f"{command.label}: pytest exited with status {returncode} "
                    f"({run['summary'] or 'no summary'}); see {log_path.name}")
        return {**run, "note": note}

    def _fold(self, section: str, label: str | None = None) -> None:
        """Move the section's new stream lines into the results."""
        for entry in self.streams[section].read():
            self._changed = True
            if "machine" in entry:
                self.results["env"] = self.results["env"] or entry["machine"]
            else:
                info = {**entry.get("extra_info", {}), "run": label}  # e.g. autotuning's cold or warm caches
                self.results["records"][section].append({**entry, "extra_info": info})

    def _kill_child(self) -> None:
        """Stop the running command and everything it started (its own process group)."""
        child = self.child
        if child is None or child.poll() is not None:
            return
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait()

    def write(self, force: bool = False) -> None:
        """Rewrite the JSON and the markdown (unless ``force``: when cases came, at most once a second)."""
        if not force and (not self._changed or time.monotonic() - self._last_write < 1.0):
            return
        self._last_write, self._changed = time.monotonic(), False
        self.results["updated_at"] = time.time()
        text = json.dumps(self.results, indent=1, default=str) + "\n"
        atomic_write(self.out / JSON_NAME, lambda tmp: tmp.write_text(text))
        markdown = render_markdown(self.results)
        atomic_write(self.out / MARKDOWN_NAME, lambda tmp: tmp.write_text(markdown))


def _raise_system_exit(signum: int, frame: Any) -> None:
    """SIGTERM (the device tool's timeout, a user's kill): unwind so that the report is written."""
    raise SystemExit(128 + signum)
