"""Backend choice: the one switch that decides which implementation runs.

Three implementations compute the same attention:

* ``"triton"``: the fused Triton kernels (``danet_kernels.kernels``), for CUDA tensors, and
  for CPU tensors when ``TRITON_INTERPRET=1`` is set (Triton's interpreter, used in CI).
* ``"torch"``: the blockwise pure-PyTorch backend (``danet_kernels.blockwise``), the same
  algorithm in plain tensor ops, for any device and dtype (float64 included).
* ``"reference"``: the plain bmm oracle (``danet_kernels.reference``).

``"auto"`` resolves per call: Triton where it can run the tensor (CUDA, or the interpreter,
and a dtype Triton computes: fp16, bf16, fp32), otherwise the blockwise backend. Under the
interpreter (``TRITON_INTERPRET=1``) bf16 is not one of them: the interpreter runs ``tl.dot``
through numpy, which has no bfloat16, and its bf16 dots come out wrong (a 16 x 16 dot off by
1e10), so bf16 goes to the blockwise backend there and forcing ``"triton"`` is an error. A process
wide default can be set with :func:`set_backend`, the :func:`use_backend` context manager,
or the ``DANET_KERNELS_BACKEND`` environment variable; an explicit ``backend=`` argument of
a call wins over all of them. Models never name a backend: they follow this switch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

__all__ = ["BACKENDS", "get_backend", "resolve_backend", "set_backend", "use_backend"]

BACKENDS = ("auto", "triton", "torch", "reference")
ENV_VAR = "DANET_KERNELS_BACKEND"
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_name(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return backend


try:
    _default_backend = _check_name(os.environ.get(ENV_VAR, "auto"))
except ValueError as _err:
    raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: {_err}") from None


def get_backend() -> str:
    """Return the process-wide default backend name (``"auto"`` unless changed)."""
    return _default_backend


def set_backend(backend: str) -> None:
    """Set the process-wide default backend: one of ``auto``, ``triton``, ``torch``, ``reference``."""
    global _default_backend
    _default_backend = _check_name(backend)


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Context manager that sets the default backend and restores the previous one on exit."""
    previous = get_backend()
    set_backend(backend)
    try:
        yield
    finally:
        set_backend(previous)


# Looked up once at import rather than behind functools.cache: torch.compile traces
# triton_can_run inside the modules' forward and warns on every lru_cache-wrapped call.
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    """Whether the ``triton`` package can be imported in this environment."""
    return _TRITON_IMPORTABLE


def triton_interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_can_run(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``x``'s device and dtype here (and compute it right)."""
    return _why_not_triton(x) is None


def _why_not_triton(x: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run ``x`` here; None when they can."""
    if not triton_importable():
        return "triton is not installed"
    if x.dtype not in TRITON_DTYPES:
        return "the Triton kernels take fp16, bf16 or fp32"
    if triton_interpreting():
        if x.dtype == torch.bfloat16:
            return ("Triton's interpreter (TRITON_INTERPRET=1) computes bf16 dots wrongly (numpy has "
                    "no bfloat16); run bf16 on a CUDA device without the interpreter")
        if x.device.type not in ("cpu", "cuda"):
            return f"the interpreter does not run {x.device} tensors"
        return None
    if x.device.type == "cuda":
        return None
    return ("the Triton kernels run on CUDA (or on the CPU with TRITON_INTERPRET=1 set before triton "
            "is imported)")


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Turn a requested backend (possibly ``"auto"``) into the one that runs on ``x``.

    Raises:
        ValueError: for an unknown name.
        RuntimeError: when ``"triton"`` is forced on a tensor it cannot run.
    """
    requested = _check_name(backend)
    backend = get_backend() if requested == "auto" else requested
    if backend == "auto":
        return "triton" if triton_can_run(x) else "torch"
    why_not = _why_not_triton(x) if backend == "triton" else None
    if why_not is not None:
        if requested == "auto" and os.environ.get(ENV_VAR) == backend:  # forced by the environment
            raise RuntimeError(f"{ENV_VAR}={backend}, but the Triton kernels cannot run a {x.dtype} tensor "
                               f"on {x.device}: {why_not}; unset {ENV_VAR} or set it to auto")
        raise RuntimeError(f"backend='triton' cannot run a {x.dtype} tensor on {x.device}: {why_not}; "
                           "use backend='torch' or 'auto'")
    return backend
