"""The GPU check's results (its JSON) as a markdown report: :func:`render_markdown`, a pure function.

Ratios are computed here, from the raw numbers the run recorded: speed-up = the reference's
time / the fused time (above 1 is better), memory fraction = the fused peak / the reference's
peak (below 1 is better). A case that did not produce a number shows why (OOM, refused,
error, skipped, not run). Renders partial results too: the report is rewritten as the run goes.
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.report import PASS_ORDER, format_bytes, format_number, format_ratio, markdown_table
from scripts.gpu_check.plan import VARIANT_SETTINGS

__all__ = ["TARGETS", "main", "render_markdown"]

VARIANT_ORDER = tuple(VARIANT_SETTINGS)
Record = Mapping[str, Any]


# ---------------------------------------------------------------------------------------------
# small formatters
# ---------------------------------------------------------------------------------------------


def _fraction(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator == 0:
        return "—"
    value = numerator / denominator
    return f"{value:.3f}" if value < 0.1 else f"{value:.2f}"


def _err(value: float | None) -> str:
    return "—" if value is None else f"{value:.1e}"


def _time(epoch: float | None) -> str:
    if epoch is None:
        return "—"
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ok(record: Record | None) -> bool:
    return record is not None and record.get("status", "ok") == "ok"


def _why(record: Record | None) -> str:
    """The cell of a case with no number: its status."""
    if record is None:
        return "not run"
    status = record.get("status", "ok")
    return {"oom": "OOM"}.get(status, status)


def _value(record: Record | None, key: str) -> float | None:
    return record.get(key) if _ok(record) else None


def _cell(record: Record | None, key: str, formatter: Any) -> str:
    return formatter(record[key]) if _ok(record) and record.get(key) is not None else _why(record)


def _order(value: str, order: Sequence[str]) -> int:
    return order.index(value) if value in order else len(order)


def _records(results: Mapping[str, Any], section: str) -> list[Record]:
    return list(results.get("records", {}).get(section, []))


# ---------------------------------------------------------------------------------------------
# targets: the issues' numbers, checked on the recorded cases
# ---------------------------------------------------------------------------------------------


def _timing(results: Mapping[str, Any], op: str, impl: str, pass_: str, variant: str, n: int,
            batch: int = 1) -> Record | None:
    for r in _records(results, op):
        if (r.get("impl"), r.get("pass"), r.get("variant"), r.get("N"), r.get("B")) == (
                impl, pass_, variant, n, batch):
            return r
    return None


def _worst_error(results: Mapping[str, Any], op: str, variant: str, n: int, impl: str) -> float | None:
    for r in _records(results, "accuracy"):
        if (r.get("op"), r.get("variant"), r.get("N")) == (op, variant, n) and _ok(r):
            return max(r["errors"][impl].values())
    return None


def _speedup_target(results: Mapping[str, Any], op: str, pass_: str, fused: str, reference: str,
                    at_least: float, n: int = 32768) -> tuple[str, bool | None]:
    ours = _value(_timing(results, op, "fused", pass_, fused, n), "median_ms")
    ref = _value(_timing(results, op, "reference", pass_, reference, n), "median_ms")
    if ours is None or ref is None:
        return "not measured", None
    measured = f"{ref / ours:.2f}x ({format_number(ours)} ms against {format_number(ref)} ms)"
    return measured, ref / ours >= at_least


def _memory_target(results: Mapping[str, Any], op: str, pass_: str, fused: str, reference: str,
                   at_most: float, n: int = 32768) -> tuple[str, bool | None]:
    ours = _value(_timing(results, op, "fused", pass_, fused, n), "peak_bytes")
    ref = _value(_timing(results, op, "reference", pass_, reference, n), "peak_bytes")
    if ours is None or ref is None or ref == 0:
        return "not measured", None
    return f"{ours / ref:.4f} ({format_bytes(ours)} against {format_bytes(ref)})", ours / ref <= at_most


def _error_target(results: Mapping[str, Any], op: str, variant: str, at_most: float,
                  n: int = 32768) -> tuple[str, bool | None]:
    worst = _worst_error(results, op, variant, n, "fused")
    if worst is None:
        return "not measured", None
    return f"{worst:.1e} (output and every gradient)", worst <= at_most


# (what, where it comes from, how it is checked). N = 32768 (128 x 256), B = 1, C = 512.
TARGETS: tuple[tuple[str, str, Any], ...] = (
    ("PAM bf16 forward: >= 2x faster than the reference", "issue 9",
     lambda r: _speedup_target(r, "pam", "forward", "bf16", "bf16", 2.0)),
    ("PAM bf16 forward+backward: >= 3x faster than the reference", "issue 10",
     lambda r: _speedup_target(r, "pam", "forward+backward", "bf16", "bf16", 3.0)),
    ("PAM bf16 forward+backward: peak memory < 1% of the reference's", "issue 10",
     lambda r: _memory_target(r, "pam", "forward+backward", "bf16", "bf16", 0.01)),
    ('PAM fp32 "high" forward+backward: faster than the reference\'s exact fp32 ("highest")', "issue 10",
     lambda r: _speedup_target(r, "pam", "forward+backward", "fp32-high", "fp32-highest", 1.0)),
    ('PAM fp32 "high": peak memory <= 1/50 of the reference\'s exact fp32', "issue 10",
     lambda r: _memory_target(r, "pam", "forward+backward", "fp32-high", "fp32-highest", 1 / 50)),
    ('PAM fp32 "high": max relative error <= 1e-5 against float64', "issue 10",
     lambda r: _error_target(r, "pam", "fp32-high", 1e-5)),
    ("CAM fp32 forward: >= 4x faster than the reference", "docs/performance.md",
     lambda r: _speedup_target(r, "cam", "forward", "fp32-highest", "fp32-highest", 4.0)),
    ("CAM fp32 forward+backward: >= 3x faster than the reference", "docs/performance.md",
     lambda r: _speedup_target(r, "cam", "forward+backward", "fp32-highest", "fp32-highest", 3.0)),
)


def _targets_section(results: Mapping[str, Any]) -> list[str]:
    rows = []
    for what, source, check in TARGETS:
        measured, met = check(results)
        rows.append((what, source, measured, {True: "met", False: "**not met**", None: "—"}[met]))
    return ["## Targets (N = 32768, B = 1, C = 512)", "",
            *markdown_table(("target", "from", "measured", ""), rows)]


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------


def _header(results: Mapping[str, Any]) -> list[str]:
    env, checkout = results.get("env", {}), results.get("checkout", {})
    device = env.get("device", "device not reported yet")
    details = ", ".join(filter(None, (
        f"{env['memory_gib']:g} GiB" if env.get("memory_gib") else None,
        f"{env['sm_count']} SMs" if env.get("sm_count") else None,
        f"compute capability {env['capability']}" if env.get("capability") else None,
        f"driver {env['driver']}" if env.get("driver") else None,
    )))
    software = ", ".join(f"{name} {env[key]}" for name, key in (
        ("torch", "torch"), ("triton", "triton"), ("CUDA", "cuda"), ("cuDNN", "cudnn"), ("timm", "timm"),
        ("numpy", "numpy"), ("Python", "python")) if env.get(key))
    commit = checkout.get("commit") or "unknown"
    if checkout.get("dirty"):
        commit += " (with uncommitted changes)"
    state = "finished" if results.get("finished") else "in progress (partial results)"
    lines = [f"# GPU check: {device}", ""]
    if results.get("synthetic"):
        lines += [f"> {results['synthetic']}", ""]
    lines += [
        f"- Device: {device}" + (f" ({details})" if details else ""),
        f"- Software: {software or '—'}",
        f"- Checkout: {commit}",
        f"- Run: {state}; started {_time(results.get('started_at'))}"
        + (f", {results['wall_s']:g} s in all" if results.get("wall_s") is not None else "")
        + f", budget {results.get('budget_s', 0):g} s" + (", --quick" if results.get("quick") else ""),
        f"- Command: `{results.get('command', '')}`",
    ]
    return lines


def _sections_table(results: Mapping[str, Any]) -> list[str]:
    rows = []
    for name, state in results.get("sections", {}).items():
        seconds = state.get("seconds")
        note = state.get("note") or ""
        if state.get("error"):
            note = (note + " " if note else "") + "error: " + state["error"].strip().splitlines()[-1]
        rows.append((name, state.get("status", "—"), "—" if seconds is None else f"{seconds:g}",
                     f"{state.get('budget_s', 0):g}", note.replace("|", "/")))
    return ["## Sections", "", *markdown_table(("section", "status", "seconds", "budget s", "note"), rows)]


def _tests_section(results: Mapping[str, Any]) -> list[str]:
    records = _records(results, "tests")
    if not records:
        return []
    r = records[-1]
    outcome = "timed out" if r.get("timed_out") else f"exit status {r.get('returncode')}"
    lines = ["## GPU tests", "", f"`{r.get('command')}`: {r.get('summary') or 'no summary line'} ({outcome}, "
             f"{r.get('seconds', 0):g} s)."]
    if r.get("returncode") != 0 and r.get("tail"):
        tail = "\n".join(r["tail"].rstrip().splitlines()[-40:])
        lines += ["", "```", tail, "```"]
    return lines


def _accuracy_section(results: Mapping[str, Any]) -> list[str]:
    records = _records(results, "accuracy")
    if not records:
        return []
    lines = ["## Accuracy against float64", "",
             "Max relative error (max |a - e| / max |e|) of the output and of each gradient, fused / "
             "reference in the same dtype and matmul precision. PAM with gamma and the residual "
             "(gamma = 0.5), q and k random normal x 0.5; CAM with gamma; B = 1."]
    for op in ("pam", "cam"):
        mine = sorted((r for r in records if r.get("op") == op),
                      key=lambda r: (r.get("N", 0), _order(r.get("variant", ""), VARIANT_ORDER)))
        if not mine:
            continue
        names = next((list(r["errors"]["fused"]) for r in mine if _ok(r)), [])
        header = ("N (H x W)", "dtype", "precision", *names, "worst fused", "worst reference")
        rows = []
        for r in mine:
            size = f"{r.get('N')} ({r.get('H')}x{r.get('W')})"
            if not _ok(r):
                rows.append((size, r.get("dtype"), r.get("precision"), *[_why(r)] * len(names), "—", "—"))
                continue
            fused, ref = r["errors"]["fused"], r["errors"]["reference"]
            cells = [f"{_err(fused.get(n))} / {_err(ref.get(n))}" for n in names]
            rows.append((size, r.get("dtype"), r.get("precision"), *cells, _err(max(fused.values())),
                         _err(max(ref.values()))))
        lines += ["", f"### {op.upper()}", "", *markdown_table(header, rows)]
    return lines


def _short_config(text: str) -> str:
    return text.replace(", num_ctas: 1", "").replace(", maxnreg: None", "").replace("num_", "")


def _autotune_section(results: Mapping[str, Any]) -> list[str]:
    records = [r for r in _records(results, "autotune") if r.get("op") in ("pam", "cam")]
    if not records:
        return []
    rows = []
    def order(r: Record) -> tuple:
        return r["op"], r.get("N", 0), _order(r.get("variant", ""), VARIANT_ORDER), r.get("cache", "")

    for r in sorted(records, key=order):
        chosen = "<br>".join(
            f"{t['kernel']}: {_short_config(t['config'])}"
            + (f" ({t['configs_timed']} of {t['configs']} timed, {t['bench_s']:g} s)"
               if t.get("configs_timed") is not None and t.get("bench_s") is not None else "")
            for t in r.get("tuned", [])) if _ok(r) else _why(r)
        if not chosen:
            chosen = "no autotuner found" if r.get("autotuners_found") == 0 else "none tuned"
        rows.append((r["op"].upper(), r.get("N"), r.get("variant"), r.get("cache"),
                     _cell(r, "first_forward_s", format_number), _cell(r, "first_backward_s", format_number),
                     _cell(r, "second_fwd_bwd_ms", format_number), chosen))
    return ["## Autotuning", "",
            "First call in a fresh process: 'cold' with empty Triton and user caches (compilation and "
            "tuning included), 'warm' over the caches the cold process left. B = 1, C = 512.", "",
            *markdown_table(("op", "N", "variant", "caches", "first forward s", "first backward s",
                             "second fwd+bwd ms", "configs chosen"), rows)]


def _timing_section(results: Mapping[str, Any], op: str) -> list[str]:
    records = _records(results, op)
    if not records:
        return []
    impls = ("fused", "reference", "sdpa_efficient") if op == "pam" else ("fused", "reference")
    by_key: dict[tuple, dict[str, Record]] = {}
    for r in records:
        key = tuple(r.get(k) for k in ("pass", "variant", "B", "N", "H", "W", "dtype", "precision"))
        by_key.setdefault(key, {})[r.get("impl")] = r
    header = ["pass", "dtype", "precision", "B", "H x W (N)", *(f"{i} ms" for i in impls),
              "speed-up vs reference"]
    if op == "pam":
        header.append("speed-up vs SDPA")
    header += [*(f"{i} peak" for i in impls), "memory fraction", "fused TFLOP/s"]
    rows = []
    def order(key: tuple) -> tuple:
        return _order(key[0], PASS_ORDER), _order(key[1], VARIANT_ORDER), key[2], key[3]

    for key in sorted(by_key, key=order):
        pass_, _, batch, n, h, w, dtype, precision = key
        cases = by_key[key]
        fused, ref = cases.get("fused"), cases.get("reference")
        row = [pass_, dtype, precision, batch, f"{h}x{w} ({n})",
               *(_cell(cases.get(i), "median_ms", format_number) for i in impls),
               format_ratio(_value(ref, "median_ms"), _value(fused, "median_ms"))]
        if op == "pam":
            sdpa = cases.get("sdpa_efficient")
            row.append(format_ratio(_value(sdpa, "median_ms"), _value(fused, "median_ms")))
        row += [*(_cell(cases.get(i), "peak_bytes", format_bytes) for i in impls),
                _fraction(_value(fused, "peak_bytes"), _value(ref, "peak_bytes")),
                _cell(fused, "tflops", "{:g}".format)]
        rows.append(row)
    title = {"pam": "PAM (position attention)", "cam": "CAM (channel attention)"}[op]
    return [f"## {title}: time and memory", "",
            "Median ms (triton.testing.do_bench: CUDA events, L2 flushed before each call); peak = "
            "max_memory_allocated during one call above its inputs; speed-up = other / fused; memory "
            "fraction = fused peak / reference peak. Inputs as the peer baseline: "
            + ("q, k random normal / 8, v random normal. SDPA: the memory-efficient backend on (B, 1, N, d) "
               "tensors, scale = 1.0." if op == "pam" else "x random normal."),
            "", *markdown_table(header, rows)]


def _pairs(records: Sequence[Record], key: Any) -> list[tuple[tuple, Record | None, Record | None]]:
    """Records grouped by ``key(record)``, each group as (key, fused, reference), in first-seen order."""
    groups: dict[tuple, dict[str, Record]] = {}
    for r in records:
        groups.setdefault(key(r), {})[r.get("attention")] = r
    return [(k, g.get("fused"), g.get("reference")) for k, g in groups.items()]


def _train_section(results: Mapping[str, Any]) -> list[str]:
    records = _records(results, "train")
    if not records:
        return []
    rows = []
    for (precision, h, w, batch, backbone), fused, ref in _pairs(
            records, lambda r: (r.get("precision"), r.get("H"), r.get("W"), r.get("B"), r.get("backbone"))):
        rows.append((backbone, f"{h}x{w}", batch, precision, _cell(fused, "median_ms", format_number),
                     _cell(ref, "median_ms", format_number),
                     format_ratio(_value(ref, "median_ms"), _value(fused, "median_ms")),
                     _cell(fused, "total_bytes", format_bytes), _cell(ref, "total_bytes", format_bytes),
                     _fraction(_value(fused, "total_bytes"), _value(ref, "total_bytes")),
                     " / ".join(_cell(r, "first_step_s", format_number) for r in (fused, ref))))
    return ["## Training step", "",
            "One step (forward, DANet's loss, backward, SGD with momentum), random weights; median ms over a "
            "few steps (CUDA events). Memory: everything the step needs (parameters, momentum, batch and the "
            "step's peak above them).", "",
            *markdown_table(("model", "input", "B", "precision", "fused ms", "reference ms", "speed-up",
                             "fused memory", "reference memory", "memory fraction",
                             "first step s (fused / ref)"), rows)]


def _eval_section(results: Mapping[str, Any]) -> list[str]:
    records = _records(results, "eval")
    if not records:
        return []
    rows = []
    for (precision, crop, h, w), fused, ref in _pairs(
            records, lambda r: (r.get("precision"), r.get("crop"), r.get("H"), r.get("W"))):
        some = fused if _ok(fused) else ref
        windows = some.get("windows", "—") if _ok(some) else "—"
        rows.append((f"{h}x{w}", precision, crop, windows, _cell(fused, "images_per_s", "{:.2f}".format),
                     _cell(ref, "images_per_s", "{:.2f}".format),
                     format_ratio(_value(fused, "images_per_s"), _value(ref, "images_per_s")),
                     _cell(fused, "peak_bytes", format_bytes), _cell(ref, "peak_bytes", format_bytes),
                     _fraction(_value(fused, "peak_bytes"), _value(ref, "peak_bytes"))))
    model = records[0].get("backbone", "")
    return ["## Evaluation throughput", "",
            f"Images/s of sliding-window inference (single scale, no flip, stride 2/3 of the crop), {model}, "
            "random weights, under torch.inference_mode; the first frame (autotuning) is left out. Peak: one "
            "frame above the model and the image.", "",
            *markdown_table(("frame", "precision", "crop", "windows", "fused img/s", "reference img/s",
                             "speed-up", "fused peak", "reference peak", "memory fraction"), rows)]


def _left_out_section(results: Mapping[str, Any]) -> list[str]:
    lines = []
    skipped = results.get("skipped", [])
    if skipped:
        counts: dict[str, int] = {}
        for case in skipped:
            counts[case.get("section", "?")] = counts.get(case.get("section", "?"), 0) + 1
        lines.append("Skipped for time: " + ", ".join(f"{n} in {s}" for s, n in counts.items()) + ".")
    errors = [(section, r) for section, records in results.get("records", {}).items() for r in records
              if r.get("status") == "error"]
    for section, r in errors[:20]:
        keys = ("op", "impl", "pass", "variant", "attention", "precision", "N", "B")
        what = ", ".join(f"{k}={r[k]}" for k in keys if k in r)
        first_line = (r.get("error") or "").strip().splitlines()[:1]
        lines.append(f"- {section} ({what}): {first_line[0] if first_line else 'error'}")
    for section, state in results.get("sections", {}).items():
        if state.get("error"):
            tail = "\n".join(state["error"].rstrip().splitlines()[-15:])
            lines += ["", f"{section} ({state.get('status')}):", "", "```", tail, "```"]
    return ["## Left out and failed", "", *lines] if lines else []


def render_markdown(results: Mapping[str, Any]) -> str:
    """The whole report for one run's results (see the module docstring)."""
    parts = [_header(results), _sections_table(results), _targets_section(results), _tests_section(results),
             _accuracy_section(results), _autotune_section(results), _timing_section(results, "pam"),
             _timing_section(results, "cam"), _train_section(results), _eval_section(results),
             _left_out_section(results)]
    return "\n\n".join("\n".join(p) for p in parts if p) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scripts.gpu_check.report gpu_check.json``: print the report of a saved run."""
    parser = argparse.ArgumentParser(prog="python -m scripts.gpu_check.report", description=main.__doc__)
    parser.add_argument("results", type=Path, help="a gpu_check.json")
    args = parser.parse_args(argv)
    print(render_markdown(json.loads(args.results.read_text())), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
