"""The kernels compiled for sm_90 as real launches compile them: the compile report's targets, in CI.

What must hold is written once, as the targets of each op's spec (benchmarks/compile_specs/<op>.py,
built from benchmarks/compile_targets.py): PAM forward (no spills, no replicated S, tensor cores,
cp.async in the main loop at N = 9409 as at 32768, the same kept configs at both, the autotuner's
loop estimate within 15% of each compiled loop, <= 1280 N^2 FLOPs and <= 2 N^2 exp2 in bf16), PAM
backward on both paths (no spills at any N or head the report covers, no replicated S, pipelined
main loops, tensor cores, <= 3000 N^2 FLOPs by default and the deterministic split's 3840, the
key-side kernel <= 12 bytes per pair at 16 bits) and CAM (no spills, shared memory within a
block's, cp.async in the GEMMs' main loops, the padded 97 x 97 Gram compiled to the 128 x 128
binary, tensor cores). The report (``python -m benchmarks.compile_report``, docs/compile_report.md)
checks them on every kept config of every problem; here it runs on a small set chosen so that every
target of every op is evaluated at least once (each binary compiled once: about 45 s on 2 idle
cores), and all must be met. The perf model's calibration needs a copy of Triton's tutorial and is
not run here.
"""

from __future__ import annotations

import pytest
import torch

from tests.danet_kernels.hopper_compile import compile_report_results

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests compile and run every kernel"),
]

OPS = ("pam_forward", "pam_backward", "pam_backward_deterministic", "cam_forward", "cam_backward")
# (ops, configs, problems): every kept forward config at the two DANet sizes (the bf16 list is the
# largest, its 128 x 64 x 256 tile the fullest); the forward's int64-offset variant and 3xTF32;
# the backward's launches (fixed tiles) at N = 32768 (the FLOPs bounds) and 9409 (3xTF32 spilled
# 100 B there) in every operand class, N = 4096 (split loops) and the wide head; CAM at the
# padded 97 x 97 in every operand class and at 128 x 128 (the padded Gram's binary).
CI_RUNS = (
    (("pam_forward",), "kept", ("32768:bf16", "9409:bf16")),
    (("pam_forward",), "preferred", ("9409:fp32-tf32x3", "32768:bf16:int64 offsets")),
    (("pam_backward", "pam_backward_deterministic"), "preferred",
     ("32768:bf16", "32768:fp32-tf32", "32768:fp32-tf32x3", "32768:fp32-ieee", "9409:bf16",
      "9409:fp32-tf32", "9409:fp32-tf32x3", "9409:fp32-ieee", "4096:bf16", "1024:bf16:d=256:C=2048",
      "1024:fp32-tf32:d=256:C=2048")),
    (("cam_forward", "cam_backward"), "preferred", ("9409:bf16", "16384:bf16", "9409:fp32-tf32",
                                                    "9409:fp32-tf32x3", "9409:fp32-ieee")),
)


def _failures(results: dict) -> list[str]:
    return [f"{t['op']}: {t['target']}: {'; '.join(t['failures'])}" for t in results["targets"]
            if t["evaluated"] and t["failures"]]


def test_ci_set_meets_every_target_of_every_op() -> None:
    results = compile_report_results(CI_RUNS)
    assert not _failures(results), "\n".join(_failures(results))
    missed = [f"{t['op']}: {t['target']}" for t in results["targets"] if not t["evaluated"]]
    assert not missed, f"targets the CI set does not evaluate: {missed}"
    assert {t["op"] for t in results["targets"]} == set(OPS)
    kept = {r["config"] for r in results["rows"]
            if r["op"] == "pam_forward" and r["problem"] == "N=32768 bf16"}
    assert len(kept) > 1, "the forward's kept configs were not expanded"


def test_every_kernel_compiles_at_degenerate_shapes() -> None:
    """N = 1, d = 5, C = 1 (Triton turns arguments equal to 1 into constants; d pads to 16): every
    kernel of every op compiles."""
    results = compile_report_results([(OPS, "preferred", ("1:fp16:d=5:C=1",))])
    expected = {"_pam_bwd_preprocess", "_pam_bwd_dv_kernel", "_pam_bwd_dkdq_kernel", "_pam_bwd_dq_kernel",
                "_pam_fwd_kernel", "_cam_gram_kernel", "_cam_softmax_kernel", "_cam_apply_kernel",
                "_cam_softmax_bwd_kernel", "_cam_bwd_weights_kernel"}
    assert {r["kernel"] for r in results["rows"]} == expected
    errors = [f"{r['problem']} {r['kernel']}: {r['error']}" for r in results["rows"] if r["error"]]
    assert not errors, errors
