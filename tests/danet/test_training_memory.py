"""danet.training.memory and .step: a training step's memory on fake tensors, against real steps.

The validation: the predicted peak of a step (fake tensors, the Python backward) against the
peak the CPU allocator measures for the same step on real tensors (benchmarks/harness.py's
profiler events, through benchmarks/training_memory_check.py), at several sizes, batches,
precisions and both attentions. Measured on the development machine (the cases of
:data:`CASES` in order): -0.40%, 0.00%, -1.99%, -0.03%, 0.00%, -0.35%; the prediction is
under the measurement where a CPU kernel allocates scratch that no op returns (im2col columns
and the like; on a GPU, cuDNN's workspaces, which the margin covers). The test holds them to
:data:`TOLERANCE`, under the issue's 15%. On the GPU side, the fake CUDA trace of the reference
attention against the peers' H100 measurements (:data:`PEERS_H100`), within 1%.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.harness import peak_memory_bytes
from benchmarks.training_memory_check import compare_step_memory
from danet.cli import main
from danet.config import Config, ModelConfig, load_config
from danet.evaluation.cost import LiveTensorBytes
from danet.models import DANet
from danet.training import memory
from danet.training import step as step_module
from danet.training.losses import DANetLoss
from danet.training.step import TrainingStep, run_backward
from danet_kernels import reference

TOLERANCE = 0.10
TINY = ModelConfig(backbone="resnet_tiny", multi_grid=False)
# benchmarks/harness.py measures the CUDA allocator where there is one; these compare with the CPU's
# (the GPU check compares DANet-101's step with torch.cuda.max_memory_allocated)
cpu_allocator = pytest.mark.skipif(torch.cuda.is_available(), reason="measures the CPU allocator")


def _config(**train: object) -> Config:
    cfg = Config(model=dataclasses.replace(TINY))
    cfg.train = dataclasses.replace(cfg.train, **train)
    return cfg


# ------------------------------------------------------------------------------ the backward replay


@cpu_allocator
@pytest.mark.parametrize("attention, checkpointing", [("reference", False), ("fused", True)])
def test_backward_replay_matches_autograd(attention: str, checkpointing: bool) -> None:
    """run_backward gives autograd's gradients (float64) and the C++ engine's peak on the CPU
    allocator, to the byte (measured as benchmarks/ does, with no Python mode in the way: under
    one, the engine itself accumulates out of place); the fused attention runs the blockwise
    backend's custom Functions here, checkpointing its saved-tensor hooks."""
    model = DANet(5, backbone="resnet_tiny", multi_grid=False, attention=attention, aux=True).double().train()
    if checkpointing:
        model.set_grad_checkpointing()
    replay = copy.deepcopy(model)
    images = torch.randn(2, 3, 96, 80, dtype=torch.float64)
    masks = torch.randint(0, 5, (2, 96, 80))
    masks[0, :3] = 255  # ignored pixels
    criterion = DANetLoss()

    def step(net: DANet, replayed: bool) -> None:
        torch.manual_seed(1)  # the same dropout masks
        loss, _ = criterion(net(images), masks)
        if replayed:  # the loss stays alive, as a view: nothing but the engine may reach the graph
            holder, loss = [loss], loss.detach()
            run_backward(holder)
        else:
            loss.backward()

    peaks = [peak_memory_bytes(lambda net=net, replayed=replayed: step(net, replayed))[0]
             for net, replayed in ((model, False), (replay, True))]
    assert peaks[0] is not None and peaks[0] == peaks[1]
    for (name, expected), got in zip(model.named_parameters(), replay.parameters(), strict=True):
        assert got.grad is not None, name
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-10, atol=1e-12, msg=name)


# ------------------------------------------------------------------------------ prediction vs measurement


