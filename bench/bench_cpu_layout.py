"""NCHW against channels_last (NHWC) on the CPU: training and attack throughput of the demo's networks.

Why: the demo trains and attacks 21 narrow ResNets on two cores, and oneDNN's NHWC convolutions are
faster than its NCHW ones at these channel counts. NHWC is still opt-in (``NEUREG_CHANNELS_LAST=1``):
torch 2.14.1's oneDNN crashes in an NHWC weight gradient on some CPUs (models/runtime.py).
This measures, in one thread, the demo's None,
regularized (a random 1500-image target at the stimuli's demo size) and VOne networks for ``--epochs``
epochs each way, then the demo's Linf FMN attack on the None network, and prints images per second and the
NHWC / NCHW ratio of each.

    python bench/bench_cpu_layout.py --epochs 1
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def _train_rate(net: dict, train: dict, reg: dict, data, images, target, channels_last: bool) -> float:
    from neureg.models.runtime import Runtime
    from neureg.models.vision.group import train_network

    result = train_network(net, train, reg, data, images, target, seed=0, runtime=Runtime(channels_last=channels_last))
    seconds = sum(r["seconds"] for r in result.history)
    return train["epochs"] * (len(data.train_y) // train["batch_size"]) * train["batch_size"] / seconds


def _attack_rate(data, channels_last: bool, n_images: int) -> float:
    from neureg.experiments.demo import SIZES
    from neureg.models.robustness import attack_registry, attacks
    from neureg.models.vision.networks import build_network

    torch.manual_seed(0)
    model = build_network({**SIZES["full"]["network"], "n_classes": 10}).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    config = attack_registry.validate_attack_config({"attack": "linf_fmn", "steps": 50})
    start = time.perf_counter()
    attacks.minimal_perturbations(model, data.test_x[:n_images], data.test_y[:n_images], [config], device="cpu")
    return n_images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--attack-images", type=int, default=110)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from neureg.experiments.demo import SIZES
    from neureg.models.vision.datasets import load_mnist_demo

    sizes, data = SIZES["full"], load_mnist_demo()
    rng = np.random.default_rng(0)
    images = rng.random((1500, 18, 32)).astype(np.float32)  # 36x64 stimuli at the demo's image scale 0.5
    target = np.corrcoef(rng.standard_normal((1500, 40)))
    train = dict(sizes["train"], epochs=args.epochs)
    cases = {
        "None": (sizes["network"], {"alpha": 0.0}),
        "regularized": (sizes["network"], sizes["regularizer"]),
        "VOne": (sizes["vone"], {"alpha": 0.0}),
    }
    report = {"threads": 1, "epochs": args.epochs}
    for name, (net, reg) in cases.items():
        nchw, nhwc = (_train_rate(net, train, reg, data, images, target, layout) for layout in (False, True))
        report[f"train {name} images/s"] = {
            "nchw": round(nchw),
            "channels_last": round(nhwc),
            "ratio": round(nhwc / nchw, 2),
        }
    _attack_rate(data, False, 4)  # imports and first-call set-up out of the clock
    nchw, nhwc = (_attack_rate(data, layout, args.attack_images) for layout in (False, True))
    report["linf FMN (50 steps) images/s"] = {
        "nchw": round(nchw, 1),
        "channels_last": round(nhwc, 1),
        "ratio": round(nhwc / nchw, 2),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
