"""Checkpoints that lose nothing and cannot be silently wrong: complete, atomic, checksummed.

A training checkpoint is a dict with

* ``model``: state_dict of the unwrapped model (no ``module.`` / ``_orig_mod.`` prefixes);
* ``optimizer``, ``scheduler``, ``scaler``: their state_dicts (``scaler`` None without fp16);
* ``iteration`` (optimiser steps done), ``epoch`` (the epoch in progress) and
  ``iteration_in_epoch`` (its steps done), so a resumed run skips exactly the finished batches;
  ``iters_per_epoch`` (the epoch length it counted with);
* ``rng``: python, numpy, torch CPU and CUDA generator states of every process (:func:`capture_rng_state`);
* ``config``: ``danet.config.config_to_dict`` of the run's Config;
* ``best_miou`` and ``metrics`` (the last validation);
* ``loss_windows``: ``[iteration, mean training loss since the previous save, healthy]`` of
  every save (danet.training.resume.LossHealth), the loss history that tells a healthy checkpoint from
  one written while training diverged.

Writing: :func:`atomic_save` writes through :func:`danet.io.atomic.atomic_write` (a temporary file,
fsynced and renamed: a crash or a full disk mid-write leaves the previous checkpoint whole) and
stores the SHA-256 of the archive torch wrote in the archive's own zip comment
(``danet-sha256:<hex>``), so the file stays an ordinary ``torch.load``-able file for any reader.
The checkpoint dict's first key is a marker, ``"danet_checkpoint"``: the pickle is the archive's
first record, stored uncompressed, so the marker sits in the file's first hundred bytes, where
it tells that the file is ours without unpickling anything. A file that carries it must carry
a checksum record that verifies, so damage at the end of a file (bytes appended, padding to a
block size, a cut-off or overwritten record) cannot make it pass for a file from elsewhere: the
record is searched for as far back as a zip reader looks for the archive's end (64 KiB), and
bytes after it are refused.

Reading: :func:`read_file` is the one reader of every ``.pt``/``.pth``/``.tar``/``.safetensors``
file danet opens (resume, eval, predict, attention, ImageNet weights). It recognises what a file
is before unpickling it (empty, text, an image: "not a checkpoint"), verifies the checksum where
there is one ("corrupted", with the path; files from elsewhere, such as the original release
or torchvision/timm weights, have none and load as they are), and reads ``weights_only``: no
code from a file ever runs, and no message ever suggests turning that off.

A run directory holds ``last.pt`` (the newest state), ``checkpoint_best.pt`` (the best
validation) and ``last_good.pt`` (the newest checkpoint that training continued from with a
healthy loss, see danet.training.trainer); the latter two are usually hard links to a ``last.pt``
of the past, costing no disk until ``last.pt`` moves on.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from danet.io.atomic import atomic_link, atomic_write
from danet.io.output_paths import describe_file_type

LAST = "last.pt"
BEST = "checkpoint_best.pt"
LAST_GOOD = "last_good.pt"

# the keys without which a checkpoint cannot continue a run
TRAINING_STATE_KEYS = ("model", "optimizer", "scheduler", "iteration", "epoch", "iteration_in_epoch",
                       "rng", "config")

# ------------------------------------------------------------------------------ the checksum

_EOCD = b"PK\x05\x06"  # a zip archive's end-of-central-directory record, the file's last 22 bytes
_EOCD_SIZE = 22  # ... its last two bytes are the length of the comment that follows it
_CHECKSUM_PREFIX = b"danet-sha256:"
_CHECKSUM_COMMENT_SIZE = len(_CHECKSUM_PREFIX) + 64
_CHUNK = 1 << 20
# zip readers (torch's miniz) look for the end record in the last 64 KiB + 22 bytes: a file that
# torch can load has ours within this window, however much was appended to it
_TAIL_WINDOW = 0xFFFF + _EOCD_SIZE + _CHECKSUM_COMMENT_SIZE
MARKER_KEY = "danet_checkpoint"
"""The first key of every checkpoint :func:`atomic_save` writes (read_file removes it again)."""
_MARKER_VALUE = "sha256 in the zip comment"
_HEAD_SIZE = 4096  # the marker is within the first ~100 bytes (the pickle is the first record)


class _HashingWriter:
    """A binary file that also feeds what is written to a SHA-256 (torch.save writes sequentially)."""

    def __init__(self, raw: io.BufferedWriter) -> None:
        self.raw, self.sha256 = raw, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def _save_with_checksum(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` (a mapping gets :data:`MARKER_KEY` first), then the archive's
    SHA-256 as its zip comment.

    The comment length (the archive's last two bytes, 0 as torch writes them) becomes the
    comment's size and the comment follows: still a valid zip archive, loadable by torch.load.
    Written through a Python file object, so that a full disk is an OSError with ENOSPC (torch
    writing to a path itself reports only "unexpected pos ...").
    """
    if isinstance(obj, Mapping):
        obj = {MARKER_KEY: _MARKER_VALUE, **{k: v for k, v in obj.items() if k != MARKER_KEY}}
    with open(path, "wb") as raw:
        writer = _HashingWriter(raw)
        try:
            torch.save(obj, writer)  # type: ignore[arg-type]
        except RuntimeError as err:  # torch's closing write masks the OSError (ENOSPC) of ours
            cause = err.__context__
            if isinstance(cause, OSError):
                raise cause from None
            raise
        raw.flush()
        size = raw.tell()
        raw.seek(size - 2)
        raw.write(_CHECKSUM_COMMENT_SIZE.to_bytes(2, "little"))
        raw.write(_CHECKSUM_PREFIX + writer.sha256.hexdigest().encode())


