"""Predicted against measured: the peak memory of one training step on this machine's device.

:func:`compare_step_memory` predicts a step with danet.training.memory (fake tensors, no run)
and then measures the same step (:class:`danet.training.step.TrainingStep` on real tensors)
with :func:`benchmarks.harness.peak_memory_bytes`: ``torch.cuda.max_memory_allocated`` on
CUDA, the CPU allocator's events on the CPU. tests/danet/test_training_memory.py holds the
CPU side to its tolerance, and on a GPU (``pytest -m gpu``, which the GPU check runs) compares
DANet-ResNet101 on a 1024 x 2048 frame; called directly::

    from benchmarks.training_memory_check import compare_step_memory
    from danet.config import load_config
    cfg = load_config("cityscapes", overrides=["model.attention=fused", "train.amp=bf16"])
    result = compare_step_memory(cfg, num_classes=19, batch=1, height=1024, width=2048)
    # result["rel_error"]: predicted / measured - 1; result["reserved_bytes"]: the allocator's
    # segments at the peak (the margin's part: reserved / measured - 1 against ALLOCATOR_MARGIN)
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.harness import DEVICE, ON_CUDA, free_memory, peak_memory_bytes, synchronize
from danet.config import Config
from danet.training.memory import ALLOCATOR_MARGIN, predict_step
from danet.training.step import TrainingStep

__all__ = ["compare_step_memory", "held_bytes"]


def held_bytes(step: TrainingStep, *batch: torch.Tensor) -> int:
    """What a step holds before it runs: its state (parameters, buffers, optimiser state) and its
    batch; a measured total is this plus the peak the step allocates above it."""
    return step.state_bytes() + sum(t.numel() * t.element_size() for t in batch)


def compare_step_memory(cfg: Config, num_classes: int, batch: int, height: int, width: int, *,
                        amp: str | None = None, backend: str | None = None) -> dict[str, Any]:
    """One step of ``cfg`` on a (batch, 3, height, width) batch: predicted and measured peak bytes.

    The measured peak is what must fit, as benchmarks/test_training_memory.py counts it: the
    state (parameters, buffers, optimiser state), the batch, and the peak the step allocates
    above them. On CUDA a first step runs unmeasured (cuDNN, cuBLAS and Triton's autotuning
    settle, as in every benchmark here). ``amp`` overrides ``train.amp``; ``backend`` is the
    attention backend of both (None: the process's).

    Returns:
        ``predicted_bytes``, ``measured_bytes``, ``rel_error`` (predicted / measured - 1),
        ``method`` (how the peak was measured), the device, and on CUDA ``reserved_bytes``
        (``torch.cuda.max_memory_reserved`` over the measured step) and ``margin``.
    """
    predicted = predict_step(cfg, num_classes, batch, height, width, amp=amp, device=DEVICE.type,
                             backend=backend).peak_bytes
    step = TrainingStep(cfg, num_classes, device=DEVICE, backend=backend)
    with step.running():
        images, masks = step.new_batch(batch, height, width)
        if ON_CUDA:
            step.run(images, masks, amp=amp)
            synchronize()
            free_memory()
            torch.cuda.reset_peak_memory_stats()
        step_peak, method = peak_memory_bytes(lambda: step.run(images, masks, amp=amp))
    result: dict[str, Any] = {"device": str(DEVICE), "batch": batch, "height": height, "width": width,
                              "predicted_bytes": predicted, "measured_bytes": None, "rel_error": None,
                              "method": method}
    if step_peak is not None:
        measured = float(held_bytes(step, images, masks) + step_peak)
        result.update(measured_bytes=measured, rel_error=predicted / measured - 1)
    if ON_CUDA:
        result.update(reserved_bytes=float(torch.cuda.max_memory_reserved()), margin=ALLOCATOR_MARGIN)
    return result
