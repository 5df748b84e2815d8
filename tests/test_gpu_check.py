"""The GPU check's CPU side: arguments, the time plan and its deadlines, the supervisor, the report.

The measuring sections need a GPU to mean anything, but their code runs here too, on tiny
shapes (the Triton kernels through the interpreter, the tiny backbone), so that a typo cannot
wait for the day a GPU is lent to show up. ``tests/fixtures/gpu_check_results.json`` is a
synthetic run (made-up numbers, every kind of outcome) for the report writer.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import danet_kernels
from scripts.gpu_check import plan as plan_module
from scripts.gpu_check.cli import parse_args
from scripts.gpu_check.events import EventWriter, apply_event, new_results
from scripts.gpu_check.plan import (
    FULL_BUDGETS,
    QUICK_SIZING,
    RESERVE_S,
    SECTIONS,
    STRETCH,
    CaseRunner,
    Deadline,
    Plan,
    make_plan,
    section_deadline,
)
from scripts.gpu_check.report import render_markdown
from scripts.gpu_check.supervisor import REPO, Supervisor, parse_pytest_summary

FIXTURE = Path(__file__).parent / "fixtures" / "gpu_check_results.json"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------


def test_defaults_run_every_section_within_eight_minutes() -> None:
    args = parse_args(["--out", "results"])
    assert args.sections == list(SECTIONS)
    assert args.budget < 8 * 60 and not args.quick
    assert args.grace > 0 and args.test_workers == 4
    quick = parse_args(["--out", "results", "--quick"])
    assert quick.budget < args.budget


def test_only_and_skip_select_sections_in_run_order() -> None:
    assert parse_args(["--out", "o", "--only", "cam,pam"]).sections == ["pam", "cam"]
    assert parse_args(["--out", "o", "--skip", "tests,eval"]).sections == [
        s for s in SECTIONS if s not in ("tests", "eval")]


@pytest.mark.parametrize("argv, message", [
    (["--only", "pam,bogus"], "unknown section bogus"),
    (["--only", "pam,,cam"], "empty section name"),
    (["--only", "pam", "--skip", "pam"], "no section left"),
    (["--budget", "30"], "too small"),
    (["--grace", "-1"], "--grace must be >= 0"),
    (["--test-workers", "-2"], "--test-workers must be >= 0"),
    ([], "--out"),
])
def test_bad_arguments_are_refused_with_a_message(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv if argv == [] else ["--out", "o", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_refuses_cleanly_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "docs/performance.md" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists(), "a refused run must write nothing"


# ---------------------------------------------------------------------------------------------
# the time plan
# ---------------------------------------------------------------------------------------------


def test_plan_scales_budgets_down_to_fit_and_keeps_them_when_they_fit() -> None:
    fitting = make_plan(SECTIONS, total_s=10_000, quick=False, start=0.0)
    assert dict(fitting.budgets) == dict(FULL_BUDGETS)
    tight = make_plan(SECTIONS, total_s=200, quick=False, start=50.0)
    assert tight.hard_end == 250.0
    assert sum(tight.budgets.values()) == pytest.approx(200 - RESERVE_S)
    ratios = {s: tight.budgets[s] / FULL_BUDGETS[s] for s in SECTIONS}
    assert max(ratios.values()) == pytest.approx(min(ratios.values()))  # one factor for all
    assert make_plan(["pam"], total_s=60, quick=True, start=0).order == ("pam",)
    with pytest.raises(ValueError, match="too small"):
        make_plan(SECTIONS, total_s=RESERVE_S + 10, quick=False, start=0.0)


def test_the_default_plan_fits_its_budget() -> None:
    for quick, total in ((False, plan_module.FULL_TOTAL_S), (True, plan_module.QUICK_TOTAL_S)):
        plan = make_plan(SECTIONS, total_s=total, quick=quick, start=0.0)
        assert sum(plan.budgets.values()) + RESERVE_S <= total


def test_section_deadline_stretches_into_slack_but_never_into_later_budgets() -> None:
    plan = Plan(("tests", "pam", "eval"), {"tests": 100.0, "pam": 50.0, "eval": 40.0}, hard_end=1000.0)
    # Plenty of time: a section may use STRETCH times its budget.
    assert section_deadline(plan, "pam", 0.0) == STRETCH * 50.0
    # Late: pam must leave eval its 40 s (and half the reserve for the last report).
    late = 900.0
    assert section_deadline(plan, "pam", late) == pytest.approx(1000.0 - RESERVE_S / 2 - 40.0)
    # The last section may run to the end less half the reserve.
    assert section_deadline(plan, "eval", 990.0 - RESERVE_S) == pytest.approx(1000.0 - RESERVE_S / 2)
    # Out of time: the deadline is now (the section's cases are all skipped), never in the past.
    assert section_deadline(plan, "pam", 999.0) == 999.0


def test_case_runner_skips_what_no_longer_fits_and_records_failures() -> None:
    clock = FakeClock()
    emitted, cleaned = [], []

    def classify(exc: BaseException) -> str:
        return "oom" if isinstance(exc, MemoryError) else "error"

    runner = CaseRunner(Deadline(clock.now + 10.0, clock), emitted.append, classify=classify,
                        cleanup=lambda: cleaned.append(True), min_seconds=1.0)

    def takes(seconds: float, result: dict | None = None, error: BaseException | None = None):
        def measure() -> dict | None:
            clock.now += seconds
            if error is not None:
                raise error
            return result

        return measure

    assert runner.run({"case": 1}, takes(4.0, {"ms": 1.5}), group="big")["status"] == "ok"
    out_of_memory = runner.run({"case": 2}, takes(1.0, error=MemoryError("out of memory")), group="small")
    assert out_of_memory["status"] == "oom"
    failed = runner.run({"case": 3}, takes(1.0, error=ValueError("broken")), group="small")
    assert failed["status"] == "error" and "ValueError: broken" in failed["error"]
    # 4 s left: another "big" case (the last took 4 s) still fits, then no more.
    assert runner.run({"case": 4}, takes(4.0, {"ms": 2.0}), group="big")["seconds"] == 4.0
    assert runner.run({"case": 5}, takes(4.0), group="big") is None
    assert runner.run({"case": 6}, takes(0.5), group="small") is None  # 0 s left, the floor is 1 s
    assert [r["case"] for r in emitted] == [1, 2, 3, 4]
    assert emitted[0] == {"case": 1, "ms": 1.5, "status": "ok", "seconds": 4.0}
    assert [c["case"] for c in runner.skipped] == [5, 6]
    assert all(c["status"] == "skipped" and "deadline" in c["reason"] for c in runner.skipped)
    assert runner.failed == 1 and len(cleaned) == 4


# ---------------------------------------------------------------------------------------------
# the supervisor, with a stand-in worker
# ---------------------------------------------------------------------------------------------

FAKE_WORKER = textwrap.dedent("""
    import argparse, json, sys, time
    from scripts.gpu_check.events import EventWriter
    from scripts.gpu_check.plan import Plan, section_deadline

    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--sections")
    parser.add_argument("--plan")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    plan = Plan.from_json(json.loads(args.plan))
    events = EventWriter(args.out + "/events.jsonl")
    events.emit("worker_start", pid=0, sections=args.sections.split(","))
    events.emit("env", data={"device": "stand-in"})
    for section in args.sections.split(","):
        events.emit("section_start", section=section, deadline=section_deadline(plan, section, time.time()))
        events.emit("record", section=section, data={"case": section, "status": "ok"})
        if section == "accuracy":
            time.sleep(120)  # hangs: the supervisor must kill it
        if section == "autotune":
            sys.exit(3)  # dies in the section
        events.emit("section_end", section=section, status="done", seconds=0.1, skipped=[])
    events.emit("worker_end")
