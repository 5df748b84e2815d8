"""The compile report's readers of PTX and TTGIR, on small hand-written inputs (no compile).

The compiles themselves run in tests/danet_kernels/test_hopper_compile.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from benchmarks import compile_report as report
from benchmarks import compile_types as types

PTX = """
.entry k(
\tmov.u32 \t%r1, 0;
$L__BB0_1:
\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};
\tex2.approx.ftz.f32 \t%f1, %f2;
\tex2.approx.ftz.f32 \t%f3, %f4;
\tcp.async.cg.shared.global [%r2], [%rd1], 16;
\t@%p1 bra \t$L__BB0_1;
$L__BB0_2:
\tex2.approx.ftz.f32 \t%f5, %f6;
\tfma.rn.f32 \t%f7, %f8, %f9, %f10;
\t@%p2 bra \t$L__BB0_3;
\tfma.rn.f32 \t%f7, %f8, %f9, %f10;
\t@%p3 bra \t$L__BB0_2;
$L__BB0_3:
\tcp.async.bulk.tensor.2d.shared::cluster.global [%r3], [%rd2, {%r4, %r5}];
\tret;
}
"""


def test_ptx_counts_and_loops() -> None:
    counts = report.ptx_counts(PTX)
    assert counts == {"wgmma": 1, "mma_sync": 0, "fma": 2, "cp_async": 1, "tma": 1, "ex2": 3,
                      "instructions": 13, "barriers": 0, "mma_wait_all": 0}
    loops = report.ptx_loops(PTX)
    # Two loops: BB0_1 (a backward branch) and BB0_2 (whose forward branch to BB0_3 is no loop).
    assert [(loop["wgmma"], loop["ex2"], loop["fma"]) for loop in loops] == [(1, 2, 0), (0, 1, 2)]
    assert report.main_loop(PTX)["ex2"] == 2  # the loop with the MMA
    assert report.main_loop("ret;") is None


TTGIR = "\n".join([
    "#blocked = #ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [4, 8], warpsPerCTA = [8, 1], "
    "order = [1, 0]}>",
    "#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], "
    "instrShape = [16, 64, 16]}>",
    "#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 2], "
    "instrShape = [16, 128, 16]}>",
    "module {",
    "  %p = math.exp2 %s : tensor<64x64xf32, #mma> loc(#loc1)",
    "  %q = math.exp2 %t : tensor<128x64xf32, #mma> loc(#loc2)",
    "  %a = math.exp2 %m : tensor<64xf32, #ttg.slice<{dim = 1, parent = #mma}>> loc(#loc3)",
    "}",
])


@pytest.mark.parametrize(
    "shape, alias, expected",
    [((64, 64), "#mma", 2.0),  # 8 warps of 16-row slices over 64 rows: two warpgroups, same rows
     ((128, 64), "#mma", 1.0),
     ((64, 256), "#mma1", 1.0),  # two warpgroups split the columns
     ((64, 128), "#mma1", 2.0),
     ((32, 64), "#blocked", 1.0),
     ((16, 64), "#blocked", 2.0)],
)
def test_layout_replication(shape: tuple[int, int], alias: str, expected: float) -> None:
    assert report.layout_replication(shape, report._layouts(TTGIR)[alias]) == expected


def test_exp2_replication_is_the_worst_2d_exp2() -> None:
    assert report.exp2_replication(TTGIR) == 2.0
    exact = TTGIR.replace("tensor<64x64xf32, #mma>", "tensor<128x64xf32, #mma>")
    assert report.exp2_replication(exact) == 1.0
    assert report.exp2_replication("module {}") is None


def test_problem_parse() -> None:
    assert types.Problem.parse("9409:bf16") == types.Problem(9409, "bf16")
    wide = types.Problem.parse("1024:fp32-tf32:d=256:C=2048:B=2")
    assert (wide.n, wide.head_dim, wide.channels, wide.batch, wide.variant) == (1024, 256, 2048, 2, "")
    variant = types.Problem.parse("32768:bf16:int64 offsets")
    assert variant.variant == "int64 offsets" and variant.label == "N=32768 bf16 [int64 offsets]"
    with pytest.raises(ValueError, match="unknown precision"):
        types.Problem.parse("9409:bf32")


def test_each_op_gets_only_the_problems_it_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--problems reach each op as problems of its own precisions and variants (an op with tiles for
    some precisions only must not be launched at another); without --problems, each op's own full
    set (launches recorded, nothing compiled)."""
    launched: list[tuple[str, types.Problem]] = []
    every_spec = {**report.all_specs(),
                  "bf16_only": dataclasses.replace(report.all_specs()["pam_forward"], precisions=("bf16",))}
    specs = {name: dataclasses.replace(spec, launch=lambda p, name=name: launched.append((name, p)))
             for name, spec in every_spec.items()}
    monkeypatch.setattr(report, "all_specs", lambda: specs)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def run(*argv: str) -> set[tuple[str, types.Problem]]:
        launched.clear()
        assert report.main([*argv, "--out", str(tmp_path / "report.md")]) == 0
        return set(launched)

    assert run() == {(name, problem) for name, spec in specs.items() for problem in spec.problems()
                     if spec.runs(problem)}
    every = {name for name, spec in specs.items() if set(spec.precisions) == set(types.PRECISIONS)}
    assert "bf16_only" not in every and "pam_forward" in every
    assert run("--problems", "9409:fp32-ieee:B=2") == {(name, types.Problem(9409, "fp32-ieee", batch=2))
                                                       for name in every}
    assert run("--problems", "32768:bf16:int64 offsets") == {
        (name, types.Problem(32768, "bf16", variant="int64 offsets"))
        for name in ("pam_forward", "bf16_only")}


