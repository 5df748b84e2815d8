"""The kernel sections of the GPU check: accuracy against float64, autotuning, timings and memory.

Everything goes through the public API (``danet_kernels.position_attention`` /
``channel_attention`` with ``backend=``, ``danet_kernels.reference``) and the benchmark
harness (inputs, peak memory, do_bench); the kernels' autotuners are only looked at, and
defensively (whatever Triton ``Autotuner`` objects the kernel modules hold, their ``cache``).

* ``accuracy``: PAM (with DANet's ``gamma * out + x`` epilogue: gradients of q, k, v, gamma
  and the residual) and CAM (x, gamma) at d = 64, C = 512, B = 1, in bf16, fp16 and fp32 at
  each matmul precision; the max relative error (``max|a - e| / max|e|``) of the output and
  of every gradient against a float64 evaluation of the same values, for the fused kernels
  and for the reference run in the same dtype and precision. q and k are random normal x 0.5
  (energies of standard deviation 2, a peaked softmax); x and v random normal.
* ``autotune``: the first call (forward, then backward) at N = 9409 and 32768 in a fresh
  process with empty Triton and user caches, the configs the autotuners chose, then the same
  in a second fresh process over the caches the first one left (what a new process pays).
* ``pam`` / ``cam``: median milliseconds (``triton.testing.do_bench``: CUDA events, L2 flushed
  before each call) and peak memory above the inputs (``max_memory_allocated``) of the forward
  and the forward+backward of the fused kernels, the bmm reference and (PAM) SDPA's
  memory-efficient backend on (B, 1, N, d) tensors with scale = 1.0, as in the peer baseline.
  Inputs: the peer baseline's (``harness.pam_inputs``, ``harness.cam_inputs``). Out of memory
  is a result ("oom").
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import itertools
import json
import pkgutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

from benchmarks import harness
from benchmarks.harness import AttentionShape
from danet_kernels import channel_attention, position_attention
from scripts.gpu_check.events import EVENTS_NAME, WORKER_LOG, EventReader
from scripts.gpu_check.plan import VARIANT_SETTINGS

__all__ = ["VARIANTS", "Variant", "accuracy", "autotune", "autotune_probe", "find_autotuners", "timing"]

ACCURACY_QK_SCALE = 0.5
ACCURACY_GAMMA = 0.5
PROBE_MIN_S = 15.0  # a probe process's start (torch, triton, CUDA) and one first call, at least


@dataclass(frozen=True)
class Variant:
    """A dtype and the fp32 matmul precision it runs at."""

    name: str
    dtype: torch.dtype
    precision: str  # torch.set_float32_matmul_precision: "highest" (IEEE fp32), "high", "medium"


VARIANTS = {name: Variant(name, getattr(torch, dtype), precision)
            for name, (dtype, precision) in VARIANT_SETTINGS.items()}


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(precision)`` inside, the previous setting restored after."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _variant_fields(variant: Variant) -> dict[str, Any]:
    return {"variant": variant.name, "dtype": harness.dtype_name(variant.dtype),
            "precision": variant.precision}


def _shape(sizing: Any, batch: int, height: int, width: int) -> AttentionShape:
    return AttentionShape(batch, height, width, channels=sizing.channels, qk_dim=sizing.channels // 8)


def _shape_fields(shape: AttentionShape) -> dict[str, Any]:
    return {"B": shape.batch, "H": shape.height, "W": shape.width, "N": shape.n, "C": shape.channels,
            "d": shape.qk_dim}


def _inputs(op: str, shape: AttentionShape, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The peer baseline's operands of ``op`` (``harness.pam_inputs``, ``cam_inputs``), an output gradient."""
    if op == "pam":
        q, k, v, grad_out = harness.pam_inputs(shape, dtype)
        return [q, k, v], grad_out
    x, grad_out = harness.cam_inputs(shape, dtype)
    return [x], grad_out


# ---------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------


