"""The compile report's readers of PTX and TTGIR, on small hand-written inputs (no compile).

The compiles themselves run in tests/danet_kernels/test_hopper_compile.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import compile_report as report

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
    assert counts == {"wgmma": 1, "mma_sync": 0, "fma": 2, "cp_async": 1, "tma": 1, "ex2": 3}
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


def test_work_and_problem() -> None:
    total = report.Work(10, 2, 5) + report.Work(1, 1, 1) * 2
    assert (total.flops, total.exp2, total.bytes) == (12, 4, 7)
    assert report.Problem(9409, "bf16").label == "N=9409 bf16"
    assert report.Problem(1, "fp16", head_dim=5, channels=1).label == "N=1 fp16 (B=1, d=5, C=1)"
    assert report.Problem(1, "fp32-tf32x3").dtype == torch.float32
    assert report.Problem(1, "fp32-tf32x3").dot_precision == "tf32x3"


def test_every_op_has_a_spec_for_each_kernel_it_names() -> None:
    """The spec table imports without TRITON_INTERPRET side effects and names each kernel once."""
    specs = report.all_specs()
    assert {"pam_forward", "pam_backward", "cam_forward", "cam_backward"} <= set(specs)
    for spec in specs.values():
        names = [kernel.name for kernel in spec.kernels]
        assert len(names) == len(set(names)), spec.name


def test_full_width_variant_computes_the_attention() -> None:
    """The variant the report measures against the library's layout is a correct PAM forward
    (interpreter, one small config; ragged N padded to 16, C below its 64-wide tile)."""
    from benchmarks.compile_specs.pam_forward_full_width import full_width_forward
    from danet_kernels.reference import position_attention_reference

    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 37) * 0.5, torch.randn(2, 5, 37) * 0.5
    v, residual, gamma = torch.randn(2, 40, 37), torch.randn(2, 40, 37), torch.full((1,), 0.7)
    result, out, lse = full_width_forward(q, k, v, gamma, residual, BLOCK_M=16, BLOCK_N=16, num_warps=4,
                                          num_stages=1)
    expected = position_attention_reference(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(result.double(), 0.7 * expected + residual.double(), atol=2e-5, rtol=2e-5)
    log2_sum = torch.logsumexp(torch.einsum("bdi,bdj->bij", q.double(), k.double()), -1) / math.log(2)
    torch.testing.assert_close(lse.double(), log2_sum, atol=1e-5, rtol=1e-5)


def test_fused_dv_variant_computes_the_gradients() -> None:
    """The deterministic variant with dV of one C block fused into the key-side kernel is a
    correct backward (interpreter: 32-wide tiles, so C = 48 is a fused block of 32 channels and
    16 for the dV kernel; N = 37 padded to 48, two query splits), against float64 autograd."""
    from benchmarks.compile_specs.pam_backward_fused_dv import fused_dv_backward
    from danet_kernels.kernels import position_attention as pam
    from danet_kernels.reference import position_attention_reference

    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 37) * 0.5, torch.randn(2, 5, 37) * 0.5
    v, dy, gamma = torch.randn(2, 48, 37), torch.randn(2, 48, 37), torch.full((1,), 0.7)
    _, out, lse = pam.pam_forward(q, k, v, gamma, v, True)
    saved = pam._sm_count
    pam._sm_count = lambda device: 8  # splits the key-side loop in two (partials summed in order)
    try:
        dq, dk, dv, delta = fused_dv_backward(dy, q, k, v, gamma, out, lse)
    finally:
        pam._sm_count = saved
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    expected_out = position_attention_reference(*leaves)
    (0.7 * expected_out).backward(dy.double())
    for got, leaf, name in zip((dq, dk, dv), leaves, "qkv", strict=True):
        torch.testing.assert_close(got.double(), leaf.grad, atol=2e-5, rtol=2e-5, msg=f"d{name}")
    torch.testing.assert_close(delta.double(), (dy.double() * expected_out).sum(1), atol=2e-5, rtol=2e-5)
