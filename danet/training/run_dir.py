"""A run directory: where it is, when it may be written, config.yaml and the metrics log.

``runs/<name>-<UTC time>/`` by default. It is created only once training is about to start
(every setting validated, the datasets found and the model built), so that a failed start
leaves nothing behind. An existing run directory is never overwritten unless the run resumes
from a checkpoint inside it or ``--overwrite`` says so.

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

import json
import math
import os
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from danet.config import Config, config_to_dict
from danet.io.atomic import FileWriteError, atomic_write, describe_os_error
from danet.io.checkpoint import BEST, LAST, LAST_GOOD
from danet.runtime import install_hint

METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
_RUN_OUTPUTS = (LAST, BEST, LAST_GOOD, METRICS)

RUNS_DIR = Path("runs")
"""Where run directories go by default (relative to the working directory)."""
LATEST = RUNS_DIR / "latest"
"""The pointer to the last run started under :data:`RUNS_DIR`."""


def default_run_dir(cfg: Config) -> Path:
    """``runs/<name>-<UTC time>``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return RUNS_DIR / f"{cfg.name}-{stamp}"


def check_run_dir(run_dir: Path, *, resuming_here: bool, overwrite: bool) -> None:
    """Refuse a run directory that is a file or holds another run's outputs (creates nothing).

    ``resuming_here``: the run continues from a checkpoint inside ``run_dir``.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"the run directory {run_dir} exists and is not a directory")
    existing = [name for name in _RUN_OUTPUTS if (run_dir / name).exists()]
    if existing and not (resuming_here or overwrite):
        if existing == [METRICS]:  # a run that stopped before its first checkpoint: nothing to resume
            raise ValueError(f"{run_dir} already holds the {METRICS} of a run that wrote no checkpoint; pass "
                             "--overwrite to replace it, or choose another --output")
        raise ValueError(
            f"{run_dir} already holds {', '.join(existing)} from another run; pass --resume {run_dir} to "
            "continue it, --overwrite to replace it, or choose another --output"
        )


def create_run_dir(run_dir: Path, cfg: Config) -> None:
    """Create ``run_dir`` and write its config.yaml (atomically)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FileWriteError(err.errno, describe_os_error(err, run_dir, "create the run directory")) from err
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
    staging = RUNS_DIR / f".latest.{os.getpid()}"
    try:
        staging.unlink(missing_ok=True)
        staging.symlink_to(run_dir.name, target_is_directory=True)
        os.replace(staging, LATEST)
    except OSError as err:
        staging.unlink(missing_ok=True)
        warnings.warn(f"could not point {LATEST} at {run_dir}: {err}", stacklevel=2)
        return None
    return LATEST


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
    for name in (CONFIG, METRICS):
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
            staging = RUNS_DIR / f".latest.{os.getpid()}"
            staging.unlink(missing_ok=True)
            staging.symlink_to(previous_latest, target_is_directory=True)
            os.replace(staging, LATEST)
    return removed