def _marked(head: bytes) -> bool:
    """Whether a file's first bytes carry our marker (a zip archive whose pickle starts with it)."""
    return head.startswith(b"PK\x03\x04") and MARKER_KEY.encode() in head[:_HEAD_SIZE]


def _checksum_record(path: Path) -> tuple[str, int, int] | None:
    """(stored SHA-256, where the archive ends, the file's size) for a file with our record, else None.

    Raises:
        ValueError: the file is ours (the marker, or our prefix near its end) but the record is
            missing or damaged.
    """
    size = path.stat().st_size
    start = max(0, size - _TAIL_WINDOW)
    with open(path, "rb") as f:
        head = f.read(_HEAD_SIZE)
        f.seek(start)
        tail = f.read()
    found = tail.rfind(_EOCD)
    while found >= 0:  # the newest end record carrying our comment (appended data may hold others)
        comment = tail[found + _EOCD_SIZE:found + _EOCD_SIZE + _CHECKSUM_COMMENT_SIZE]
        if (tail[found + _EOCD_SIZE - 2:found + _EOCD_SIZE] == _CHECKSUM_COMMENT_SIZE.to_bytes(2, "little")
                and comment.startswith(_CHECKSUM_PREFIX)
                and re.fullmatch(rb"[0-9a-f]{64}", comment[len(_CHECKSUM_PREFIX):])):
            return comment[len(_CHECKSUM_PREFIX):].decode(), start + found + _EOCD_SIZE + len(comment), size
        found = tail.rfind(_EOCD, 0, found)
    if _marked(head) or _CHECKSUM_PREFIX in tail:
        raise ValueError(f"{path} is corrupted: danet wrote it, but its checksum record is missing or "
                         "damaged: not a complete checkpoint (a truncated copy?), or its end was "
                         "overwritten; "
                         f"use another checkpoint (e.g. {LAST_GOOD} or {BEST} of the run, or an intact copy)")
    return None


def stored_checksum(path: str | Path) -> str | None:
    """The SHA-256 a danet checkpoint stores (hex), None for files written elsewhere.

    Raises:
        ValueError: the file is ours, but its checksum record is missing or damaged.
    """
    record = _checksum_record(Path(path))
    return record[0] if record is not None else None