def _op_inputs(
    op: str, shape: AttentionShape, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Named operands of one op (PAM with gamma and residual, CAM with gamma) and an output gradient."""
    gamma = torch.full((1,), ACCURACY_GAMMA, device=harness.DEVICE)
    if op == "pam":
        q, k, v, grad_out = harness.pam_inputs(shape, dtype, qk_scale=ACCURACY_QK_SCALE)
        residual = torch.randn_like(v, dtype=torch.float32).to(dtype)
        return {"q": q, "k": k, "v": v, "gamma": gamma, "residual": residual}, grad_out
    x, grad_out = harness.cam_inputs(shape, dtype)
    return {"x": x, "gamma": gamma}, grad_out


def _call(op: str, tensors: dict[str, torch.Tensor], backend: str) -> torch.Tensor:
    if op == "pam":
        return position_attention(tensors["q"], tensors["k"], tensors["v"], gamma=tensors["gamma"],
                                  residual=tensors["residual"], backend=backend)
    return channel_attention(tensors["x"], gamma=tensors["gamma"], backend=backend)


def _forward_backward(op: str, inputs: dict[str, torch.Tensor], grad_out: torch.Tensor, backend: str,
                      to: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The output and the gradient of every input (``to``: cast the inputs first, e.g. float64)."""
    leaves = {name: (t if to is None else t.to(to)).detach().requires_grad_() for name, t in inputs.items()}
    out = _call(op, leaves, backend)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))
    return {"out": out.detach(), **{name: g for name, g in zip(leaves, grads, strict=True)}}


def _errors(actual: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: harness.max_rel_err([actual[name]], [exact[name]]) for name in exact}


def _accuracy_case(op: str, shape: AttentionShape, variant: Variant, problems: dict) -> dict[str, Any]:
    """Errors of the fused kernels and of the reference in ``variant`` against float64.

    ``problems`` caches one dtype's inputs and float64 results (the variants of one dtype share
    them); it is cleared when the dtype changes, so at most one set of large tensors is held.
    """
    if variant.dtype not in problems:
        problems.clear()
        torch.manual_seed(0)
        inputs, grad_out = _op_inputs(op, shape, variant.dtype)
        exact = _forward_backward(op, inputs, grad_out, "reference", to=torch.float64)
        problems[variant.dtype] = (inputs, grad_out, exact)
    inputs, grad_out, exact = problems[variant.dtype]
    with matmul_precision(variant.precision):
        fused = _errors(_forward_backward(op, inputs, grad_out, "triton"), exact)
        reference = _errors(_forward_backward(op, inputs, grad_out, "reference"), exact)
    return {"errors": {"fused": fused, "reference": reference}}


def accuracy(ctx: Any) -> None:
    """PAM and CAM against float64, fused and reference, every variant (see the module docstring)."""
    sizing = ctx.sizing
    for height, width in sizing.accuracy_sizes:
        shape = _shape(sizing, 1, height, width)
        for op in ("pam", "cam"):
            problems: dict = {}
            for name in sizing.accuracy_variants:
                variant = VARIANTS[name]
                case = {"op": op, **_shape_fields(shape), **_variant_fields(variant)}
                ctx.runner.run(case, functools.partial(_accuracy_case, op, shape, variant, problems),
                               group=f"{op}-{shape.id}")


# ---------------------------------------------------------------------------------------------
# autotune
# ---------------------------------------------------------------------------------------------


def _is_autotuner(obj: object) -> bool:
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:  # pragma: no cover - triton is a dependency on Linux
        return False
    return isinstance(obj, Autotuner) and isinstance(getattr(obj, "cache", None), dict)


def find_autotuners() -> dict[str, Any]:
    """Every Triton autotuner held by a module of ``danet_kernels.kernels``, by ``module.attribute``
    (or ``module.attribute[key]`` for a dict of them, as CAM keeps one per operand class)."""
    import danet_kernels.kernels as package

    found: dict[int, tuple[str, Any]] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in sorted(vars(module).items()):
            members = obj.items() if isinstance(obj, dict) else [(None, obj)]
            for key, member in members:
                if _is_autotuner(member):
                    label = f"{info.name}.{name}" if key is None else f"{info.name}.{name}[{key}]"
                    found.setdefault(id(member), (label, member))
    return dict(found.values())


def _tuned_since(tuners: dict[str, Any], before: dict[str, set]) -> list[dict[str, Any]]:
    """The autotuners' new cache entries: key, chosen config, how many configs were timed, for how long."""
    tuned = []
    for label, tuner in tuners.items():
        for key, config in tuner.cache.items():
            if key in before.get(label, set()):
                continue
            timings = getattr(tuner, "configs_timings", None)
            bench = getattr(tuner, "bench_time", None)
            tuned.append({"kernel": label, "key": str(key), "config": str(config),
                          "configs": len(getattr(tuner, "configs", []) or []),
                          "configs_timed": len(timings) if isinstance(timings, dict) else None,
                          "bench_s": round(bench, 3) if isinstance(bench, (int, float)) else None})
    return tuned