CASES = [  # (attention, backend, amp, batch, height, width, train overrides, optim overrides)
    ("reference", "torch", "none", 2, 96, 128, {}, {}),
    ("reference", "torch", "none", 1, 384, 384, {}, {}),  # the N x N matrices dominate
    ("reference", "torch", "bf16", 3, 64, 96, {"activation_checkpointing": True, "channels_last": True}, {}),
    ("fused", "torch", "bf16", 2, 128, 128, {"channels_last": True}, {}),
    ("reference", "torch", "none", 1, 80, 112, {"accum_steps": 2}, {"name": "adamw", "grad_clip": 1.0}),
    ("fused", "triton", "none", 1, 64, 64, {}, {}),  # the Triton kernels, in the interpreter
]


@cpu_allocator
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-B{c[3]}-{c[4]}x{c[5]}")
def test_prediction_matches_the_measured_step(case: tuple) -> None:
    attention, backend, amp, batch, height, width, train, optim = case
    cfg = _config(amp=amp, **train)
    cfg.model.attention, cfg.model.aux = attention, True
    cfg.optim = dataclasses.replace(cfg.optim, **optim)
    result = compare_step_memory(cfg, 5, batch, height, width, backend=backend)
    assert result["method"] is not None, "the CPU allocator's events were not recorded"
    print(f"predicted {result['predicted_bytes']:.0f} B, measured {result['measured_bytes']:.0f} B, "
          f"error {result['rel_error']:+.2%}")
    assert abs(result["rel_error"]) <= TOLERANCE


# The peers' H100 measurements (../shared/baseline/h100_peers.md, 2026-11-24, torch 2.11):
# torch.cuda.max_memory_allocated over torch.autograd.grad(op(*inputs), inputs, grad_out), above the
# inputs, for the reference ops (bmm + softmax) at C = 512, d = 64. (op, B, H, W, dtype, MiB)
PEERS_H100 = [
    ("pam", 2, 97, 97, torch.float32, 3490),
    ("pam", 2, 97, 97, torch.bfloat16, 1745),
    ("pam", 1, 128, 256, torch.float32, 20672),
    ("cam", 1, 128, 256, torch.float32, 321),
    ("cam", 1, 128, 256, torch.bfloat16, 160),
]


@pytest.mark.parametrize("case", PEERS_H100, ids=lambda c: f"{c[0]}-B{c[1]}-{c[2]}x{c[3]}-{str(c[4])[6:]}")
def test_fake_cuda_trace_reproduces_the_h100_measurements(case: tuple) -> None:
    """The only GPU numbers we have: the fake CUDA trace (no GPU) of the reference attention's
    forward and backward gives them within 1% (the softmax backward's scratch included)."""
    op, batch, height, width, dtype, measured_mib = case
    n, device = height * width, torch.device("cuda")
    shapes = [(batch, 64, n), (batch, 64, n), (batch, 512, n)] if op == "pam" else [(batch, 512, n)]
    function = (reference.position_attention_reference if op == "pam"
                else reference.channel_attention_reference)
    with FakeTensorMode():
        inputs = [torch.empty(s, device=device, dtype=dtype, requires_grad=True) for s in shapes]
        grad_out = torch.empty(batch, 512, n, device=device, dtype=dtype)
        live = LiveTensorBytes(block_bytes=memory.CUDA_BLOCK_BYTES)
        with live, step_module._KernelScratch(device):
            out = function(*inputs)
            holder, out = [out], out.detach()  # autograd.grad's caller holds the output throughout
            run_backward(holder, grad_out)
    assert live.peak / 2**20 == pytest.approx(measured_mib, rel=0.01)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", ["fused", "reference"])
