"""Will it fit? A training step's memory, predicted on fake tensors, and the largest batch per GPU.

:func:`trace_step` follows one step of :class:`danet.training.step.TrainingStep` (the trainer's
step: forward, the three-output loss plus aux, backward, clipping, the optimiser's update) op
by op with :class:`danet.evaluation.cost.LiveTensorBytes`, on fake tensors of the target
device (no GPU needed; step.py says how) at any batch, input size, precision, layout,
checkpointing and attention backend. :class:`StepMemoryModel` turns two such traces into the
peak at every batch; ``danet plan`` prints them, and the trainer warns with
:func:`check_training_fits` before a first step that would not fit.

**What is predicted**: the bytes the CUDA caching allocator has handed out at the step's peak,
what ``torch.cuda.max_memory_allocated`` reports for it: parameters, buffers, the optimiser's
state (SGD momentum, AdamW's two moments), DDP's gradient buckets, the batch, every tensor
autograd saves, the gradients, the optimiser's foreach temporaries, the attention's own
tensors (the reference's N x N matrices, the fused ops' outputs and saved statistics), the
scratch of the kernels where it is large (the softmax backward's N x N copies), each allocation
rounded up to the allocator's 512-byte blocks. On the CPU (``device="cpu"``), the
same without rounding: what benchmarks/ measures there.

**Not counted**, and covered by margins instead of pretended to:

* inside the allocator, :data:`ALLOCATOR_MARGIN` (10% of the peak): cached blocks that freed
  tensors leave split (reserved beyond allocated: fragmentation), cuDNN's convolution
  workspaces (transient, up to a few hundred MB for the widest convolutions), cuBLAS and
  cuBLASLt workspaces (tens of MB), Triton's autotuning on a new input size (its L2 flush
  buffer is 256 MB), and the fused launchers' scratch (about 2% at a 769 crop, step.py);
* outside the allocator, :data:`DEVICE_RESERVE_BYTES` (1.5 GiB): the CUDA context and kernel
  images (about 0.5 GiB on an H100), NCCL's buffers under DDP, and the gap between a card's
  nominal size and its memory (an "80 GB" H100 has 79.6 GiB).

A step fits a card of X GB (read as X GiB) when ``peak x 1.1 <= X GiB - 1.5 GiB``. Not
modelled: ``train.compile`` (predicted as the eager step; Inductor's fusions usually need
less), SyncBatchNorm's all-gathered statistics (a few KB), and the first step's one-off
allocations beyond autotuning. ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` keeps
fragmentation near zero where a fit is tight.

**The batch.** A step's events (allocations and frees) come in the same order at every batch,
and every allocation is either proportional to the batch or independent of it. Traces at batch
1 and 2 give each event's storage as ``fixed + batch x per_image`` bytes; rounded to the
allocator's blocks and added up in order, they give the step's peak at any batch: exact, not
fitted (the test checks a trace at batch 5 to the byte). Where the events differ between
batches (the blockwise backend tiles its loop by images) each batch asked for is traced.

**Speed.** The trace's op count does not grow with the input (the attention is one op, or one
bmm), so there is nothing to extrapolate: DANet-ResNet101 at 1024 x 2048 is a direct trace,
about 15 s for the first prediction on this project's 2-core machine (model built on fake
tensors, then one traced step), and every size after it shares the fake-op cache.
"""

from __future__ import annotations

import bisect
import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from danet.config import Config
from danet.evaluation.cost import LiveTensorBytes, format_bytes
from danet.training.step import TrainingStep

__all__ = [
    "ALLOCATOR_MARGIN",
    "CUDA_BLOCK_BYTES",
    "DEVICE_RESERVE_BYTES",
    "GPU_SIZES_GB",
    "StepMemory",
    "StepMemoryModel",
    "check_training_fits",
    "largest_batches",
    "predict_step",
    "trace_step",
    "usable_bytes",
]

