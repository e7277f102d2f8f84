"""Training the demo's networks in one process or in several: networks per minute on this machine.

Why: the demo trains 21 small networks on the CPU. They are bound by per-operation overhead rather than
arithmetic, so one process with every core's thread leaves cores idle between small operations; several
single-thread processes keep them busy. This trains the demo's None network (its width and schedule,
``--epochs`` epochs) ``--networks`` times each way and prints both throughputs and their ratio (each
process reads the digits before the clock starts). The demo uses as many processes as cores
(``NEUREG_DEMO_PROCESSES`` overrides).

    python bench/bench_demo_parallel.py --networks 4 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time


def _train(seeds: list[int], threads: int, epochs: int, start_line, results) -> None:
    import torch

    torch.set_num_threads(threads)
    from neureg.experiments.demo import SIZES
    from neureg.models.vision import datasets, group

    data = datasets.load_mnist_demo()
    start_line.get()  # every process has read the digits: the clock starts for all at once
    start = time.perf_counter()
    for seed in seeds:
        group.train_network(
            SIZES["full"]["network"], dict(SIZES["full"]["train"], epochs=epochs), {"alpha": 0.0}, data, seed=seed
        )
    results.put(time.perf_counter() - start)


def _timed(n_networks: int, processes: int, epochs: int) -> float:
    """Seconds until the last process has trained its share (reading the digits excluded)."""
    threads = max(1, (os.cpu_count() or 1) // processes)
    os.environ.update(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    context = multiprocessing.get_context("spawn")
    start_line, results = context.Queue(), context.Queue()
    seeds = list(range(n_networks))
    children = [
        context.Process(target=_train, args=(seeds[i::processes], threads, epochs, start_line, results))
        for i in range(processes)
    ]
    for c in children:
        c.start()
    for _ in children:
        start_line.put(None)
    times = [results.get(timeout=3600) for _ in children]
    for c in children:
        c.join()
    if any(c.exitcode for c in children):
        raise RuntimeError("a training process failed")
    return max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    one = _timed(args.networks, 1, args.epochs)
    several = _timed(args.networks, args.processes, args.epochs)
    print(
        json.dumps(
            {
                "networks": args.networks,
                "epochs": args.epochs,
                "cores": os.cpu_count(),
                "one_process_networks_per_min": round(60 * args.networks / one, 2),
                f"{args.processes}_processes_networks_per_min": round(60 * args.networks / several, 2),
                "speedup": round(one / several, 2),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
