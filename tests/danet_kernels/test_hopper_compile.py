"""The kernels compiled for sm_90 as real launches compile them (the compile report's instrument).

What must hold for the PAM forward at DANet's shapes (d = 64, C = 512; N = 32768 and 97 x 97 =
9409, not a multiple of 16): no config the prune keeps spills or replicates S, the N = 9409 path
pipelines its loads (cp.async) like N = 32768, and the preferred config executes at most
1280 N^2 FLOPs and 2 N^2 exp2. Every other kernel must compile (their figures are in
docs/compile_report.md). Each compile takes about a second; these tests run a small subset.
"""

from __future__ import annotations

import pytest
import torch

from tests.danet_kernels.hopper_compile import compile_report_rows

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests compile and run every kernel"),
]


def _where(row: dict) -> str:
    return f"{row['problem']} {row['kernel']} {row['config']}"


def test_pam_forward_compiles_to_the_fast_path_at_danet_shapes() -> None:
    rows = compile_report_rows("--ops", "pam_forward", "--sizes", "32768", "9409",
                               "--precisions", "bf16", "fp32-tf32")
    assert {r["n"] for r in rows} == {32768, 9409} and {r["precision"] for r in rows} == {"bf16", "fp32-tf32"}
    for row in rows:
        assert row["error"] is None, f"{_where(row)}: {row['error']}"
        assert row["spill_bytes"] == 0, f"{_where(row)} spills {row['spill_bytes']} B"
        assert row["replication"] == 1, f"{_where(row)} replicates S {row['replication']}x"
        assert row["loop_ex2"] <= 1.1 * row["ex2_share"] + 2, _where(row)
        assert row["mma"] == "wgmma", _where(row)
        assert row["counts"]["cp_async"] > 0, f"{_where(row)}: no cp.async, the loads are not pipelined"
    for precision in ("bf16", "fp32-tf32"):
        configs = {n: [r["config"] for r in rows if r["n"] == n and r["precision"] == precision]
                   for n in (32768, 9409)}
        assert configs[32768] == configs[9409], f"{precision}: N = 9409 keeps other configs than 32768"
    preferred = {r["n"]: r for r in rows if r["preferred"] and r["precision"] == "bf16"}
    assert preferred[32768]["flops"] <= 1280 and preferred[32768]["exp2"] <= 2
    # At 9409 the same tiles cover 9472 rows and keys (74 x 128, 148 x 64): the same work per
    # covered N^2, plus the tiles' 0.7% per axis.
    assert preferred[9409]["config"] == preferred[32768]["config"]
    assert preferred[9409]["flops"] <= 1280 * (9472 / 9409) ** 2 + 1e-6


def test_every_kernel_compiles_for_hopper() -> None:
    """PAM backward and CAM at DANet's shapes (one config per launch), and every op at N = 1,
    d = 5, C = 1 (Triton turns arguments equal to 1 into constants; d pads to 16)."""
    ops = ("pam_backward", "pam_backward_deterministic", "cam_forward", "cam_backward")
    rows = compile_report_rows("--ops", *ops, "--sizes", "9409", "--precisions", "bf16", "fp32-ieee",
                               "--configs", "preferred")
    rows += compile_report_rows("--ops", "pam_forward", *ops, "--sizes", "1", "--precisions", "fp16",
                                "--head-dim", "5", "--channels", "1", "--configs", "preferred")
    expected = {"_pam_bwd_preprocess", "_pam_bwd_dv_kernel", "_pam_bwd_dkdq_kernel", "_pam_bwd_dq_kernel",
                "_pam_fwd_kernel", "_cam_gram_kernel", "_cam_softmax_kernel", "_cam_apply_kernel",
                "_cam_softmax_bwd_kernel", "_cam_bwd_weights_kernel"}
    assert {r["kernel"] for r in rows} == expected
    for row in rows:
        assert row["error"] is None, f"{_where(row)}: {row['error']}"
