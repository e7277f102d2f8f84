"""Benchmark: simulate one paper-sized scan, then the oracle stage on it (the oracle stage's performance goals).

Goals on the project's 2-core machines: simulating a 5000-image (+100 oracle x 10) x 8000-unit scan in
<= 60 s; OracleStats plus the similarity matrices in <= 20 s. Prints wall and CPU seconds per step and
the peak resident memory; the load average is printed too, because other jobs sharing the cores slow
every wall-clock number.

    python bench/bench_oracle.py                       # the paper's sizes
    python bench/bench_oracle.py --units 2000 --images 1000
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from contextlib import contextmanager

import numpy as np

from neureg.models.neural import oracle as orc
from neureg.models.neural import simulator as sim


@contextmanager
def timed(label: str, totals: dict):
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    totals[label] = wall
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{label:<34} {wall:7.2f} s wall {cpu:7.2f} s cpu   peak RSS {peak_mib:7.0f} MiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="images shown once (non-oracle)")
    parser.add_argument("--oracle", type=int, default=100, help="oracle images")
    parser.add_argument("--repeats", type=int, default=10, help="repeats of each oracle image")
    parser.add_argument("--units", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    n_images = args.images + args.oracle
    print(
        f"scan: {n_images} distinct images ({args.oracle} oracle x {args.repeats}), "
        f"{args.images + args.oracle * args.repeats} trials, {args.units} units; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    totals: dict[str, float] = {}
    with timed("image set (cached per process)", totals):
        images = sim.natural_image_set(n_images, seed=args.seed)
    with timed("simulate_scan", totals):
        scan = sim.simulate_scan(
            args.units,
            n_oracle=args.oracle,
            n_repeats=args.repeats,
            seed=args.seed,
            images=images,
            image_seed=args.seed,
        )

    oracle_trials = scan.trial_image < args.oracle
    with timed("oracle_stats (eq. 1)", totals):
        stats = orc.oracle_stats(scan.responses, scan.trial_image)
    with timed(f"data_similarity {n_images}x{n_images} (eq. 2)", totals):
        orc.data_similarity(scan.responses, scan.trial_image, stats.snr_weight)
    with timed("oracle_similarity (eq. 3)", totals):
        orc.oracle_similarity(scan.responses[oracle_trials], scan.trial_image[oracle_trials], stats.snr_weight)
    with timed("repeat_fluctuations (eq. 5)", totals):
        orc.repeat_fluctuations(scan.responses[oracle_trials], scan.trial_image[oracle_trials], stats.snr_weight)

    oracle_total = sum(v for k, v in totals.items() if k.startswith(("oracle_stats", "data_sim", "oracle_sim")))
    print(
        f"simulate_scan: {totals['simulate_scan']:.1f} s (goal <= 60 s); OracleStats + S^data + S^oracle: "
        f"{oracle_total:.1f} s (goal <= 20 s); load average now {os.getloadavg()[0]:.1f}"
    )
    print(f"true SNR median {np.median(scan.true_snr):.3f}; estimated w median {np.median(stats.snr_weight):.3f}")


if __name__ == "__main__":
    main()
