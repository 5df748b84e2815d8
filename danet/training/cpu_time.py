"""How long a training iteration will take on this CPU, said before the first one runs.

A GPU recipe run on a CPU (DANet-101 at 480 x 480, batch 8) takes minutes per iteration; the
user should know before waiting for the first one. The estimate is a FLOP count over a measured
speed: the forward FLOPs of the model at the training crop (danet.evaluation.cost, on fake
tensors, nothing computed), times 3 for a training step (the backward costs about twice the
forward), times the images of an iteration, over the speed this process reaches on one 3x3
convolution (64 channels, 56 x 56) with its own thread count, measured for about 0.15 s.

Checked on the 2-core development machine (one thread, load average about 8), estimated against
measured seconds per iteration: ResNet-18 at output stride 16, 256 px, batch 4: 5.1 against 5.2
to 6.5; at output stride 8: 16.0 against 15.5 to 16.8; resnet_tiny, 256 px, batch 8: 1.15 against
2.0 to 2.5 (its narrow layers run below the convolution's speed). So: right for real backbones,
an underestimate up to 2x for the tiny one.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from danet.evaluation.cost import estimate_forward_cost, format_duration, measured_conv_speed

__all__ = ["IterationEstimate", "estimate_iteration"]

_TRAINING_STEP_FLOPS = 3.0  # forward + backward (about twice the forward), in forwards


@dataclasses.dataclass(frozen=True)
class IterationEstimate:
    """The estimated cost of one training iteration on this CPU."""

    flops: float  # of one iteration (every micro-batch)
    speed: float  # measured FLOP/s

    @property
    def seconds(self) -> float:
        """The estimated seconds of one iteration: its FLOPs over the measured speed."""
        return self.flops / self.speed

    def describe(self, iterations: int) -> str:
        """``"about 1.2 s per iteration; 300 iterations: about 6 min (...)"``."""
        total = self.seconds * iterations
        return (f"about {self.seconds:.3g} s per iteration; {iterations} iterations: about "
                f"{format_duration(total)} ({self.flops / 1e9:.3g} GFLOP per iteration at the "
                f"{self.speed / 1e9:.3g} GFLOP/s this CPU measured)")


def estimate_iteration(model: nn.Module, images: int, crop_size: int) -> IterationEstimate:
    """The cost of a training iteration over ``images`` crops of ``crop_size`` (``model`` keeps its mode)."""
    was_training = model.training
    model.eval()  # traced in eval mode: training mode would update BatchNorm's statistics with fake tensors
    try:
        forward = estimate_forward_cost(model, 1, crop_size, crop_size).flops
    finally:
        model.train(was_training)
    flops = _TRAINING_STEP_FLOPS * forward * images
    speed = measured_conv_speed()
    return IterationEstimate(flops, speed)
