"""The one-call GPU check: what a lent GPU must measure for danet-fused, in under 8 minutes.

On the GPU machine, from the checkout (torch, triton, timm, pytest, pytest-xdist and
pytest-benchmark preinstalled, no network)::

    PYTHONPATH=$PWD python -m scripts.gpu_check --out $OUT            # or scripts/gpu_check.sh $OUT
    PYTHONPATH=$PWD python -m scripts.gpu_check --out $OUT --quick    # about 4 minutes
    PYTHONPATH=$PWD python -m scripts.gpu_check --out $OUT --only pam,cam --budget 200

It measures nothing itself: it runs the GPU tests and the benchmark suite (benchmarks/) on the
cases the issues' targets name, each section in fresh processes within its deadline
(``plan.py``), kills a command that hangs and keeps what came before (``supervisor.py``), and
writes ``gpu_check.json`` (every case as the suite recorded it) and ``gpu_check.md`` (the
targets, met or not, and the suite's tables: ``report.py``) into ``--out`` as the run goes,
beside ``<section>.jsonl`` (the cases as they came) and ``<section>.log``. Without CUDA it
refuses at once (exit status 2). Exit status 0: every section done, the GPU tests passed.

Sections (``--only`` / ``--skip``), in run order, and their budgets in seconds (full, quick).
A section may also use, up to twice its budget, what earlier ones left, never what later ones
are owed. Estimated from the H100 peer baseline (../shared/baseline/h100_peers.md): no GPU had
been lent when this was written, so the first run checks the plan; the deadlines make it safe.

* ``tests`` (100, 60): ``pytest -m gpu -x -n 4 tests``; compiling and autotuning at N = 9409.
* ``autotune`` (60, 30): the fused kernels at N = 9409 and 32768, B = 1, bf16, fp32 and fp32
  "high", twice: an empty Triton cache, then warm; each case's first call.
* ``pam`` (130, 50): fused, reference and SDPA, forward and forward+backward, 64x64 to 128x256,
  B = 1 and 2, bf16, fp32, fp32 "high" (fp16 and fp32 "medium" at B = 1, 97x97 and 128x256):
  168 cases with their errors against float64; the reference in fp32 at N = 32768 takes
  100-230 ms a call.
* ``cam`` (45, 20): fused and reference on the same grid, 112 cases of a few ms.
* ``train`` (90, 45): a DANet-ResNet101 training step at 1024 x 2048, fused and reference, fp32
  then bf16 autocast (the model built 4 times, 5 steps each).
* 20 s are kept for the processes' start and the last report: 465 s in all (240 s with
  ``--quick``), ``--budget``; with the machine's start (1-2 min) one full run fits in the
  session's 15 minutes of device time.
"""
