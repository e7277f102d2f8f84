"""The ``fused`` section of gpu_bench.py: K regularized paper networks trained as one fused model.

For K = 1, 2, 4, 8 (tiny: 1, 2) it builds K regularized runs of the paper protocol (ResNet18 at the
benchmark's width, 64 CIFAR-sized images and 32 pairs = 64 stimulus images of 36x64 per network and step),
fuses them (``models/vision/group.py``) and times the fused step as the pipeline runs it: captured as one
CUDA graph on CUDA (``NEUREG_CUDA_GRAPHS``), with the runtime's bf16 autocast; eagerly on a CPU. It reports
ms per fused step, regularized paper networks per hour (K networks per 31,250 steps) and the achieved
TFLOPS: K times the FLOPs of one network's eager step as torch's FlopCounterMode counts them (it counts a
grouped convolution's backward as if it were dense, K times too much), over the measured time. K = 1 is the
fused model of one network, so the ratios show what grouping alone buys.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from neureg.models.runtime import Runtime, synchronize
from neureg.models.vision.datasets import ClassificationData
from neureg.models.vision.fused import fuse
from neureg.models.vision.graphs import GraphedStep
from neureg.models.vision.group import group_step_function
from neureg.models.vision.training import PairBatch, build_run

PAPER_STEPS = 31_250


def fused_rig(k: int, s: dict, runtime: Runtime):
    """(step callable, fused model) for K regularized networks on fixed random batches."""
    rng = np.random.default_rng(0)
    batch, pairs = s["batch"], s["pairs"]
    data = ClassificationData(
        "bench", rng.random((batch, 1, 32, 32), dtype=np.float32), rng.integers(0, 10, batch), None, None, 10
    )
    images = rng.integers(0, 256, (4 * pairs, 36, 64), dtype=np.uint8)
    target = np.corrcoef(rng.standard_normal((4 * pairs, 20))).astype(np.float32)
    train = {"epochs": 1, "batch_size": batch, "lr": 0.01}
    reg = {"alpha": 1.0, "pairs_per_step": pairs}
    runs = [build_run({"width": s["width"]}, train, reg, data, images, target, seed, runtime) for seed in range(k)]
    device = runtime.torch_device
    fused = fuse([run.model for run in runs]).to(device, memory_format=runtime.memory_format)
    optimizer = torch.optim.SGD(
        [
            {"params": list(fused.parameters()), "weight_decay": 5e-4},
            {"params": [run.regularizer.gamma_logits for run in runs], "weight_decay": 0.0},
        ],
        lr=0.01,
        momentum=0.9,
    )
    fused.train()
    step_fn = group_step_function(fused, runs, optimizer)
    x = torch.rand(batch, k, 32, 32, device=device).contiguous(memory_format=runtime.memory_format)
    y = torch.randint(0, 10, (batch, k), device=device)
    stimuli = torch.rand(2 * pairs, k, 36, 64, device=device).contiguous(memory_format=runtime.memory_format)
    pair_batch = PairBatch(
        stimuli, torch.arange(2 * pairs, device=device).view(-1, 2), torch.rand(k, pairs, device=device)
    )
    if runtime.graphs_active:
        modules = [fused] + [run.regularizer for run in runs]
        graphed = GraphedStep(step_fn, modules, optimizer, x, y, pair_batch)
        return (lambda: graphed(x, y, pair_batch)), (lambda: step_fn(x, y, pair_batch))
    return (lambda: step_fn(x, y, pair_batch)), (lambda: step_fn(x, y, pair_batch))


def step_flops(eager_step) -> int:
    """FLOPs of one eager step (forward, backward; the SGD update's few element-wise FLOPs not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        eager_step()
    return counter.get_total_flops()


def bench_fused(s: dict, runtime: Runtime, budget: float, results: dict, time_left) -> None:
    """Section ``fused``: networks per hour and TFLOPS of a fused regularized group, K = 1, 2, 4, 8."""
    graphs = Runtime(**{**runtime.__dict__, "cuda_graphs": runtime.on_cuda})
    eager = Runtime(**{**runtime.__dict__, "cuda_graphs": False})
    flops_one = step_flops(fused_rig(1, s, eager)[1])
    for k in s["fused_groups"]:
        name = f"fused/regularized/K={k}"
        if time_left(budget) < 5:
            results[name] = {"status": "skipped (budget)"}
            continue
        try:
            tic = time.perf_counter()
            run, _ = fused_rig(k, s, graphs)
            flops = k * flops_one
            for _ in range(s["warmup"]):
                run()
            synchronize(graphs.torch_device)
            setup = time.perf_counter() - tic
            tic = time.perf_counter()
            for _ in range(s["steps"]):
                run()
            synchronize(graphs.torch_device)
            seconds = (time.perf_counter() - tic) / s["steps"]
            results[name] = {
                "ms_per_step": 1e3 * seconds,
                "networks_per_hour": 3600 * k / (seconds * PAPER_STEPS),
                "min_per_network": seconds * PAPER_STEPS / 60 / k,
                "gflop_per_step": flops / 1e9,
                "tflops": flops / seconds / 1e12,
                "setup_s": setup,
                "graphs": graphs.graphs_active,
            }
        except Exception as error:  # noqa: BLE001 - a K that does not fit is reported, not fatal
            results[name] = {"status": f"failed: {type(error).__name__}: {str(error)[:120]}"}
        print(f"  {name}: {results[name]}", flush=True)
    base = results.get("fused/regularized/K=1", {}).get("networks_per_hour")
    for k in s["fused_groups"][1:]:
        rate = results.get(f"fused/regularized/K={k}", {}).get("networks_per_hour")
        if base and rate:
            results[f"ratio/fused_K={k}_over_K=1"] = rate / base