GIB = 1 << 30
CUDA_BLOCK_BYTES = 512
"""The CUDA caching allocator rounds every allocation up to a multiple of 512 bytes."""
ALLOCATOR_MARGIN = 0.10
"""Fraction of the predicted peak added for what the allocator holds beyond it (module docstring)."""
DEVICE_RESERVE_BYTES = int(1.5 * GIB)
"""Device memory outside the allocator: the CUDA context, NCCL, nominal-versus-real size."""
GPU_SIZES_GB: tuple[int, ...] = (16, 24, 40, 80, 141)
"""The cards ``danet plan`` answers for: V100/T4 16 GB, RTX 4090/A10 24 GB, A100 40 and 80 GB,
H100 80 GB, H200 141 GB."""
_BATCH_LIMIT = 4096  # the largest batch a search by traces tries


def usable_bytes(memory_gb: float) -> float:
    """What a training step may allocate on a card of ``memory_gb`` GB (read as GiB): all but
    :data:`DEVICE_RESERVE_BYTES`, before :data:`ALLOCATOR_MARGIN`."""
    return memory_gb * GIB - DEVICE_RESERVE_BYTES


def trace_step(step: TrainingStep, batch: int, height: int, width: int, *, amp: str | None = None,
               record: bool = False) -> LiveTensorBytes:
    """Follow one step of ``step`` on a (batch, 3, height, width) batch, op by op.

    The result's ``peak`` is the most bytes alive at once, the step's state included (CUDA
    steps round every allocation to :data:`CUDA_BLOCK_BYTES`); with ``record`` its
    ``timeline`` holds the total after every allocation and free. ``amp`` overrides the
    config's ``train.amp``. Works on real steps too (then it counts what the ops returned).
    """
    cuda = step.device.type == "cuda"
    live = LiveTensorBytes(block_bytes=CUDA_BLOCK_BYTES if cuda else 1, record=record)
    live.hold(step.state_tensors())
    with step.running(live):
        images, masks = step.new_batch(batch, height, width)
        step.run(images, masks, amp=amp)
        del images, masks
    return live


def predict_step(cfg: Config, num_classes: int, batch: int, height: int, width: int, *,
                 amp: str | None = None, device: str = "cuda", processes: int = 1,
                 backend: str | None = None) -> StepMemory:
    """The predicted memory of one step of ``cfg`` on ``batch`` images of ``height`` x ``width``
    per process: one trace of a fake :class:`TrainingStep` (arguments as there; ``amp``
    overrides ``train.amp``)."""
    step = TrainingStep(cfg, num_classes, device=device, fake=True, processes=processes, backend=backend)
    return _step_memory(step, batch, height, width, amp=amp)


def _step_memory(step: TrainingStep, batch: int, height: int, width: int, *,
                 amp: str | None = None) -> StepMemory:
    peak = trace_step(step, batch, height, width, amp=amp).peak
    return StepMemory(batch, height, width, float(peak), float(step.state_bytes()))


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """The predicted memory of one training step on one device.

    Attributes:
        batch, height, width: the micro-batch per process and its images' size.
        peak_bytes: allocated bytes at the step's peak, state included.
        state_bytes: what the run holds between steps (parameters, buffers, optimiser state,
            DDP buckets).
    """

    batch: int
    height: int
    width: int
    peak_bytes: float
    state_bytes: float

    @property
    def required_bytes(self) -> float:
        """The peak with :data:`ALLOCATOR_MARGIN`: what the allocator must be able to give."""
        return self.peak_bytes * (1 + ALLOCATOR_MARGIN)

    def fits(self, available_bytes: float) -> bool:
        """Whether the step fits ``available_bytes`` of allocator memory (:func:`usable_bytes`)."""
        return self.required_bytes <= available_bytes

    def describe(self) -> str:
        """``"12.3 GiB at batch 2 of 769 x 769 (0.5 GiB of it held between steps)"``."""
        return (f"{format_bytes(self.peak_bytes)} at batch {self.batch} of {self.height} x {self.width} "
                f"({format_bytes(self.state_bytes)} of it held between steps)")


