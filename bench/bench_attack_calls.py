"""Calls per batch of every attack of the standard evaluation, its CPU throughput, and a projected GPU time.

Why: on a GPU an attack's time is its number of *sequential* model calls times the latency of one call at
its batch size, not its arithmetic; that count is a property of the attack and the network's margins, and
it can be measured on any machine. For every attack of ``default_attack_configs()`` (and AutoAttack at the
dataset's first Linf and L2 budgets) this runs one batch of ``--n-images`` images through the small CNN of
``bench_attacks.py`` and counts forward calls with gradients (a gradient call: forward + backward) and
without, and the images per second on this CPU.

Projection (say what it assumes): one ResNet18 gradient call on B CIFAR images costs
``max(LAUNCH_S, B * PER_IMAGE_S)``, the larger of a launch-bound floor and the arithmetic. Both come from the
H200 run (docs/gpu.md): ``LAUNCH_S`` = 14.4 ms, an eager float32 training step at batch 64 (the GPU ~20%
busy, so the step time is launches, not images), and ``PER_IMAGE_S`` = 4.06 ms / 64, the same step captured
as a CUDA graph (95% busy: arithmetic). A forward call costs a third of a gradient call. The standard
evaluation of 1000 images is ``ceil(1000 / B)`` batches; the table gives B = 128 (the attacks' batch today)
and B = 1000 (one batch). A count taken on the small CNN stands in for ResNet18's: attacks that stop early
stop on the margins, which differ between networks, so treat the projection as an order of magnitude.

    python bench/bench_attack_calls.py --n-images 16
    python bench/bench_attack_calls.py --n-images 32 --attacks linf_fmn l2_ddn --no-autoattack
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attacks import synthetic_task, train_small_cnn  # noqa: E402

from neureg.models.robustness.attacks import default_attack_configs, minimal_perturbations  # noqa: E402
from neureg.models.robustness.autoattack import autoattack_robust_accuracy  # noqa: E402
from neureg.models.robustness.evaluation import DATASET_EPSILONS  # noqa: E402

LAUNCH_S = 14.4e-3
PER_IMAGE_S = 4.06e-3 / 64
FORWARD_SHARE = 1 / 3


class CallCounter(nn.Module):
    """The model, counting its calls: with gradients (the input requires grad) or forward only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.gradient_calls, self.forward_calls = model, 0, 0

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            self.gradient_calls += 1
        else:
            self.forward_calls += 1
        return self.model(x)


def projected_seconds(gradient_calls: int, forward_calls: int, batch: int, n_images: int = 1000) -> float:
    """GPU seconds for ``n_images`` in batches of ``batch`` (module notes)."""
    gradient = max(LAUNCH_S, batch * PER_IMAGE_S)
    return math.ceil(n_images / batch) * (gradient_calls + FORWARD_SHARE * forward_calls) * gradient


def measure(run, counter: CallCounter, n_images: int) -> dict:
    counter.gradient_calls = counter.forward_calls = 0
    start = time.perf_counter()
    outcome = run()
    seconds = time.perf_counter() - start
    row = {
        "gradient calls": counter.gradient_calls,
        "forward calls": counter.forward_calls,
        "CPU images/s": round(n_images / seconds, 2),
        "GPU s per 1000 images, B=128": round(projected_seconds(counter.gradient_calls, counter.forward_calls, 128)),
        "GPU s per 1000 images, B=1000": round(projected_seconds(counter.gradient_calls, counter.forward_calls, 1000)),
    }
    return {**row, **outcome}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=16, help="images in the one batch each attack runs")
    parser.add_argument("--attacks", nargs="*", help="only configs of these attack names")
    parser.add_argument("--no-autoattack", action="store_true")
    parser.add_argument("--dataset", default="cifar", help="whose fixed-epsilon budgets AutoAttack uses")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    counter = CallCounter(train_small_cnn(0))
    x, y = synthetic_task(args.n_images, seed=2)
    pool = synthetic_task(256, seed=3)
    n = args.n_images
    report = {"images per batch": n, "threads": args.threads}
    configs = [c for c in default_attack_configs() if not args.attacks or c["attack"] in args.attacks]
    for config in configs:
        minimal_perturbations(counter, x[:2], y[:2], [config], starting_pool=pool, batch_size=n)  # warm-up (numba)

        def attack(config=config):
            result = minimal_perturbations(counter, x, y, [config], starting_pool=pool, batch_size=n)
            return {"median": round(float(result.median(result.norms[0])), 4)}

        name = f"{config['attack']} {config.get('steps', '')}".strip()
        report[name] = measure(attack, counter, n)
        print(name, report[name], flush=True)
    if not args.no_autoattack:
        budgets = DATASET_EPSILONS[args.dataset]
        for norm in ("linf", "l2"):
            epsilon = budgets[norm][0]

            def auto(norm=norm, epsilon=epsilon):
                return {"robust accuracy": autoattack_robust_accuracy(counter, x, y, norm, epsilon, batch_size=n)}

            name = f"autoattack {norm} {epsilon:g}"
            report[name] = measure(auto, counter, n)
            print(name, report[name], flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