def test_dot_precision_sets_what_the_launchers_read() -> None:
    """Within the block every kernel module (imported before or inside it) picks the precision
    for fp32 dots; afterwards torch's setting is as it was."""
    import importlib

    from danet_kernels.kernels import common

    before = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision
    for precision in common.DOT_PRECISIONS:
        with report.dot_precision(precision):
            cam = importlib.import_module("danet_kernels.kernels.channel_attention")
            assert common.dot_input_precision(torch.float32) == precision
            assert cam.dot_input_precision(torch.float32) == precision
            assert common.dot_input_precision(torch.bfloat16) == "tf32"
        assert (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision) == before
    assert cam.dot_input_precision is common.dot_input_precision


def _row(**fields: object) -> types.Row:
    base = {"op": "op", "problem": "N=32768 bf16", "n": 32768, "precision": "bf16", "batch": 1,
            "head_dim": 64, "channels": 512, "variant": "", "kernel": "_k", "launch": "",
            "config": "64 w4 s2",
            "registers": 100, "spill_bytes": 0, "shared": 1024, "mma": "wgmma", "loop_ex2": 32,
            "loop_cp_async": 4, "ex2_share": 32, "replication": 1.0, "specialisation": "a", "flops": 1000.0,
            "exp2": 1.0, "preferred": True,
            "counts": {"wgmma": 8, "mma_sync": 0, "fma": 0, "cp_async": 8, "tma": 0, "ex2": 32}}
    return types.Row(**{**base, **fields})


def test_pass_times_sum_the_preferred_launches_of_each_pass() -> None:
    """Forward: the forward op's preferred launches; forward+backward: both ops'; a problem that
    lacks an op or a time, or a config not preferred, adds nothing."""
    plain = {"variant": types.PLAIN_CALL, "problem": "N=32768 bf16 [plain]"}
    rows = [_row(op="pam_forward", model_us=100.0, **plain),
            _row(op="pam_forward", model_us=999.0, preferred=False, **plain),
            _row(op="pam_backward", kernel="_a", model_us=200.0, **plain),
            _row(op="pam_backward", kernel="_b", model_us=50.0, **plain),
            _row(op="cam_forward", model_us=None, **plain),
            _row(op="pam_forward", n=9409, batch=2, precision="fp32-ieee", model_us=7.0)]
    times = {(t["op"], t["pass"], t["N"], t["B"], t["precision"], t["variant"]): t["model_us"]
             for t in report.pass_times(rows)}
    assert times == {("pam", "forward", 32768, 1, "bf16", "plain"): 100.0,
                     ("pam", "forward+backward", 32768, 1, "bf16", "plain"): 350.0,
                     ("pam", "forward", 9409, 2, "fp32-ieee", ""): 7.0}


