"""Checkpoints that lose nothing: complete training state, written atomically.

A training checkpoint is a dict with

* ``model``: state_dict of the unwrapped model (no ``module.`` / ``_orig_mod.`` prefixes);
* ``optimizer``, ``scheduler``, ``scaler``: their state_dicts (``scaler`` None without fp16);
* ``iteration`` (optimiser steps done), ``epoch`` (the epoch in progress) and
  ``iteration_in_epoch`` (its steps done), so a resumed run skips exactly the finished batches;
* ``rng``: python, numpy, torch CPU and CUDA generator states (:func:`capture_rng_state`);
* ``config``: ``danet.config.config_to_dict`` of the run's Config;
* ``best_miou`` and ``metrics`` (the last validation).

Writes go to a temporary file in the destination directory, are flushed and fsync'ed, then
``os.replace``d over the destination, and the directory is fsync'ed: a crash or a full disk
mid-write leaves the previous checkpoint intact, never a truncated one.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from danet.files import atomic_write

LAST = "last.pt"
BEST = "checkpoint_best.pt"


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: the old file stays whole until the new one is."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


# Checkpoints hold numpy's RNG state (an ndarray) next to the weights. These are the only
# non-tensor globals it needs, so every read stays weights_only: no code runs from a file.
_NUMPY_RNG_GLOBALS = [np.ndarray(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_file(path: str | Path, map_location: str | torch.device = "cpu", what: str = "file") -> Any:
    """Read a ``.pt``/``.pth`` (weights_only) or ``.safetensors`` file; ``what`` names it in errors.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be read (corrupt, wrong format, pickled code).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device=str(map_location))
        with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt file, wrong format, pickled custom classes
        raise ValueError(f"cannot read {what} {path}: {err}") from err


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint written by :func:`atomic_save`; clear errors for a wrong file."""
    state = read_file(path, map_location, what="checkpoint")
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a danet training checkpoint (a {type(state).__name__}, not a dict)")
    missing = [key for key in ("model", "config", "iteration") if key not in state]
    if missing:
        raise ValueError(f"{path} is not a danet training checkpoint (missing {', '.join(missing)})")
    return state


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


def non_finite_tensors(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of floating-point entries holding NaN or Inf: such a state must never be saved."""
    return [
        name for name, tensor in state_dict.items()
        if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all())
    ]
