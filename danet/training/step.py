"""One training step as the trainer runs it, on real tensors or on fake ones (no data, no GPU).

:class:`TrainingStep` builds what :class:`danet.training.trainer.Trainer` builds for a config
(the model, activation checkpointing, channels_last, the optimiser with its state, the loss)
and runs the trainer's step on one micro-batch: the forward under autocast, the three-output
(+aux) loss, the backward, gradient clipping, the update, ``zero_grad``. Left out: DDP's
all-reduce (its gradient buckets are held, see ``processes``), the GradScaler (a few
scalars), logging. On real tensors it is what benchmarks/training_memory_check.py measures;
on fake tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes, devices and strides,
no storage, no compute) it is what danet.training.memory follows, op by op.

Fake tensors live on the target device, "cuda" by default, also where no GPU exists, so that
every decision that depends on the device is the GPU's: CUDA autocast's op lists (conv and bmm
in bf16/fp16, softmax and bilinear upsampling in fp32; CPU autocast keeps the last two in
bf16), the attention backend (the fused model takes the Triton ops) and the optimiser's foreach
update (torch's default on CUDA: it holds a gradient-sized
temporary). Three things torch does not do without a GPU are done here instead, and one
thing fake tensors do not show is added:

* **Autocast.** ``torch.autocast("cuda")`` switches itself off when
  ``torch.cuda.is_available()`` is False (and refuses bf16 without a device to ask);
  torch.utils.checkpoint re-enters it to recompute a stage. :func:`_gpu_checks_pass` makes
  those two checks pass while a fake step runs on CUDA tensors; the autocast kernels then
  run as on a GPU.
* **The fused attention.** On a GPU build ``danet_kernels::pam_forward`` and its siblings are
  ``triton_op``s, whose fake kernel is the launcher itself, and the launcher asks the device
  for its SM count. :class:`_FusedOpFakes` answers the four ops with the fake implementations
  danet_kernels registers under the Triton interpreter: the outputs exactly as the launchers
  allocate them (padded to 16-element rows), the autograd formula's saved tensors untouched.
  Not counted: the launchers' scratch, which the fakes do not allocate: copies of operands
  whose N is not a multiple of 16 (PAM's backward (2 d + 3 C) N_pad elements per image, CAM's
  2 C N_pad), split-N partials at small N, the fp32 dQ accumulator of 16-bit inputs. About 2%
  of a DANet-101 step at a 769 x 769 crop (N = 9409), nothing at 1024 x 2048 (N = 32768 is
  aligned) but the 8 MiB accumulator.
* **The backward.** The C++ autograd engine stops on a graph of CUDA tensors without a driver
  (``GraphTask::stash_current_streams`` asks for a primary context). :func:`run_backward`
  runs the same graph from Python: the engine's order (highest sequence number first,
  gradients stored into parameters first), its input buffers, its dtype and shape checks,
  and each node's saved tensors freed once it has run (the node dies, as the engine's
  ``release_variables`` frees them). On CPU graphs it gives the C++ engine's peak to the
  byte (tests/danet/test_training_memory.py); fake steps always use it, on any machine.
* **Kernel scratch.** A fake op allocates its outputs only; a few kernels allocate more and
  free it before returning. :class:`_KernelScratch` holds that scratch for the op's duration
  where it is large: the softmax backward of the reference PAM's N x N matrix (on CUDA two
  more N x N matrices, ``grad * output`` and its contiguous copy). With it the fake CUDA
  trace of the reference PAM and CAM gives the peers' H100 measurements
  (``torch.cuda.max_memory_allocated``, ../shared/baseline/h100_peers.md) within 1% from
  N = 9409 up; without it, 60% of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import itertools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.autograd.function import BackwardCFunction
from torch.utils._python_dispatch import TorchDispatchMode

import danet_kernels
from danet.config import AMP_MODES, Config
from danet.models import build_model
from danet.runtime import AMP_DTYPES
from danet.training.losses import DANetLoss
from danet.training.optimizer import build_optimizer
from danet_kernels._dispatch import triton_importable

__all__ = ["TrainingStep", "run_backward"]


# ------------------------------------------------------------------------------ CUDA without a GPU


@contextlib.contextmanager
def _gpu_checks_pass(device: torch.device) -> Iterator[None]:
    """While inside, torch.autocast("cuda") takes fake CUDA tensors on a machine without a GPU
    (its two device checks pass); nothing changes on the CPU or where a GPU exists."""
    if device.type != "cuda" or torch.cuda.is_available():
        yield
        return
    common = torch.cuda.amp.common
    saved = common.amp_definitely_not_available, torch.cuda.is_bf16_supported
    common.amp_definitely_not_available = lambda: False
    torch.cuda.is_bf16_supported = lambda *args, **kwargs: True
    try:
        yield
    finally:
        common.amp_definitely_not_available, torch.cuda.is_bf16_supported = saved


def _fused_op_fakes() -> dict[str, Callable[..., Any]]:
    """The fake implementations of danet_kernels' Triton ops, by op name (none without triton)."""
    if not triton_importable():
        return {}  # danet_kernels runs every attention in the blockwise backend then
    # lazy: triton is optional (danet_kernels runs without it), as in danet_kernels.functional
    from danet_kernels.kernels import channel_attention, position_attention  # noqa: F401 - defines the ops
    from danet_kernels.kernels.common import FAKE_KERNELS

    return dict(FAKE_KERNELS)