def test_targets_find_what_breaks_them() -> None:
    """Each kind of target: met on good rows, a failure naming the row on a bad one, None where
    no row applies."""
    from benchmarks import compile_targets as targets

    good = _row()
    assert targets.no_spills().check([good]) == []
    assert "100 B of spills" in targets.no_spills().check([good, _row(spill_bytes=100)])[0]
    assert targets.compiles().check([_row(error="ptxas: boom")]) == ["N=32768 bf16 _k 64 w4 s2: ptxas: boom"]
    # A row that did not compile counts against compiles(), not against the others.
    assert targets.no_spills().check([_row(error="x", spill_bytes=None)]) is None
    exp2 = targets.exp2_once(["_k"])
    assert exp2.check([good, _row(loop_ex2=34)]) == []  # the row rescale
    assert len(exp2.check([_row(loop_ex2=64), _row(replication=2.0)])) == 2
    assert exp2.check([_row(kernel="_other")]) is None
    assert targets.pipelined(["_k"]).check([_row(loop_cp_async=0)]) != []
    assert targets.tensor_cores(["_k"]).check([_row(precision="fp32-ieee", mma="FMA")]) is None
    assert targets.tensor_cores(["_k"]).check([_row(mma="FMA")]) != []
    small = _row(n=9409, problem="N=9409 bf16")
    assert targets.same_configs((32768, 9409)).check([good, small]) == []
    assert targets.same_configs((32768, 9409)).check([good, _row(n=9409, config="32 w4 s2")]) != []
    assert targets.same_configs((32768, 9409)).check([good]) is None
    padded = targets.same_binary_when_padded(["_k"])
    assert padded.check([_row(n=16384), small]) == []
    assert padded.check([_row(n=16384), _row(n=9409, specialisation="b")]) != []
    assert padded.check([good]) is None
    bound = targets.preferred_total("bound", ("bf16",), 32768, flops=1500)
    assert bound.check([good, _row(kernel="_j", flops=400.0)]) == []
    assert bound.check([good, _row(kernel="_j", flops=600.0)]) == ["N=32768 bf16: 1600 FLOPs per unit"]
    assert bound.check([small]) is None


def test_evaluate_reports_every_target_of_each_op_with_rows() -> None:
    from benchmarks import compile_targets as targets

    results = targets.evaluate({"op": [targets.no_spills(), targets.same_configs((1, 2))], "other": [
        targets.compiles()]}, [_row(spill_bytes=8)])
    assert [(r.op, r.evaluated, r.met) for r in results] == [("op", True, False), ("op", False, False)]
    assert results[0].failures == ("N=32768 bf16 _k 64 w4 s2: 8 B of spills",)


def test_every_spec_states_targets_and_the_markdown_shows_them() -> None:
    """The library's ops carry targets; the report prints each, met or not, under its op."""
    specs = report.all_specs()
    for name in ("pam_forward", "pam_backward", "pam_backward_deterministic", "cam_forward", "cam_backward"):
        assert specs[name].targets, name
    rows = [_row(op="pam_forward", kernel="_pam_fwd_kernel", spill_bytes=24, choice="fixed")]
    text = report.render_markdown(rows, report.check_targets(rows), "python -m benchmarks.compile_report",
                                  versions={"triton": "t", "ptxas": "p", "torch": "x", "python": "y"})
    assert "**NOT MET**: no kept config spills registers" in text and "- met: every launch compiles" in text
    assert "- not evaluated here" in text


