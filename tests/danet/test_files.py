"""danet.io.atomic: a file is replaced whole or not at all, with a plain open()'s mode, and clear errors."""

import errno
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from danet.io.atomic import FileWriteError, atomic_link, atomic_write, remove_stale_temporaries

REPO = Path(__file__).resolve().parents[2]


def test_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = atomic_write(tmp_path / "out" / "metrics.json", lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_keeps_the_previous_file(tmp_path, error):
    path = tmp_path / "mask.png"
    path.write_bytes(b"previous")

    def write_half_then_fail(tmp):
        tmp.write_bytes(b"half")
        raise error

    with pytest.raises(OSError if isinstance(error, OSError) else KeyboardInterrupt):
        atomic_write(path, write_half_then_fail)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.png"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_files_get_the_mode_of_a_plain_open(tmp_path, umask):
    """mkstemp would give 0600 whatever the umask: nobody else could read a checkpoint."""
    previous = os.umask(umask)
    try:
        atomic_write(tmp_path / "atomic.pt", lambda tmp: tmp.write_bytes(b"x"))
        (tmp_path / "plain.pt").write_bytes(b"x")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "atomic.pt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.pt").stat().st_mode) == 0o666 & ~umask


def test_replacing_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "shared.json"
    path.write_text("old")
    path.chmod(0o640)
    atomic_write(path, lambda tmp: tmp.write_text("new"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_text() == "new"
    path.chmod(0o444)  # read-only: the writer still fills its temporary, the result stays read-only
    atomic_write(path, lambda tmp: tmp.write_text("newer"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o444 and path.read_text() == "newer"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)
    return child.pid


def test_stale_temporaries_of_dead_writers_are_removed_at_the_next_write(tmp_path):
    from danet.io.atomic import _host_tag

    host = _host_tag()
    stale = tmp_path / f".last.pt.partial-{_dead_pid()}-{host}-0123abcd"
    live = tmp_path / f".last.pt.partial-{os.getppid()}-{host}-0123abcd"  # a live process's write
    other_host = tmp_path / f".last.pt.partial-{_dead_pid()}-ffffff-0123abcd"  # a shared file system
    foreign = tmp_path / ".last.pt.backup"  # not ours
    for path in (stale, live, other_host, foreign):
        path.write_bytes(b"partial")
    atomic_write(tmp_path / "metrics.json", lambda tmp: tmp.write_text("{}"))
    assert not stale.exists()
    assert live.exists() and other_host.exists() and foreign.exists()
    assert remove_stale_temporaries(tmp_path) == []


def test_a_directory_is_swept_once_per_process(tmp_path, monkeypatch):
    """Not at every write: predict writes thousands of files into one directory."""
    sweeps = []
    monkeypatch.setattr("danet.io.atomic.remove_stale_temporaries", sweeps.append)
    for name in ("a.png", "b.png", "a.png"):
        atomic_write(tmp_path / name, lambda tmp: tmp.write_bytes(b"png"))
    atomic_link(tmp_path / "a.png", tmp_path / "c.png")
    atomic_write(tmp_path / "sub" / "d.png", lambda tmp: tmp.write_bytes(b"png"))
    assert sweeps == [tmp_path, tmp_path / "sub"]


def test_kill_9_mid_write_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    """The real thing: a writer killed with SIGKILL while its temporary is half written."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from danet.io.atomic import atomic_write\n"
        "def write(tmp):\n"
        "    tmp.write_bytes(b'x' * 100000)\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(120)\n"
        "atomic_write(Path(sys.argv[1]) / 'last.pt', write)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".last.pt.partial-"), left
    atomic_write(tmp_path / "last.pt", lambda tmp: tmp.write_bytes(b"whole"))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_long_name_fits_its_temporary(tmp_path):
    """A 250-byte name is legal; its temporary (name + suffix) must still fit 255 bytes."""
    path = tmp_path / ("m" * 246 + ".png")
    atomic_write(path, lambda tmp: tmp.write_bytes(b"png"))
    assert path.read_bytes() == b"png"
    with pytest.raises(FileWriteError, match=r"cannot write .*: file name too long \(ENAMETOOLONG"):
        atomic_write(tmp_path / ("n" * 300), lambda tmp: tmp.write_bytes(b"x"))


def test_a_full_disk_is_one_clear_line(tmp_path, monkeypatch):
    """/dev/full gives a real ENOSPC on every write."""
    path = tmp_path / "metrics.json"
    path.write_text("previous")

    def write_to_full_disk(tmp):
        with open("/dev/full", "wb") as full:
            full.write(b"x" * 10000)
            full.flush()

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    with pytest.raises(FileWriteError) as caught:
        atomic_write(path, write_to_full_disk)
    expected = f"cannot write {path}: disk full (ENOSPC); the previous metrics.json is intact"
    assert str(caught.value) == expected
    assert caught.value.errno == errno.ENOSPC
    assert path.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_read_only_directory_is_one_clear_line(readonly_dir):
    refused = r"^cannot write .*out\.json: (read-only file system|permission)"
    with pytest.raises(FileWriteError, match=refused):
        atomic_write(readonly_dir / "out.json", lambda tmp: tmp.write_text("{}"))
    with pytest.raises(FileWriteError, match=r"^cannot create the directory .*sub: "):
        atomic_write(readonly_dir / "sub" / "out.json", lambda tmp: tmp.write_text("{}"))


def test_atomic_link_shares_the_bytes_until_the_source_moves_on(tmp_path):
    source = atomic_write(tmp_path / "last.pt", lambda tmp: tmp.write_bytes(b"one"))
    atomic_link(source, tmp_path / "last_good.pt")
    assert os.path.samefile(source, tmp_path / "last_good.pt")
    atomic_write(source, lambda tmp: tmp.write_bytes(b"two"))
    assert (tmp_path / "last_good.pt").read_bytes() == b"one" and source.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last_good.pt"]
