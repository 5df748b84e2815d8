"""The inference engine: a protocol's plan (danet.evaluation.protocols) run as batched forwards.

The engine batches the windows of an image, and their mirror images, into forwards of as many
samples as :attr:`EvalConfig.window_memory_mb` allows (the tensor memory of one window is
estimated on fake tensors, :mod:`danet.evaluation.cost`; 0 runs one window at a time), under
``torch.inference_mode``, autocast (``amp``: bf16 on CUDA by default, unless the caller runs under
an autocast of its own) and channels_last. All
windows of one image and scale have one size, so the fused attention meets one ``N`` per image
size (its kernels are tuned per ``N``).
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional
from tqdm import tqdm

from danet.config import HEAD_OUTPUTS, DataConfig, EvalConfig, check_eval_config
from danet.evaluation.cost import ForwardCost, fit_cost_model
from danet.evaluation.protocols import Stage, inference_plan
from danet.runtime import AMP_DTYPES, progress_bar

__all__ = ["estimate_inference_cost", "predict_logits", "predict_scores", "scores_of_resolved"]



# the fitted per-sample cost of a model, per inference settings (dtype, device, autocast, layout, heads)
_COST_MODELS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], Any]] = weakref.WeakKeyDictionary()


class _ModelRunner:
    """Calls the model on batches of windows of ``image_dtype`` images on ``device`` and returns the
    requested heads' logits, stacked along the channel dimension ((n, len(heads) * K, h, w), in the
    accumulation dtype: float32, as half-precision logits are summed in float32, or float64 for
    float64 images)."""

    def __init__(self, model: nn.Module, num_classes: int, heads: Sequence[str], cfg: EvalConfig,
                 image_dtype: torch.dtype, device: torch.device, bar: tqdm | None) -> None:
        self.model, self.num_classes, self.heads = model, num_classes, tuple(heads)
        self.cfg, self.bar = cfg, bar
        self.dtype = torch.promote_types(image_dtype, torch.float32)
        self.device = device
        amp = cfg.amp
        if amp == "auto":  # bf16 on CUDA, unless the caller runs under an autocast of its own
            own = device.type == "cuda" and not torch.is_autocast_enabled(device.type)
            amp = "bf16" if own else "none"
        self.autocast_dtype = AMP_DTYPES[amp]
        self.call = {} if self.heads == ("sum",) else {"head_outputs": True}

    def batch_size(self, window_shape: tuple[int, int], images: int, samples: int) -> int:
        """The forward batch for windows of ``window_shape``: as many of the ``samples`` as fit in
        the memory budget, and never fewer than the ``images`` of one window (the caller's batch).
        A model in training mode gets exactly that: its BatchNorm statistics would mix windows."""
        budget = self.cfg.window_memory_mb * 2 ** 20
        if budget == 0 or samples <= images or self.model.training:
            return images
        per_sample = self.sample_cost(window_shape)
        fits = images if per_sample is None else int(budget // max(per_sample.peak_bytes, 1.0))
        return max(images, min(samples, fits))

    def sample_cost(self, window_shape: tuple[int, int]) -> Any:
        """The estimated :class:`danet.evaluation.cost.ForwardCost` of one sample (the cost model is
        fitted once per model and settings); None when the model cannot be traced on fake tensors."""
        key = (self.dtype, self.device, self.autocast_dtype, self.cfg.channels_last, self.heads)
        per_model = _COST_MODELS.setdefault(self.model, {})
        if key not in per_model:
            try:
                per_model[key] = fit_cost_model(self.model, dtype=self.dtype, device=self.device,
                                                autocast_dtype=self.autocast_dtype,
                                                channels_last=self.cfg.channels_last, call=self.call)
            except Exception as err:  # an estimate must not stop the inference itself
                warnings.warn(f"cannot estimate the cost of a {type(self.model).__name__} forward ({err}); "
                              "windows run one at a time", stacklevel=4)
                per_model[key] = None
        cost_model = per_model[key]
        return None if cost_model is None else cost_model.estimate(1, *window_shape)

    def __call__(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The stacked logits of the samples ``x``, run ``batch_size`` at a time."""
        outputs = []
        autocast = (contextlib.nullcontext() if self.autocast_dtype is None
                    else torch.autocast(x.device.type, dtype=self.autocast_dtype))
        for start in range(0, x.shape[0], batch_size):
            batch = x[start:start + batch_size]
            if self.cfg.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast:
                output = self.model(batch, **self.call)
            outputs.append(self._checked(output, batch))
            if self.bar is not None:
                self.bar.update(batch.shape[0])
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _checked(self, output: torch.Tensor | Sequence[torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        if self.heads == ("sum",):
            # a tuple is a model in training mode: its first output is the sum
            selected = [output[0] if isinstance(output, (tuple, list)) else output]
        else:
            if not isinstance(output, (tuple, list)) or len(output) < len(HEAD_OUTPUTS):
                raise ValueError("the model did not return the (sum, pam, cam) outputs for head_outputs=True")
            selected = [output[HEAD_OUTPUTS.index(head)] for head in self.heads]
        expected = (batch.shape[0], self.num_classes, batch.shape[-2], batch.shape[-1])
        for logits in selected:
            if tuple(logits.shape) != expected:
                raise ValueError(f"model returned logits of shape {tuple(logits.shape)}, expected {expected} "
                                 f"(num_classes={self.num_classes})")
        stacked = selected[0] if len(selected) == 1 else torch.cat(selected, 1)
        return stacked.to(self.dtype).contiguous()


def _pad(x: torch.Tensor, size: tuple[int, int], values: Sequence[float] | None) -> torch.Tensor:
    """``x`` padded at the bottom and right to ``size`` with one value per channel (the release's
    pad_image: a black pixel after normalisation)."""
    pad_h, pad_w = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if pad_h <= 0 and pad_w <= 0:
        return x
    out = x.new_empty((*x.shape[:-2], max(size[0], x.shape[-2]), max(size[1], x.shape[-1])))
    for channel, value in enumerate(values):
        out[:, channel] = functional.pad(x[:, channel], (0, max(pad_w, 0), 0, max(pad_h, 0)), value=value)
    return out


def _window_averages(run: _ModelRunner, image: torch.Tensor, stage: Stage, pad_values: Sequence[float] | None,
                     transform: Callable[[torch.Tensor], torch.Tensor] | None) -> list[torch.Tensor]:
    """For each pass in ``stage.image_flips``: the per-pixel average over the windows covering it of
    ``transform(logits [+ mirrored window's logits])``, on the padded image (flipped passes stay
    flipped). ``image`` is already resized to ``stage.size``."""
    b = image.shape[0]
    sources = [_pad(image.flip(-1) if flipped else image, stage.padded, pad_values)
               for flipped in stage.image_flips]
    mirrors = 2 if stage.window_flip else 1
    batch_size = run.batch_size(stage.window_shape, b, b * stage.forwards)
    per_forward = max(1, batch_size // (b * mirrors))
    channels = len(run.heads) * run.num_classes
    sums = [image.new_zeros((b, channels, *stage.padded), dtype=run.dtype) for _ in sources]
    count = image.new_zeros((1, 1, *stage.padded), dtype=run.dtype)
    items = [(source, window) for source in range(len(sources)) for window in stage.windows]
    for start in range(0, len(items), per_forward):
        chunk = items[start:start + per_forward]
        crops = [sources[s][w.region()] for s, w in chunk]
        if stage.pad_to is not None:
            crops = [_pad(crop, (stage.pad_to, stage.pad_to), pad_values) for crop in crops]
        x = crops[0] if len(crops) == 1 else torch.cat(crops)
        if stage.window_flip:
            x = torch.cat([x, x.flip(-1)])
        out = run(x, batch_size)
        if stage.window_flip:
            half = out.shape[0] // 2
            out = out[:half] + out[half:].flip(-1)
        if transform is not None:
            out = transform(out)
        for i, (s, w) in enumerate(chunk):
            sums[s][w.region()] += out[i * b:(i + 1) * b, :, :w.height, :w.width]
    for w in stage.windows:
        count[w.region()] += 1
    return [total / count for total in sums]


def _resize(x: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    if (x.shape[-2], x.shape[-1]) == size:
        return x
    return functional.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def _danet_scores(run: _ModelRunner, images: torch.Tensor, stages: list[Stage]) -> torch.Tensor:
    size = (images.shape[-2], images.shape[-1])
    total = None
    for stage in stages:
        (average,) = _window_averages(run, _resize(images, stage.size, True), stage, None, None)
        logits = _resize(average / (2 if stage.window_flip else 1), size, True)
        total = logits if total is None else total + logits
    return total / len(stages)


def _release_scores(run: _ModelRunner, images: torch.Tensor, stages: list[Stage],
                    pad_values: Sequence[float]) -> torch.Tensor:
    size = (images.shape[-2], images.shape[-1])
    total = None
    for stage in stages:
        # the release resizes even to the same size (bilinear, align_corners=True: an exact copy)
        scaled = functional.interpolate(images, size=stage.size, mode="bilinear", align_corners=True)
        (average,) = _window_averages(run, scaled, stage, pad_values, torch.exp)
        cropped = average[:, :, :stage.size[0], :stage.size[1]]
        scores = functional.interpolate(cropped, size=size, mode="bilinear", align_corners=True)
        total = scores if total is None else total + scores
    return total


def _mmseg_scores(run: _ModelRunner, images: torch.Tensor, stages: list[Stage]) -> torch.Tensor:
    size = (images.shape[-2], images.shape[-1])
    b, heads, k = images.shape[0], len(run.heads), run.num_classes
    total, passes = None, 0
    for stage in stages:
        averages = _window_averages(run, _resize(images, stage.size, False), stage, None, None)
        for flipped, logits in zip(stage.image_flips, averages, strict=True):
            logits = _resize(logits.flip(-1) if flipped else logits, size, False)
            probs = logits.view(b, heads, k, *size).softmax(2).view(b, heads * k, *size)
            total = probs if total is None else total + probs
            passes += 1
    return total / passes


def predict_scores(model: nn.Module, images: torch.Tensor, num_classes: int, cfg: EvalConfig, *,
                   mean: Sequence[float] = DataConfig.mean, std: Sequence[float] = DataConfig.std,
                   heads: Sequence[str] = ("sum",), progress: bool = False) -> dict[str, torch.Tensor]:
    """Per-pixel class scores of ``model`` on ``images`` (B, 3, H, W, normalised), one map per head.

    Returns ``{head: (B, num_classes, H, W)}`` in float32 (float64 for float64 images); the
    prediction is the argmax over classes. The scores are the protocol's (module docstring):
    mean logits ("danet"), the sum over scales of window-averaged ``exp(logits + flipped
    logits)`` ("release"), mean probabilities ("mmseg").

    ``cfg`` is checked here (danet.config.check_eval_config); ``mean``/``std`` give the release's padding
    value; ``heads`` are names from :data:`HEAD_OUTPUTS` ("pam"/"cam" need a DANet, which is
    called with ``head_outputs=True``); ``progress`` shows a bar over the model's samples.
    ``model`` should be in eval mode (a tuple output of a model in training mode is reduced to
    its first element, and then windows are not batched).

    Raises:
        ValueError: bad settings, shapes or heads.
    """
    check_eval_config(cfg)
    return scores_of_resolved(model, images, num_classes, cfg, mean=mean, std=std, heads=heads,
                              progress=progress)


def scores_of_resolved(model: nn.Module, images: torch.Tensor, num_classes: int, cfg: EvalConfig, *,
                       mean: Sequence[float] = DataConfig.mean, std: Sequence[float] = DataConfig.std,
                       heads: Sequence[str] = ("sum",), progress: bool = False) -> dict[str, torch.Tensor]:
    """:func:`predict_scores` for a ``cfg`` that is already checked (danet.config.resolve_eval_config
    or check_eval_config ran on it): for callers that run many batches under one config.

    Raises:
        ValueError: bad shapes or heads.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    heads = tuple(heads)
    unknown = [h for h in heads if h not in HEAD_OUTPUTS]
    if not heads or unknown or len(set(heads)) != len(heads):
        raise ValueError(f"heads must be distinct names from {', '.join(HEAD_OUTPUTS)}, got {list(heads)}")
    if heads != ("sum",) and "head_outputs" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"heads {list(heads)} need a model that offers its head outputs (a DANet), "
                         f"got {type(model).__name__}")
    images = images.as_subclass(torch.Tensor)  # tv_tensors.Image would re-wrap some results
    stages = inference_plan(images.shape[-2], images.shape[-1], cfg)
    total = images.shape[0] * sum(stage.forwards for stage in stages)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        bar = stack.enter_context(progress_bar(total=total, desc="inference", unit="window", leave=False)) \
            if progress else None
        run = _ModelRunner(model, num_classes, heads, cfg, images.dtype, images.device, bar)
        if cfg.protocol == "release":
            pad_values = [-m / s for m, s in zip(mean, std, strict=True)]
            scores = _release_scores(run, images, stages, pad_values)
        elif cfg.protocol == "mmseg":
            scores = _mmseg_scores(run, images, stages)
        else:
            scores = _danet_scores(run, images, stages)
    return dict(zip(heads, scores.split(num_classes, dim=1), strict=True))


def predict_logits(model: nn.Module, images: torch.Tensor, num_classes: int, mode: str = "whole",
                   crop_size: int | None = None, stride_ratio: float = 2.0 / 3.0,
                   scales: Sequence[float] = (1.0,), flip: bool = False, *,
                   mean: Sequence[float] = DataConfig.mean, std: Sequence[float] = DataConfig.std,
                   **options: Any) -> torch.Tensor:
    """The "sum" scores (B, num_classes, H, W) of :func:`predict_scores`, settings as keywords.

    ``options`` are further :class:`~danet.config.EvalConfig` fields (``protocol``, ``stride``,
    ``base_size``, ``window_memory_mb``, ``amp``, ``channels_last``). ``amp`` defaults to "none"
    here, so that the caller's own autocast context (or its absence: fp32) decides the precision.
    With the default protocol the scores are the averaged logits.

    Raises:
        ValueError: bad mode, shapes, crop size, stride or scales.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    cfg = EvalConfig(mode=mode, crop_size=crop_size, stride_ratio=stride_ratio, scales=tuple(scales),
                     flip=flip, **{"amp": "none", **options})
    return predict_scores(model, images, num_classes, cfg, mean=mean, std=std)["sum"]


def estimate_inference_cost(model: nn.Module, height: int, width: int, num_classes: int, cfg: EvalConfig, *,
                            device: torch.device | str = "cpu", heads: Sequence[str] = ("sum",)) -> Any:
    """The estimated :class:`danet.evaluation.cost.ForwardCost` of :func:`predict_scores` on one float32
    image of ``height`` x ``width``: the FLOPs of all its forwards, and the peak tensor memory of the
    largest batched forward plus the score buffers. None when the model cannot be traced.
    ``cfg`` is checked (danet.config.resolve_eval_config or check_eval_config ran on it)."""
    run = _ModelRunner(model, num_classes, heads, cfg, torch.float32, torch.device(device), None)
    flops, peak = 0.0, 0.0
    for stage in inference_plan(height, width, cfg):
        per_sample = run.sample_cost(stage.window_shape)
        if per_sample is None:
            return None
        batch_size = run.batch_size(stage.window_shape, 1, stage.forwards)
        flops += stage.forwards * per_sample.flops
        # window sums (one per image pass), the count, the merged scores, the resized image: 4 bytes a value
        buffers = 4 * (len(heads) * num_classes * (len(stage.image_flips) + 1) + 1 + 3) * stage.padded[0] \
            * stage.padded[1]
        peak = max(peak, batch_size * per_sample.peak_bytes + buffers)
    return ForwardCost(flops, peak, extrapolated=True)