class StepMemoryModel:
    """The peak of one step as a function of the batch, for one configuration, input size and precision.

    Built from traces at batch 1 and 2 (module docstring, "The batch"); exact at every batch.

    Args:
        step: a fake :class:`TrainingStep` (or a real one, on the CPU).
        height, width: the input size.
        amp: the precision ("none", "bf16", "fp16"); default the config's ``train.amp``.
    """

    def __init__(self, step: TrainingStep, height: int, width: int, *, amp: str | None = None) -> None:
        self.step, self.height, self.width, self.amp = step, height, width, amp
        self.state_bytes = float(step.state_bytes())
        first, second = (trace_step(step, b, height, width, amp=amp, record=True) for b in (1, 2))
        self.block_bytes = first.block_bytes
        self._traced = {1: float(first.peak), 2: float(second.peak)}
        self._sizes: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        if len(first.events) == len(second.events):
            one, two = (np.asarray(t.events, np.float64) for t in (first, second))
            if np.array_equal(np.sign(one), np.sign(two)):
                # each event's storage: |fixed + batch x per_image| bytes, allocated (+) or freed (-)
                self._sizes = (np.abs(2 * one - two), np.abs(two) - np.abs(one), np.sign(one))

    @property
    def exact(self) -> bool:
        """Whether the peak at any batch follows from the two traces (else each batch is traced)."""
        return self._sizes is not None

    @property
    def per_image_bytes(self) -> float:
        """What each image beyond the first adds to the peak (from batch 1 to 2)."""
        return self._traced[2] - self._traced[1]

    def peak_bytes(self, batch: int) -> float:
        """The predicted peak at ``batch`` images per process."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if batch not in self._traced:
            if self._sizes is not None:
                fixed, per_image, sign = self._sizes
                rounded = np.ceil((fixed + batch * per_image) / self.block_bytes) * self.block_bytes
                self._traced[batch] = float(np.cumsum(sign * rounded).max())
            else:
                self._traced[batch] = float(trace_step(self.step, batch, self.height, self.width,
                                                       amp=self.amp).peak)
        return self._traced[batch]

    def at(self, batch: int) -> StepMemory:
        """The :class:`StepMemory` of ``batch`` images per process."""
        return StepMemory(batch, self.height, self.width, self.peak_bytes(batch), self.state_bytes)

    def largest_batch(self, available_bytes: float) -> int:
        """The largest batch whose step fits ``available_bytes`` of allocator memory with the
        margin (:meth:`StepMemory.fits`); 0 when not even one image fits. Doubling, then
        bisection: with exact lines each trial is arithmetic; without, a trace (at most 4096)."""
        limit = _BATCH_LIMIT if self._sizes is None else 1 << 30

        def fails(batch: int) -> bool:
            return not self.at(batch).fits(available_bytes)

        fitting, trial = 0, 1  # doubling first: few trials where each is a trace
        while not fails(trial):
            if trial >= limit:
                return limit
            fitting, trial = trial, min(2 * trial, limit)
        return fitting + bisect.bisect_left(range(fitting + 1, trial + 1), True, key=fails)


# ------------------------------------------------------------------------------ the trainer's check


def _device_bytes(device: torch.device) -> float:
    """What this process may still allocate on ``device``, now: the free memory plus what its
    allocator holds already, and at most the card's size less the reserve."""
    free, total = torch.cuda.mem_get_info(device)
    return min(total - DEVICE_RESERVE_BYTES, free + torch.cuda.memory_reserved(device))


