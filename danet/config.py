"""Typed configuration: the one place where defaults live.

Every command (train, eval, predict, attention) reads its options from these dataclasses;
YAML presets (``danet/configs/*.yaml``) and command-line flags only override fields.
Sections:

* :class:`ModelConfig`: the network (backbone, output stride, attention implementation).
* :class:`DataConfig`: the dataset and its transforms.
* :class:`EvalConfig`: inference mode (whole, sliding, multi-scale).
* the training sections (optimiser, schedule, run, distributed) are defined below them.

Every Config that :func:`load_config` or :func:`config_from_dict` builds is checked whole by
:func:`validate_config` (names of backbones, datasets, policies, ..., and value ranges), so
``--print-config`` refuses what training would refuse. The range of every numeric setting is
:data:`RANGES` (signs, finiteness, and bounds derived from this machine where that is the
honest limit: worker processes and threads from its CPUs, image sizes and sample counts from
its memory); the command line's numeric flags are checked against the same table when they are
parsed (danet/cli.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

# ------------------------------------------------------------------------------ choices
# The names the command line offers and the modules share: defined here, torch-free, so that
# `danet --help` answers without importing torch (danet/cli.py).

OUTPUT_STRIDES: tuple[int, ...] = (8, 16)
"""The dilated backbone's output strides (``model.output_stride``)."""
ATTENTIONS: tuple[str, ...] = ("fused", "reference")
"""Attention implementations: danet_kernels' fused kernels, or the reference bmm modules."""
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
"""Where a command runs: "auto" is CUDA when available."""
LR_POLICIES: tuple[str, ...] = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")
"""Learning-rate policies, Caffe's set (danet.training.schedules)."""

INFERENCE_PROTOCOLS: tuple[str, ...] = ("danet", "release", "mmseg")
"""Evaluation protocols (docs/evaluation.md): ours, the DANet release's, mmsegmentation's."""
INFERENCE_MODES: tuple[str, ...] = ("whole", "sliding", "multiscale")
"""Inference modes: the whole image, sliding windows, several scales (with sliding windows)."""
INFERENCE_AMP: tuple[str, ...] = ("auto", "none", "bf16", "fp16")
"""Autocast for inference: "auto" is bf16 on CUDA and none on the CPU."""
HEAD_OUTPUTS: tuple[str, ...] = ("sum", "pam", "cam")
"""DANet's head outputs, in the order the original head returns them."""
PREDICT_FORMATS: tuple[str, ...] = ("palette", "cityscapes")
"""``danet predict`` outputs: palette masks and overlays, or Cityscapes label-id PNGs."""
EXPORT_FORMATS: tuple[str, ...] = ("onnx", "torch-export")
"""``danet export`` formats."""
AMP_MODES: tuple[str, ...] = ("none", "bf16", "fp16")
"""Training autocast (``train.amp``): fp16 adds a GradScaler."""
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
"""``optim.name``."""
MATMUL_PRECISIONS: tuple[str, ...] = ("highest", "high", "medium")
"""``train.matmul_precision``: torch.set_float32_matmul_precision's settings."""


# ------------------------------------------------------------------------------ the machine's limits
# Where a setting's honest upper bound is a property of the machine, it is read here (os only,
# no torch) when a config is checked: a config valid on a large server may be refused on a
# laptop, with a message naming the setting and the limit (give a smaller one with --set).

