"""Writing files that a user keeps: all or nothing, with the permissions a plain ``open()`` gives.

Every file danet writes for a user (checkpoints, metrics JSON, config.yaml, predicted masks,
figures) goes through :func:`atomic_write`: the bytes go to a temporary file next to the
destination, which is fsynced and renamed over it. A crash, a full disk or a Ctrl-C in the
middle leaves the previous file whole.

A ``kill -9`` in the middle cannot run any clean-up: it leaves the temporary behind. Our
temporaries are named ``.<name>.partial-<pid>-<host>-<random>``, so the first write of a
process into the same directory removes those of this machine whose process no longer runs
(a live writer's, or another machine's on a shared file system, are left alone). Once per
process and directory, not at every write (``danet predict`` writes thousands of files into
one directory): a temporary that another process leaves later waits for the next process.

The new file gets the mode a plain ``open(path, "w")`` would give: the existing file's mode when
it replaces one, else ``0o666`` minus the umask (``tempfile.mkstemp`` would make it 0600, so that
nobody else on a shared server could read a checkpoint).

Operating-system errors (read-only directory, full disk, a name too long) come out as
:class:`FileWriteError`, an OSError whose message is one line naming the file and the cause.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Callable
from pathlib import Path

__all__ = ["FileWriteError", "atomic_link", "atomic_write", "describe_os_error", "make_directory",
           "process_alive", "remove_stale_temporaries"]

# a file system's limit on one name (ext4, xfs, btrfs, tmpfs, NTFS); temporaries are kept under it
_NAME_MAX = 255
_TMP_TAG = ".partial-"
# .<name>.partial-<pid>-<host>-<random>; <name> may be shortened to fit _NAME_MAX
_TMP_PATTERN = re.compile(r"^\..*\.partial-(\d+)-([0-9a-f]{6})-[0-9a-f]{8}$")

# why a write failed, in words, for the errors a user can fix
_CAUSES = {
    errno.ENOSPC: "disk full (ENOSPC)",
    errno.EDQUOT: "disk quota exceeded (EDQUOT)",
    errno.EROFS: "read-only file system (EROFS)",
    errno.EACCES: "permission denied (EACCES)",
    errno.EPERM: "operation not permitted (EPERM)",
    errno.ENAMETOOLONG: f"file name too long (ENAMETOOLONG; at most {_NAME_MAX} bytes per name)",
    errno.ENOTDIR: "a path component is a file, not a directory (ENOTDIR)",
    errno.EISDIR: "it is a directory (EISDIR)",
}


class FileWriteError(OSError):
    """A file could not be written; ``str()`` is one line: what, where and why."""

    def __str__(self) -> str:
        return str(self.strerror)


def describe_os_error(err: OSError, path: str | Path, action: str = "write") -> str:
    """One line for ``err``: ``cannot <action> <path>: <cause>``."""
    cause = _CAUSES.get(err.errno or -1, err.strerror or str(err))
    return f"cannot {action} {path}: {cause}"


def make_directory(path: str | Path, action: str = "create the directory") -> None:
    """``mkdir -p path``; an operating-system error comes out as :class:`FileWriteError`
    (``cannot <action> <path>: <cause>``)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FileWriteError(err.errno, describe_os_error(err, path, action)) from err


