"""The benchmark suite cannot rot silently: its smallest cases run and the report renders them.

``pytest benchmarks/ --bench-quick`` runs every benchmark of the suite on its smallest grid
(one 16x16 attention problem, a 128x128 training step on the tiny backbone) with one timed
round each, in a subprocess, exactly as a user would; then ``benchmarks.report`` turns the
JSON it wrote into markdown and a PNG. The checks are on what the suite records (every
implementation ran, memory was measured, the errors against float64 are small, the cases
that cannot run are listed with their reason), never on timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import danet_kernels
from benchmarks import harness
from benchmarks import test_training_memory as training
from benchmarks.harness import largest_batch
from benchmarks.report import format_bytes, main

REPO = Path(__file__).resolve().parents[1]


def run_quick_suite(out: Path, *options: str, read: bool = True) -> dict:
    """Run the benchmark suite's smoke grid in a subprocess and return its JSON (if ``read``)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # Under `pytest -n`, this process is an xdist worker; pytest-benchmark reads the inherited
    # PYTEST_XDIST_WORKER and would disable every benchmark in the child.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env["PYTHONPATH"] = path
    command = [sys.executable, "-m", "pytest", "benchmarks", "--bench-quick", "--benchmark-only",
               f"--benchmark-json={out}", "-q", "-p", "no:cacheprovider", *options]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"benchmark suite failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text()) if read else {}


@pytest.mark.slow
def test_benchmark_suite_runs_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One test, not three sharing a fixture: under pytest-xdist a module fixture would run the
    suite once per worker."""
    stream = tmp_path / "cases.jsonl"
    quick_results = run_quick_suite(tmp_path / "results.json", f"--bench-stream={stream}")
    check_every_benchmark_records_what_the_report_needs(quick_results)
    check_cases_that_cannot_run_are_listed_with_their_reason(quick_results)
    check_every_case_is_streamed_once(quick_results, stream)
    check_report_renders_markdown_and_plot(tmp_path / "results.json", tmp_path / "docs", capsys)
    # Past --bench-deadline no case starts: each is skipped, and streamed, as "deadline".
    run_quick_suite(tmp_path / "late.json", "--bench-deadline=0", f"--bench-stream={tmp_path / 'late.jsonl'}",
                    "-k", "test_cam", read=False)
    late = [json.loads(line) for line in (tmp_path / "late.jsonl").read_text().splitlines()[1:]]
    assert len(late) == 4 and all(e["reason"].startswith("deadline:") for e in late)


def check_every_benchmark_records_what_the_report_needs(quick_results: dict) -> None:
    measured = {}
    for bench in quick_results["benchmarks"]:
        info = bench["extra_info"]
        measured[(info["op"], info["impl"], info.get("pass"))] = info
        assert bench["stats"]["median"] > 0
        assert info["peak_mem_bytes"] > 0, f"{bench['name']}: no peak memory recorded"
        if info["op"] in ("pam", "cam"):
            assert info["flops"] > 0 and info["first_call_s"] > 0
            # fp32 against float64 on the same inputs: any backend bug shows up far above this
            assert info["rel_err"] < 1e-4, f"{bench['name']}: error {info['rel_err']:.1e} against float64"
    for op in ("pam", "cam"):
        for impl in ("reference", "blockwise"):
            for pass_ in ("forward", "forward+backward"):
                assert (op, impl, pass_) in measured, f"{op} {impl} {pass_} did not run"
    for attention in ("reference", "fused"):
        assert ("train_step", attention, None) in measured
        assert measured[("train_step", attention, None)]["predicted"]["peak_mem_bytes"] > 0
        assert measured[("train_max_batch", attention, None)]["max_batch"] >= 1
    assert quick_results["machine_info"]["danet"]["quick"] is True


def check_cases_that_cannot_run_are_listed_with_their_reason(quick_results: dict) -> None:
    not_run = quick_results["danet_not_run"]
    reasons = {(entry["extra_info"]["op"], entry["extra_info"]["impl"]): entry for entry in not_run}
    sdpa = reasons[("pam", "sdpa")]  # no fused SDPA kernel takes value dim 512 != query dim 64 on a CPU
    assert sdpa["reason"].startswith("SDPA")
    too_small = [e for e in not_run if e["extra_info"]["op"] == "train_max_batch"]
    assert too_small and all(e["extra_info"]["oom"] and e["reason"].startswith("OOM") for e in too_small)
    assert all(e["extra_info"]["max_batch"] == 0 for e in too_small)


def check_every_case_is_streamed_once(quick_results: dict, stream: Path) -> None:
    """--bench-stream: the machine first, then each case as pytest-benchmark and the not-run list hold it."""
    lines = [json.loads(line) for line in stream.read_text().splitlines()]
    assert lines[0]["machine"]["device"].startswith("CPU")
    measured = {e["name"]: e["stats"]["median"] for e in lines[1:] if "stats" in e}
    assert measured == {b["name"]: b["stats"]["median"] for b in quick_results["benchmarks"]}
    assert [e for e in lines[1:] if "reason" in e] == quick_results["danet_not_run"]


def check_report_renders_markdown_and_plot(results: Path, docs: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out, plot = docs / "benchmarks.md", docs / "benchmarks.png"
    assert main([str(results), "--out", str(out), "--plot", str(plot)]) == 0
    said = capsys.readouterr().err
    assert f"wrote {plot}" in said and f"wrote {out}" in said  # it says what it wrote
    before = out.read_text()
    assert main([str(results), "--out", str(out), "--plot", str(plot)]) == 2  # never overwritten silently
    assert "pass --overwrite" in capsys.readouterr().err and out.read_text() == before
    assert main([str(results), "--out", str(out), "--plot", str(plot), "--overwrite"]) == 0
    text = out.read_text()
    headings = ("## Position attention (PAM)", "## Channel attention (CAM)", "### Step time and peak memory",
                "### Largest batch under a memory cap", "## Cases that did not run", "## Reproducing")
    for heading in headings:
        assert heading in text
    assert "CPU results" in text and "Smoke run" in text
    assert "| 1 | 16x16 | 256 | blockwise |" in text
    assert "![time and peak memory against N](benchmarks.png)" in text
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert not list(out.parent.glob("*.tmp"))


def test_report_rejects_a_file_that_is_not_benchmark_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    assert main([str(bad)]) == 2
    assert "not a pytest-benchmark JSON file" in capsys.readouterr().err


@pytest.mark.parametrize("true_max", [0, 1, 2, 3, 5, 8, 13, 40])
def test_largest_batch_search(true_max: int) -> None:
    trials: list[int] = []

    def fits(batch: int) -> bool:
        trials.append(batch)
        return batch <= true_max

    assert largest_batch(fits, limit=32) == min(true_max, 32)
    assert len(trials) <= 2 * 6 + 1  # doubling to 32, then bisecting: O(log limit) steps
    with pytest.raises(ValueError, match="limit"):
        largest_batch(fits, limit=0)


def test_format_bytes() -> None:
    assert format_bytes(None) == "—"
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**20) == "3.0 MiB"
    assert format_bytes(1.5 * 2**30) == "1.50 GiB"


class _Benchmark:
    """pytest-benchmark's fixture, as much of it as run_benchmark uses."""

    def __init__(self, **extra_info: object) -> None:
        self.extra_info, self.rounds = dict(extra_info), 0

    def pedantic(self, target, setup, rounds: int, warmup_rounds: int, iterations: int) -> None:
        for _ in range(rounds):
            setup()
            target()
        self.rounds = rounds


