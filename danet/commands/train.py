"""Train DANet: one process on a CPU or GPU, or many through torchrun (DDP + SyncBatchNorm).

With no arguments, ``danet train`` runs the embedded default: the ``synthetic`` preset, a tiny
backbone on generated scenes, on the CPU in a few minutes (1280 iterations, about 75 s of one
core's time), ending with a validation mIoU of about 0.76 (always predicting the background
scores 0.21).

Presets are GPU recipes, except ``synthetic``. One with a ``cpu:`` section (``folder``) uses it
on a machine without CUDA: a model and a run length that a CPU trains in minutes, said when the
run starts. On a CPU every run (with ``train.progress``, the default) first prints its estimated
time per iteration (FLOPs over this CPU's measured speed), with a warning when the whole run
would take over an hour.

    danet train                                            # CPU demo -> runs/synthetic-<time>/
    danet train --preset folder --set data.root=my_data    # your own images (on a CPU: minutes)
    danet train --preset cityscapes --set data.root=/data/cityscapes
    danet train --preset ade20k --config my.yaml --set optim.lr=0.01 train.epochs=120 train.amp=bf16
    danet train --resume runs/cityscapes-20260101-120000   # continue: same LR, same data order
    danet train --resume runs/city-20260101-120000 --set train.epochs=480 --rebase-schedule
    torchrun --standalone --nproc_per_node=4 -m danet.cli train --preset cityscapes --set data.root=...
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=host0:29500 \\
        --rdzv_id=city -m danet.cli train --preset cityscapes --set data.root=...   # on every node

Configuration: dataclass defaults (danet/config.py), then ``--preset`` (danet/configs/*.yaml,
default "synthetic"), then ``--config FILE``, then ``--set section.key=value ...`` (values in
YAML syntax); unknown keys and bad values are errors before anything runs. Multi-node
commands: see danet.distributed.

A run directory (danet.training.run_dir; created once every setting is checked, the data
found, the masks of a folder dataset read and found valid, and the model built) holds
``config.yaml``, ``metrics.jsonl`` (training loss and LR every ``train.log_interval``
iterations, every validation), ``last.pt`` (the full state, rewritten
atomically at every epoch end, every ``train.checkpoint_interval`` iterations, on SIGTERM or
Ctrl-C and at the end), ``checkpoint_best.pt`` (the best validation mIoU) and ``last_good.pt``
(the newest checkpoint that training continued from with a healthy loss).

Fitting a memory budget: ``train.batch_size`` is the global batch, split over processes and
``train.accum_steps`` (gradient accumulation; DDP syncs only on the last micro-step);
``train.amp=bf16`` (autocast) or ``fp16`` (autocast + GradScaler); ``train.channels_last``;
``train.activation_checkpointing`` (recompute backbone stages in backward); ``train.compile``.
``danet plan`` predicts a step's memory per GPU and the largest batch; on CUDA the trainer
predicts its own step before the first one and warns, naming these knobs, when it will not fit.

Failures (docs/training.md says what is guaranteed): SIGTERM (preemption) or a first Ctrl-C
finishes the current iteration, writes last.pt and exits with status 143 (130 for Ctrl-C; before
the first iteration is done there is nothing to keep: the run directory is removed again), also
when the whole process group is signalled (DataLoader workers ignore the signals) and when a
second signal arrives during that save. A NaN/Inf loss stops the run before the update (status 1)
and names the checkpoint to resume from. ``--resume`` continues in the checkpoint's own
directory with the stored config; settings that shape the LR schedule change only with
``--rebase-schedule`` (danet.training.resume). One process trains into a run directory at a
time: a second ``danet train`` into it, ``--resume`` of it or ``--overwrite`` of it is refused
at once, naming the process that holds it.

Exact resumption: the data order is a function of (seed, epoch) (DistributedSampler), each
sample's augmentation a function of (seed, epoch, index), and the other random state (dropout)
is restored from the checkpoint, which records the iteration within the epoch; a resumed run
skips the batches already done and continues bit for bit as an uninterrupted one on the CPU
(on GPUs, up to the nondeterminism of the CUDA kernels themselves).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import yaml

from danet.config import (
    DEFAULT_PRESET,
    Config,
    apply_dict,
    config_to_dict,
    cpu_variant,
    load_config,
    parse_overrides,
    runs_on_cpu,
    validate_config,
)
from danet.distributed import DistributedError
from danet.io.atomic import FileWriteError
from danet.io.checkpoint import load_training_state
from danet.training.resume import LoadedCheckpoint, check_stored_config, resolve_resume_path
from danet.training.stopping import StopFlag
from danet.training.trainer import NonFiniteLossError, train

__all__ = ["resolve_config", "run"]


def resolve_config(args: argparse.Namespace) -> tuple[Config, LoadedCheckpoint | None]:
    """The Config the command line asks for (on --resume: the checkpoint's, plus --set), and
    on --resume the checkpoint, read once (for :func:`train`).

    On --resume the stored ``train.output`` is dropped: the run continues where the checkpoint
    is, or in ``--output``.
    """
    loaded = None
    if args.resume is not None:
        if args.preset is not None or args.config is not None:
            raise ValueError("--resume continues with the checkpoint's stored config; "
                             "only --set overrides can be added")
        path = resolve_resume_path(args.resume)
        state = load_training_state(path)
        stored = state["config"]
        overrides = parse_overrides(args.overrides)
        check_stored_config(stored, overrides, path)
        cfg = apply_dict(Config(), stored)
        cfg.train.output = None  # the stored one; --set train.output may still name one
        apply_dict(cfg, overrides)
        validate_config(cfg)  # once, the stored config as --set amends it
        loaded = LoadedCheckpoint(path, state)
    else:
        if args.rebase_schedule:
            raise ValueError("--rebase-schedule applies to --resume only")
        preset = args.preset or DEFAULT_PRESET
        cfg = load_config(preset, args.config, args.overrides)
        variant = cpu_variant(preset)
        if variant is not None and runs_on_cpu(cfg.train.device) and not args.print_config:
            why = "no CUDA device" if cfg.train.device == "auto" else "train.device=cpu"
            settings = " ".join(f"{section}.{key}={str(value).lower() if isinstance(value, bool) else value}"
                                for section, values in variant.items() for key, value in values.items())
            print(f"{why}: the {preset} preset's CPU variant ({settings}; --set wins over it; on a GPU "
                  f"machine the preset's own recipe)")
    if args.output is not None:
        cfg.train.output = args.output
    return cfg, loaded


def run(args: argparse.Namespace) -> int:
    """Entry point of ``danet train``: status 0, 1 (a failure named on stderr), 130/143 (stopped)."""
    stop = StopFlag()
    with stop.handle_signals(ignore_after_stop=True):  # from the start: a SIGTERM at any time stops
        cfg, loaded = resolve_config(args)
        if args.print_config:
            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
            return 0
        try:
            result = train(cfg, resume=loaded, overwrite=args.overwrite,
                           rebase_schedule=args.rebase_schedule, stop=stop)
        except (NonFiniteLossError, DistributedError, FileWriteError) as err:
            print(f"danet train: error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # a second Ctrl-C before the stop's checkpoint
            print("danet train: interrupted; the newest checkpoint is the run's last.pt", file=sys.stderr)
            return 130
        except Exception:
            args.run_dir = cfg.train.output  # danet.cli writes an unexpected error's traceback there
            raise
    if result.stopped_early:  # the shell's status for "terminated by SIGTERM/SIGINT": 143/130
        return 128 + (result.signal_received or signal.SIGTERM)
    if result.metrics and result.run_dir and int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result.iteration} iterations; final mIoU {float(result.metrics['mIoU']):.4f}, "
              f"pixAcc {float(result.metrics['pixAcc']):.4f}, best mIoU {result.best_miou:.4f}; "
              f"outputs in {result.run_dir}")
    return 0