""")


def test_supervisor_kills_an_overrunning_worker_survives_a_crash_and_runs_the_rest(tmp_path: Path) -> None:
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER)
    out = tmp_path / "out"
    out.mkdir()
    start = time.time()
    order = ("accuracy", "autotune", "pam")
    plan = Plan(order, {s: 0.5 for s in order}, hard_end=start + RESERVE_S + 60.0)
    results = new_results(sections=order, budgets=plan.budgets, total_s=60.0, quick=True, command="test",
                          started_at=start, checkout={"commit": "abc"})
    supervisor = Supervisor(out, results, plan, quick=True, test_workers=0, grace_s=0.5,
                            worker_argv=[sys.executable, str(worker)], poll_s=0.05)
    assert supervisor.run() == 1  # not every section done
    elapsed = time.time() - start
    assert elapsed < 30, "the hung worker was not killed at its deadline"
    sections = results["sections"]
    assert sections["accuracy"]["status"] == "killed" and "deadline" in sections["accuracy"]["note"]
    assert sections["autotune"]["status"] == "crashed" and "status 3" in sections["autotune"]["note"]
    assert sections["pam"]["status"] == "done"
    assert [r["case"] for r in results["records"]["accuracy"]] == ["accuracy"]  # kept after the kill
    assert results["records"]["pam"] == [{"case": "pam", "status": "ok"}]
    assert results["finished"] and len(results["workers"]) == 3
    written = json.loads((out / "gpu_check.json").read_text())
    assert written["sections"] == sections
    markdown = (out / "gpu_check.md").read_text()
    assert "| accuracy | killed |" in markdown and "| pam | done |" in markdown


def test_worker_skips_every_case_past_its_deadline(tmp_path: Path) -> None:
    """The worker's own entry point, with a plan whose time is up: every section starts, skips
    all its cases (none may run at the full sizes here) and ends, saying so."""
    sections = [s for s in SECTIONS if s != "tests"]
    plan = Plan(tuple(sections), dict.fromkeys(sections, 1.0), hard_end=time.time())
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "scripts.gpu_check", "--worker", "--out", str(tmp_path), "--quick",
               "--sections", ",".join(sections), "--plan", json.dumps(plan.to_json())]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = _read_events(tmp_path / "events.jsonl")
    assert [e["event"] for e in events[:2]] == ["worker_start", "env"] and events[-1]["event"] == "worker_end"
    assert events[1]["data"]["torch"] and events[1]["data"]["cuda"] is None
    ends = [e for e in events if e["event"] == "section_end"]
    assert [e["section"] for e in ends] == sections
    assert all(e["status"] == "partial" and e["skipped"] for e in ends), [(e["section"], e["error"])
                                                                          for e in ends]
    assert not [e for e in events if e["event"] == "record"]


def test_a_cuda_fault_stops_the_worker_so_that_a_fresh_one_runs_the_rest(tmp_path: Path, monkeypatch) -> None:
    from scripts.gpu_check import worker

    ran = []

    def faulting(ctx) -> None:
        ctx.runner.run({"case": "fine"}, lambda: {"ms": 1.0})
        fault = RuntimeError("CUDA error: an illegal memory access was encountered")
        ctx.runner.run({"case": "faults"}, _raise(fault))
        ran.append("after the fault")

    sections = {"pam": faulting, "cam": lambda ctx: ran.append("cam")}
    monkeypatch.setattr(worker, "_section_functions", lambda: sections)
    plan = make_plan(["pam", "cam"], total_s=600.0, quick=True, start=time.time())
    events_file = EventWriter(tmp_path / "events.jsonl")
    assert not worker.run_sections(["pam", "cam"], plan, TINY, tmp_path, events_file)
    assert ran == []
    events = _read_events(tmp_path / "events.jsonl")
    records = [e["data"] for e in events if e["event"] == "record"]
    assert [(r["case"], r["status"]) for r in records] == [("fine", "ok"), ("faults", "cuda fault")]
    end = events[-1]
    assert end["event"] == "section_end" and end["section"] == "pam" and end["status"] == "failed"
    assert "fresh worker" in end["note"]


def _read_events(path: Path) -> list[dict]:
    """Every line of an events file, parsed strictly (a malformed line fails the test)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def _raise(exc: BaseException):
    def measure() -> None:
        raise exc

    return measure


