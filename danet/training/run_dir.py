"""A run directory: where it is, who writes it, when it may be written, config.yaml and the metrics log.

``runs/<name>-<UTC time>/`` by default (``-2``, ``-3``, ... when another run started in the
same second: :func:`reserve_run_dir` creates the directory to claim the name). It is created
only once training is about to start (every setting validated, the datasets found and the
model built), so that a failed start leaves nothing behind. An existing run directory is never
overwritten unless the run resumes from a checkpoint inside it or ``--overwrite`` says so.

One writer per run directory: the process that trains into it holds :class:`RunDirLock`, an
exclusive ``flock`` on ``RUN_DIR/.writer.lock``. The kernel releases it when the process ends,
however it ends (``kill -9`` included), so it never goes stale; a second ``danet train`` into
the directory, a ``--resume`` of it or an ``--overwrite`` of it is refused at once, naming the
holder (PID, host, since when).

``metrics.jsonl`` is one JSON record per line (flushed at once, so a killed run keeps every
line it logged). A resumed run first keeps only the records up to the checkpoint's iteration
(those after it belong to steps that are now redone), so every iteration is logged once.

Wherever a command takes ``--checkpoint`` it also accepts a run directory (its
``checkpoint_best.pt``, else its ``last.pt``; the choice is printed) or ``latest``: the run
directory ``runs/latest`` points to. ``danet train`` points that link at each run it starts
under ``runs/`` (a relative symbolic link, replaced atomically; runs written elsewhere with
``--output`` leave it alone).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import socket
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import yaml

from danet.config import Config, config_to_dict
from danet.distributed import all_gather_objects
from danet.evaluation.cost import format_duration
from danet.io.atomic import FileWriteError, atomic_write, describe_os_error, make_directory
from danet.io.checkpoint import BEST, LAST, LAST_GOOD
from danet.io.output_paths import occupied
from danet.runtime import install_hint

METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
LOCK = ".writer.lock"
_RUN_OUTPUTS = (LAST, BEST, LAST_GOOD, METRICS, CONFIG)

RUNS_DIR = Path("runs")
"""Where run directories go by default (relative to the working directory)."""
LATEST = RUNS_DIR / "latest"
"""The pointer to the last run started under :data:`RUNS_DIR`."""
_MAX_SAME_SECOND = 9999  # runs/<name>-<time>-2 ... -9999 (danet.config keeps room for it in the name)


def default_run_dir(cfg: Config) -> Path:
    """``runs/<name>-<UTC time>`` (not created: :func:`reserve_run_dir` claims a unique one)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return RUNS_DIR / f"{cfg.name}-{stamp}"


def reserve_run_dir(cfg: Config) -> Path:
    """Create and return a new default run directory: :func:`default_run_dir`, or with ``-2``,
    ``-3``, ... when that name is taken (two runs started in the same second). ``mkdir`` claims
    the name atomically; :func:`release_reservation` removes it again if the start fails."""
    base = default_run_dir(cfg)
    for number in range(1, _MAX_SAME_SECOND + 1):
        candidate = base if number == 1 else base.with_name(f"{base.name}-{number}")
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError as err:
            message = describe_os_error(err, candidate, "create the run directory")
            raise FileWriteError(err.errno, message) from err
        return candidate
    raise ValueError(f"{_MAX_SAME_SECOND} runs named {base} started in one second: give --output")


def release_reservation(run_dir: Path) -> None:
    """Remove a directory of :func:`reserve_run_dir` that a failed start left empty."""
    try:
        run_dir.rmdir()
    except OSError:
        pass  # not empty (something was written after all): leave it


class RunDirInUseError(ValueError):
    """Another process is training into the run directory; the message names it."""


