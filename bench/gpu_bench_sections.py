"""The predictive-fit and robustness sections of gpu_bench.py, and the budget clock every section reads.

gpu_bench.py runs them after the training-step and concurrency sections; each takes the sizes from
``gpu_bench.sizes``, the runtime, a deadline in seconds since the run started and the results dict it
fills. Run gpu_bench.py, not this module.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.nn import functional as F

from neureg.models.runtime import Runtime
from neureg.models.vision.networks import build_network

STARTED = time.perf_counter()  # the run's clock: gpu_bench.py imports this module first thing


def time_left(budget: float) -> float:
    """Seconds until ``budget`` seconds after the run started (negative once past it)."""
    return budget - (time.perf_counter() - STARTED)


# ------------------------------------------------------------------------------------ predictive
def sensorium_like_scan(s: dict, seed: int = 0) -> dict:
    """LN units (Gabor receptive fields, softplus, Poisson) on smooth images: learnable, cheap to make."""
    from scipy import ndimage

    g = np.random.default_rng(seed)
    (h, w), n, units = s["image_shape"], s["images"], s["units"]
    smooth = ndimage.gaussian_filter(g.standard_normal((n, h, w)).astype(np.float32), sigma=(0, 1.5, 1.5))
    images = np.clip(128 + 45 * smooth / smooth.std(), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = g.uniform(4, h - 5, (units, 1, 1)), g.uniform(4, w - 5, (units, 1, 1))
    theta = g.uniform(0, np.pi, (units, 1, 1))
    along = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    rfs = (np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 10.0) * np.cos(2 * np.pi * along / 7.0)).astype(np.float32)
    drive = ((images.reshape(n, -1) - 128.0) / 45).astype(np.float32) @ rfs.reshape(units, -1).T
    rates = 2.0 * np.log1p(np.exp(2.0 * drive / drive.std(axis=0) - 0.5))
    behavior = g.normal(size=(n, 3)).astype(np.float32)
    pupil = g.normal(size=(n, 2)).astype(np.float32)
    return dict(
        images=images, responses=g.poisson(rates).astype(np.float32), behavior=behavior, pupil_center=pupil, rates=rates
    )


def bench_predictive(s: dict, runtime: Runtime, budget: float, results: dict) -> None:
    """Section ``predictive``: one fit of the predictive model, stopped and projected at the budget."""
    from neureg.models.neural.predictions import predict_responses, unit_correlations
    from neureg.models.neural.predictive import fit_predictor

    if time_left(budget) < 30:
        results["predictive"] = {"status": "skipped (budget)"}
        return

    class OutOfBudget(Exception):
        pass

    epochs = []

    def stop_at_budget(row):
        epochs.append(row)
        if time_left(budget) < 0:
            raise OutOfBudget

    tic = time.perf_counter()
    scan = sensorium_like_scan(s)
    made = time.perf_counter() - tic
    n = s["images"]
    train, val = np.arange(int(0.9 * n)), np.arange(int(0.9 * n), n)
    config = {"max_epochs": s["predictive_epochs"]}
    tic = time.perf_counter()
    try:
        fit = fit_predictor(
            scan["images"],
            scan["responses"],
            scan["behavior"],
            scan["pupil_center"],
            train,
            val,
            config,
            seed=0,
            runtime=runtime,
            progress=stop_at_budget,
        )
    except OutOfBudget:
        seconds = time.perf_counter() - tic
        per_epoch = float(np.mean([row["seconds"] for row in epochs]))
        results["predictive"] = {
            "status": f"stopped at the budget after {len(epochs)} epochs",
            "s_so_far": seconds,
            "s_per_epoch": per_epoch,
            "val_corr_so_far": epochs[-1]["val_corr"],
            "projected_max_epochs_s": per_epoch * s["predictive_epochs"],
            "data_s": made,
        }
        print(f"  predictive: {results['predictive']}", flush=True)
        return
    seconds = time.perf_counter() - tic
    model = fit.to_model(runtime.device)
    r = unit_correlations(
        predict_responses(model, scan["images"][val], scan["behavior"][val], scan["pupil_center"][val]),
        scan["rates"][val],
    )
    results["predictive"] = {
        "fit_s": seconds,
        "epochs": fit.epochs_run,
        "s_per_epoch": seconds / fit.epochs_run,
        "train_images_per_s": fit.train_images_per_second,
        "val_corr": fit.best_val_corr,
        "r_true_rates": float(np.nanmean(r)),
        "data_s": made,
        "units": s["units"],
        "images": n,
    }
    print(f"  predictive: {results['predictive']}", flush=True)


# ------------------------------------------------------------------------------------ robustness
def template_task(n: int, seed: int):
    """10 classes of faint sign templates: a network learns it in seconds, so attacks face a real classifier."""
    templates = torch.sign(torch.randn(10, 1, 32, 32, generator=torch.Generator().manual_seed(1234)))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (0.5 + 0.12 * templates[y] + 0.08 * torch.randn(n, 1, 32, 32, generator=g)).clamp(0, 1)
    return x, y


def trained_network(s: dict, runtime: Runtime):
    """A small network trained on ``template_task``, so the attacks face a classifier that is right."""
    torch.manual_seed(0)
    model = build_network({"width": s["width"]}).to(runtime.torch_device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = template_task(2048, seed=1)
    x, y = x.to(runtime.torch_device), y.to(runtime.torch_device)
    model.train()
    for _ in range(300 if not s["quick_attacks"] else 150):
        index = torch.randint(0, len(y), (s["batch"],), device=runtime.torch_device)
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def bench_robustness(s: dict, runtime: Runtime, budget: float, results: dict) -> None:
    """Section ``robustness``: the standard evaluation of one network on ``robust_images`` images (1000 at paper
    sizes), timed part by part as it runs: nothing is projected from a subset."""
    from neureg.models.robustness.attack_registry import PRIMARY_ATTACKS
    from neureg.models.robustness.attacks import default_attack_configs, minimal_perturbations
    from neureg.models.robustness.autoattack import autoattack_robust_accuracy
    from neureg.models.robustness.corruptions import CORRUPTIONS, corruption_accuracy
    from neureg.models.robustness.evaluation import default_noise_ladder, noise_accuracy, robust_accuracy
    from neureg.models.runtime import accuracy

    device = runtime.device
    model = trained_network(s, runtime)
    x, y = template_task(s["robust_images"], seed=2)
    timings = {}

    def timed(name, fn):
        if time_left(budget) < 10:
            timings[name] = {"status": "skipped (budget)"}
            return None
        tic = time.perf_counter()
        value = fn()
        timings[name] = {"s": time.perf_counter() - tic}
        print(f"  robustness/{name}: {timings[name]}", flush=True)
        return value

    clean = timed("clean", lambda: accuracy(model, x, y, batch_size=1000, device=device))
    timed("noise_ladder", lambda: noise_accuracy(model, x, y, default_noise_ladder(), 0, 1000, device))
    timed(
        "corruptions",
        lambda: [corruption_accuracy(model, x, y, c, sev, 0, 1000, device) for c in CORRUPTIONS for sev in (1, 3, 5)],
    )
    timed("robust_pgd_linf", lambda: robust_accuracy(model, x, y, "linf", device=device, batch_size=1000))
    # The standard evaluation as it runs (schemas.robustness.add_standard_configs): AutoAttack and the primary
    # minimal-norm attacks on every image, in one batch (their sequential call count does not grow with the
    # images, so a subset projected linearly overstates them), the cross-checks on the first 100.
    n = s["robust_images"]
    for norm in ("linf", "l2"):
        value = timed(
            f"autoattack_{norm}",
            lambda norm=norm: autoattack_robust_accuracy(model, x, y, norm, device=device, batch_size=n),
        )
        if value is not None:
            timings[f"autoattack_{norm}"].update(images=n, robust_accuracy=value)
    # Cheap attacks first; the slow ones (C&W's 9 x 1000 steps, Brendel-Bethge's per-image solver on the
    # host, Boundary's 5000 queries) run last and only with enough time left.
    slow = {"l2_cw": 60, "linf_bb": 90, "l2_bb": 90, "boundary": 60}
    configs = sorted(default_attack_configs(quick=s["quick_attacks"]), key=lambda c: c["attack"] in slow)
    for config in configs:
        label = "/".join(f"{v}" for k, v in config.items() if k in ("attack", "steps"))
        n_attack = n if config["attack"] in PRIMARY_ATTACKS else min(n, s["attack_images"])
        if time_left(budget) < slow.get(config["attack"], 15):
            timings[f"attack/{label}"] = {"status": "skipped (budget)"}
            continue
        tic = time.perf_counter()
        result = minimal_perturbations(model, x[:n_attack], y[:n_attack], [config], device=device, batch_size=n_attack)
        seconds = time.perf_counter() - tic
        timings[f"attack/{label}"] = {
            "s": seconds,
            "images": n_attack,
            "role": "primary" if config["attack"] in PRIMARY_ATTACKS else "cross-check",
            "images_per_s": n_attack / seconds,
            "median": float(np.median(result.distances[0])),
        }
        print(f"  robustness/attack/{label}: {timings[f'attack/{label}']}", flush=True)
    results["robustness"] = {
        "clean_accuracy": clean,
        "images": n,
        "parts": timings,
        "standard_evaluation_s": float(sum(v["s"] for v in timings.values() if "s" in v)),
        "complete": all("s" in v for v in timings.values()),
    }