def test_work_and_problem() -> None:
    total = types.Work(10, 2, 5) + types.Work(1, 1, 1) * 2
    assert (total.flops, total.exp2, total.bytes) == (12, 4, 7)
    assert types.Problem(9409, "bf16").label == "N=9409 bf16"
    assert types.Problem(1, "fp16", head_dim=5, channels=1).label == "N=1 fp16 (B=1, d=5, C=1)"
    assert types.Problem(1, "fp32-tf32x3").dtype == torch.float32
    assert types.Problem(1, "fp32-tf32x3").dot_precision == "tf32x3"


def test_every_op_has_a_spec_for_each_kernel_it_names() -> None:
    """The spec table imports without TRITON_INTERPRET side effects and names each kernel once."""
    specs = report.all_specs()
    assert {"pam_forward", "pam_backward", "cam_forward", "cam_backward"} <= set(specs)
    for spec in specs.values():
        names = [kernel.name for kernel in spec.kernels]
        assert len(names) == len(set(names)), spec.name


TUTORIAL = '''"""A stand-in for Triton's fused-attention tutorial: the names the calibration takes."""
import torch
import triton
import triton.language as tl

DEVICE = triton.runtime.driver.active.get_active_torch_device()  # needs a GPU: must not run


def is_hip():
    raise AssertionError("the calibration's stub replaces it")


configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": 16}, num_stages=2, num_warps=4) for bm in (16, 32)]


def keep(conf):
    return conf.kwargs["BLOCK_M"] == 16 or not is_hip()


@triton.jit
def _attn_fwd_inner(x, BLOCK_M: tl.constexpr):
    return x + tl.arange(0, BLOCK_M)


@triton.autotune(list(filter(keep, configs)), key=["N_CTX"])
@triton.jit
def _attn_fwd(Out, N_CTX, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tl.store(Out + tl.arange(0, BLOCK_M), _attn_fwd_inner(tl.zeros([BLOCK_M], tl.float32), BLOCK_M))
'''


def test_load_tutorial_takes_the_forward_kernel_and_its_configs(tmp_path: Path) -> None:
    """The calibration extracts the tutorial's forward, inner loop and configs from its file, leaving
    out what needs a GPU at import; a file without them is refused by name."""
    from benchmarks import compile_calibration

    path = tmp_path / "06-fused-attention.py"
    path.write_text(TUTORIAL)
    module = compile_calibration.load_tutorial(path)
    assert [c.kwargs["BLOCK_M"] for c in module._attn_fwd.configs] == [16, 32]
    out = torch.full((16,), -1.0)
    module._attn_fwd.fn[(1,)](out, 64, BLOCK_M=16, BLOCK_N=16)
    assert torch.equal(out, torch.arange(16.0))
    path.write_text(TUTORIAL.replace("def _attn_fwd(", "def _attn_other("))
    with pytest.raises(ValueError, match="no _attn_fwd: is it Triton's fused-attention tutorial"):
        compile_calibration.load_tutorial(path)


def test_calibration_fit_finds_the_constants_that_explain_the_figures() -> None:
    """Figures made by the model itself with known constants: the search, started elsewhere, finds
    constants with (almost) no error, and the target holds where the error is within 20%."""
    from benchmarks import compile_calibration as calibration

    known = dataclasses.replace(report.CALIBRATION, mma_efficiency=0.6, clocks_per_instruction=1.4)
    points = []
    for figure in calibration.PUBLISHED[:6]:
        rows = [_row(programs=4096, resident=resident, num_warps=4, num_stages=3,
                     iterations=figure.seqlen / 64, loop_flops=2 * 128 * 64 * 64 * 2,
                     loop_instructions=400 + 100 * resident, loop_ex2=64, loop_bytes=16384,
                     problem=figure.problem.label) for resident in (1, 2)]
        tflops = calibration.modelled(figure, rows, known, report.model_us)
        points.append((dataclasses.replace(figure, tflops=tflops), rows))
    found = calibration.fit(points, report.model_us, start=report.CALIBRATION)
    assert found.error < 0.02
    assert calibration.fit(points, report.model_us, start=known).error == pytest.approx(0.0, abs=1e-9)
