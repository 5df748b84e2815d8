"""Writing files that a user keeps: all or nothing.

Every file danet writes for a user (checkpoints, metrics JSON, predicted masks, figures) goes
through :func:`atomic_write`: a crash, a full disk or a Ctrl-C in the middle leaves the
previous file whole and no partial one behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it onto ``path``.

    The temporary is fsynced before the rename and the directory after it, so the new file is
    durable once this returns; on any failure (exceptions and KeyboardInterrupt alike) the
    temporary is removed and ``path`` keeps what it held.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent, os.O_RDONLY)
    return path


def _fsync(target: Path, flags: int) -> None:
    """Flush ``target`` (a file, or a directory to make a rename durable) to disk where the
    platform allows it; a no-op where it cannot be opened that way (directories on Windows)."""
    try:
        fd = os.open(target, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
