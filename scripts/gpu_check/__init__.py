"""The one-call GPU check: everything a lent GPU must measure for danet-fused, in under 8 minutes.

On the GPU machine, from the checkout (torch, triton, timm and pytest preinstalled, no network)::

    PYTHONPATH=$PWD python -m scripts.gpu_check --out $OUT            # or scripts/gpu_check.sh $OUT
    PYTHONPATH=$PWD python -m scripts.gpu_check --out $OUT --quick    # about 4 minutes
    PYTHONPATH=$PWD python -m scripts.gpu_check --out $OUT --only pam,cam --budget 200

It writes ``gpu_check.json`` (every number, raw) and ``gpu_check.md`` (the tables, with the
ratios against the reference computed from the JSON by :func:`report.render_markdown`) into
``--out``, rewritten as the run goes, plus ``events.jsonl``, ``worker.log`` and ``pytest.log``.
Without CUDA it refuses at once (exit status 2). Exit status 0: every section done and the
GPU tests passed; 1 otherwise (the report says what).

Sections (``--only`` / ``--skip`` take comma lists of these names), in run order:

* ``tests``: ``python -m pytest -m gpu -x -q -n 4 tests`` in a subprocess (``--test-workers``).
* ``accuracy``: PAM and CAM at d = 64, C = 512, N = 9409 and 32768, B = 1, in bf16, fp16 and
  fp32 at each matmul precision ("highest", "high", "medium") against float64, the max
  relative error of the output and of every gradient, beside the reference's own in the
  same dtype and precision.
* ``autotune``: first-call time and the configs chosen at N = 9409 and 32768, in fresh
  processes with cold, then warm, caches.
* ``pam``, ``cam``: median time and peak memory, forward and forward+backward, fused against
  the bmm reference and (PAM) SDPA's memory-efficient backend, at 64x64, 97x97, 128x128 and
  128x256, B = 1 and 2, bf16 and fp32 ("highest" and "high").
* ``train``: one DANet-ResNet101 training step at 1024 x 2048, fused against reference
  attention, fp32 and bf16 autocast: time and memory, OOM recorded.
* ``eval``: images/s on 1024 x 2048 frames, sliding 769 and 768 windows, single scale,
  fused against reference attention, bf16 autocast and fp32.

Time plan (``plan.py`` holds the numbers; a section may also use, up to twice its budget,
what earlier sections left unused, never what later ones are owed). Estimated from the H100
peer baseline (../shared/baseline/h100_peers.md) and first principles: no GPU had been lent
when this was written, so the first run is also the check of the plan; the deadlines make it
safe either way (a section that overruns is cut case by case, or killed, and reported).

=========  =====  =====  ==========================================================================
section    full   quick  what takes the time (full)
=========  =====  =====  ==========================================================================
tests      100 s   60 s  about ten GPU tests; compiling and autotuning the kernels at N = 9409
accuracy    45 s   20 s  20 cases; float64 references (PAM at N = 32768: ~4 TFLOP, ~40 GB)
autotune    60 s   30 s  12 cold first calls (compilation + tuning) and their warm repeats, 2 processes
pam        100 s   30 s  144 cases; reference and SDPA at N = 32768 in fp32 (100-230 ms a call)
cam         30 s   15 s  96 cases of a few ms each
train       60 s   30 s  4 cases: ResNet-101 built 4 times, 5 steps each at 1024 x 2048 (fp32 ~1 s)
eval        45 s   25 s  8 cases (full): 8 windows a frame, 4 frames each (fp32 ~2 s a frame)
reserve     20 s   20 s  start (torch, CUDA), a worker restart, the last report
total      465 s  240 s  ``--budget`` (the run's hard end); with the machine's start (1-2 min),
                         one full run fits in the session's 15 minutes of device time
=========  =====  =====  ==========================================================================
"""

from scripts.gpu_check.cli import main

__all__ = ["main"]
