"""The GPU check's CPU side: arguments, the time plan, the supervisor (with stand-in commands), the report.

The measuring is the benchmark suite's and the GPU tests' (tests/test_benchmarks_smoke.py keeps
the suite running); here the check's own logic is tested. ``tests/fixtures/gpu_check_results.json``
is a synthetic run (made-up numbers, every kind of outcome) for the report writer.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _pytest.mark.expression import Expression

from danet.config import ATTENTIONS
from scripts.gpu_check.cli import parse_args
from scripts.gpu_check.plan import (
    FULL_TOTAL_S,
    QUICK_TOTAL_S,
    RESERVE_S,
    SECTIONS,
    STRETCH,
    Command,
    Plan,
    make_plan,
    section_commands,
    section_deadline,
)
from scripts.gpu_check.report import main as report_main
from scripts.gpu_check.report import render_markdown
from scripts.gpu_check.supervisor import REPO, Supervisor, new_results, parse_pytest_summary

FIXTURE = Path(__file__).parent / "fixtures" / "gpu_check_results.json"


def test_defaults_run_every_section_within_eight_minutes() -> None:
    args = parse_args(["--out", "results"])
    assert args.sections == list(SECTIONS) and args.budget < 8 * 60 and args.grace > 0
    assert parse_args(["--out", "results", "--quick"]).budget < args.budget
    assert parse_args(["--out", "o", "--only", "cam,pam"]).sections == ["pam", "cam"]
    assert parse_args(["--out", "o", "--skip", "tests,train"]).sections == ["autotune", "pam", "cam"]


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


def test_plan_fits_its_budget_and_scales_down_by_one_factor() -> None:
    for quick, total in ((False, FULL_TOTAL_S), (True, QUICK_TOTAL_S)):
        plan = make_plan(SECTIONS, total_s=total, quick=quick, start=0.0)
        assert dict(plan.budgets) == {s: budgets[quick] for s, budgets in SECTIONS.items()}
        assert sum(plan.budgets.values()) + RESERVE_S <= total
    tight = make_plan(SECTIONS, total_s=200, quick=False, start=50.0)
    assert tight.hard_end == 250.0 and sum(tight.budgets.values()) == pytest.approx(200 - RESERVE_S)
    ratios = {s: tight.budgets[s] / SECTIONS[s][0] for s in SECTIONS}
    assert max(ratios.values()) == pytest.approx(min(ratios.values()))
    with pytest.raises(ValueError, match="too small"):
        make_plan(SECTIONS, total_s=RESERVE_S + 10, quick=False, start=0.0)


def test_section_deadline_stretches_into_slack_but_never_into_later_budgets() -> None:
    plan = Plan(("tests", "pam", "train"), {"tests": 100.0, "pam": 50.0, "train": 40.0}, hard_end=1000.0)
    assert section_deadline(plan, "pam", 0.0) == STRETCH * 50.0
    assert section_deadline(plan, "pam", 900.0) == pytest.approx(1000.0 - RESERVE_S / 2 - 40.0)
    assert section_deadline(plan, "train", 990.0 - RESERVE_S) == pytest.approx(1000.0 - RESERVE_S / 2)
    assert section_deadline(plan, "pam", 999.0) == 999.0  # out of time: now, never in the past


def _cuda_grid_ids() -> list[str]:
    """The kernel benchmarks' test ids on a CUDA machine (benchmarks/harness.py's CUDA grid)."""
    shapes = [f"B{b}-C512-{h}x{w}" for b in (1, 2) for h, w in ((128, 256), (97, 97), (64, 64), (128, 128))]
    variants = ("fp32", "fp32-high", "fp32-medium", "bf16", "fp16")
    impls = {"pam": ("reference", "triton", "blockwise", "sdpa"), "cam": ("reference", "triton", "blockwise")}
    return [f"test_{op}[{s}-{v}-{p}-{i}]" for op in impls for s in shapes for v in variants
            for p in ("forward", "forward+backward") for i in impls[op]]


TESTS_IN = {"benchmarks/test_position_attention.py": ("test_pam[",),
            "benchmarks/test_channel_attention.py": ("test_cam[",),
            "benchmarks/test_training_memory.py": ("test_train_step[", "test_max_batch[")}


@pytest.mark.parametrize("quick, counts", [(False, {"pam": 168, "cam": 112, "autotune": 24, "train": 2}),
                                           (True, {"pam": 36, "cam": 24, "autotune": 4, "train": 2})])
def test_sections_select_the_cases_the_targets_need(quick: bool, counts: dict[str, int], tmp_path: Path,
                                                    ) -> None:
    """Each section's -k expression, evaluated as pytest does on the CUDA grid's test ids."""
    ids = [*_cuda_grid_ids(), *(f"test_train_step[B{b}-1024x2048-{a}]" for b in (1, 2) for a in ATTENTIONS),
           "test_max_batch[80G-1024x2048-fused]"]
    for section, expected in counts.items():
        commands = section_commands(section, quick=quick, test_workers=4, scratch=str(tmp_path))
        selected = set()
        for command in commands:
            assert command.benchmarks and "--benchmark-only" in command.args
            files = [a for a in command.args if a.startswith("benchmarks/")]
            assert all((REPO / f).is_file() for f in files)
            expression = Expression.compile(command.args[command.args.index("-k") + 1])
            tests = [name for f in files for name in TESTS_IN[f]]
            selected |= {i for i in ids if i.startswith(tuple(tests))
                         and expression.evaluate(lambda word, i=i: word in i)}
        assert len(selected) == expected, (section, sorted(selected)[:5])
        assert all("triton" in i for i in selected) or section != "autotune"
    tests = section_commands("tests", quick=quick, test_workers=0, scratch=str(tmp_path))
    assert [c.benchmarks for c in tests] == [False] and "-n" not in tests[0].args


STAND_INS = {
    # streams a case, then hangs: killed at its end plus the grace, the case kept
    "autotune": """
        w({"machine": {"device": "stand-in GPU"}})
        w({"name": "a", "extra_info": {"op": "pam"}, "stats": {"median": 0.001, "min": 0.001, "rounds": 3}})
        time.sleep(120)""",
    # a case failed and pytest exits 1
    "pam": """
        w({"name": "b", "extra_info": {}, "reason": "error: ValueError: broken"})
        print("1 failed, 2 passed in 0.10s"); sys.exit(1)""",
    # a case left out for time: partial
    "cam": """
        w({"name": "c", "extra_info": {}, "reason": "deadline: 0 s left"})
        print("1 skipped in 0.10s")""",
    "train": """
        w({"name": "d", "extra_info": {}, "stats": {"median": 1.0, "min": 1.0, "rounds": 3}})""",
}


def _stand_in_commands(section: str, **_: object) -> list[Command]:
    if section == "tests":
        return [Command("tests", ("-c", "print('3 passed in 0.50s')"), benchmarks=False)]
    code = textwrap.dedent("""
        import json, sys, time
        stream = sys.argv[sys.argv.index("--bench-stream") + 1]
        def w(entry):
            with open(stream, "a") as f:
                f.write(json.dumps(entry) + "\\n")
    """) + textwrap.dedent(STAND_INS[section])
    return [Command(section, ("-c", code))]


def test_supervisor_kills_an_overrunning_command_keeps_its_cases_and_runs_the_rest(tmp_path: Path) -> None:
    start = time.time()
    plan = Plan(("tests", "autotune", "pam", "cam", "train"), dict.fromkeys(SECTIONS, 0.5),
                hard_end=start + RESERVE_S + 60.0)
    results = new_results(plan, total_s=60.0, quick=True, command="test", started_at=start, checkout={})
    supervisor = Supervisor(tmp_path, results, plan, quick=True, test_workers=0, grace_s=0.5,
                            commands=_stand_in_commands, poll_s=0.05)
    assert supervisor.run() == 1
    assert time.time() - start < 30, "the hung command was not killed at its end"
    sections = results["sections"]
    assert {s: state["status"] for s, state in sections.items()} == {
        "tests": "done", "autotune": "killed", "pam": "errors", "cam": "partial", "train": "done"}
    assert "overran its end" in sections["autotune"]["note"]
    assert "status 1" in sections["pam"]["note"] and "1 case(s) failed" in sections["pam"]["note"]
    assert "1 case(s) left out" in sections["cam"]["note"]
    assert sections["tests"]["runs"][0]["summary"] == "3 passed in 0.50s"
    assert [r["name"] for r in results["records"]["autotune"]] == ["a"]  # kept after the kill
    assert results["records"]["autotune"][0]["extra_info"]["run"] == "autotune"
    assert results["env"] == {"device": "stand-in GPU"} and results["finished"]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["sections"] == sections
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| autotune | killed |" in markdown and "# GPU check: stand-in GPU" in markdown


def test_pytest_summary_is_found_in_quiet_and_verbose_output() -> None:
    quiet = "....F\nFAILED tests/x.py::test_y - AssertionError\n1 failed, 4 passed, 2 skipped in 3.21s\n"
    assert parse_pytest_summary(quiet) == {"summary": "1 failed, 4 passed, 2 skipped in 3.21s",
                                           "counts": {"failed": 1, "passed": 4, "skipped": 2}}
    assert parse_pytest_summary("===== 3 passed, 1 warning in 0.50s =====\n")["counts"] == {"passed": 3,
                                                                                           "warning": 1}
    assert parse_pytest_summary("collected 0 items\n")["summary"] is None


def test_report_of_the_recorded_run_checks_the_targets(capsys) -> None:
    results = json.loads(FIXTURE.read_text())
    before = copy.deepcopy(results)
    markdown = render_markdown(results)
    assert results == before, "the report writer must not change its input"
    assert markdown.startswith("# GPU check: NVIDIA H200") and "made-up numbers" in markdown
    assert "torch 2.11.0+cu130, triton 3.6.0" in markdown and "0123456789abcdef" in markdown
    # The targets, met and not, from the recorded cases.
    assert "| PAM bf16 forward+backward: >= 3x faster than the reference | issue 10 | 3.50x" in markdown
    assert "| CAM fp32 forward: >= 4x faster than the reference | docs/performance.md | 2.33x" in markdown
    assert "**not met**" in markdown and "3.0e-06 (output and every gradient) | met |" in markdown
    # The suite's tables: the ratios, what did not run and why, the predicted figures beside the measured.
    row = next(line for line in markdown.splitlines()
               if line.startswith("| 1 | 128x256 | 32768 | triton | 8 |"))
    assert "| 3.50x | 64.0 MiB | 0.01x |" in row and row.endswith("| 7.5 | 60.0 MiB |")
    assert "Predicted by synthetic model." in markdown  # what made them, with its error, under the table
    assert "| 2 | 128x256 | 32768 | reference | OOM |" in markdown
    assert "| 1024x2048 | 32768 | 1 | bf16-autocast | reference | OOM |" in markdown
    assert "| PAM | 32768 | bf16 | forward+backward | 55 | 2.5 |" in markdown  # first calls, cold and warm
    # Sections cut, killed and not run, the tests' failure and the failed case.
    assert "| autotune | killed |" in markdown and "| train | not run |" in markdown
    assert "2 case(s) left out" in markdown and "test_gpu_tf32_when_torch_allows_it" in markdown
    assert "error: ValueError: synthetic failure" in markdown
    assert report_main([str(FIXTURE)]) == 0 and capsys.readouterr().out == markdown


def test_report_of_a_run_that_has_just_started() -> None:
    plan = make_plan(SECTIONS, total_s=FULL_TOTAL_S, quick=False, start=0.0)
    results = new_results(plan, total_s=FULL_TOTAL_S, quick=False, command="c", started_at=0.0, checkout={})
    markdown = render_markdown(results)
    assert "in progress" in markdown and "device not reported yet" in markdown
    assert markdown.count("| pending |") == len(SECTIONS) and "not measured" in markdown
