"""Distributed training through torchrun: process group, DDP, SyncBatchNorm, sharded sampling.

The trainer runs as one process per GPU; ``torchrun`` starts them and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, which
:func:`setup_distributed` reads. Without them (plain ``danet train``) the run is a single process.

One node, 4 GPUs::

    torchrun --standalone --nproc_per_node=4 -m danet.cli train --preset cityscapes \\
        --set data.root=/data/cityscapes

Two nodes with 8 GPUs each (run on every node; ``host0`` is any one of them)::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=danet-city --rdzv_backend=c10d \\
        --rdzv_endpoint=host0:29500 -m danet.cli train --preset cityscapes --set data.root=/data/cityscapes

(or with a static master: ``--nnodes=2 --node_rank=<0|1> --master_addr=host0 --master_port=29500``).
Two CPU processes (gloo, as the tests run them): ``OMP_NUM_THREADS=1 torchrun --standalone
--nproc_per_node=2 -m danet.cli train --set train.device=cpu``.
The configured ``train.batch_size`` is the global batch: it is split over the processes (and the
gradient-accumulation steps), so the same preset trains the same recipe on 1 GPU or 16.

Backends: NCCL on CUDA, gloo on the CPU. SyncBatchNorm needs CUDA; where it cannot sync
(gloo / CPU) each process keeps plain BatchNorm over its own micro-batch, with a warning.
Only rank 0 writes logs and checkpoints; metrics are all-reduced across ranks.

A process that stops answering (frozen, deadlocked, its machine gone) would hold the others
for torch's default 30 minutes. Collectives here wait ``dist.timeout_s`` seconds (default 300;
the first step of a large model, or validation on one rank, must fit in it). Every process
records what it is starting (step N, validation, saving) in the process group's key-value
store (:class:`Progress`), so the one that times out names the rank that stopped answering
and where it was. (On NCCL, torch's watchdog may end the processes itself on a timeout; its
own log names the collective.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler
from torch.utils.data.distributed import DistributedSampler

from danet.io.atomic import process_alive

_CPU = torch.device("cpu")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job: its rank, the job size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = _CPU

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part (a process group is initialised)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes logs and checkpoints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: this process's GPU when CUDA is available, else the CPU; ``"cpu"``/``"cuda"``."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup_distributed(device_preference: str = "auto", timeout_s: float = 300.0) -> DistributedContext:
    """Read torchrun's environment, pick the device and, for several processes, join the group.

    ``timeout_s``: how long a collective waits for the other processes (``dist.timeout_s``).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup_distributed() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def convert_batchnorm(model: nn.Module, ctx: DistributedContext, sync_bn: bool) -> nn.Module:
    """SyncBatchNorm for a multi-process CUDA run; elsewhere BN stays per process (warned about).

    The converted layers keep the same Parameter objects, but build the optimiser afterwards anyway.
    """
    if not (ctx.distributed and sync_bn):
        return model
    if ctx.device.type != "cuda":
        if ctx.is_main:  # once per job, not once per process
            warnings.warn(
                "SyncBatchNorm needs CUDA; on this backend each process normalises its own micro-batch "
                "with plain BatchNorm", stacklevel=2,
            )
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap_ddp(model: nn.Module, ctx: DistributedContext) -> nn.Module:
    """DistributedDataParallel around ``model`` in a multi-process run; ``model`` itself otherwise."""
    if not ctx.distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over all processes (identity in a single process); returns the tensor."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class DistributedError(RuntimeError):
    """Another process of the job failed; the message names it (one line)."""


class DistributedTimeoutError(DistributedError):
    """Another process stopped answering within ``dist.timeout_s``; the message names it."""


class PeerGoneError(DistributedError):
    """Another process of the job is gone (killed, crashed, its machine lost); the message names it."""


def is_timeout(err: BaseException) -> bool:
    """Whether ``err`` is a collective's timeout (gloo: "Timed out waiting", NCCL: "timeout")."""
    return isinstance(err, RuntimeError) and re.search(r"timed? ?out", str(err), re.IGNORECASE) is not None