class _FusedOpFakes(TorchDispatchMode):
    """Answers the fused attention ops with their fake implementations (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.fakes = _fused_op_fakes()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        fake = self.fakes.get(func._schema.name)
        return (fake or func)(*args, **(kwargs or {}))


def _softmax_backward_scratch(device: torch.device, grad: torch.Tensor, output: torch.Tensor,
                              *unused: Any) -> list[torch.Tensor]:
    """What ``_softmax_backward_data``'s kernel allocates besides its result: on CUDA
    ``tmp = grad * output`` and ``tmp.contiguous()`` (a copy where tmp follows a transposed grad,
    as the reference PAM's does: SoftMax.cu), on the CPU ``grad.contiguous()``. Two N x N
    matrices per PAM on a GPU, which no op returns."""
    if device.type == "cuda":
        tmp = grad * output
        return [tmp, tmp.contiguous()]
    return [grad.contiguous(), output.contiguous()]


# op -> the scratch its kernel allocates and frees inside the call, as (device, *args) -> tensors
_KERNEL_SCRATCH: dict[str, Callable[..., list[torch.Tensor]]] = {
    "aten::_softmax_backward_data": _softmax_backward_scratch,
}


class _KernelScratch(TorchDispatchMode):
    """Allocates, for the duration of an op, the scratch its kernel takes and returns no trace of
    (:data:`_KERNEL_SCRATCH`; where a copy is not needed, ``contiguous`` returns its input and
    nothing is allocated). Kept to what is large in a DANet step: the softmax of the reference
    PAM's N x N matrix. cuDNN's and cuBLAS's workspaces are the margin's (danet.training.memory)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        scratch = _KERNEL_SCRATCH.get(func._schema.name)
        held = scratch(self.device, *args) if scratch is not None else []
        out = func(*args, **(kwargs or {}))
        del held
        return out


# ------------------------------------------------------------------------------ the backward, in Python


def _priority(node: Any) -> int:
    """The engine's ready queue runs the highest sequence number first (the node created last;
    AccumulateGrad's is UINT64_MAX: a parameter's gradient is stored as soon as it is complete)."""
    return -node._sequence_nr()


def _conform(grad: torch.Tensor | None, metadata: Any) -> torch.Tensor | None:
    """The engine's validate_outputs: a gradient takes the dtype and shape its consumer expects."""
    if grad is None:
        return None
    if grad.dtype != metadata.dtype and metadata.dtype.is_floating_point:
        grad = grad.to(metadata.dtype)
    if tuple(grad.shape) != tuple(metadata.shape):
        grad = grad.sum_to_size(metadata.shape)
    return grad


def _same_layout(grad: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether ``grad`` has the strides the layout contract asks of ``param``'s gradient."""
    return all(a == b for a, b, n in zip(grad.stride(), param.stride(), param.shape, strict=True) if n > 1)


def _store_gradient(param: torch.Tensor, grads: list[torch.Tensor | None]) -> None:
    """AccumulateGrad: the first gradient becomes ``param.grad`` itself when nothing else holds it
    and its layout is the parameter's (else a copy in that layout); later ones are added in place.
    (Calling the C++ node from Python would always copy: Python's own reference defeats its
    use-count test.)"""
    grad, grads[0] = grads[0], None
    if grad is None:
        return
    if param.grad is not None:
        param.grad.add_(grad)
    elif sys.getrefcount(grad) <= 2 and _same_layout(grad, param):  # this name, getrefcount's argument
        param.grad = grad
    else:
        param.grad = grad.new_empty_strided(param.shape, param.stride()).copy_(grad)


def _apply(node: Any, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Run one node; its gradients, one per entry of ``node.next_functions``."""
    if type(node).__name__ == "AccumulateGrad":
        _store_gradient(node.variable, grads)
        return []
    if not isinstance(node, BackwardCFunction):  # a C++ node: callable, one result per next edge
        result = node(*grads)
        return list(result) if isinstance(result, tuple) else [result]
    # A custom autograd.Function. The engine (PyNode::apply) hands it zeros for gradients that
    # never came, and keeps the results of the inputs that need one: those are, in order, the
    # non-empty next edges (next_functions lists the tensor inputs only). For an output marked
    # non-differentiable the metadata has no shape, so its zeros here are a scalar where the
    # engine's have the output's: the fused PAM's O and lse, CAM's A, one (B, C, N) tensor
    # during each PAM backward (under 1% of a DANet step) that this replay does not count.
    grads = [g if g is not None else torch.zeros(m.shape, dtype=m.dtype, device=m.device)
             for g, m in zip(grads, node._input_metadata, strict=True)]
    result = node.apply(*grads)
    result = result if isinstance(result, tuple) else (result,)
    needed = iter([g for g, needs in zip(result, node.needs_input_grad, strict=False) if needs])
    return [next(needed) if edge is not None else None for edge, _ in node.next_functions]


def _dependencies(root: Any) -> dict[Any, int]:
    """How many edges of the graph below ``root`` lead to each node."""
    counts: dict[Any, int] = {}
    stack, seen = [root], {root}
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is None:
                continue
            counts[node] = counts.get(node, 0) + 1
            if node not in seen:
                seen.add(node)
                stack.append(node)
    return counts


def _accumulate(held: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Two gradients for one input: into the first in place where nothing else holds it or its
    storage and it is dense (the engine's InputBuffer::accumulate), else a new sum."""
    dense = held.is_contiguous() or held.is_contiguous(memory_format=torch.channels_last)
    alone = (sys.getrefcount(held) <= 3  # the caller's name, this argument, getrefcount's own
             and torch._C._storage_Use_Count(held.untyped_storage()._cdata) <= 2)  # held's, the temporary's
    return held.add_(grad) if dense and alone else held + grad


def run_backward(holder: list[torch.Tensor], gradient: torch.Tensor | None = None) -> None:
    """``holder[0].backward(gradient)``, run node by node from Python (see the module docstring).

    ``holder`` is emptied: the graph must be reachable from nothing but the engine, so that a
    node and its saved tensors die once it has run. Tensor hooks are not run (the step has none;
    torch.utils.checkpoint's saved-tensor hooks run, inside the nodes, each stage recomputed once
    as in a backward call).
    """
    loss = holder.pop()
    root = loss.grad_fn
    pending = _dependencies(root)
    seed = torch.ones_like(loss) if gradient is None else gradient  # backward() holds it to the end
    buffers: dict[Any, list[torch.Tensor | None]] = {root: [seed]}
    order = itertools.count()
    ready = [(_priority(root), next(order), root)]
    del loss, root
    # GraphExecGroup stands for the engine's graph task: checkpointed stages recompute once
    with torch.no_grad(), torch.utils.checkpoint.GraphExecGroup():
        while ready:
            node = heapq.heappop(ready)[2]
            grads = _apply(node, buffers.pop(node))
            for (consumer, slot), grad in zip(node.next_functions, grads, strict=True):
                if consumer is None:
                    continue
                buffer = buffers.get(consumer)
                if buffer is None:
                    buffer = buffers[consumer] = [None] * len(consumer._input_metadata)
                grad = _conform(grad, consumer._input_metadata[slot])
                if buffer[slot] is None:
                    buffer[slot] = grad
                elif grad is not None:
                    held, buffer[slot] = buffer[slot], None
                    buffer[slot] = _accumulate(held, grad)
                    del held
                del grad
                pending[consumer] -= 1
                if pending[consumer] == 0:
                    del pending[consumer]
                    heapq.heappush(ready, (_priority(consumer), next(order), consumer))
                del consumer
            del node, grads


# ------------------------------------------------------------------------------ the step


@functools.cache
def _shared_fake_mode() -> FakeTensorMode:
    return FakeTensorMode()


def _to_channels_last(model: nn.Module) -> None:
    """``model.to(memory_format=torch.channels_last)`` for fake parameters (whose ``to`` would swap
    tensors, which fake tensors refuse): 4-D weights and buffers take the layout in place."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.dim() == 4:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)


class TrainingStep:
    """The trainer's model, optimiser and loss for ``cfg``; :meth:`run` is one step on a micro-batch.

    Args:
        cfg: the run's configuration: model, optim, loss, data.ignore_index and the train
            section's amp, channels_last, activation_checkpointing, accum_steps.
        num_classes: the dataset's classes.
        device: where the step runs: "cuda" (default; fake steps need no GPU) or "cpu".
        fake: build and run on fake tensors (see the module docstring).
        processes: DDP processes; above 1 each holds gradient buckets as large as the
            gradients (``DistributedDataParallel``'s default, ``gradient_as_bucket_view=False``).
        backend: the attention backend while the step runs (danet_kernels.use_backend); None
            keeps the process's (by default "auto": what a run picks on ``device``, the Triton
            ops on CUDA, else the blockwise backend, or the Triton interpreter under
            ``TRITON_INTERPRET=1``).
        fake_mode: the FakeTensorMode to build in; by default one shared by every fake step of
            the process (its cache of fake ops makes every trace after the first faster).

    The state (parameters, buffers, the optimiser's momentum or moments) is that of a run in
    progress: one update at construction creates it, as a run's first step does.
    """

    def __init__(self, cfg: Config, num_classes: int, *, device: str | torch.device = "cuda",
                 fake: bool = False, processes: int = 1, backend: str | None = None,
                 fake_mode: FakeTensorMode | None = None) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.cfg, self.device, self.backend = cfg, torch.device(device), backend
        self.fake_mode = (fake_mode or _shared_fake_mode()) if fake else None
        model_cfg = dataclasses.replace(cfg.model, pretrained_backbone=None, pretrained=None)
        layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        with self.fake_mode or contextlib.nullcontext():
            with self.device:  # parameters are created on the device, as .to(device) puts them
                self.model = build_model(model_cfg, num_classes).train()
            if cfg.train.activation_checkpointing:
                self.model.set_grad_checkpointing()
            if not fake:
                self.model.to(memory_format=layout)
            elif cfg.train.channels_last:
                _to_channels_last(self.model)
            self.optimizer = build_optimizer(self.model, cfg)
            if fake:  # torch's default picks by the parameters' type, which fake tensors fail
                for group in self.optimizer.param_groups:
                    group["foreach"] = self.device.type == "cuda"
            params = self.trained_parameters()
            for param in params:
                param.grad = torch.zeros_like(param)
            self.optimizer.step()  # the first update creates the state every later step holds
            self.optimizer.zero_grad(set_to_none=True)
            numel = sum(p.numel() for p in params)
            self.buckets = [torch.empty(numel, device=self.device)] if processes > 1 else []
        self.criterion = DANetLoss(cfg.loss.weights, cfg.loss.aux_weight, cfg.data.ignore_index)
        self.layout = layout

    def trained_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser updates."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def state_tensors(self) -> list[torch.Tensor]:
        """What a run holds between steps: parameters, buffers, optimiser state, DDP buckets."""
        state = [t for per_param in self.optimizer.state.values() for t in per_param.values()
                 if isinstance(t, torch.Tensor)]
        return [*self.model.parameters(), *self.model.buffers(), *state, *self.buckets]

    def state_bytes(self) -> int:
        """Bytes of :meth:`state_tensors` (each storage once, unrounded)."""
        storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in self.state_tensors()}
        return sum(storages.values())

    @contextlib.contextmanager
    def running(self, *modes: TorchDispatchMode) -> Iterator[None]:
        """The context a step runs in: the backend switch, and for a fake step its FakeTensorMode,
        the GPU shims, the kernels' scratch and the fused ops' fakes; ``modes`` (e.g. a
        LiveTensorBytes) are entered between the fake tensors and the last two, so that they see
        what those allocate."""
        with contextlib.ExitStack() as stack:
            if self.fake_mode is not None:
                stack.enter_context(self.fake_mode)
                stack.enter_context(_gpu_checks_pass(self.device))
            if self.backend is not None:
                stack.enter_context(danet_kernels.use_backend(self.backend))
            for mode in modes:
                stack.enter_context(mode)
            if self.fake_mode is not None:
                stack.enter_context(_KernelScratch(self.device))
                stack.enter_context(_FusedOpFakes())
            yield

    def new_batch(self, batch: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (batch, 3, height, width) in the step's layout and int64 masks, as the trainer moves
        them to the device (random on real tensors; call inside :meth:`running`)."""
        if batch < 1 or height < 1 or width < 1:
            raise ValueError(f"cannot run a training step on a batch of shape ({batch}, 3, {height}, "
                             f"{width})")
        shape = (batch, 3, height, width)
        images = torch.empty(shape, device=self.device, memory_format=self.layout).normal_()
        masks = torch.randint(0, self.model.nclass, (batch, height, width), device=self.device)
        return images, masks

    def run(self, images: torch.Tensor, masks: torch.Tensor, *, amp: str | None = None) -> None:
        """danet.training.trainer.Trainer._step for one micro-batch (call inside :meth:`running`).

        ``amp`` overrides ``cfg.train.amp`` ("none", "bf16", "fp16"). With ``train.accum_steps``
        above 1 this is a later micro-step: the earlier ones' gradients are held throughout.
        """
        amp = self.cfg.train.amp if amp is None else amp
        if amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
        amp_dtype, accum = AMP_DTYPES[amp], self.cfg.train.accum_steps
        params = self.trained_parameters()
        if accum > 1:
            for param in params:
                param.grad = torch.zeros_like(param)
        with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = self.model(images)
            loss, _ = self.criterion(outputs, masks)
        if self.fake_mode is None:
            (loss / accum).backward()
        else:
            # The trainer holds its outputs and loss until the step ends; here they become detached
            # views of the same storages, so that nothing but run_backward reaches the graph.
            outputs = [o.detach() for o in outputs]
            scaled = [loss / accum]
            loss = loss.detach()
            run_backward(scaled)
        if self.cfg.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        del outputs, loss
