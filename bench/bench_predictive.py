"""Benchmark: fit one predictive model on a simulated scan (goal <= 5 min for 1000 units x
1100 images on the CPU).

    python bench/bench_predictive.py                      # 1000 units, 1100 images, CPU
    python bench/bench_predictive.py --device cuda --threads 16

Trains on the single-shown images (a random tenth held out for early stopping), as the pipeline does,
and reports fit wall time, process CPU time (the honest number on a shared machine), epochs, training
images/s and, with the simulator's truth, how well the denoised responses match the noise-free rates of
the oracle images. Falls back to the tiny LN generator of tests/models/neural/test_predictive.py when the
simulator is not importable.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from neureg.models.neural.predictions import predict_responses, unit_correlations
from neureg.models.neural.predictive import fit_predictor
from neureg.models.neural.rsa import centered_cosine
from neureg.models.neural.similarity import data_similarity, model_similarity, similarity_agreement


def simulated(n_units: int, n_images: int, n_oracle: int, n_repeats: int, seed: int) -> dict:
    try:
        from neureg.models.neural.simulator import simulate_scan
    except ImportError:
        return ln_fallback(n_units, n_images, seed)
    sim = simulate_scan(n_units=n_units, n_images=n_images, n_oracle=n_oracle, n_repeats=n_repeats, seed=seed)
    return {
        "source": "simulate_scan",
        "images": sim.images,
        "trial_image": sim.trial_image,
        "responses": sim.responses,
        "behavior": sim.behavior,
        "pupil_center": sim.pupil_center,
        "single": np.flatnonzero(sim.trial_image >= sim.n_oracle),
        "truth_images": sim.images[: sim.n_oracle],
        "true_rates": sim.true_rates[: sim.n_oracle],
        "sim": sim,
    }


def oracle_similarity_check(sim, model) -> dict:
    """Fig. 1D on the simulator: r(S^model, truth) vs r(S^data, truth) over the oracle images.

    w_a from the repeats (equation 1), v_a = the model's correlation with the oracle trials (held out:
    the model never saw an oracle image), S^data from each oracle image's first repeat, and the truth
    the noise-free rates weighted by the true w_a.
    """
    oracle = np.flatnonzero(sim.trial_image < sim.n_oracle)
    image = sim.trial_image[oracle]
    by_image = [sim.responses[oracle[image == i]] for i in range(sim.n_oracle)]
    signal = np.stack([r.mean(0) for r in by_image]).var(0, ddof=1)
    noise = np.stack([r.var(0, ddof=1) for r in by_image]).mean(0)
    w = np.sqrt(signal / np.where(noise > 0, noise, np.inf))
    v = unit_correlations(
        predict_responses(model, sim.images[image], sim.behavior[oracle], sim.pupil_center[oracle]),
        sim.responses[oracle],
    )
    s_model = model_similarity(predict_responses(model, sim.images[: sim.n_oracle]), w, v)
    s_data = data_similarity(np.stack([r[0] for r in by_image]), w)
    truth = centered_cosine(sim.true_rates[: sim.n_oracle] * np.sqrt(sim.true_snr))
    return {
        "oracle_corr_mean_v": round(float(v.mean()), 4),
        "r_model_truth": round(similarity_agreement(s_model, truth), 4),
        "r_data_truth": round(similarity_agreement(s_data, truth), 4),
    }


def ln_fallback(n_units: int, n_images: int, seed: int) -> dict:
    path = Path(__file__).resolve().parents[1] / "tests" / "models" / "neural" / "test_predictive.py"
    spec = importlib.util.spec_from_file_location("_ln_generator", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scan = module.ln_scan(n_units=n_units, n_trials=n_images, height=36, width=64, seed=seed)
    return {
        "source": "ln_scan (tests)",
        "images": scan.images,
        "trial_image": None,
        "responses": scan.responses,
        "behavior": scan.behavior,
        "pupil_center": scan.pupil_center,
        "single": np.arange(n_images),
        "truth_images": scan.images,
        "true_rates": scan.true_rates,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-units", type=int, default=1000)
    parser.add_argument("--n-images", type=int, default=1100)
    parser.add_argument("--n-oracle", type=int, default=100)
    parser.add_argument("--n-repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core machine)"
    )
    parser.add_argument("--readout", choices=["gaussian", "factorized"], default=None)
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--config", default="{}", help="JSON predictor config overrides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    config = json.loads(args.config)
    if args.readout:
        config["readout"] = args.readout
    if args.max_epochs:
        config["max_epochs"] = args.max_epochs
    tic = time.perf_counter()
    data = simulated(args.n_units, args.n_images, args.n_oracle, args.n_repeats, args.seed)
    simulate_seconds = time.perf_counter() - tic
    rng = np.random.default_rng(args.seed)
    single = rng.permutation(data["single"])
    n_val = max(2, len(single) // 10)
    val_idx, train_idx = single[:n_val], single[n_val:]

    def progress(row):
        if not args.quiet:
            print(
                f"  epoch {row['epoch']:3d}  loss {row['train_loss']:.4f}  val r {row['val_corr']:.4f}  "
                f"lr {row['lr']:.2g}  {row['seconds']:.1f}s",
                flush=True,
            )

    cpu0 = time.process_time()
    fit = fit_predictor(
        data["images"],
        data["responses"],
        data["behavior"],
        data["pupil_center"],
        train_idx,
        val_idx,
        config,
        seed=args.seed,
        runtime=args.device,
        progress=progress,
        trial_image=data["trial_image"],
    )
    cpu_seconds = time.process_time() - cpu0
    pred = predict_responses(fit.to_model(args.device), data["truth_images"])
    truth_r = unit_correlations(pred, data["true_rates"])
    report = {
        "data": data["source"],
        "n_units": args.n_units,
        "n_images": args.n_images,
        "train_trials": len(train_idx),
        "val_trials": len(val_idx),
        "device": args.device,
        "torch_threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "readout": fit.config["readout"],
        "simulate_seconds": round(simulate_seconds, 1),
        "fit_seconds": round(fit.fit_seconds, 1),
        "fit_cpu_seconds": round(cpu_seconds, 1),
        "epochs": fit.epochs_run,
        "best_epoch": fit.best_epoch,
        "best_val_corr": round(fit.best_val_corr, 4),
        "train_images_per_second": round(fit.train_images_per_second, 1),
        "truth_corr_mean": round(float(truth_r.mean()), 4),
        "truth_corr_median": round(float(np.median(truth_r)), 4),
    }
    if "sim" in data:
        report.update(oracle_similarity_check(data["sim"], fit.to_model(args.device)))
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