def verify_checksum(path: str | Path) -> bool:
    """Check the stored SHA-256 of ``path``; False when the file has none (written elsewhere).

    Raises:
        ValueError: "corrupted": the bytes differ from those written (disk, copy or transfer
            error), or bytes follow the end of the checkpoint (appended or padded).
    """
    path = Path(path)
    record = _checksum_record(path)
    if record is None:
        return False
    expected, end, size = record
    archive_end = end - _CHECKSUM_COMMENT_SIZE - 2  # up to the comment length field
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = archive_end
        while remaining > 0:
            chunk = f.read(min(_CHUNK, remaining))
            if not chunk:
                break
            sha256.update(chunk)
            remaining -= len(chunk)
    sha256.update(b"\x00\x00")  # the comment length as torch wrote it
    if sha256.hexdigest() != expected:
        raise ValueError(f"{path} is corrupted: its SHA-256 differs from the one stored when it was "
                         "written (a disk, copy or transfer error changed it); use another checkpoint "
                         f"(e.g. {LAST_GOOD} or {BEST} of the run, or an intact copy)")
    if size != end:
        raise ValueError(f"{path} has {size - end} bytes after the end of the checkpoint danet wrote "
                         "(appended or padded by a copy or a transfer); the checkpoint before them is "
                         f"intact: `truncate -s {end} {path}` restores it")
    return True


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically and checksummed: the old file stays whole until
    the new one is complete.

    Raises:
        danet.io.atomic.FileWriteError: full disk, read-only directory, ... (the old file is intact).
    """
    return atomic_write(path, lambda tmp: _save_with_checksum(obj, tmp))


def keep_as(path: str | Path, name: str) -> Path:
    """Make ``name`` (next to ``path``) the same file as ``path`` (a hard link, atomically)."""
    path = Path(path)
    return atomic_link(path, path.parent / name)


# ------------------------------------------------------------------------------ reading


# Checkpoints hold numpy's RNG state (an ndarray) next to the weights. These are the only
# non-tensor globals it needs, so every read stays weights_only: no code runs from a file.
_NUMPY_RNG_GLOBALS = [np.ndarray(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]

# what a file that is not a checkpoint starts with, for the message that says so
_KNOWN_MAGIC = (
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"), (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"),
    (b"{", "JSON text"),
)


def _kind_of(head: bytes) -> str:
    """A guess at what a file that is not a torch archive is, from its first bytes."""
    for magic, kind in _KNOWN_MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "a TIFF image"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of an unknown format"
    return "a text file"


def _is_torch_archive(head: bytes) -> bool:
    """torch.save's zip format, its legacy pickle format, or the oldest tar format."""
    return (head.startswith(b"PK\x03\x04")
            or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5)  # a pickle, protocols 2-5
            or head[257:262] == b"ustar")


def _refusal(err: Exception) -> str:
    """torch's weights_only refusal, without its advice to turn the protection off."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    what = f" (it names {found.group(1)})" if found else ""
    return (f"it holds Python objects other than tensors and plain containers{what}; danet reads "
            "weights without running code from the file, so it cannot use this one")


def check_regular_file(path: str | Path, what: str = "file") -> Path:
    """``path``, if it is a regular file (or a link to one).

    Raises:
        FileNotFoundError: nothing there.
        ValueError: a directory or a special file (a FIFO, a device such as /dev/zero: reading one
            would block or never end).
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{what} {path} is a directory, not a file")
    kind = describe_file_type(mode)
    if kind is not None:
        raise ValueError(f"{what} {path} is {kind}, not a file: a checkpoint is a regular file")
    return path


def read_file(path: str | Path, map_location: str | torch.device = "cpu", what: str = "file") -> Any:
    """Read a ``.pt``/``.pth``/``.tar`` (weights_only) or ``.safetensors`` file; ``what`` names it in errors.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a checkpoint (empty, text, an image, a directory), is
            corrupted (its checksum differs), or holds pickled objects other than tensors.
    """
    path = check_regular_file(path, what)
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): not a checkpoint")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return load_file(str(path), device=str(map_location))
        except Exception as err:
            raise ValueError(f"cannot read {what} {path}: {str(err).splitlines()[0]}") from err
    with open(path, "rb") as f:
        head = f.read(512)
    if not _is_torch_archive(head):
        raise ValueError(f"{path} is not a checkpoint: it is {_kind_of(head)}")
    verify_checksum(path)
    try:
        with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS):
            state = torch.load(path, map_location=map_location, weights_only=True)
        if isinstance(state, dict):
            state.pop(MARKER_KEY, None)
        return state
    except pickle.UnpicklingError as err:
        raise ValueError(f"cannot read {what} {path}: {_refusal(err)}") from None
    except Exception as err:  # a truncated or damaged archive
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read {what} {path}: not a complete checkpoint ({reason}); "
                         "a truncated copy?") from None


