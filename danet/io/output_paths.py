"""Checks on the files a command is asked to write, made before any work starts.

Each returns or raises with one clear line: an existing output without ``--overwrite`` (a
symbolic link counts, even one whose target is missing: it is the user's), a directory where a
file is expected (or a file where a directory is), a special file (a FIFO, a socket, a device:
never replaced, not even with ``--overwrite``), a name longer than the file system allows.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["check_name_length", "check_output_dir", "check_output_file", "describe_file_type", "occupied"]


def occupied(path: str | Path) -> bool:
    """Whether anything is at ``path``: a file, a directory, a special file or a symbolic link,
    a dangling one included (``Path.exists()`` follows links and says False for those)."""
    return os.path.lexists(path)


def describe_file_type(mode: int) -> str | None:
    """What a special file is ("a FIFO", "a character device", ...); None for a regular file,
    a directory or a symbolic link."""
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return None


def _name_max(directory: Path) -> int:
    """The longest file name (bytes) on the file system of ``directory`` (or its first existing parent)."""
    for candidate in (directory, *directory.absolute().parents):
        if candidate.is_dir():
            try:
                return os.pathconf(candidate, "PC_NAME_MAX")
            except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or not reported
                return 255
    return 255


def check_name_length(path: str | Path) -> Path:
    """``path``, if its file name fits the file system (checked before any work); else ValueError.

    (danet.io.atomic.atomic_write shortens its temporary's name to fit, so the final name is the limit.)
    """
    path = Path(path)
    limit, length = _name_max(path.parent), len(os.fsencode(path.name))
    if length > limit:
        raise ValueError(f"output name too long for the file system ({length} bytes; at most {limit} "
                         f"here): {path.name[:40]}...{path.suffix}; choose a shorter name")
    return path


def check_output_file(path: str | Path, overwrite: bool) -> Path:
    """``path`` as a file to (re)write: refuses a directory and a special file, and anything
    already there (a dangling symbolic link too) without ``overwrite``."""
    path = check_name_length(path)  # first: is_dir() on a name too long raises ENAMETOOLONG
    if path.is_dir():
        raise ValueError(f"{path} is a directory, and a file is written here: give a file path "
                         f"(e.g. {path / ('output' + (path.suffix or '.png'))})")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None  # nothing there, or a dangling link
    kind = describe_file_type(mode) if mode is not None else None
    if kind is not None:
        raise ValueError(f"{path} is {kind}, not a regular file: danet writes regular files only; "
                         "choose another path")
    if occupied(path) and not overwrite:
        what = "is a symbolic link to a missing file" if mode is None else "exists"
        raise ValueError(f"{path} {what} (pass --overwrite to replace it)")
    return path


def check_output_dir(path: str | Path) -> Path:
    """``path`` as a directory to write into (it may not exist yet): refuses an existing file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output {path} exists and is not a directory")
    return path
