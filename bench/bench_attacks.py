"""Time minimal_perturbations per attack config on a small CNN, on the CPU.

Why: the minimal-perturbation table is the slowest stage of the pipeline; these numbers say how many
images an evaluation can afford per attack and which attacks to leave out of a CPU demo.

The CNN (two conv layers, ~20k parameters) is first trained for a few seconds on a synthetic
10-class task (faint class templates on natural-ish noise), so the attacks face a model with real
margins rather than random weights. Each config is run once, untimed, on two images first, so that
one-off costs (foolbox import, Brendel-Bethge's numba compilation) are reported apart.

    python bench/bench_attacks.py --n-images 32
    python bench/bench_attacks.py --n-images 64 --quick --attacks linf_pgd l2_ddn
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from neureg.models.robustness.attacks import default_attack_configs, minimal_perturbations
from neureg.models.runtime import accuracy


class SmallCNN(nn.Module):
    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(32 * 16, n_classes),
        )

    def forward(self, x):
        return self.net(x)


def synthetic_task(n: int, seed: int, n_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random backgrounds in [0.2, 0.8] plus a faint smooth template per class."""
    templates_rng, rng = np.random.default_rng(12345), np.random.default_rng(seed)
    templates = ndimage.gaussian_filter(templates_rng.standard_normal((n_classes, 32, 32)), (0, 2, 2))
    templates /= np.abs(templates).max(axis=(1, 2), keepdims=True)
    background = ndimage.gaussian_filter(rng.random((n, 32, 32)), (0, 1.5, 1.5))
    background = 0.2 + 0.6 * (background - background.min()) / np.ptp(background)
    labels = rng.integers(0, n_classes, n)
    images = np.clip(background + 0.2 * templates[labels], 0, 1)[:, None]
    return torch.tensor(images, dtype=torch.float32), torch.tensor(labels)


def train_small_cnn(seed: int, steps: int = 150) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN()
    x, y = synthetic_task(2048, seed=seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=32, help="test images per attack")
    parser.add_argument("--quick", action="store_true", help="the quick (demo) config set")
    parser.add_argument("--attacks", nargs="*", help="only configs of these attack names")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest on small, shared machines)"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    model = train_small_cnn(args.seed)
    x, y = synthetic_task(args.n_images, seed=args.seed + 2)
    pool_x, pool_y = synthetic_task(256, seed=args.seed + 3)
    print(
        f"small CNN trained in {time.perf_counter() - start:.1f} s; clean accuracy on the "
        f"{args.n_images} test images {accuracy(model, x, y):.2f}; torch threads {args.threads}"
    )

    configs = default_attack_configs(quick=args.quick)
    if args.attacks:
        configs = [c for c in configs if c["attack"] in args.attacks]
    header = f"{'attack':10s} {'params':58s} {'warm-up s':>9s} {'run s':>7s} {'img/s':>7s} {'found':>6s} {'median':>8s}"
    print(header)
    print("-" * len(header))
    for config in configs:
        start = time.perf_counter()
        minimal_perturbations(
            model, x[:2], y[:2], [config], starting_pool=(pool_x, pool_y), batch_size=args.batch_size, seed=args.seed
        )
        warm_up = time.perf_counter() - start
        start = time.perf_counter()
        result = minimal_perturbations(
            model, x, y, [config], starting_pool=(pool_x, pool_y), batch_size=args.batch_size, seed=args.seed
        )
        elapsed = time.perf_counter() - start
        params = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items() if k != "attack"
        )
        found = np.isfinite(result.distances[0]).mean()
        print(
            f"{config['attack']:10s} {params[:58]:58s} {warm_up:9.1f} {elapsed:7.1f} "
            f"{args.n_images / elapsed:7.2f} {found:6.0%} {result.median(result.norms[0]):8.4f}"
        )


if __name__ == "__main__":
    main()
