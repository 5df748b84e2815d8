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
"""

from __future__ import annotations

import torch

from danet_kernels._dispatch import resolve_backend

__all__ = ["AMP_DTYPES", "check_attention_backend", "set_threads"]

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
