"""danet.io.checkpoint: atomic checksummed writes, the one reader, RNG round trips, non-finite detection."""

import collections
import random
import re

import numpy as np
import pytest
import torch

from danet.io.checkpoint import (
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    load_training_state,
    non_finite_tensors,
    read_file,
    restore_rng_state,
    stored_checksum,
    strip_prefixes,
    verify_checksum,
)
from danet.models.weights import read_checkpoint


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((64, 64), value)}, "config": {}, "iteration": int(value)}


def test_round_trip_and_no_temporary_left(tmp_path):
    path = atomic_save(_state(3.0), tmp_path / "run" / "last.pt")
    loaded = load_checkpoint(path)
    assert loaded["iteration"] == 3
    torch.testing.assert_close(loaded["model"]["w"], torch.full((64, 64), 3.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_failure_mid_save_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save(_state(1.0), path)
    before = path.read_bytes()
    # the lambda cannot be pickled: torch.save fails after it has written the tensor's bytes
    bad = {**_state(2.0), "callback": lambda: None}
    with pytest.raises(Exception, match=r"pickle|lambda"):
        atomic_save(bad, path)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # the partial temporary is gone


def test_interrupt_during_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save(_state(1.0), path)
    before = path.read_bytes()
    real_save = torch.save

    def save_then_interrupt(obj, handle):
        real_save(obj, handle)  # the whole new state reached the temporary file...
        raise KeyboardInterrupt  # ...but the process dies before the rename

    monkeypatch.setattr(torch, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_save(_state(2.0), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a danet training checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")


def test_rng_state_round_trip():
    state = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2])


def test_strip_prefixes_and_non_finite():
    sd = {"module._orig_mod.head.w": torch.tensor([1.0, float("nan")]), "bn.num_batches": torch.tensor(3)}
    stripped = strip_prefixes(sd)
    assert list(stripped) == ["head.w", "bn.num_batches"]
    assert non_finite_tensors(stripped) == ["head.w"]
    assert non_finite_tensors({"w": torch.tensor([float("inf")]), "ok": torch.ones(2)}) == ["w"]


# ---------------------------------------------------------------- checksums


def _flip_middle(path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_detected_as_corruption(tmp_path):
    """64 flipped bytes in the tensor data: torch itself loads them without complaint."""
    path = atomic_save(_state(1.5), tmp_path / "last.pt")
    assert verify_checksum(path)
    _flip_middle(path)
    assert torch.load(path, weights_only=True)["iteration"] == 1  # torch does not notice
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is corrupted: its SHA-256 differs"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="is corrupted"):
        read_checkpoint(path)  # eval / predict / attention read through the same reader


def test_a_damaged_checksum_record_is_corruption_too(tmp_path):
    path = atomic_save(_state(1.0), tmp_path / "last.pt")
    data = bytearray(path.read_bytes())
    data[-3] = ord("g")  # not a hex digit any more
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        load_checkpoint(path)


def test_our_checkpoints_stay_plain_torch_files_and_foreign_ones_load_as_before(tmp_path):
    ours = atomic_save(_state(2.0), tmp_path / "ours.pt")
    assert stored_checksum(ours) is not None
    assert torch.load(ours, weights_only=True)["iteration"] == 2  # any reader can load it
    foreign = tmp_path / "release.pth.tar"  # e.g. the original release, timm/torchvision weights
    torch.save({"state_dict": {"w": torch.ones(3)}, "epoch": 240}, foreign)
    assert stored_checksum(foreign) is None and not verify_checksum(foreign)
    assert read_file(foreign)["epoch"] == 240


# ---------------------------------------------------------------- what a file is


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"is empty \(0 bytes\): not a checkpoint"),
        (b"epoch: 3\nlr: 0.01\n", "is not a checkpoint: it is a text file"),
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "is not a checkpoint: it is a PNG image"),
        (b"\xff\xd8\xff\xe0" + bytes(64), "is not a checkpoint: it is a JPEG image"),
    ],
)
def test_files_that_are_not_checkpoints_say_so(tmp_path, content, message):
    path = tmp_path / "thing.pt"
    path.write_bytes(content)
    for reader in (load_checkpoint, read_checkpoint, load_training_state):
        with pytest.raises(ValueError, match=message):
            reader(path)


def test_a_truncated_checkpoint_says_so(tmp_path):
    path = atomic_save(_state(1.0), tmp_path / "last.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(path)


def test_pickled_objects_are_refused_without_advising_weights_only_false(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": collections.OrderedDict, "hook": _Hook()}, path)
    with pytest.raises(ValueError) as caught:
        read_file(path)
    message = str(caught.value)
    assert "Python objects other than tensors" in message and "weights_only" not in message
    assert "\n" not in message


class _Hook:
    """A class a checkpoint could name: weights_only reading must refuse it."""


def test_resuming_needs_the_whole_training_state(tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, weights)
    with pytest.raises(ValueError, match=r"cannot be resumed: it holds a plain state_dict \(1 tensors\), no "
                                         r"training state .*weights only .*--set model\.pretrained=.*"
                                         r"danet eval --checkpoint"):
        load_training_state(weights)
    ours_without_state = atomic_save({"model": {"w": torch.ones(2)}, "config": {}, "iteration": 3},
                                     tmp_path / "stripped.pt")
    with pytest.raises(ValueError, match=r"has no optimizer, scheduler, epoch, iteration_in_epoch, rng; "
                                         "it looks like weights only"):
        load_training_state(ours_without_state)


def test_non_finite_weights_are_refused_by_every_reader(tmp_path):
    """All-NaN weights would evaluate to plausible metrics and all-background masks."""
    state = {"model": {"head.w": torch.full((2,), float("nan")), "ok": torch.ones(1)}, "config": {},
             "iteration": 1}
    path = atomic_save(state, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"NaN/Inf weights in 1 tensor\(s\): head\.w"):
        read_checkpoint(path)
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.tensor([float("inf")])}, plain)
    with pytest.raises(ValueError, match=r"NaN/Inf weights .*: w"):
        read_checkpoint(plain)