def test_a_registered_predictor_is_recorded_beside_the_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(harness.PREDICTORS, "pam", lambda info: {"median_ms": info["N"] / 1000, "by": "test"})
    bench = _Benchmark(op="pam", N=4096)
    harness.run_benchmark(bench, lambda: [0.0] * 1000, rounds=(2, 0))
    assert bench.extra_info["predicted"] == {"median_ms": 4.096, "by": "test"} and bench.rounds == 2
    assert bench.extra_info["first_call_s"] >= 0 and "peak_mem_bytes" in bench.extra_info
    unpredicted = _Benchmark(op="cam", impl="reference", N=4096)  # a predictor that answers None
    harness.run_benchmark(unpredicted, lambda: None, rounds=(1, 0))
    assert "predicted" not in unpredicted.extra_info
    monkeypatch.setitem(harness.PREDICTORS, "pam", lambda info: 1 / 0)  # costs no measurement
    failed = _Benchmark(op="pam", N=4096)
    harness.run_benchmark(failed, lambda: None, rounds=(1, 0))
    assert failed.extra_info["predicted"] == {"by": "no prediction: ZeroDivisionError: division by zero"}
    assert failed.rounds == 1


def test_the_kernel_predictor_takes_the_compile_reports_time_of_exactly_the_cases_problem() -> None:
    """pam and cam cases of the fused kernels get the report's time of their pass at their problem
    (benchmarks/kernel_model_times.json), the calibration's error in "by"; a problem the file does
    not hold, or another implementation, gets nothing (no interpolation)."""
    times = json.loads(harness.KERNEL_MODEL_TIMES.read_text())
    assert f"{times['calibration_error']:.0%}" == "13%"
    case = {"impl": "triton", "B": 1, "N": 9409, "C": 512, "d": 64, "dtype": "float32", "precision": "high"}
    for op in ("pam", "cam"):
        forward, both = (harness.PREDICTORS[op]({**case, "op": op, "pass": p}) for p in harness.PASSES)
        expected = next(t["model_us"] for t in times["times"] if (t["op"], t["pass"], t["N"], t["B"],
                        t["precision"], t["variant"]) == (op, "forward", 9409, 1, "fp32-tf32x3", "plain"))
        assert forward["median_ms"] == expected / 1000 and "± 13%" in forward["by"]
        assert both["median_ms"] > forward["median_ms"]
        for other in ({"N": 9408}, {"B": 3}, {"impl": "reference"}, {"dtype": "float16", "B": 2}):
            assert harness.PREDICTORS[op]({**case, "op": op, "pass": "forward", **other}) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="measures the CPU allocator")
@pytest.mark.parametrize("attention", ["reference", "fused"])
def test_the_training_step_predictor_is_the_memory_model_of_the_measured_step(attention: str) -> None:
    """harness.PREDICTORS["train_step"] predicts what a step case measures (state + batch + the
    step's peak), within its stated tolerance (10%) of the CPU allocator's measured peak."""
    assert harness.PREDICTORS["train_step"] is training.predict_train_step
    info = {"op": "train_step", "impl": attention, "H": 64, "W": 64, "B": 1, "amp": "none"}
    predicted = training.predict_train_step(info)
    assert "fake CPU tensors" in predicted["by"] and "10%" in predicted["by"]
    assert training.predict_train_step({**info, "B": 2})["peak_mem_bytes"] > predicted["peak_mem_bytes"]
    with danet_kernels.use_backend(training.CPU_BACKEND):  # the benchmark's fused backend on the CPU
        trainer = training._training_step(attention, "none")
        measured = training._step_total_bytes(trainer, *trainer.new_batch(1, 64, 64))
    assert measured is not None, "the CPU allocator's events were not recorded"
    assert predicted["peak_mem_bytes"] == pytest.approx(measured, rel=0.10)
