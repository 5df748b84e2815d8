"""Run directories as command-line arguments: ``--checkpoint RUN_DIR`` and ``--checkpoint latest``.

``danet train`` writes each run into ``runs/<name>-<UTC time>/`` and, when the run starts, points
``runs/latest`` at it (a relative symbolic link, replaced atomically; runs written elsewhere
with ``--output`` leave it alone). Wherever a command takes ``--checkpoint`` it accepts:

* a checkpoint file (ours, the original release's, a plain state_dict);
* a run directory: its ``checkpoint_best.pt``, else its ``last.pt`` (the choice is printed);
* ``latest``: the run directory ``runs/latest`` points to.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

__all__ = ["LATEST", "RUNS_DIR", "mark_latest", "resolve_checkpoint"]

RUNS_DIR = Path("runs")
"""Where run directories go by default (relative to the working directory)."""
LATEST = RUNS_DIR / "latest"
"""The pointer to the last run started under :data:`RUNS_DIR`."""


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
    from danet.checkpoint import BEST, LAST  # a run directory's checkpoints, in order of preference

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