_PEER_GONE = re.compile(r"connection (reset|closed|refused)|broken pipe|socket (closed|error)|"
                        r"end of file|communicator was aborted|remote process exited", re.IGNORECASE)


def is_peer_gone(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another process went away (gloo: "Connection
    reset by peer", "Connection closed by peer"; NCCL: an aborted communicator)."""
    return isinstance(err, RuntimeError) and _PEER_GONE.search(str(err)) is not None


class Progress:
    """What every process last started, and whether it still lives, in the process group's store,
    to name a stalled or vanished rank.

    ``mark("step 12")`` costs one small write to the store (rank 0's or torchrun's); a daemon
    thread writes a heartbeat (host, PID, time) every ``HEARTBEAT_S`` seconds, which stops when
    the process is stopped, frozen or gone. With one process it does nothing.
    """

    _KEY = "danet/progress/{rank}"
    _ALIVE = "danet/alive/{rank}"
    HEARTBEAT_S = 2.0
    SILENT_AFTER = 3  # heartbeats missed before a rank counts as silent

    def __init__(self, ctx: DistributedContext) -> None:
        self.ctx, self.count = ctx, 0
        self.store = None
        self._stopped = threading.Event()
        if ctx.distributed and dist.is_initialized():
            try:
                self.store = dist.distributed_c10d._get_default_store()
            except (AttributeError, RuntimeError, ValueError):  # pragma: no cover - a torch without it
                self.store = None
        self.mark("start")
        if self.store is not None:
            self._beat()
            threading.Thread(target=self._heartbeat, name="danet-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        record = json.dumps([socket.gethostname(), os.getpid(), time.time()])
        self.store.set(self._ALIVE.format(rank=self.ctx.rank), record)  # type: ignore[union-attr]

    def _heartbeat(self) -> None:
        while not self._stopped.wait(self.HEARTBEAT_S):
            try:
                self._beat()
            except Exception:  # the store is gone (the job is ending): nothing left to tell
                return

    def close(self) -> None:
        """Stop the heartbeat."""
        self._stopped.set()

    def silent_ranks(self, seconds: float = 10.0) -> tuple[list[str], bool]:
        """The other ranks that are gone or silent, in words, and whether the store answered.

        Gone: its process no longer exists (same host). Silent: no heartbeat for
        ``SILENT_AFTER`` x ``HEARTBEAT_S`` seconds (stopped, frozen, killed, its machine lost).
        """
        if self.store is None:
            return [], False
        host, now, found = socket.gethostname(), time.time(), []
        try:
            self.store.set_timeout(timedelta(seconds=seconds))
            for rank in range(self.ctx.world_size):
                key = self._ALIVE.format(rank=rank)
                if rank == self.ctx.rank or not self.store.check([key]):
                    continue
                their_host, pid, beat = json.loads(self.store.get(key))
                if their_host == host and not process_alive(pid):
                    found.append(f"rank {rank} (PID {pid} on {host}) is gone")
                elif now - beat > self.SILENT_AFTER * self.HEARTBEAT_S:
                    found.append(f"rank {rank} (PID {pid} on {their_host}) has given no sign of life for "
                                 f"{now - beat:.0f} s")
        except (RuntimeError, ValueError):
            return found, False
        return found, True

    def describe_gone(self, wait_s: float | None = None) -> str:
        """Which rank went away, waiting up to ``wait_s`` seconds for its heartbeat to go stale."""
        wait_s = (self.SILENT_AFTER + 1) * self.HEARTBEAT_S if wait_s is None else wait_s
        deadline = time.monotonic() + wait_s
        while True:
            found, answered = self.silent_ranks()
            if found or not answered or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if found:
            return "; ".join(found)
        if not answered:
            return ("the job's store (on MASTER_ADDR) does not answer either: rank 0, which holds it, or "
                    "its machine is gone")
        return "another process of the job is gone (the connection to it was lost)"

    def mark(self, what: str) -> None:
        """Record that this process starts ``what`` now."""
        if self.store is None:
            return
        self.count += 1
        self.store.set(self._KEY.format(rank=self.ctx.rank), json.dumps([self.count, what, time.time()]))

    def describe_stall(self, seconds: float = 10.0) -> str:
        """Which ranks are behind the others, and where they were, as far as the store tells."""
        if self.store is None:
            return "no other process's progress is known"
        try:
            self.store.set_timeout(timedelta(seconds=seconds))
            seen = {}
            for rank in range(self.ctx.world_size):
                key = self._KEY.format(rank=rank)
                seen[rank] = json.loads(self.store.get(key)) if self.store.check([key]) else None
        except (RuntimeError, ValueError) as err:
            return (f"the store on MASTER_ADDR (rank 0 or torchrun) does not answer either ({err}); "
                    "rank 0's process is the likely one")
        reached = max(entry[0] for entry in seen.values() if entry is not None)
        now, behind = time.time(), []
        for rank, entry in seen.items():
            if entry is None:
                behind.append(f"rank {rank} (never reported)")
            elif entry[0] < reached:
                behind.append(f"rank {rank} (last started {entry[1]}, {now - entry[2]:.0f} s ago)")
        if not behind:
            silent, _ = self.silent_ranks()
            if silent:
                return (f"{'; '.join(silent)}: it stopped answering inside a collective (every rank had "
                        f"started {next(e[1] for e in seen.values() if e is not None)})")
            return ("every rank reported the same progress and is alive; the stall is inside a collective "
                    "(a deadlock, or a network problem between the machines)")
        ahead = [str(rank) for rank, entry in seen.items() if entry is not None and entry[0] == reached]
        where = next(entry[1] for entry in seen.values() if entry is not None and entry[0] == reached)
        return (f"{', '.join(behind)} stopped answering; rank(s) {', '.join(ahead)} had started {where}")


@contextlib.contextmanager
def stalled_ranks_named(progress: Progress, timeout_s: float,
                        note: Callable[[], str] = str) -> Iterator[None]:
    """Turn a collective's failure inside the block into one line naming the process at fault:
    a timeout into a DistributedTimeoutError naming the process that stopped answering, a lost
    connection into a PeerGoneError naming the process that is gone (``note()`` adds e.g. where
    the newest checkpoint is). The heartbeat stops when the block ends."""
    try:
        yield
    except RuntimeError as err:
        if not progress.ctx.distributed or isinstance(err, DistributedError):
            raise
        extra = note()
        extra = f"; {extra}" if extra else ""
        if is_timeout(err):
            raise DistributedTimeoutError(
                f"rank {progress.ctx.rank} waited dist.timeout_s={timeout_s:g} s for the other processes: "
                f"{progress.describe_stall()}{extra}") from err
        if is_peer_gone(err):
            raise PeerGoneError(f"rank {progress.ctx.rank} lost a peer: {progress.describe_gone()}; this "
                                f"process stops too{extra}") from err
        raise
    finally:
        progress.close()


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler whose order is a function of (seed, epoch) and that can skip a prefix.

    ``set_epoch(e)`` picks the permutation (as DistributedSampler does); ``set_start(k)`` drops
    this process's first ``k`` indices of that epoch, so a run resumed mid-epoch sees exactly
    the samples an uninterrupted run would have seen next. ``set_start`` applies until changed.
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int, seed: int, shuffle: bool = True,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of this process's share of the current epoch."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"cannot skip {start} of {self.num_samples} samples")
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``, in order, without padding: exact validation.

    (DistributedSampler pads the last round with repeated samples, which would count those
    images twice in the all-reduced confusion matrix.)
    """

    def __init__(self, length: int, num_replicas: int, rank: int) -> None:
        self.indices = range(rank, length, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