def test_gpu_prediction_matches_max_memory_allocated(attention: str) -> None:
    """The release's DANet-ResNet101 on a whole 1024 x 2048 frame in bf16 (the GPU check runs it
    with ``pytest -m gpu``): predicted against ``torch.cuda.max_memory_allocated``, within the
    allocator margin; the printed line is the number docs/performance.md waits for."""
    if torch.cuda.get_device_properties(0).total_memory < 48 * 2**30:
        pytest.skip("the reference needs about 28 GiB here; a card of 48 GB or more measures both")
    cfg = load_config("cityscapes", overrides=[f"model.attention={attention}", "train.amp=bf16"])
    result = compare_step_memory(cfg, 19, 1, 1024, 2048)
    gib = {key: result[key] / 2**30 for key in ("predicted_bytes", "measured_bytes", "reserved_bytes")}
    print(f"DANet-ResNet101 {attention} bf16 1024x2048 B1: predicted {gib['predicted_bytes']:.2f} GiB, "
          f"measured {gib['measured_bytes']:.2f} GiB ({result['rel_error']:+.1%}), reserved "
          f"{gib['reserved_bytes']:.2f} GiB")
    assert abs(result["rel_error"]) <= memory.ALLOCATOR_MARGIN


# ------------------------------------------------------------------------------ the batch lines


@pytest.fixture(scope="module")
def tiny_model() -> memory.StepMemoryModel:
    """The tiny DANet's step on (fake) CUDA at 48 x 64, as a function of the batch."""
    return memory.StepMemoryModel(TrainingStep(_config(), 5, fake=True), 48, 64)


def test_peak_at_any_batch_follows_from_two_traces(tiny_model: memory.StepMemoryModel) -> None:
    """Exact, the allocator's rounding included."""
    model = tiny_model
    assert model.exact and model.block_bytes == memory.CUDA_BLOCK_BYTES
    assert model.peak_bytes(5) == memory.trace_step(model.step, 5, 48, 64).peak
    assert model.per_image_bytes == model.peak_bytes(2) - model.peak_bytes(1) > 0
    budget = model.at(5).required_bytes
    assert model.largest_batch(budget) == 5 and model.largest_batch(budget - 1) == 4
    assert model.largest_batch(model.at(1).required_bytes - 1) == 0
    with pytest.raises(ValueError, match="batch"):
        model.peak_bytes(0)


def test_largest_batch_by_traces_where_the_events_differ(tiny_model: memory.StepMemoryModel) -> None:
    model = copy.copy(tiny_model)
    model._sizes = None  # as for a backend whose loop follows the batch
    model._traced = {b: tiny_model.peak_bytes(b) for b in (1, 2)}
    assert model.largest_batch(tiny_model.at(3).required_bytes) == 3
    assert model._traced.keys() == {1, 2, 3, 4}


def test_ddp_processes_hold_gradient_buckets(tiny_model: memory.StepMemoryModel) -> None:
    ddp = TrainingStep(_config(), 5, fake=True, processes=2)
    buckets = sum(p.numel() * p.element_size() for p in ddp.trained_parameters())
    assert ddp.state_bytes() == tiny_model.step.state_bytes() + buckets


# ------------------------------------------------------------------------------ CUDA without a GPU


class _OpLog(TorchDispatchMode):
    """The ops called and the dtypes of their tensor outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: dict[str, set[torch.dtype]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        dtypes = self.dtypes.setdefault(func._schema.name, set())
        if isinstance(out, torch.Tensor):
            dtypes.add(out.dtype)
        return out


def _fake_cuda_step(attention: str, amp: str, **train: object) -> tuple[dict[str, set[torch.dtype]], int]:
    """The ops of one fake CUDA step with their output dtypes, and the step's peak."""
    cfg = _config(amp=amp, **train)
    cfg.model.attention = attention
    step = TrainingStep(cfg, 5, fake=True, backend="auto")
    live, log = LiveTensorBytes(block_bytes=memory.CUDA_BLOCK_BYTES), _OpLog()
    live.hold(step.state_tensors())
    with step.running(live), log:  # the log above the fused ops' fakes: it sees the ops themselves
        images, masks = step.new_batch(2, 64, 64)
        step.run(images, masks)
        del images, masks
    return log.dtypes, live.peak