class RunDirLock:
    """The one-writer lock of a run directory (see the module docstring); rank 0 holds it.

    ``acquire`` takes it (or raises :class:`RunDirInUseError` naming the holder); ``release``
    removes the lock file and lets go. A process forked while the lock is held (a DataLoader
    worker) closes its copy of the descriptor, so it never keeps the lock alive after its parent.
    """

    _held: ClassVar[dict[int, Path]] = {}  # descriptors held by this process: closed in forked children

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this process holds the lock."""
        return self._fd is not None

    def acquire(self, *, create: bool = False) -> bool:
        """Hold the lock. ``create``: make the run directory first (else a missing directory
        is not locked, and False is returned).

        Raises:
            RunDirInUseError: another process holds it.
            FileWriteError: the directory cannot be created or written.
        """
        if self._fd is not None:
            return True
        if create:
            make_directory(self.run_dir, "create the run directory")
        elif not self.run_dir.is_dir():
            return False
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as err:
                raise FileWriteError(err.errno, describe_os_error(err, self.path, "lock the run directory "
                                                                  "with")) from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0)
                os.close(fd)
                raise RunDirInUseError(self._in_use(holder)) from None
            except OSError as err:  # a file system without locks (ENOLCK, some NFS setups)
                os.close(fd)
                warnings.warn(f"cannot lock {self.run_dir} ({errno.errorcode.get(err.errno or 0, err)}): "
                              "a second run writing into it would not be stopped", stacklevel=2)
                return False
            # the holder before us may have removed the file as it let go: lock the file that is there
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        self._fd = fd
        RunDirLock._held[fd] = self.path
        return True

    def release(self) -> None:
        """Remove the lock file and let go (nothing when not held)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: nobody locks the removed file
        except OSError:
            pass
        RunDirLock._held.pop(self._fd, None)
        os.close(self._fd)
        self._fd = None

    def _in_use(self, holder: bytes) -> str:
        try:
            info = json.loads(holder)
            since = datetime.fromtimestamp(info["since"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            who = (f"the process with PID {info['pid']} on {info['host']} (since {since}, "
                   f"{format_duration(time.time() - info['since'])} ago)")
        except (ValueError, KeyError, TypeError):
            who = "another process (it is starting)"
        return (f"{self.run_dir} is in use: {who} is training into it. One run writes a run directory "
                "at a time: wait for it to end (or stop it), or choose another --output")

    @staticmethod
    def _close_in_child() -> None:
        for fd in list(RunDirLock._held):
            try:
                os.close(fd)  # not flock(LOCK_UN): that would release the parent's lock too
            except OSError:
                pass
        RunDirLock._held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=RunDirLock._close_in_child)


def claim_run_dir(lock: RunDirLock, *, writer: bool, resuming_here: bool, overwrite: bool,
                  create: bool) -> None:
    """The writer (rank 0) takes ``lock`` (``create``: making the directory first) and checks that
    the run directory may be written (:func:`check_run_dir`); every process of the job learns the
    answer (one collective) and raises the same refusal.

    Raises:
        RunDirInUseError: another process trains into it.
        ValueError, FileWriteError: see :func:`check_run_dir` and :meth:`RunDirLock.acquire`.
    """
    refusal: Exception | None = None
    if writer:
        try:
            lock.acquire(create=create)
            check_run_dir(lock.run_dir, resuming_here=resuming_here, overwrite=overwrite)
        except (ValueError, OSError) as err:
            refusal = err
    message = all_gather_objects(None if refusal is None else str(refusal))[0]
    if refusal is not None:
        raise refusal
    if message is not None:
        raise ValueError(message)


def check_run_dir(run_dir: Path, *, resuming_here: bool, overwrite: bool) -> None:
    """Refuse a run directory that is a file or holds another run's outputs (creates nothing).

    ``resuming_here``: the run continues from a checkpoint inside ``run_dir``.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"the run directory {run_dir} exists and is not a directory")
    existing = [name for name in _RUN_OUTPUTS if occupied(run_dir / name)]  # a dangling link too
    if existing and not (resuming_here or overwrite):
        if METRICS in existing and set(existing) <= {METRICS, CONFIG}:  # stopped before its first checkpoint
            raise ValueError(f"{run_dir} already holds the {METRICS} of a run that wrote no checkpoint; pass "
                             "--overwrite to replace it, or choose another --output")
        raise ValueError(
            f"{run_dir} already holds {', '.join(existing)} from another run; pass --resume {run_dir} to "
            "continue it, --overwrite to replace it, or choose another --output"
        )


def create_run_dir(run_dir: Path, cfg: Config) -> None:
    """Create ``run_dir`` and write its config.yaml (atomically)."""
    make_directory(run_dir, "create the run directory")
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    atomic_write(run_dir / CONFIG, lambda tmp: tmp.write_text(text))


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics log; a line cut short by a kill is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    """Values with NaN/Inf turned into None (JSON has no NaN), in lists too."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return {key: clean(value) for key, value in values.items()}


class MetricsLog:
    """Rank 0's JSON-lines log (and optional TensorBoard); every other rank writes nothing.

    Args:
        run_dir: where ``metrics.jsonl`` is written.
        enabled: False on every rank but 0.
        resume_iteration: on resume, the checkpoint's iteration: the records up to it are kept
            (read from ``previous_log``, by default this run directory's log), the rest dropped.
        tensorboard: also write TensorBoard scalars (when the package is installed).
    """

    def __init__(self, run_dir: Path, enabled: bool, *, resume_iteration: int | None = None,
                 previous_log: Path | None = None, tensorboard: bool = False) -> None:
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        path = run_dir / METRICS
        kept = ""
        previous_log = previous_log or path
        if resume_iteration is not None and previous_log.is_file():
            kept = "".join(json.dumps(r) + "\n" for r in read_records(previous_log)
                           if isinstance(r.get("iteration"), int) and r["iteration"] <= resume_iteration)
        atomic_write(path, lambda tmp: tmp.write_text(kept))
        self._file = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("train.tensorboard is on but the tensorboard package is not installed "
                              f"({install_hint('tensorboard')}); logging to metrics.jsonl only", stacklevel=2)
            else:
                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, kind: str, iteration: int, **values: Any) -> None:
        """Append one record (flushed at once, so a killed run keeps every line it logged)."""
        if self._file is None:
            return
        record = {"type": kind, "iteration": iteration, "time": time.time(), **_jsonable(values)}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as err:
            raise FileWriteError(err.errno, describe_os_error(err, self._file.name)) from err
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, iteration)

    def close(self) -> None:
        """Flush and close the outputs."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # a full disk: the write that failed has already said so
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def mark_latest(run_dir: str | Path) -> Path | None:
    """Point ``runs/latest`` at ``run_dir`` when it lies directly in ``runs/``; returns the link or None.

    Never fails a run: where links cannot be made (some file systems) or ``runs/latest`` is a real
    file or directory, it warns and leaves things as they are.
    """
    run_dir = Path(run_dir)
    if run_dir.resolve().parent != RUNS_DIR.resolve() or run_dir.name == LATEST.name:
        return None
    if LATEST.exists() and not LATEST.is_symlink():
        warnings.warn(f"{LATEST} exists and is not a link: not pointing it at {run_dir}", stacklevel=2)
        return None
    try:
        _point_latest(run_dir.name)
    except OSError as err:
        warnings.warn(f"could not point {LATEST} at {run_dir}: {err}", stacklevel=2)
        return None
    return LATEST


def _point_latest(target: str) -> None:
    """Make ``runs/latest`` a link to ``target`` (relative to runs/), swapped in atomically: a
    staging link renamed over it (no staging link is left behind when that fails)."""
    staging = RUNS_DIR / f".latest.{os.getpid()}"
    try:
        staging.unlink(missing_ok=True)
        staging.symlink_to(target, target_is_directory=True)
        os.replace(staging, LATEST)
    except OSError:
        staging.unlink(missing_ok=True)
        raise


def resolve_checkpoint(spec: str | Path) -> Path:
    """The checkpoint file that ``--checkpoint spec`` means (see the module docstring).

    A run directory (or ``latest``) prints which of its checkpoints is used.

    Raises:
        FileNotFoundError: nothing at ``spec``, a run directory without checkpoints, or ``latest``
            with no run started under runs/.
    """
    path = Path(spec)
    if str(spec) == "latest" and not path.exists():
        if not LATEST.exists():
            raise FileNotFoundError(f"--checkpoint latest: {LATEST} does not exist (no run has been "
                                    f"started under {RUNS_DIR}/ from this directory)")
        path = LATEST
    if not path.is_dir():
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return path
    for name in (BEST, LAST):
        candidate = path / name
        if candidate.is_file():
            via = f" ({LATEST} -> {os.readlink(LATEST)})" if path == LATEST and LATEST.is_symlink() else ""
            print(f"--checkpoint {spec}: using {candidate}{via}")
            return candidate
    raise FileNotFoundError(f"{path} is a directory without {BEST} or {LAST} (is it a run "
                            "directory whose run has not written a checkpoint yet?)")


def latest_target() -> str | None:
    """Where ``runs/latest`` points now (its link text), or None (for :func:`remove_unstarted_run`)."""
    return os.readlink(LATEST) if LATEST.is_symlink() else None


def remove_unstarted_run(run_dir: Path, *, created: bool, previous_latest: str | None) -> bool:
    """Undo the start of a run stopped before its first iteration: it has nothing worth keeping.

    Removes what starting it wrote (config.yaml, the empty metrics.jsonl, a TensorBoard log),
    ``run_dir`` itself when this run ``created`` it and it is then empty, and points
    ``runs/latest`` back where it pointed before (``previous_latest``; removed if it pointed
    nowhere). Anything else in ``run_dir`` is left as it is. Returns whether ``run_dir`` was removed.
    """
    for name in (CONFIG, METRICS, LOCK):  # the lock: the caller still holds it, and lets go after
        (run_dir / name).unlink(missing_ok=True)
    tensorboard = run_dir / "tensorboard"
    if tensorboard.is_dir():
        for event_file in tensorboard.iterdir():
            event_file.unlink()
        tensorboard.rmdir()
    removed = created and run_dir.is_dir() and not any(run_dir.iterdir())
    if removed:
        run_dir.rmdir()
    if LATEST.is_symlink() and LATEST.resolve() == run_dir.resolve():
        if previous_latest is None:
            LATEST.unlink()
        else:
            _point_latest(previous_latest)
    return removed
