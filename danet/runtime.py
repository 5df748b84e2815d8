"""How a danet process computes: its CPU threads (``train.threads``, ``--threads``) and its autocast dtype.

Threads: the default is one (:attr:`danet.config.TrainConfig.threads`). torch's own default is one
thread per core, and its parallel regions end in a barrier: on a machine whose cores are shared
(other jobs, DataLoader workers, several torchrun processes) one descheduled thread stalls
every region, and the small ops of a CPU run collapse. Measured on the 2-core development
machine, the README's main job took 38 min with torch's default against 155 s with one thread
while other work ran; idle, two threads were 17% faster than one (31 s against 38 s; README,
"Threads"). One thread gives up that 17% to never collapse. torchrun sets OMP_NUM_THREADS=1
for the same reason. On a dedicated many-core CPU, raise it; ``0`` keeps torch's own choice
(OMP_NUM_THREADS, else the number of cores).

DataLoader worker processes are separate: torch gives each of them one thread already.
Results depend on the thread count in the last bits (the reductions inside a convolution are
split differently), so runs compare exactly only at the same count.

Autocast: :data:`AMP_DTYPES` maps the ``amp`` settings of training and inference to a dtype.
The attention backend: :func:`check_attention_backend` refuses one forced where it cannot run.

Install hints: :func:`install_hint` names the command that adds an extra's optional packages,
for the way this process runs: from a checkout (``pip install -c constraints.txt -e '.[export]'``)
or from the installed distribution (``pip install 'danet-fused[export]==0.1.0'``).

Progress bars (:func:`progress_bar`) are drawn on a terminal only: redirected to a file or a pipe
(a job's log), a bar's redraws would fill it (about 200 KB for the README's main job).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from danet_kernels._dispatch import resolve_backend

__all__ = ["AMP_DTYPES", "DISTRIBUTION", "check_attention_backend", "install_hint",
           "progress_bar", "set_threads"]

DISTRIBUTION = "danet-fused"
"""The name danet is installed under (pyproject.toml's project.name)."""

AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The autocast dtype of each ``amp`` setting (``train.amp``; ``eval.amp`` once "auto" is resolved)."""


def set_threads(threads: int) -> int:
    """Use ``threads`` intra-op threads in this process (0: torch's default); returns the count in use.

    Raises:
        ValueError: a negative count.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"the thread count (train.threads / --threads) must be an integer >= 0 "
                         f"(0: torch's default), got {threads!r}")
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def check_attention_backend(device: torch.device) -> None:
    """Refuse, before any work, an attention backend forced where it cannot run (e.g.
    ``DANET_KERNELS_BACKEND=triton`` on a machine without CUDA), with danet_kernels' reason.

    Raises:
        ValueError: one line naming the setting and what to do.
    """
    try:
        resolve_backend("auto", torch.empty(0, device=device))
    except RuntimeError as err:
        raise ValueError(str(err)) from None


def _checkout_root() -> Path | None:
    """The checkout danet runs from (PYTHONPATH or an editable install), or None when installed."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "constraints.txt").is_file() else None


def install_hint(extra: str) -> str:
    """The command that installs the optional packages of ``extra`` (a pyproject.toml extra)."""
    root = _checkout_root()
    if root is not None:
        return f"pip install -c constraints.txt -e '.[{extra}]' (in {root})"
    try:
        pin = "==" + importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # copied without its metadata: any version
        pin = ""
    return f"pip install '{DISTRIBUTION}[{extra}]{pin}'"


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **options: Any) -> tqdm:
    """A tqdm bar (``options`` are tqdm's) that draws only when ``enabled`` and stderr is a terminal.

    A disabled bar accepts every call (update, set_postfix, close), so callers need no branches.
    """
    # tqdm's disable=None: off when its output (stderr) is not a TTY
    return tqdm(iterable, disable=None if enabled else True, **options)
