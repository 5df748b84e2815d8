"""danet.files.atomic_write: a file is replaced whole or not at all."""

import pytest

from danet.files import atomic_write


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

    with pytest.raises(type(error)):
        atomic_write(path, write_half_then_fail)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.png"]