def test_events_fold_into_results() -> None:
    results = new_results(sections=["pam"], budgets={"pam": 10.0}, total_s=60.0, quick=False, command="c",
                          started_at=0.0, checkout={})
    for event in ({"event": "env", "data": {"device": "X"}},
                  {"event": "section_start", "section": "pam", "t": 1.0, "deadline": 11.0},
                  {"event": "record", "section": "pam", "data": {"ms": 1.0}},
                  {"event": "record", "section": "nonsense", "data": {}},
                  {"event": "section_end", "section": "pam", "status": "partial", "seconds": 9.0,
                   "skipped": [{"case": 2}]}):
        apply_event(results, event)
    assert results["env"] == {"device": "X"}
    assert results["records"]["pam"] == [{"ms": 1.0}]
    assert results["sections"]["pam"]["status"] == "partial" and results["sections"]["pam"]["skipped"] == 1
    assert results["skipped"] == [{"section": "pam", "case": 2}]


def test_pytest_summary_is_found_in_quiet_and_verbose_output() -> None:
    quiet = "....F\nFAILED tests/x.py::test_y - AssertionError\n1 failed, 4 passed, 2 skipped in 3.21s\n"
    assert parse_pytest_summary(quiet) == {"summary": "1 failed, 4 passed, 2 skipped in 3.21s",
                                           "counts": {"failed": 1, "passed": 4, "skipped": 2}}
    verbose = "===== 3 passed, 1 warning in 0.50s =====\n"
    assert parse_pytest_summary(verbose)["counts"] == {"passed": 3, "warning": 1}
    assert parse_pytest_summary("collected 0 items\n")["summary"] is None


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


