"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU.

Triton's interpreter forgives what its compiler rejects (a plain global read inside a kernel,
a type mismatch, a register-hungry tile that fails to allocate), so the kernel tests also
compile every kernel for sm_90 with the ptxas that ships with Triton. That must happen in a
fresh process without TRITON_INTERPRET: :func:`check_compiles` runs a script there, and the
script calls :func:`compile_for_hopper` for each kernel and configuration.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass
class Launch:
    """One kernel launch as a launcher made it: the JITFunction, its grid, arguments, options."""

    kernel: Any
    grid: tuple[int, ...] | Any  # or a function of the config, as an autotuned launch passes it
    args: tuple
    kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def programs(self) -> int:
        total = 1
        for size in self.grid:
            total *= size
        return total

    def arg(self, name: str) -> Any:
        """An argument by name, positional or keyword."""
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[self.kernel.arg_names.index(name)]


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Record, instead of running, the launches made through ``torch.library.wrap_triton``
    (how the kernel modules launch everything); the launchers can then run on "meta" tensors."""
    import torch

    launches: list[Launch] = []

    class Recorder:
        def __init__(self, kernel: Any) -> None:
            self.kernel = kernel

        def __getitem__(self, grid: tuple[int, ...]) -> Any:
            def record(*args: Any, **kwargs: Any) -> None:
                # A grid may be a function of the config (an autotuned kernel's): kept as given.
                launches.append(Launch(self.kernel, grid if callable(grid) else tuple(grid), args, kwargs))
            return record

    original = torch.library.wrap_triton
    torch.library.wrap_triton = Recorder
    try:
        yield launches
    finally:
        torch.library.wrap_triton = original


def compile_launch(launch: Launch) -> dict[str, Any]:
    """Compile a recorded launch for sm_90 as Triton's launcher would specialise it: pointers
    16-byte aligned (as torch allocates), integer arguments that are multiples of 16 marked
    divisible by 16, arguments equal to 1 turned into constants.

    Returns registers, spill bytes, ex2 instructions (one S tile's worth per thread, i.e. no
    replication, when equal to ``BLOCK_M * BLOCK_N / threads``), wgmma / mma.sync counts and the
    loads inside the main loop: asynchronous copies (software-pipelined) and plain loads, and the
    shared memory the kernel needs (a Hopper CTA may use 227 KiB).
    """
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
    options = {key: launch.kwargs[key] for key in ("num_warps", "num_stages")}
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(launch.kernel.arg_names):
        value = launch.arg(name)
        if name in launch.kwargs or (isinstance(value, int) and value == 1):
            signature[name], constexprs[(index,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name], attrs[(index,)] = types[value.dtype], [["tt.divisibility", 16]]
        else:
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True  # ptxas prints its log only when it runs
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    registers = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores", log.getvalue())
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    loop = ttgir[ttgir.find("scf.for"):]
    return {
        "kernel": launch.name,
        "registers": int(registers.group(1)) if registers else None,
        "spill_bytes": int(spills.group(1)) if spills else None,
        "ex2": len(re.findall(r"ex2\.approx", ptx)),
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
        "loop_async_loads": len(re.findall(r"ttg\.async_copy_global_to_local", loop)),
        "loop_plain_loads": len(re.findall(r"= tt\.load ", loop)),
        "threads": 32 * options["num_warps"],
        "shared": compiled.metadata.shared,
    }


def check_compiles(script: str) -> str:
    """Run ``script`` in a fresh process without TRITON_INTERPRET; it must print ``compiled``.

    Returns the script's standard output."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=600)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
    return result.stdout
