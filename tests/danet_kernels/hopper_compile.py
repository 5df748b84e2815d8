"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU.

Triton's interpreter forgives what its compiler rejects (a plain global read inside a kernel,
a type mismatch, a register-hungry tile that fails to allocate), so the kernel tests also
compile every kernel for sm_90 with the ptxas that ships with Triton. That must happen in a
fresh process without TRITON_INTERPRET: :func:`check_compiles` runs a script there, and the
script calls :func:`compile_for_hopper` for each kernel and configuration.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def compile_for_hopper(kernel: Any, pointer_types: dict[str, str], constexprs: dict[str, Any],
                       config: Any = None) -> None:
    """Compile ``kernel`` (a JITFunction or an Autotuner around one) for sm_90.

    Args:
        pointer_types: Triton type of each pointer argument (e.g. ``"*bf16"``); every other
            argument that is not a constexpr is an ``i32``.
        constexprs: values of the constexpr arguments (and of arguments to specialise).
        config: a ``triton.Config`` giving tile constexprs, num_warps and num_stages.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    constexprs = {**constexprs, **(config.kwargs if config else {})}
    signature = {name: "constexpr" if name in constexprs else pointer_types.get(name, "i32")
                 for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages} if config else {}
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def check_compiles(script: str) -> None:
    """Run ``script`` in a fresh process without TRITON_INTERPRET; it must print ``compiled``."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=600)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
