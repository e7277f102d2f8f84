"""K networks trained as one fused group against the same K trained one after another, on the CPU.

Why: the demo's narrow networks leave the CPU mostly in per-step overhead of tiny convolutions; a group of
K puts K networks' channels into each kernel (models/vision/group.py). For K = 1, 2, 4, 8 this trains K
networks of the demo's width (the demo's schedule, one epoch of ``--images`` digits) both ways, once all
unregularized and once all regularized (each with its own random target at the stimuli's demo size), and
prints networks per minute and the fused / alone ratio.

    python bench/bench_fused.py --images 2048 --threads 1
    python bench/bench_fused.py --paper-step --threads 2     # the paper's ResNet18 step, K = 1 and 2

``--paper-step`` times the paper protocol's regularized step (ResNet18 width 1, 64 CIFAR-sized images and
64 stimulus images of 36x64 per network) fused for K = 1 and 2 (gpu_bench_fused.py's rig), with its FLOPs:
seconds per network-step and what 31,250 steps would take per network on this CPU.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def _members(k: int, regularized: bool, sizes: dict, train: dict):
    from neureg.models.vision.group import Member

    members = []
    for seed in range(k):
        if regularized:
            rng = np.random.default_rng(seed)
            images = (rng.random((600, 18, 32)) * 255).astype(np.uint8)
            target = np.corrcoef(rng.standard_normal((600, 40))).astype(np.float32)
            members.append(Member(sizes["network"], train, sizes["regularizer"], images, target, seed=seed))
        else:
            members.append(Member(sizes["network"], train, {"alpha": 0.0}, seed=seed))
    return members


def _seconds(members, data, fused: bool) -> float:
    from neureg.models.runtime import Runtime
    from neureg.models.vision.group import train_group

    start = time.perf_counter()
    if fused:
        train_group(members, data, Runtime())
    else:
        for member in members:
            train_group([member], data, Runtime())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048, help="training digits per epoch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--paper-step", action="store_true", help="time the paper's ResNet18 step instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.paper_step:
        return paper_step(args.threads)
    from neureg.experiments.demo import SIZES
    from neureg.models.vision.datasets import load_mnist_demo

    sizes, data = SIZES["full"], load_mnist_demo()
    train = dict(sizes["train"], epochs=1, max_train_images=args.images)
    report = {"threads": args.threads, "images per epoch": args.images, "width": sizes["network"]["width"]}
    for regularized in (False, True):
        kind = "regularized" if regularized else "None"
        _seconds(_members(1, regularized, sizes, dict(train, max_train_images=256)), data, False)  # warm-up
        for k in args.groups:
            members = _members(k, regularized, sizes, train)
            alone = _seconds(members, data, fused=False)
            together = _seconds(members, data, fused=True)
            report[f"{kind} K={k}"] = {
                "alone networks/min": round(60 * k / alone, 2),
                "fused networks/min": round(60 * k / together, 2),
                "ratio": round(alone / together, 2),
            }
            print(kind, k, report[f"{kind} K={k}"], flush=True)
    print(json.dumps(report, indent=1))


def paper_step(threads: int) -> None:
    """The paper's regularized ResNet18 step, fused for K = 1 and 2, on this CPU (see the module notes)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_bench_fused import PAPER_STEPS, fused_rig, step_flops

    from neureg.models.runtime import Runtime

    s = {"batch": 64, "pairs": 32, "width": 1.0}
    flops = step_flops(fused_rig(1, s, Runtime())[1])
    report = {"threads": threads, "gflop per network-step": round(flops / 1e9, 1)}
    for k in (1, 2):
        step = fused_rig(k, s, Runtime())[0]
        step()  # warm-up
        start = time.perf_counter()
        for _ in range(2):
            step()
        seconds = (time.perf_counter() - start) / 2 / k
        report[f"K={k}"] = {
            "s per network-step": round(seconds, 2),
            "GFLOPS": round(flops / seconds / 1e9, 1),
            "days per paper network": round(seconds * PAPER_STEPS / 86400, 1),
        }
        print(k, report[f"K={k}"], flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
