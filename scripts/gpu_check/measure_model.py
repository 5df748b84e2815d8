"""The model sections of the GPU check: a DANet-ResNet101 training step and evaluation throughput.

* ``train``: one training step at 1024 x 2048 (a whole Cityscapes frame: N = 128 x 256 = 32768
  positions in the head), batch 1, random weights, the fused attention against the reference
  one, in fp32 (the published recipe) and under bf16 autocast. The step is the benchmark
  suite's (``benchmarks/test_training_memory.Trainer``: forward, DANet's three-output loss,
  backward, SGD with momentum); its first call, its median time over a few steps (CUDA
  events) and the memory it needs in all (parameters, momentum, batch, and the step's peak
  above them). Out of memory is a result.
* ``eval``: images per second of the same model (``benchmarks/test_training_memory.GRID``: the
  published one on CUDA, the tiny backbone on the CPU) on 1024 x 2048 frames through
  ``danet.evaluation.engine.predict_scores`` in sliding mode (crops 769 and 768, the default 2/3
  stride, single scale, no flip) under ``torch.inference_mode``, in bf16 autocast and fp32,
  fused against reference attention; the first frame (autotuning at the window's N) is timed
  apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import torch

from benchmarks import harness
from danet.config import ATTENTIONS, EvalConfig
from danet.evaluation.engine import predict_scores
from danet.evaluation.protocols import inference_plan, window_stride
from danet.models import build_model

__all__ = ["eval_throughput", "train_step"]


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for "bf16", nothing for "fp32" (torch's default matmul precision, "highest")."""
    return torch.autocast(harness.DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _precision_fields(precision: str) -> dict[str, Any]:
    return {"precision": "bf16-autocast" if precision == "bf16" else "fp32",
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


def _train_case(attention: str, precision: str, sizing: Any) -> dict[str, Any]:
    from benchmarks.test_training_memory import Trainer  # the suite's step: one definition

    trainer = Trainer(attention, amp=precision == "bf16")
    images, target = trainer.batch(sizing.train_batch, *sizing.train_size)
    _, first_s = harness.timed(lambda: trainer.step(images, target))
    total = trainer.step_total_bytes(images, target)
    ms = harness.median_step_ms(lambda: trainer.step(images, target), warmup=0, repeats=sizing.train_repeats)
    state = trainer.state_bytes()
    return {"median_ms": round(ms, 2), "first_step_s": round(first_s, 2), "steps": sizing.train_repeats,
            "state_bytes": state, "total_bytes": total,
            "step_peak_bytes": None if total is None else total - state}


def train_step(ctx: Any) -> None:
    """Fused and reference attention, fp32 then bf16 autocast (see the module docstring)."""
    from benchmarks.test_training_memory import GRID, NETWORK  # the published model on CUDA, tiny on the CPU

    sizing = ctx.sizing
    height, width = sizing.train_size
    for precision in sizing.train_precisions:
        for attention in ATTENTIONS:
            case = {"attention": attention, **_precision_fields(precision), "H": height, "W": width,
                    "B": sizing.train_batch, "backbone": NETWORK, "output_stride": GRID.model.output_stride}
            ctx.runner.run(case, functools.partial(_train_case, attention, precision, sizing), group="train")


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------


def _eval_case(model: torch.nn.Module, crop: int, precision: str, sizing: Any) -> dict[str, Any]:
    height, width = sizing.eval_size
    # predict_logits's settings: amp "none", so that _autocast alone sets the precision.
    cfg = EvalConfig(mode="sliding", crop_size=crop, scales=(1.0,), flip=False, amp="none")
    windows = sum(len(stage.windows) for stage in inference_plan(height, width, cfg))
    image = torch.randn(1, 3, height, width, device=harness.DEVICE)

    def frame() -> torch.Tensor:
        return predict_scores(model, image, sizing.num_classes, cfg)["sum"]

    with torch.inference_mode(), _autocast(precision):
        _, first_s = harness.timed(frame)
        peak, _ = harness.peak_memory_bytes(frame)
        ms = harness.median_step_ms(frame, warmup=0, repeats=sizing.eval_frames)
    return {"windows": windows, "stride": window_stride(cfg), "frames": sizing.eval_frames,
            "first_frame_s": round(first_s, 2), "ms_per_frame": round(ms, 1),
            "images_per_s": round(1000 / ms, 3), "peak_bytes": peak}


def eval_throughput(ctx: Any) -> None:
    """Sliding-window evaluation, fused against reference attention (see the module docstring)."""
    from benchmarks.test_training_memory import GRID, NETWORK  # the training section's model

    sizing = ctx.sizing
    models: dict[str, torch.nn.Module] = {}

    def model_for(attention: str) -> torch.nn.Module:
        if attention not in models:
            config = dataclasses.replace(GRID.model, attention=attention)
            models[attention] = build_model(config, sizing.num_classes).to(harness.DEVICE).eval()
        return models[attention]

    height, width = sizing.eval_size
    for precision in sizing.eval_precisions:
        for crop in sizing.eval_crops:
            for attention in ATTENTIONS:
                case = {"attention": attention, **_precision_fields(precision), "H": height, "W": width,
                        "crop": crop, "mode": "sliding", "scales": [1.0], "flip": False, "backbone": NETWORK}

                def measure(attention: str = attention, crop: int = crop, precision: str = precision) -> dict:
                    return _eval_case(model_for(attention), crop, precision, sizing)

                ctx.runner.run(case, measure, group="eval")