def non_finite_tensors(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of floating-point entries holding NaN or Inf: such a state must never be saved or used."""
    return [
        name for name, tensor in state_dict.items()
        if isinstance(tensor, torch.Tensor) and torch.is_floating_point(tensor)
        and not bool(torch.isfinite(tensor).all())
    ]


def check_finite(state_dict: Mapping[str, Any], path: str | Path) -> None:
    """Refuse weights holding NaN or Inf (they would give plausible-looking but meaningless output).

    Raises:
        ValueError: naming the tensors (the first few of them).
    """
    bad = non_finite_tensors(state_dict)
    if bad:
        shown = ", ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
        raise ValueError(f"{path} holds NaN/Inf weights in {len(bad)} tensor(s): {shown}; "
                         "it was saved from a diverged model")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a danet checkpoint (written by :func:`atomic_save`); clear errors for a wrong file."""
    state = read_file(path, map_location, what="checkpoint")
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a danet training checkpoint (a {type(state).__name__}, not a dict)")
    missing = [key for key in ("model", "config", "iteration") if key not in state]
    if missing:
        raise ValueError(f"{path} is not a danet training checkpoint (missing {', '.join(missing)}); "
                         f"{_what_it_is(state, path)}")
    return state


def load_training_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint that can continue a run: every key of TRAINING_STATE_KEYS, finite weights.

    Raises:
        ValueError: what is missing and what the file seems to be instead (weights only?).
    """
    state = read_file(path, map_location, what="checkpoint")
    if not isinstance(state, dict):
        raise ValueError(f"{path} cannot be resumed: it holds a {type(state).__name__}, not a training state")
    missing = [key for key in TRAINING_STATE_KEYS if key not in state]
    if missing and _tensors_only(state):
        raise ValueError(f"{path} cannot be resumed: it holds a plain state_dict ({len(state)} tensors), "
                         "no training state (optimizer, scheduler, iteration, rng); "
                         f"{_what_it_is(state, path)}")
    if missing:
        raise ValueError(f"{path} cannot be resumed: it has no {', '.join(missing)}; "
                         f"{_what_it_is(state, path)}")
    if not isinstance(state["model"], Mapping):
        raise ValueError(f"{path} cannot be resumed: its 'model' is not a state_dict")
    check_finite(state["model"], path)
    return state


def _tensors_only(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` is a plain state_dict: tensors and nothing else."""
    return bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def _what_it_is(state: Mapping[str, Any], path: str | Path) -> str:
    """What a dict that is not a full training state seems to be, and what to do with it."""
    release = isinstance(state.get("state_dict"), Mapping)  # the original release's layout
    if _tensors_only(state) or release or isinstance(state.get("model"), Mapping):
        kind = ("the original release's layout" if release else
                "a danet checkpoint's weights without their training state" if "model" in state
                else "a state_dict")
        return (f"it looks like weights only ({kind}); to start a new run from them use "
                f"--set model.pretrained={path}, to evaluate them "
                f"danet eval --checkpoint {path}")
    keys = ", ".join(sorted(map(str, state))[:8])
    return f"it holds the keys {keys}, which are not a danet checkpoint's"


# ------------------------------------------------------------------------------ state pieces


def capture_rng_state() -> dict[str, Any]:
    """Every generator a training step can draw from: python, numpy, torch CPU and the current GPU."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        # this process's device only: get_rng_state_all() would open a context on every GPU
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (the CUDA states only where CUDA is present)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop leading ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes, in any order and number."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "_orig_mod."):
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out