def test_report_of_the_recorded_run_computes_the_ratios() -> None:
    results = json.loads(FIXTURE.read_text())
    before = copy.deepcopy(results)
    markdown = render_markdown(results)
    assert results == before, "the report writer must not change its input"
    assert render_markdown(results) == markdown
    assert markdown.startswith("# GPU check: NVIDIA H200")
    assert "made-up numbers" in markdown  # the fixture says it is synthetic; the report repeats it
    assert "torch 2.11.0+cu130, triton 3.6.0" in markdown and "0123456789abcdef" in markdown
    # PAM bf16 forward+backward at 128x256: 28 ms / 8 ms, 64 MiB / 10 GiB.
    row = next(line for line in markdown.splitlines()
               if line.startswith("| forward+backward | bfloat16 | highest | 1 | 128x256 (32768) |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5:10] == ["8", "28", "130", "3.50x", "16.19x"]
    assert cells[-2] == "0.006"
    # Outcomes without numbers say why.
    oom_row = next(line for line in markdown.splitlines() if "| 2 | 97x97 (9409) |" in line)
    assert "| OOM |" in oom_row and "| refused |" in oom_row
    assert "| bf16-autocast | 300 | OOM |" in markdown  # training: the reference ran out of memory
    # Targets: met and not met, from the recorded cases.
    assert "| PAM bf16 forward+backward: >= 3x faster than the reference | issue 10 | 3.50x" in markdown
    assert "| CAM fp32 forward: >= 4x faster than the reference | docs/performance.md | 2.33x" in markdown
    assert "**not met**" in markdown
    # Sections cut, killed and not run are reported, and what was left out.
    assert "| autotune | killed |" in markdown and "| eval | not run |" in markdown
    assert "Skipped for time: 2 in pam." in markdown
    assert "ValueError: synthetic failure" in markdown
    assert "| 1024x2048 | bf16-autocast | 769 | 8 | 4.00 | 3.20 | 1.25x |" in markdown
    assert "1 failed, 9 passed" in markdown and "test_gpu_tf32_when_torch_allows_it" in markdown


def test_report_is_regenerated_from_a_saved_json(capsys) -> None:
    from scripts.gpu_check.report import main

    assert main([str(FIXTURE)]) == 0
    assert capsys.readouterr().out == render_markdown(json.loads(FIXTURE.read_text()))


def test_report_of_a_run_that_has_just_started() -> None:
    results = new_results(sections=SECTIONS, budgets=FULL_BUDGETS, total_s=465.0, quick=False, command="c",
                          started_at=0.0, checkout={})
    markdown = render_markdown(results)
    assert "in progress" in markdown and "device not reported yet" in markdown
    assert markdown.count("| pending |") == len(SECTIONS)
    assert "not measured" in markdown  # targets with no numbers yet


# ---------------------------------------------------------------------------------------------
# the measuring sections, run on tiny CPU shapes
# ---------------------------------------------------------------------------------------------

TINY = dataclasses.replace(
    QUICK_SIZING, channels=32, accuracy_sizes=((5, 7),), accuracy_variants=("fp32-highest", "fp32-high"),
    autotune_ns=(33,), autotune_variants=("fp32-highest",), timing_sizes=((4, 4),), timing_batches=(1,),
    timing_variants=("fp32-highest",), bench_warmup_ms=1.0, bench_rep_ms=2.0, num_classes=3,
    train_size=(64, 64), train_precisions=("fp32",), train_repeats=1, eval_size=(64, 96), eval_crops=(48,),
    eval_precisions=("fp32",), eval_frames=1,
)


def _run_tiny(tmp_path: Path, sections: list[str]) -> list[dict]:
    from scripts.gpu_check.worker import run_sections

    plan = make_plan(sections, total_s=600.0, quick=True, start=time.time())
    events_path = tmp_path / "events.jsonl"
    with danet_kernels.use_backend("torch"):  # the models' attention: the blockwise backend on the CPU
        run_sections(sections, plan, TINY, tmp_path, EventWriter(events_path))
    return _read_events(events_path)


def test_sections_run_on_tiny_cpu_shapes(tmp_path: Path) -> None:
    events = _run_tiny(tmp_path, ["accuracy", "pam", "cam", "train", "eval"])
    ends = {e["section"]: e for e in events if e["event"] == "section_end"}
    statuses = {s: e["status"] for s, e in ends.items()}
    assert statuses == dict.fromkeys(("accuracy", "pam", "cam", "train", "eval"), "done"), [
        e.get("error") for e in ends.values()]
    records = [e for e in events if e["event"] == "record"]
    by_section: dict[str, list[dict]] = {}
    for e in records:
        by_section.setdefault(e["section"], []).append(e["data"])
    accuracy = by_section["accuracy"]
    assert len(accuracy) == 4
    for r in accuracy:  # fp32 on the interpreter: both far under 1e-3, every gradient present
        names = {"pam": {"out", "q", "k", "v", "gamma", "residual"}, "cam": {"out", "x", "gamma"}}[r["op"]]
        assert set(r["errors"]["fused"]) == set(r["errors"]["reference"]) == names
        assert max(r["errors"]["fused"].values()) < 1e-3
    pam = by_section["pam"]
    assert {(r["impl"], r["pass"]) for r in pam} == {(i, p) for i in ("fused", "reference", "sdpa_efficient")
                                                     for p in ("forward", "forward+backward")}
    for r in pam + by_section["cam"]:
        if r["impl"] == "sdpa_efficient":
            assert r["status"] == "refused"  # no memory-efficient SDPA kernel on the CPU
        else:
            assert r["status"] == "ok" and r["median_ms"] > 0 and r["peak_bytes"] > 0
    train = by_section["train"]
    assert [(r["attention"], r["status"]) for r in train] == [("fused", "ok"), ("reference", "ok")]
    assert all(r["total_bytes"] > r["state_bytes"] > 0 for r in by_section["train"])
    evaluation = by_section["eval"]
    assert [r["windows"] for r in evaluation] == [2 * 3, 2 * 3]
    assert all(r["images_per_s"] > 0 for r in evaluation)
    results = new_results(sections=list(ends), budgets=dict.fromkeys(ends, 1.0), total_s=60.0, quick=True,
                          command="c", started_at=0.0, checkout={})
    for e in events:
        apply_event(results, e)
    markdown = render_markdown(results)  # the worker's real records render
    assert "| forward+backward | float32 | highest | 1 | 4x4 (16) |" in markdown
    assert "| resnet_tiny | 64x64 | 1 | fp32 |" in markdown and "| 64x96 | fp32 | 48 | 6 |" in markdown


@pytest.mark.slow
def test_autotune_section_probes_in_fresh_processes(tmp_path: Path) -> None:
    events = _run_tiny(tmp_path, ["autotune"])
    records = [e["data"] for e in events if e["event"] == "record"]
    assert sorted((r["op"], r["cache"]) for r in records) == [("cam", "cold"), ("cam", "warm"),
                                                              ("pam", "cold"), ("pam", "warm")]
    assert all(r["status"] == "ok" and r["first_forward_s"] > 0 for r in records)
    assert all(isinstance(r["tuned"], list) for r in records)
    assert events[-1]["event"] == "section_end" and events[-1]["status"] == "done"


class _FakeProbe:
    """Stands in for the autotune probe process: writes the records a probe's CaseRunner would
    (one case measured, one failed, the rest skipped for time) and exits."""

    def __init__(self, argv: list[str], **kwargs) -> None:
        cases = json.loads(argv[argv.index("--probe") + 1])
        cache = argv[argv.index("--probe-cache") + 1]
        events = EventWriter(Path(argv[argv.index("--out") + 1]) / "events.jsonl")
        outcomes = {"cold": ("ok", "error"), "warm": ("ok",)}[cache]
        for case, status in zip(cases, outcomes, strict=False):
            events.emit("record", section="autotune", data={**case, "cache": cache, "status": status})
        for case in cases[len(outcomes):]:
            events.emit("record", section="autotune",
                        data={**case, "cache": cache, "status": "skipped", "reason": "section deadline"})

    def wait(self, timeout: float | None = None) -> int:
        return 0


def test_autotune_counts_the_probes_skipped_and_failed_cases(tmp_path: Path, monkeypatch) -> None:
    from scripts.gpu_check import measure_kernels
    from scripts.gpu_check.worker import run_sections

    monkeypatch.setattr(measure_kernels.subprocess, "Popen", _FakeProbe)
    sizing = dataclasses.replace(TINY, autotune_ns=(33, 65))  # pam 33, pam 65, cam 33, cam 65
    plan = make_plan(["autotune"], total_s=600.0, quick=True, start=time.time())
    run_sections(["autotune"], plan, sizing, tmp_path, EventWriter(tmp_path / "events.jsonl"))
    events = _read_events(tmp_path / "events.jsonl")
    end = events[-1]
    assert end["event"] == "section_end" and end["status"] == "partial"
    skipped = [(c["op"], c["N"], c["cache"]) for c in end["skipped"]]
    assert skipped == [("cam", 33, "cold"), ("cam", 65, "cold")]
    assert "1 case(s) failed" in end["note"]
