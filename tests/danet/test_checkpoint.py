"""danet.checkpoint: atomic writes, RNG round trips, prefix stripping, non-finite detection."""

import random

import numpy as np
import pytest
import torch

from danet.checkpoint import (
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    non_finite_tensors,
    restore_rng_state,
    strip_prefixes,
)


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