def _probe_case(op: str, n: int, variant: Variant, channels: int) -> dict[str, Any]:
    """First and second call of one op at one N in this process, and what the autotuners chose."""
    torch.manual_seed(0)
    shape = AttentionShape(1, 1, n, channels=channels, qk_dim=channels // 8)
    inputs, grad_out = _inputs(op, shape, variant.dtype)
    if op == "pam":
        fn = lambda *t: position_attention(*t, backend="triton")
    else:
        fn = lambda *t: channel_attention(*t, backend="triton")
    leaves = [t.requires_grad_() for t in inputs]
    tuners = find_autotuners()
    before = {label: set(tuner.cache) for label, tuner in tuners.items()}
    def forward_backward() -> object:
        return torch.autograd.grad(fn(*leaves), leaves, grad_out)

    with matmul_precision(variant.precision):
        outputs, forward_s = harness.timed(lambda: fn(*leaves))
        backward = functools.partial(torch.autograd.grad, outputs, leaves, grad_out)
        _, backward_s = harness.timed(backward)
        del outputs
        _, second_s = harness.timed(forward_backward)
    return {"first_forward_s": round(forward_s, 3), "first_backward_s": round(backward_s, 3),
            "second_fwd_bwd_ms": round(1000 * second_s, 3), "autotuners_found": len(tuners),
            "tuned": _tuned_since(tuners, before)}


def autotune_probe(cases: Sequence[dict[str, Any]], deadline: float, cache_label: str, channels: int,
                   emit: Callable[[dict[str, Any]], None]) -> None:
    """The probe process's work: each case once, in order, while the deadline allows."""
    from scripts.gpu_check.plan import CaseRunner, Deadline
    from scripts.gpu_check.worker import classify_error

    torch.zeros(1, device=harness.DEVICE).add_(1)  # CUDA's context: not part of any first call
    find_autotuners()  # the kernel modules' import, likewise
    harness.synchronize()
    runner = CaseRunner(Deadline(deadline), emit, classify=classify_error, cleanup=harness.free_memory)
    for case in cases:
        variant = VARIANTS[case["variant"]]
        record = {**case, **_variant_fields(variant), "cache": cache_label, "C": channels}
        measure = functools.partial(_probe_case, case["op"], case["N"], variant, channels)
        runner.run(record, measure, group=case["op"])
    for skipped in runner.skipped:
        emit(skipped)


def _probe_cases(sizing: Any) -> list[dict[str, Any]]:
    """PAM then CAM, bf16 first (the N = 9409 crops, then a whole 1024 x 2048 frame's N = 32768)."""
    return [{"op": op, "N": n, "variant": v} for v in sizing.autotune_variants for op in ("pam", "cam")
            for n in sizing.autotune_ns]


def autotune(ctx: Any) -> None:
    """Cold then warm-cache first calls, each in a fresh process (see the module docstring)."""
    cases = _probe_cases(ctx.sizing)
    if not ctx.runner.deadline.allows(PROBE_MIN_S):
        reason = "section deadline: no time for a probe process"
        ctx.runner.skipped += [{**case, "status": "skipped", "reason": reason} for case in cases]
        return
    with tempfile.TemporaryDirectory(prefix="gpu_check_caches_") as root:
        caches = {"TRITON_CACHE_DIR": f"{root}/triton", "TRITON_HOME": f"{root}/triton_home",
                  "XDG_CACHE_HOME": f"{root}/xdg", "HOME": f"{root}/home"}
        for path in caches.values():
            Path(path).mkdir()
        # The cold pass may use 70% of the time left; the warm pass repeats what the cold one finished.
        cold_deadline = time.time() + 0.7 * ctx.runner.deadline.remaining()
        finished = _run_probe(ctx, cases, cold_deadline, "cold", caches)
        done = [c for c in cases if (c["op"], c["N"], c["variant"]) in finished]
        if done:
            _run_probe(ctx, done, ctx.runner.deadline.at, "warm", caches)


def _run_probe(ctx: Any, cases: list[dict[str, Any]], deadline: float, label: str,
               caches: dict[str, str]) -> set[tuple]:
    """One probe process; returns the (op, N, variant) it measured. Its records go to the events,
    and its cases skipped for time or failed count as the section's (``ctx.runner``)."""
    from scripts.gpu_check.supervisor import repo_env

    argv = [sys.executable, "-m", "scripts.gpu_check", "--out", str(ctx.out), "--probe", json.dumps(cases),
            "--probe-cache", label, "--probe-deadline", str(deadline),
            "--probe-channels", str(ctx.sizing.channels)]
    # The probe stays in the worker's process group: a worker killed by the supervisor takes it along.
    with open(ctx.out / WORKER_LOG, "ab") as out:
        process = subprocess.Popen(argv, env=repo_env(caches), stdout=out, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=max(1.0, deadline - time.time() + 15.0))  # grace: a case may overrun
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            ctx.runner.skipped.append({"op": "autotune", "cache": label, "status": "skipped",
                                       "reason": "the probe process overran its deadline and was stopped"})
    finished = set()
    for event in EventReader(ctx.out / EVENTS_NAME).read_new():  # a line cut by a kill is left out
        data = event.get("data", {})
        if event["event"] != "record" or event.get("section") != "autotune" or data.get("cache") != label:
            continue
        ctx.runner.adopt(data)
        if data.get("status") == "ok":
            finished.add((data["op"], data["N"], data["variant"]))
    return finished


# ---------------------------------------------------------------------------------------------
# pam / cam timings
# ---------------------------------------------------------------------------------------------


def _sdpa_efficient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return scaled_dot_product_attention(q, k, v, scale=1.0)


@dataclass(frozen=True)
class Impl:
    """One implementation of an op and the layout it takes its operands in."""

    name: str
    fn: Callable[..., torch.Tensor]
    to_native: Callable[[torch.Tensor], torch.Tensor] = harness.identity


IMPLS = {
    "pam": (Impl("fused", lambda q, k, v: position_attention(q, k, v, backend="triton")),
            Impl("reference", lambda q, k, v: position_attention(q, k, v, backend="reference")),
            Impl("sdpa_efficient", _sdpa_efficient, harness.to_sdpa_layout)),
    "cam": (Impl("fused", lambda x: channel_attention(x, backend="triton")),
            Impl("reference", lambda x: channel_attention(x, backend="reference"))),
}


def _time_case(op: str, impl: Impl, pass_: str, shape: AttentionShape, variant: Variant,
               tensors: Sequence[torch.Tensor], grad_out: torch.Tensor, sizing: Any) -> dict[str, Any]:
    backward = pass_ != "forward"
    native = [impl.to_native(t).detach().requires_grad_(backward) for t in tensors]
    step = harness.make_step(impl.fn, native, pass_, impl.to_native(grad_out))
    with matmul_precision(variant.precision):
        _, first_s = harness.timed(step)  # autotuning, compilation, cuBLAS handles
        peak, _ = harness.peak_memory_bytes(step)
        ms = harness.median_ms(step, warmup_ms=sizing.bench_warmup_ms, rep_ms=sizing.bench_rep_ms)
    flops = (harness.pam_flops if op == "pam" else harness.cam_flops)(shape, pass_)
    return {"median_ms": round(ms, 4), "first_call_ms": round(1000 * first_s, 3), "peak_bytes": peak,
            "flops": flops, "tflops": round(flops / ms / 1e9, 2)}


def timing(ctx: Any, op: str) -> None:
    """Every implementation of ``op``, forward and forward+backward, over the grid, in priority order."""
    sizing = ctx.sizing
    for batch in sizing.timing_batches:
        for height, width in sizing.timing_sizes:
            shape = _shape(sizing, batch, height, width)
            # The variants of one dtype (fp32 at each precision) share its inputs.
            for _, names in itertools.groupby(sizing.timing_variants, key=lambda v: VARIANTS[v].dtype):
                _time_variants(ctx, op, shape, [VARIANTS[name] for name in names])


def _time_variants(ctx: Any, op: str, shape: AttentionShape, variants: Sequence[Variant]) -> None:
    """Every implementation and pass of ``op`` at ``variants`` (one dtype), on one set of inputs."""
    harness.free_memory()  # the previous dtype's inputs, released when its call returned
    torch.manual_seed(0)
    tensors, grad_out = _inputs(op, shape, variants[0].dtype)
    for variant, impl, pass_ in itertools.product(variants, IMPLS[op], harness.PASSES):
        case = {"op": op, "impl": impl.name, "pass": pass_, **_shape_fields(shape),
                **_variant_fields(variant)}
        measure = functools.partial(_time_case, op, impl, pass_, shape, variant, tensors, grad_out,
                                    ctx.sizing)
        ctx.runner.run(case, measure, group=shape.id)
