"""Batched against one-window-at-a-time evaluation on the CPU, in one process (docs/evaluation.md).

The variants run alternately, round after round, on the same image and random-weight model, so
a load change on a shared machine hits all of them alike; the load average is printed before and
after. Each variant is warmed up once (the cost estimate, the allocator) before the rounds.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/measure_eval_cpu.py --backbone resnet50 \\
        --height 256 --width 512 --crop 192 --protocol release --flip --rounds 3

(``PYTHONPATH=$PWD``: the checkout's danet, not an installed one.) On a GPU, ``--device cuda``
times Cityscapes frames (``--backbone resnet101 --height 1024 --width 2048 --crop 768``), and
``--attention reference`` the bmm attention instead of the fused one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time

import torch

from danet.config import ATTENTIONS, INFERENCE_PROTOCOLS, EvalConfig, resolve_eval_config
from danet.evaluation.engine import predict_scores
from danet.evaluation.protocols import inference_plan
from danet.models import DANet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--crop", type=int, default=192)
    parser.add_argument("--protocol", choices=INFERENCE_PROTOCOLS, default="release")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attention", choices=ATTENTIONS, default="fused")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = DANet(args.classes, backbone=args.backbone, attention=args.attention).eval().to(device)
    image = torch.randn(1, 3, args.height, args.width, device=device)
    base = resolve_eval_config(EvalConfig(protocol=args.protocol, mode="sliding", crop_size=args.crop,
                                          base_size=max(args.height, args.width), flip=args.flip))
    variants = {
        "one window at a time": dataclasses.replace(base, window_memory_mb=0, channels_last=False),
        "batched": dataclasses.replace(base, channels_last=False),
        "batched + channels_last": dataclasses.replace(base, channels_last=True),
    }
    forwards = sum(stage.forwards for stage in inference_plan(args.height, args.width, base))
    load_before = os.getloadavg()
    predictions = {name: predict_scores(model, image, args.classes, cfg)["sum"].argmax(1)  # warm-up
                   for name, cfg in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, cfg in variants.items():
            start = time.perf_counter()
            predict_scores(model, image, args.classes, cfg)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    load_after = os.getloadavg()
    reference = times["one window at a time"]
    print(f"DANet-{args.backbone} ({args.attention} attention, {device}), {args.classes} classes, "
          f"image {args.height}x{args.width}, "
          f"protocol {args.protocol}, crop {args.crop}, flip {args.flip}: {forwards} forwards of "
          f"{base.crop_size}x{base.crop_size} per image; torch {torch.__version__}, "
          f"{args.threads} thread(s), {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    before, after = (" ".join(f"{v:.2f}" for v in load) for load in (load_before, load_after))
    print(f"load average (1, 5, 15 min) before {before}, after {after}; {args.rounds} alternating rounds")
    print("| path | min s | median s | speed-up (min) | speed-up (median) | same prediction |")
    print("|---|---|---|---|---|---|")
    for name, values in times.items():
        same = bool(torch.equal(predictions[name], predictions["one window at a time"]))
        median = statistics.median(values)
        print(f"| {name} | {min(values):.2f} | {median:.2f} | {min(reference) / min(values):.2f}x | "
              f"{statistics.median(reference) / median:.2f}x | {same} |")


if __name__ == "__main__":
    main()