MAX_WORKERS_PER_CPU = 4
"""DataLoader worker processes per usable CPU (torch itself suggests at most one; data read from
a network file system can use a few more while they wait)."""
BYTES_PER_PIXEL = 12
"""One float32 RGB copy of an image: the least memory a pixel costs any run (the network's
activations cost many times more)."""
BYTES_PER_SAMPLE = 64
"""An epoch's shuffled order per training sample: torch.randperm's int64 and a Python list entry."""
MAX_SCALE = 10.0
"""The largest test-time or training scale factor: above it every pixel becomes more than a 10 x 10
block and the cost grows more than 100-fold (the release and mmsegmentation use at most 2)."""
MAX_TIMEOUT_S = 7 * 24 * 3600.0
"""``dist.timeout_s``: a week; torch converts it to milliseconds, and no collective should wait longer."""
FLOAT32_MAX = 3.4028234663852886e38
"""The LR multiplies float32 parameters: an LR beyond float32's range cannot be applied at all."""
MAX_SEED = 2**31 - 1
"""Seeds are offset by the process rank and must stay within numpy's 32-bit seeds."""


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; the CPU count where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def memory_bytes() -> int:
    """The memory this process may use: the machine's physical memory, or its cgroup's limit
    when that is lower (containers, Slurm jobs)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        total = 1 << 40  # unknown (not POSIX): no machine bound to speak of
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def max_image_pixels() -> int:
    """The most pixels one image may have here: one float32 RGB copy must fit in memory."""
    return memory_bytes() // BYTES_PER_PIXEL


def max_image_side() -> int:
    """The longest side of a square image here (:func:`max_image_pixels`)."""
    return math.isqrt(max_image_pixels())


def max_samples() -> int:
    """The most samples an epoch may have here: its shuffled order must fit in memory."""
    return memory_bytes() // BYTES_PER_SAMPLE


def _memory() -> str:
    return f"{memory_bytes() / 2**30:.1f} GiB"


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric setting: finite, ``low <= value <= high`` (``<`` where open).

    ``high`` may be a function of the machine (evaluated when a value is checked); ``why`` says
    where it comes from, in the message that refuses a value above it.
    """

    low: float | None = None
    high: float | Callable[[], float] | None = None
    low_open: bool = False
    high_open: bool = False
    why: str | Callable[[], str] = ""

    @staticmethod
    def _shown(number: float) -> str:
        whole = isinstance(number, int) or (abs(number) < 1e15 and float(number).is_integer())
        return str(int(number)) if whole else f"{number:g}"

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` ("must be >= 1, got 0"), None when it is valid."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        high = self.high() if callable(self.high) else self.high
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = high is not None and (value >= high if self.high_open else value > high)
        if not (below or above):
            return None
        why = self.why() if callable(self.why) else self.why
        if self.low is not None and high is not None and not why:
            brackets = ("(" if self.low_open else "[", ")" if self.high_open else "]")
            return (f"must be in {brackets[0]}{self._shown(self.low)}, {self._shown(high)}{brackets[1]}, "
                    f"got {value!r}")
        if below:
            return f"must be {'>' if self.low_open else '>='} {self._shown(self.low)}, got {value!r}"
        limit = "below" if self.high_open else "at most"
        return f"must be {limit} {self._shown(high)} ({why}), got {value!r}"


def _cpu_why(per_cpu: int) -> Callable[[], str]:
    def why() -> str:
        cpus = usable_cpus()
        each = f"{per_cpu} per CPU, " if per_cpu > 1 else "one per CPU: "
        return f"{each}this process may use {cpus} CPU{'s' if cpus > 1 else ''}"
    return why


_SIDE = Range(1, lambda: max_image_side(),
              why=lambda: f"a float32 RGB image of that side must fit in this machine's {_memory()}")
_COUNT = Range(1, lambda: max_samples(),
               why=lambda: f"an epoch's shuffled order takes {BYTES_PER_SAMPLE} bytes per sample of "
                           f"this machine's {_memory()}")
_NON_NEGATIVE = Range(0)
_AT_LEAST_ONE = Range(1)

RANGES: dict[str, Range] = {
    "data.base_size": _SIDE,
    "data.crop_size": _SIDE,
    "data.image_size": _SIDE,
    "data.ignore_index": Range(0, 255),  # masks are 8-bit images
    "data.workers": Range(0, lambda: MAX_WORKERS_PER_CPU * usable_cpus(), why=_cpu_why(MAX_WORKERS_PER_CPU)),
    # images are scaled to [0, 1] before they are normalised (mmsegmentation's 0-255 values / 255)
    "data.mean": Range(0, 1),
    "data.std": Range(0, 1, low_open=True),
    "data.scale_range": Range(0, MAX_SCALE, low_open=True),
    "data.train_samples": _COUNT,
    "data.val_samples": _COUNT,
    "eval.crop_size": _SIDE,
    "eval.stride_ratio": Range(0, 1, low_open=True),
    "eval.stride": _SIDE,
    "eval.scales": Range(0, MAX_SCALE, low_open=True),
    "eval.base_size": _SIDE,
    "eval.batch_size": _AT_LEAST_ONE,
    "eval.window_memory_mb": _NON_NEGATIVE,
    "optim.lr": Range(0, FLOAT32_MAX, why="the largest float32"),
    "optim.momentum": Range(0, 1, high_open=True),  # 1 never forgets a gradient
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.head_lr_mult": _NON_NEGATIVE,
    "optim.grad_clip": _NON_NEGATIVE,  # 0: no clipping
    "schedule.power": _NON_NEGATIVE,  # poly and inv: a negative power raises the LR (poly: 0 ** -p)
    "schedule.gamma": Range(),  # its sign and size depend on the policy: check_schedule
    "schedule.step_size": _NON_NEGATIVE,
    "schedule.milestones": _AT_LEAST_ONE,
    "schedule.warmup_iters": _NON_NEGATIVE,
    "schedule.warmup_start_factor": Range(0, 1, low_open=True),
    "loss.weights": _NON_NEGATIVE,
    "loss.aux_weight": _NON_NEGATIVE,
    "train.epochs": _AT_LEAST_ONE,
    "train.iters": _AT_LEAST_ONE,
    "train.batch_size": _AT_LEAST_ONE,
    "train.accum_steps": _AT_LEAST_ONE,
    "train.threads": Range(0, lambda: usable_cpus(), why=_cpu_why(1)),  # 0: torch's default
    "train.seed": Range(0, MAX_SEED, why="offset by the process rank, seeds stay within numpy's 32 bits"),
    "train.val_interval": _NON_NEGATIVE,
    "train.checkpoint_interval": _NON_NEGATIVE,
    "train.log_interval": _NON_NEGATIVE,
    "dist.timeout_s": Range(0, MAX_TIMEOUT_S, low_open=True, why="a week"),
    # command-line flags that set no config field (danet/cli.py)
    "predict.alpha": Range(0, 1),
    "predict.max_whole_pixels": _NON_NEGATIVE,  # 0: no limit
    "attention.num_channels": _AT_LEAST_ONE,
    "attention.channels": _NON_NEGATIVE,
    "attention.points": _NON_NEGATIVE,
    "export.size": _SIDE,
    # danet plan predicts for other machines (GPUs): no bound from this one
    "plan.size": _AT_LEAST_ONE,
    "plan.batch": _AT_LEAST_ONE,
    "plan.gpus": _AT_LEAST_ONE,
    "plan.classes": _AT_LEAST_ONE,
    "plan.memory": Range(0, low_open=True),  # GB; above the CUDA context's reserve: danet.commands.plan
}
"""The valid values of every numeric setting (each element of a tuple setting) and of the
command line's numeric flags that set no config field; a test checks that every numeric field
of :class:`Config` has an entry. Cross-field rules (low <= high, stride <= crop,
policy-dependent ones) are in :func:`validate_config`."""


def check_value(key: str, value: Any, *, name: str | None = None) -> None:
    """Raise ValueError if ``value`` is outside ``key``'s :data:`RANGES` (each element of a tuple).

    ``name``: how the message names the setting (default ``key``).
    """
    name = name or key
    values = value if isinstance(value, (tuple, list)) else (value,)
    for element in values:
        problem = None if element is None else RANGES[key].problem(element)
        if problem is not None:
            where = "" if len(values) == 1 else f" (in {list(values)})"
            raise ValueError(f"{name} {problem}{where}")


# ------------------------------------------------------------------------------ the configuration


@dataclass
class ModelConfig:
    """The network: DANet on a dilated ResNet.

    The defaults are the published model, the one definition of it: the release's DANet-101
    (``DANet101.pth.tar``, Cityscapes), a ResNet-101 with the standard 7x7 stem at output stride
    8 with multi-grid (4, 8, 16). The named models (danet.models.MODELS, the hub entry points)
    and the release's checkpoint loader start from it.
    """

    backbone: str = "resnet101"  # danet.models.BACKBONES; "resnet101s": Encoding's 64-64-128 deep stem
    output_stride: int = 8
    multi_grid: bool = True  # last-stage dilations x (1, 2, 4): (4, 8, 16) at output stride 8
    attention: str = "fused"  # "fused" (danet_kernels) or "reference" (bmm modules)
    aux: bool = False  # auxiliary FCN head on the third stage
    pretrained_backbone: str | None = None  # ImageNet weights: a local file, or "timm" / "timm:<tag>"
    pretrained: str | None = None  # training only: a checkpoint whose weights start a new run


@dataclass
class DataConfig:
    """The dataset and its transforms."""

    dataset: str = "synthetic"
    root: str | None = None
    base_size: int = 520
    crop_size: int = 480
    ignore_index: int = 255
    workers: int = 2
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    scale_range: tuple[float, float] = (0.5, 2.0)  # training random scale, x base_size (published)
    train_samples: int | None = None  # use only the first N training images (synthetic: generate N)
    val_samples: int | None = None  # likewise for the validation split
    image_size: int = 64  # generated datasets ("synthetic") only: side of the square scenes


@dataclass
class EvalConfig:
    """How validation and ``danet eval`` run inference."""

    protocol: str = "danet"  # "danet" (ours), "release" (the DANet release's), "mmseg"; docs/evaluation.md
    mode: str = "whole"  # "whole", "sliding" or "multiscale"
    crop_size: int | None = None  # sliding-window crop; None: DataConfig.crop_size
    stride_ratio: float = 2.0 / 3.0  # the published sliding stride: 2/3 of the crop
    stride: int | None = None  # window stride in pixels (mmseg: 513 for 769 crops); None: crop * stride_ratio
    scales: tuple[float, ...] = (0.75, 1.0, 1.25, 1.5, 1.75, 2.0)  # "multiscale": x the image's own size
    base_size: int | None = None  # protocol "release": scales are x base_size (long side); None: DataConfig's
    flip: bool = True
    batch_size: int = 1
    window_memory_mb: int = 4096  # batch windows and flips up to this estimated tensor memory; 0: one by one
    amp: str = "auto"  # "auto" (bf16 on CUDA, none on the CPU), "none", "bf16", "fp16"
    channels_last: bool = True
    checkpoint: str | None = None


# ---------------------------------------------------------------------------------------------
# Training sections, the top-level Config, YAML presets and command-line overrides.
# ---------------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    """The optimiser. The head (everything outside the backbone) trains at ``head_lr_mult`` x LR."""

    name: str = "sgd"  # "sgd" or "adamw"
    lr: float = 0.01  # base LR of the backbone group
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = False
    weight_decay: float = 1e-4
    head_lr_mult: float = 10.0  # the published recipe trains the randomly initialised head at 10x
    grad_clip: float = 0.0  # max global gradient norm; 0 disables clipping


@dataclass
class ScheduleConfig:
    """The learning-rate policy (Caffe's set), stepped once per optimiser iteration.

    Which fields a policy reads: step: gamma, step_size; exp: gamma; inv: gamma, power;
    multistep: gamma, milestones; poly: power; sigmoid: gamma, step_size; fixed: none.
    A linear warm-up from ``warmup_start_factor`` x LR to the LR takes the first ``warmup_iters``
    iterations; the policy then starts from its own iteration 0 (see danet.training.schedules).
    """

    policy: str = "poly"  # fixed, step, exp, inv, multistep, poly, sigmoid
    power: float = 0.9
    gamma: float = 0.1
    step_size: int = 1000  # iterations
    milestones: tuple[int, ...] = ()  # iterations
    warmup_iters: int = 0
    warmup_start_factor: float = 0.1


@dataclass
class LossConfig:
    """Cross entropy on each DANet output; the ignore label is ``DataConfig.ignore_index``."""

    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # (sum, PAM, CAM) outputs
    aux_weight: float = 0.4  # auxiliary FCN head, used when ModelConfig.aux is on


@dataclass
class TrainConfig:
    """The run: length, batch, precision and memory knobs, logging and checkpoints."""

    epochs: int = 240
    iters: int | None = None  # total optimiser iterations; overrides epochs when set
    batch_size: int = 8  # GLOBAL batch per optimiser step (all processes x accumulation steps)
    accum_steps: int = 1  # gradient accumulation: micro-batches per optimiser step
    amp: str = "none"  # AMP_MODES: "none", "bf16" (autocast) or "fp16" (autocast + GradScaler)
    # torch.set_float32_matmul_precision for fp32 work: "highest" (exact, torch's default), "high"
    # (the attention kernels run 3xTF32 on tensor cores at fp32's error; torch's matmuls TF32),
    # "medium" (plain TF32). See README, "Training".
    matmul_precision: str = "highest"
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute backbone stages in backward to save memory
    sync_bn: bool = True  # SyncBatchNorm under DDP on CUDA (plain BN, with a warning, elsewhere)
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda"
    threads: int = 1  # CPU threads of the main process; 0: torch's default (one per core); danet/runtime.py
    seed: int = 0
    output: str | None = None  # run directory; None: runs/<name>-<UTC timestamp>
    val_interval: int = 1  # validate every N epochs (and always at the end); 0: only at the end
    checkpoint_interval: int = 1000  # also write last.pt every N iterations (besides epoch ends)
    log_interval: int = 10  # iterations between metrics.jsonl records of the training loss
    progress: bool = True  # tqdm progress bars
    tensorboard: bool = False  # also log to TensorBoard (when the tensorboard package is installed)


@dataclass
class DistConfig:
    """Multi-process runs (torchrun): how long a process waits for the others."""

    # seconds a collective (all-reduce, barrier) waits before the run fails naming the rank that
    # stopped answering; torch's own default is 30 minutes
    timeout_s: float = 300.0


@dataclass
class Config:
    """Everything one run needs; ``dataclasses.asdict`` of it is stored in every checkpoint."""

    name: str = "synthetic"  # run name: the default run directory is runs/<name>-<timestamp>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)


# a run directory is runs/<name>-YYYYmmdd-HHMMSS[-N]: one path component of at most 255 bytes
# (-N tells apart runs started in the same second, up to -9999)
_MAX_NAME_BYTES = 255 - len("-20260101-120000") - len("-9999")

PRESETS_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_PRESET = "synthetic"  # what `danet train` runs with no arguments: a CPU demo in minutes


def available_presets() -> list[str]:
    """Names of the YAML presets shipped in ``danet/configs``."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """Path of the preset ``name``; ValueError naming the available presets if it does not exist."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(available_presets())}")
    return path


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field's type (YAML gives lists for tuples, ints for floats)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{key}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if annotation is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads "1e-4" as a string: accept it
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation in (bool, str):
        if isinstance(value, annotation):
            return value
    else:  # pragma: no cover - every field uses the types above
        raise TypeError(f"{key}: unsupported field type {annotation!r}")
    raise ValueError(f"{key}: expected {annotation.__name__}, got {value!r}")


def _merge(section: Any, values: Mapping[str, Any], prefix: str = "") -> None:
    """Write ``values`` (a nested mapping) into the dataclass ``section`` in place, strictly."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = get_type_hints(type(section))
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(f"{prefix}{k}" for k in hints)
            raise ValueError(f"unknown config key {name!r}; known keys here: {known}")
        current = getattr(section, key)
        if is_dataclass(current):
            _merge(current, value, f"{name}.")
        else:
            setattr(section, key, _coerce(value, hints[key], name))


def apply_dict(cfg: Config, values: Mapping[str, Any]) -> Config:
    """Override fields of ``cfg`` from a nested mapping (as read from YAML); returns ``cfg``."""
    _merge(cfg, values or {})
    return cfg


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``["optim.lr=0.01", "train.amp=bf16"]`` into a nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        *parents, leaf = key.strip().split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with an earlier override of {part!r}")
        try:
            node[leaf] = _load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            if problem.startswith("duplicate key"):
                raise ValueError(f"override {key.strip()}={raw}: {problem}") from None
            raise ValueError(f"override {key.strip()}={raw}: the value is not valid YAML ({problem}); "
                             "quote lists and strings, e.g. --set 'data.scale_range=[0.5, 2.0]'") from None
    return nested


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (it would keep the last
    silently: ``optim: {lr: 0.5, lr: 0.02}`` trains at 0.02)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults" merges, on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: PyYAML's own error says so
                break
            line = key_node.start_mark.line + 1
            if repeated:
                where = f"line {line}" if seen[key] == line else f"lines {seen[key]} and {line}"
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} ({where}; YAML would keep the last one silently): "
                    "remove one", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (:class:`_UniqueKeyLoader`)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file (a mapping of sections); clear errors for a missing or bad file,
    and for a key given twice."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = _load_yaml(path.read_text()) or {}
    except yaml.constructor.ConstructorError as err:
        if err.problem and err.problem.startswith("duplicate key"):
            raise ValueError(f"{path}: {err.problem}") from None
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    return data


CPU_VARIANT = "cpu"
"""A preset's section that replaces some of its settings when the run will be on a CPU (see load_config)."""


def cpu_variant(preset: str) -> dict[str, Any] | None:
    """The ``cpu:`` section of ``preset`` (what it changes on a machine without CUDA), or None."""
    return read_yaml(preset_path(preset)).get(CPU_VARIANT)


def runs_on_cpu(device: str) -> bool:
    """Whether ``train.device`` ``device`` means the CPU here ("auto": when CUDA is not available)."""
    if device != "auto":
        return device == "cpu"
    import torch  # lazy: start-up time (`danet --help` reads this module)

    return not torch.cuda.is_available()


def _sets(values: Mapping[str, Any], section: str, key: str) -> bool:
    """Whether the nested mapping ``values`` gives ``section.key`` a value other than None."""
    inner = values.get(section)
    return isinstance(inner, Mapping) and inner.get(key) is not None


def load_config(
    preset: str | None = DEFAULT_PRESET,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """Build a Config: dataclass defaults, then the preset, then ``config_file``, then ``overrides``.

    ``preset=None`` skips presets (pure dataclass defaults). Later sources win; every key is
    checked against the dataclasses, so a typo is a ValueError, not a silently ignored setting.

    A preset written for GPUs may carry a ``cpu:`` section (:data:`CPU_VARIANT`): when the run
    will be on a CPU (``train.device`` cpu, or auto on a machine without CUDA, as the file and
    the overrides set it), its settings are applied right after the preset's own, so that the
    config file and the overrides still win over them; its ``model`` section is skipped when
    they give ``model.pretrained_backbone`` (weights for the preset's own backbone).
    """
    cfg = Config()
    file_values = read_yaml(config_file) if config_file is not None else {}
    override_values = parse_overrides(overrides)
    if preset is not None:
        preset_values = read_yaml(preset_path(preset))
        variant = preset_values.pop(CPU_VARIANT, None)
        apply_dict(cfg, preset_values)
        if variant is not None:
            device = next((values["train"]["device"] for values in (override_values, file_values)
                           if isinstance(values.get("train"), Mapping) and "device" in values["train"]),
                          cfg.train.device)
            if runs_on_cpu(str(device)):
                if _sets(file_values, "model", "pretrained_backbone") or \
                        _sets(override_values, "model", "pretrained_backbone"):
                    variant = {k: v for k, v in variant.items() if k != "model"}  # weights for the preset's
                apply_dict(cfg, variant)
    apply_dict(cfg, file_values)
    apply_dict(cfg, override_values)
    validate_config(cfg)
    return cfg


def _choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _check_section(section: Any, prefix: str, name_prefix: str | None = None) -> None:
    """Every field of ``section`` that :data:`RANGES` knows (as ``prefix + field``), checked."""
    name_prefix = prefix if name_prefix is None else name_prefix
    for name in get_type_hints(type(section)):
        if prefix + name in RANGES:
            check_value(prefix + name, getattr(section, name), name=name_prefix + name)


def validate_config(cfg: Config) -> None:
    """Check every field whose valid values are known without the data: names and ranges.

    Raises:
        ValueError: naming the first bad field, its value and what it may be.
    """
    # lazy: start-up time. The registries import torch and timm; `danet --help` reads this module.
    from danet.data import DATASETS
    from danet.models.backbone import BACKBONES

    m, d, o = cfg.model, cfg.data, cfg.optim
    if not cfg.name or "/" in cfg.name or len(cfg.name.encode()) > _MAX_NAME_BYTES:
        raise ValueError(f"name must be 1 to {_MAX_NAME_BYTES} bytes without '/' (it names the run "
                         f"directory runs/<name>-<time>), got {len(cfg.name.encode())} bytes: "
                         f"{cfg.name[:40]!r}...")
    _choice("model.backbone", m.backbone, list(BACKBONES))
    _choice("model.output_stride", m.output_stride, OUTPUT_STRIDES)
    _choice("model.attention", m.attention, ATTENTIONS)
    _choice("data.dataset", d.dataset, list(DATASETS))
    for section in ("data", "optim", "loss", "train", "dist"):
        _check_section(getattr(cfg, section), f"{section}.")
    low, high = d.scale_range
    if not low <= high:
        raise ValueError(f"data.scale_range must satisfy 0 < low <= high, got {list(d.scale_range)}")
    if int(d.base_size * low) < 2:  # torchvision's antialiased resize of 8-bit images fails at 1 x 1
        raise ValueError(f"data.scale_range's low end x data.base_size must be at least 2 pixels, got "
                         f"{low:g} x {d.base_size} = {d.base_size * low:g}")
    check_value("data.base_size", math.ceil(d.base_size * high),
                name="data.base_size x data.scale_range's high end")
    if o.lr * o.head_lr_mult > FLOAT32_MAX:
        raise ValueError(f"optim.lr x optim.head_lr_mult (the head's LR) must be at most {FLOAT32_MAX:g} "
                         f"(the largest float32), got {o.lr:g} x {o.head_lr_mult:g}")
    if not any(cfg.loss.weights) and not (m.aux and cfg.loss.aux_weight > 0):
        raise ValueError(f"loss.weights are all 0 (and no auxiliary loss): nothing would be trained, "
                         f"got {list(cfg.loss.weights)}")
    resolve_eval_config(cfg.eval, d, prefix="eval.")  # as validation and danet eval will run it
    _choice("optim.name", o.name, OPTIMIZERS)
    check_schedule(cfg.schedule)
    _choice("train.amp", cfg.train.amp, AMP_MODES)
    _choice("train.matmul_precision", cfg.train.matmul_precision, MATMUL_PRECISIONS)
    _choice("train.device", cfg.train.device, DEVICES)


def check_schedule(cfg: ScheduleConfig) -> None:
    """Raise ValueError naming the first bad setting of the LR schedule that needs no run length
    (danet.training.schedules.validate_schedule adds those that do)."""
    if cfg.policy not in LR_POLICIES:
        raise ValueError(f"unknown LR policy {cfg.policy!r}: schedule.policy must be one of "
                         f"{', '.join(LR_POLICIES)}")
    _check_section(cfg, "schedule.")
    if cfg.policy == "step" and cfg.step_size < 1:
        raise ValueError(f"schedule.step_size must be >= 1 for the step policy, got {cfg.step_size}")
    if cfg.policy == "multistep" and list(cfg.milestones) != sorted(set(cfg.milestones)):
        raise ValueError(f"schedule.milestones must be strictly increasing, got {list(cfg.milestones)}")
    if cfg.policy == "inv" and cfg.gamma < 0:
        raise ValueError(f"schedule.gamma must be >= 0 for the inv policy, got {cfg.gamma}")
    if cfg.policy in ("step", "exp", "multistep") and not 0 < cfg.gamma <= 1:
        # a decay factor: <= 0 gives LR 0 or a negative LR (gradient ascent); > 1 makes the LR grow
        raise ValueError(f"schedule.gamma must be in (0, 1] for the {cfg.policy} policy (the factor the LR "
                         f"is multiplied by), got {cfg.gamma}")


def check_eval_config(cfg: EvalConfig, *, prefix: str = "") -> None:
    """Raise ValueError naming the first bad field of a resolved EvalConfig (:func:`resolve_eval_config`).

    ``prefix`` (``"eval."`` in :func:`validate_config`) names the fields as keys of a Config.
    """
    for what, name, value, allowed in (("evaluation protocol", "protocol", cfg.protocol, INFERENCE_PROTOCOLS),
                                       ("inference mode", "mode", cfg.mode, INFERENCE_MODES),
                                       ("amp", "amp", cfg.amp, INFERENCE_AMP)):
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}: {prefix}{name} must be one of {', '.join(allowed)}")
    needs_crop = cfg.mode != "whole" or cfg.protocol == "release"
    if needs_crop and (cfg.crop_size is None or cfg.crop_size < 1):
        raise ValueError(f"mode {cfg.mode!r} (protocol {cfg.protocol!r}) needs a {prefix}crop_size >= 1, "
                         f"got {cfg.crop_size}")
    if cfg.mode == "multiscale" and not cfg.scales:
        raise ValueError(f"{prefix}scales must be a non-empty list of positive numbers, "
                         f"got {list(cfg.scales)}")
    _check_section(cfg, "eval.", prefix)
    if cfg.stride is not None and cfg.crop_size is not None and cfg.stride > cfg.crop_size:
        raise ValueError(f"{prefix}stride must be between 1 and the crop size {cfg.crop_size}, "
                         f"got {cfg.stride}")
    if cfg.protocol == "release" and (cfg.base_size is None or cfg.base_size < 1):
        raise ValueError(f"protocol 'release' needs a {prefix}base_size >= 1, got {cfg.base_size}")
    if cfg.mode == "multiscale" and cfg.base_size is not None:
        check_value("eval.base_size", math.ceil(cfg.base_size * max(cfg.scales)),
                    name=f"{prefix}base_size x the largest of {prefix}scales")


def resolve_eval_config(cfg: EvalConfig, data: DataConfig | None = None, *, prefix: str = "") -> EvalConfig:
    """A checked copy of ``cfg`` with ``crop_size`` and ``base_size`` filled from ``data`` when None
    (``prefix``: see :func:`check_eval_config`)."""
    data = data or DataConfig()
    resolved = replace(cfg, crop_size=cfg.crop_size if cfg.crop_size is not None else data.crop_size,
                       base_size=cfg.base_size if cfg.base_size is not None else data.base_size,
                       scales=tuple(cfg.scales))
    check_eval_config(resolved, prefix=prefix)
    return resolved


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of ``cfg`` (tuples as lists), fit for YAML and checkpoints."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(asdict(cfg))


def config_from_dict(values: Mapping[str, Any]) -> Config:
    """Rebuild a Config from :func:`config_to_dict` output (e.g. a checkpoint's "config"), checked."""
    cfg = apply_dict(Config(), values)
    validate_config(cfg)
    return cfg


def missing_keys(values: Mapping[str, Any], section: Any = None, prefix: str = "") -> list[str]:
    """The dotted keys of Config that the nested mapping ``values`` does not set."""
    section = Config() if section is None else section
    missing = []
    for key in get_type_hints(type(section)):
        current = getattr(section, key)
        inner = values.get(key) if isinstance(values, Mapping) else None
        if is_dataclass(current):
            missing += missing_keys(inner if isinstance(inner, Mapping) else {}, current, f"{prefix}{key}.")
        elif not isinstance(values, Mapping) or key not in values:
            missing.append(f"{prefix}{key}")
    return missing