def _alternatives(cfg: Config, num_classes: int, micro_batch: int, size: int, processes: int,
                  model: StepMemoryModel, available: float) -> list[str]:
    """The knobs that would make the step fit, each with its predicted peak and whether that fits."""

    def outcome(peak: float) -> str:
        fits = StepMemory(micro_batch, size, size, peak, model.state_bytes).fits(available)
        return f"{format_bytes(peak)}: {'fits' if fits else 'not enough alone'}"

    knobs = []
    largest, global_batch = model.largest_batch(available), cfg.train.batch_size
    # the fewest accumulation steps that split the same global batch into micro-batches that fit
    splits = [a for a in range(cfg.train.accum_steps + 1, global_batch + 1)
              if global_batch % (processes * a) == 0 and 1 <= global_batch // (processes * a) <= largest]
    if splits:  # traced as such: from the second micro-step on, the gradients are held throughout
        micro = global_batch // (processes * splits[0])
        recipe = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, accum_steps=splits[0]))
        step = TrainingStep(recipe, num_classes, fake=True, processes=processes)
        knobs.append(f"train.accum_steps={splits[0]}: micro-batches of {micro} "
                     f"({outcome(trace_step(step, micro, size, size).peak)}), the same global batch of "
                     f"{global_batch}")
    elif largest >= 1:
        knobs.append(f"a global train.batch_size of {largest * processes * cfg.train.accum_steps} "
                     f"({format_bytes(model.peak_bytes(largest))} per step: fits)")
    if cfg.train.amp == "none":
        bf16 = trace_step(model.step, micro_batch, size, size, amp="bf16").peak
        knobs.append(f"train.amp=bf16 ({outcome(bf16)})")
    if not cfg.train.activation_checkpointing:
        recipe = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, activation_checkpointing=True))
        step = TrainingStep(recipe, num_classes, fake=True, processes=processes)
        checkpointed = trace_step(step, micro_batch, size, size).peak
        knobs.append(f"train.activation_checkpointing=true ({outcome(checkpointed)})")
    smaller = max(8, (size * 3 // 4) // 8 * 8)
    cropped = trace_step(model.step, micro_batch, smaller, smaller).peak
    knobs.append(f"data.crop_size={smaller} ({outcome(cropped)}; the reference attention grows with the "
                 f"square of the crop's pixels)")
    return knobs


def check_training_fits(cfg: Config, num_classes: int, micro_batch: int, device: torch.device, *,
                        processes: int = 1, available_bytes: float | None = None) -> StepMemory | None:
    """Predict the step ``danet train`` is about to run on ``device`` (CUDA) and warn, naming the
    knobs that would help (AMP, batch and accumulation, activation checkpointing, crop), when
    it will not fit. Returns the prediction (None where it could not be made, with a warning
    saying why: a failed prediction never stops a run).

    ``available_bytes``: what the step may allocate; default what the device has now
    (free memory plus this process's cached blocks, at most its size less the reserve).
    """
    size = cfg.data.crop_size
    try:
        step = TrainingStep(cfg, num_classes, device="cuda", fake=True, processes=processes)
        model = StepMemoryModel(step, size, size) if micro_batch <= 2 else None
        memory = model.at(micro_batch) if model is not None else _step_memory(step, micro_batch, size, size)
        available = _device_bytes(device) if available_bytes is None else available_bytes
        if memory.fits(available):
            return memory
        model = model or StepMemoryModel(step, size, size)
        knobs = _alternatives(cfg, num_classes, micro_batch, size, processes, model, available)
    except Exception as err:  # the check is advice: a model it cannot follow must still train
        warnings.warn(f"could not predict the training step's memory ({type(err).__name__}: {err}); "
                      "training anyway", stacklevel=2)
        return None
    warnings.warn(
        f"the training step will probably not fit: predicted {memory.describe()}, "
        f"{format_bytes(memory.required_bytes)} with the allocator's margin, against "
        f"{format_bytes(available)} available on {device}. What would fit or help: " + "; ".join(knobs)
        + ". (`danet plan` with the same settings shows every option.)", stacklevel=2)
    return memory


def largest_batches(model: StepMemoryModel, sizes_gb: Sequence[float]) -> dict[float, int]:
    """The largest batch per card size (GB, read as GiB) for ``model``'s step."""
    return {gb: model.largest_batch(usable_bytes(gb)) for gb in sizes_gb}