def test_fake_cuda_step_takes_the_gpu_paths() -> None:
    """No GPU here: the fake CUDA step still runs CUDA autocast's lists (softmax and bilinear
    upsampling in fp32, unlike CPU autocast; checkpointed stages recompute under it too), the
    fused model's Triton ops (fp32: the tests' Triton interpreter computes no bf16), and counts
    the caching allocator's 512-byte blocks."""
    reference, peak = _fake_cuda_step("reference", "bf16", activation_checkpointing=True)
    assert reference["aten::convolution"] == {torch.bfloat16}
    assert reference["aten::_softmax"] == {torch.float32}
    assert reference["aten::upsample_bilinear2d"] == {torch.float32}
    assert peak % memory.CUDA_BLOCK_BYTES == 0
    fused, _ = _fake_cuda_step("fused", "none")
    assert {"danet_kernels::pam_forward", "danet_kernels::pam_backward", "danet_kernels::cam_forward",
            "danet_kernels::cam_backward"} <= set(fused)
    assert "aten::_softmax" not in fused and "aten::bmm" not in fused


# ------------------------------------------------------------------------------ the trainer's check


@pytest.mark.slow
def test_check_training_fits_names_the_knobs() -> None:
    cfg = _config(batch_size=6, accum_steps=2)  # one process, micro-batches of 3
    cfg.data.crop_size = 64
    fits = memory.check_training_fits(cfg, 5, 3, torch.device("cuda"), available_bytes=1 << 40)
    assert fits is not None and fits.batch == 3 and fits.peak_bytes > fits.state_bytes > 0
    tight = fits.required_bytes - 1
    with pytest.warns(UserWarning, match="will probably not fit") as caught:
        memory.check_training_fits(cfg, 5, 3, torch.device("cuda"), available_bytes=tight)
    message = str(caught[0].message)
    for knob in ("train.accum_steps=3: micro-batches of 2", "train.amp=bf16",
                 "train.activation_checkpointing=true", "data.crop_size=48"):
        assert knob in message, knob


def test_check_training_fits_never_stops_a_run() -> None:
    cfg = _config()
    cfg.data.crop_size = 0  # nothing can be traced
    with pytest.warns(UserWarning, match="could not predict"):
        assert memory.check_training_fits(cfg, 5, 1, torch.device("cuda"), available_bytes=1 << 40) is None


def test_card_sizes_and_margins() -> None:
    assert memory.usable_bytes(80) == 80 * 2**30 - memory.DEVICE_RESERVE_BYTES
    step = memory.StepMemory(1, 8, 8, peak_bytes=1000.0, state_bytes=10.0)
    assert step.required_bytes == pytest.approx(1000 * (1 + memory.ALLOCATOR_MARGIN))
    assert step.fits(1100.0) and not step.fits(1099.0)


# ------------------------------------------------------------------------------ danet plan


def test_plan_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--preset", "synthetic", "--size", "48", "64", "--batch", "3",
                 "--attention", "reference", "--amp", "none", "--memory", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["height"], report["width"], report["batch"]) == (48, 64, 3)
    (row,) = report["rows"]
    assert row["attention"] == "reference" and row["amp"] == "none"
    # the peak is the highest of lines in the batch: at least their extrapolation from batches 1 and 2
    assert row["peak_bytes"] >= row["peak_bytes_batch1"] + 2 * row["per_image_bytes"] - 1
    assert list(row["largest_batch"]) == ["16", "24", "40", "80", "141", "2"]
    assert 0 < row["largest_batch"]["2"] < row["largest_batch"]["16"]


@pytest.mark.slow
def test_plan_table_and_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--set", "data.crop_size=32", "--amp", "bf16", "--gpus", "2", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "reference  bf16 AMP" in out and "fused      bf16 AMP" in out and "141 GB" in out
    with pytest.raises(SystemExit):  # argparse checks the range (danet.config.RANGES)
        main(["plan", "--size", "0", "64"])
    assert "argument --size: must be >= 1, got 0" in capsys.readouterr().err
    assert main(["plan", "--memory", "1"]) == 2
    assert "--memory must be above" in capsys.readouterr().err
    assert main(["plan", "--gpus", "3"]) == 2  # the synthetic preset's batch 8 over 3 GPUs
    assert "not divisible" in capsys.readouterr().err