@functools.cache
def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _temporary_name(name: str) -> str:
    """``.<name>.partial-<pid>-<host>-<random>``, ``name`` shortened so that it fits _NAME_MAX bytes."""
    tail = f"{_TMP_TAG}{os.getpid()}-{_host_tag()}-{secrets.token_hex(4)}"
    room = _NAME_MAX - len(tail.encode()) - 1
    encoded = name.encode()
    if len(encoded) > room:
        name = encoded[:room].decode(errors="ignore")
    return f".{name}{tail}"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine still runs: it exists (under any user) and is not a
    zombie (dead, not yet reaped by its parent, e.g. torchrun) or a dead task (Linux's /proc)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (not Linux), or the process ended meanwhile
        return True
    return state not in ("Z", "X")


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporaries of :func:`atomic_write` left in ``directory`` by dead processes.

    Only files of our own naming, written on this machine, by a process that no longer runs
    (:func:`process_alive`; the current process's own are never touched). Returns the removed paths.
    """
    directory, host, removed = Path(directory), _host_tag(), []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TMP_PATTERN.match(entry.name)
        if match is None or match.group(2) != host or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or process_alive(pid):
            continue
        try:
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


_swept: set[str] = set()  # the directories this process removed stale temporaries from


def _sweep_once(directory: Path) -> None:
    """:func:`remove_stale_temporaries` at this process's first write into ``directory``."""
    key = os.path.abspath(directory)
    if key not in _swept:
        _swept.add(key)
        remove_stale_temporaries(directory)


def _umask() -> int:
    """The process's umask; read from /proc where it can be (setting it to read it back is not
    thread safe: another thread's file created meanwhile would get mode 0666)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _mode_for(path: Path) -> int:
    """The mode ``open(path, "w")`` would leave: the existing file's, else 0o666 minus the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it onto ``path``.

    The temporary exists (empty) when ``write`` is called, which may reopen it by name. It is
    fsynced before the rename and the directory after it, so the new file is durable once this
    returns; on any failure (exceptions and KeyboardInterrupt alike) the temporary is removed
    and ``path`` keeps what it held. Stale temporaries of dead writers are removed first (at
    this process's first write into the directory).

    Raises:
        FileWriteError: an operating-system error (full disk, read-only or missing permission,
            a name too long); the message names ``path`` and the cause.
    """
    path = Path(path)
    make_directory(path.parent)
    _sweep_once(path.parent)
    if len(path.name.encode()) > _NAME_MAX:
        too_long = OSError(errno.ENAMETOOLONG, "name too long")
        raise FileWriteError(errno.ENAMETOOLONG, describe_os_error(too_long, path)
                             + f" (this one has {len(path.name.encode())})")
    _refuse_special_file(path)
    tmp = path.parent / _temporary_name(path.name)
    mode = _mode_for(path)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as err:
        raise FileWriteError(err.errno, describe_os_error(err, path)) from err
    try:
        write(tmp)
        os.chmod(tmp, mode)  # after writing: a read-only mode must not stop ``write`` reopening it
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, FileWriteError):
            raise
        raise FileWriteError(err.errno, describe_os_error(err, path)
                             + (f"; the previous {path.name} is intact" if path.exists() else "")) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent, os.O_RDONLY)
    return path


def _refuse_special_file(path: Path) -> None:
    """A FIFO, socket or device at ``path`` is never replaced (a rename would swap the node itself:
    as root, /dev/null)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode) or stat.S_ISDIR(mode)):
        error = OSError(errno.EPERM, "not a regular file")
        raise FileWriteError(errno.EPERM, describe_os_error(error, path, "replace the special file"))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def atomic_link(source: str | Path, path: str | Path) -> Path:
    """Make ``path`` the same file as ``source`` (a hard link, swapped in atomically).

    Costs no disk while both names exist; replacing ``source`` later (atomic_write makes a new
    file) leaves ``path`` with the old content. Where the file system has no hard links, the
    bytes are copied instead (through :func:`atomic_write`). Nothing is done when ``path`` is
    already ``source``'s file (renaming a hard link onto its own file is a no-op that would leave
    the temporary behind).
    """
    source, path = Path(source), Path(path)
    if source.resolve() == path.resolve() or _same_file(source, path):
        return path
    _sweep_once(path.parent)
    _refuse_special_file(path)
    tmp = path.parent / _temporary_name(path.name)
    try:
        os.link(source, tmp)
        os.replace(tmp, path)
        # rename(2) does nothing when both names are links to one file (another writer linked
        # them meanwhile): the temporary is still there
        tmp.unlink(missing_ok=True)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise FileWriteError(err.errno, describe_os_error(err, path)) from err
        return atomic_write(path, lambda tmp_copy: shutil.copyfile(source, tmp_copy))
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
