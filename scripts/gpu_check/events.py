"""The results of a GPU check and the event stream that fills them.

The worker (and the autotune probes it starts) append one JSON object per line to
``events.jsonl`` in the output folder; the supervisor reads the lines as they come and folds
them into the results with :func:`apply_event`. Events:

* ``{"event": "env", "data": {...}}``: the device and the library versions;
* ``{"event": "section_start", "section": s, "deadline": t}``;
* ``{"event": "record", "section": s, "data": {...}}``: one measured case;
* ``{"event": "section_end", "section": s, "status": ..., "seconds": ..., "skipped": [...]}``;
* ``{"event": "worker_start" | "worker_end", ...}``: bookkeeping.

Every event carries ``"t"`` (``time.time()``). Pure Python: no torch.

Section statuses. Set by the worker: done, partial (cases skipped for time), errors (cases
failed with an error, OOM excluded), failed (the section raised). Set by the supervisor:
pending, running, killed (overran its deadline: the worker was stopped), crashed (the worker
died in it), not run (no time left, or no worker could start).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "EVENTS_NAME",
    "JSON_NAME",
    "MARKDOWN_NAME",
    "PYTEST_LOG",
    "SCHEMA",
    "WORKER_LOG",
    "EventReader",
    "EventWriter",
    "apply_event",
    "end_section",
    "new_results",
]

SCHEMA = 1
# The files of a run in its output folder.
JSON_NAME, MARKDOWN_NAME, EVENTS_NAME = "gpu_check.json", "gpu_check.md", "events.jsonl"
WORKER_LOG, PYTEST_LOG = "worker.log", "pytest.log"


class EventWriter:
    """Appends events to a JSON-lines file, one ``write`` per event, flushed at once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def emit(self, event: str, **fields: Any) -> None:
        """Append ``{"event": event, "t": now, **fields}`` as one line."""
        line = json.dumps({"event": event, "t": time.time(), **fields}, default=str)
        # One os.write of a whole line on an O_APPEND descriptor: lines from the worker and a
        # probe writing at once never interleave.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


class EventReader:
    """Reads the complete lines appended to a JSON-lines file since the last call."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.offset = 0

    def read_new(self) -> list[dict[str, Any]]:
        """The events of the lines completed since the last call (a half-written line waits)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        events = []
        for line in data[:end].splitlines():
            try:
                event = json.loads(line)
            except ValueError:  # a line cut by a killed writer
                continue
            if isinstance(event, dict) and "event" in event:
                events.append(event)
        return events


def new_results(*, sections: Iterable[str], budgets: Mapping[str, float], total_s: float, quick: bool,
                command: str, started_at: float, checkout: Mapping[str, Any]) -> dict[str, Any]:
    """The empty results of a run: every selected section pending, no records."""
    order = list(sections)
    return {
        "schema": SCHEMA,
        "tool": "python -m scripts.gpu_check",
        "command": command,
        "started_at": started_at,
        "finished_at": None,
        "finished": False,
        "budget_s": total_s,
        "quick": quick,
        "checkout": dict(checkout),
        "env": {},
        "sections": {s: {"status": "pending", "budget_s": round(budgets[s], 1), "seconds": None, "note": None,
                         "error": None, "skipped": 0} for s in order},
        "records": {s: [] for s in order},
        "skipped": [],
        "workers": [],
    }


def apply_event(results: dict[str, Any], event: Mapping[str, Any]) -> None:
    """Fold one event into ``results`` (events of unknown kinds or sections are ignored)."""
    kind = event.get("event")
    section = event.get("section")
    state = results["sections"].get(section) if section is not None else None
    if kind == "env":
        results["env"].update(event.get("data", {}))
    elif kind == "worker_start":
        results["workers"].append({"pid": event.get("pid"), "sections": event.get("sections"),
                                   "started": event.get("t")})
    elif kind == "worker_end" and results["workers"]:
        results["workers"][-1]["ended"] = event.get("t")
    elif state is None:
        return
    elif kind == "section_start":
        state.update(status="running", started=event.get("t"), deadline=event.get("deadline"))
    elif kind == "record":
        results["records"][section].append(dict(event.get("data", {})))
    elif kind == "section_end":
        skipped = list(event.get("skipped", []))
        state.update(status=event.get("status", "done"), seconds=event.get("seconds"),
                     note=event.get("note"), error=event.get("error"), skipped=len(skipped))
        results["skipped"].extend({"section": section, **case} for case in skipped)


def end_section(results: dict[str, Any], section: str, status: str, note: str, now: float) -> None:
    """Close a section the worker could not close itself (killed, crashed, never started)."""
    state = results["sections"][section]
    started = state.get("started")
    state.update(status=status, note=note, seconds=None if started is None else round(now - started, 1))
