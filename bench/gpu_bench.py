"""GPU benchmark of the paper-scale work: training steps, concurrency, a predictive fit, robustness.

    python bench/gpu_bench.py --out results.json            # paper sizes on CUDA, tiny sizes on a CPU
    python bench/gpu_bench.py --tiny                         # tiny sizes anywhere

Sections (each checks the time left against ``--budget`` seconds and says "skipped (budget)" if short):

- ``step``: one step of the paper protocol (ResNet18 width 1, 64 CIFAR-sized 32x32 images; regularized
  steps add 32 pairs = 64 stimulus images of 36x64) for plain / same images / regularized / VOne, eager,
  compiled (``torch.compile``) and captured as one CUDA graph (the whole step: forward, backward, SGD).
  "same images" is the plain step over the regularized step's images (the batch plus the stimulus
  images through the taps, no similarity term): regularized / same images is the regularizer's overhead;
  with ``gpu_busy`` (profiler kernel time / wall time) to show what bounds each step;
- ``fused``: K = 1, 2, 4, 8 regularized networks trained as one fused model (gpu_bench_fused.py):
  networks per hour and achieved TFLOPS, graphed and bf16 as the runtime says;
- ``concurrency``: 1, 2 and 4 training processes on the one GPU, networks per hour at the paper's
  31,250 steps (40 epochs of 50,000 images at batch 64);
- ``predictive``: one fit of the predictive model on a Sensorium-sized synthetic scan (8000 units,
  5000 images of 36x64, LN units with Gabor receptive fields on smooth images);
- ``robustness``: the standard evaluation of one network (noise ladder, the minimal-perturbation attack
  set, AutoAttack Linf and L2, corruptions). Attacks that cannot finish 1000 images inside the budget run
  on fewer and are projected linearly to 1000 (an upper bound: larger batches use the GPU better).

The summary table goes to stdout; ``--out`` also writes every number as JSON. The ``predictive`` and
``robustness`` sections live in gpu_bench_sections.py; this file holds the step and concurrency sections.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from neureg.models.runtime import Runtime, synchronize
from neureg.models.vision.networks import build_network, tap_feature_sizes
from neureg.models.vision.regularizer import SimilarityRegularizer
from neureg.models.vision.training import PairBatch, training_step

if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling module, however this file is loaded
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench_fused import bench_fused  # noqa: E402
from gpu_bench_sections import bench_predictive, bench_robustness, time_left  # noqa: E402

PAPER_STEPS = 31_250  # 40 epochs x 50,000 images / 64


#: Each size as (tiny, paper): tiny runs the same code on a CPU in seconds.
SIZES = {
    "width": (0.0625, 1.0),
    "batch": (8, 64),
    "pairs": (4, 32),
    "vone_channels": (8, 256),
    "steps": (3, 50),
    "warmup": (1, 5),
    "concurrency": ((1, 2), (1, 2, 4)),
    "concurrency_seconds": (2.0, 8.0),
    "units": (60, 8000),
    "images": (160, 5000),
    "image_shape": ((18, 32), (36, 64)),
    "predictive_epochs": (2, 60),
    "robust_images": (16, 1000),
    "attack_images": (8, 100),
    "quick_attacks": (True, False),
    "fused_groups": ((1, 2), (1, 2, 4, 8)),
}


def sizes(tiny: bool) -> dict:
    """Paper sizes, or tiny ones that run the same code on a CPU in seconds."""
    return {name: pair[0 if tiny else 1] for name, pair in SIZES.items()}


# ----------------------------------------------------------------------------------------- steps
class StepRig:
    """One network, optimizer, regularizer and a fixed batch on the device: what a training step touches."""

    def __init__(self, kind: str, s: dict, runtime: Runtime):
        device = runtime.torch_device
        torch.manual_seed(0)
        config = {"arch": "resnet18", "width": s["width"]}
        if kind == "vone":
            config.update(arch="vone_resnet18", simple_channels=s["vone_channels"], complex_channels=s["vone_channels"])
        self.model = build_network(config).to(device, memory_format=runtime.memory_format)
        self.kind = kind
        self.alpha = 1.0 if kind in ("regularized", "same_images") else 0.0
        self.runtime = runtime
        self.x = torch.rand(s["batch"], 1, 32, 32, device=device).contiguous(memory_format=runtime.memory_format)
        self.y = torch.randint(0, 10, (s["batch"],), device=device)
        params = [{"params": list(self.model.parameters()), "weight_decay": 5e-4}]
        self.regularizer = self.pairs = None
        if self.alpha:
            stim = torch.rand(2 * s["pairs"], 1, 36, 64, device=device).contiguous(memory_format=runtime.memory_format)
            feature_sizes = tap_feature_sizes(self.model, (1, 36, 64))
            self.regularizer = SimilarityRegularizer(feature_sizes).to(device)
            pairs = torch.arange(2 * s["pairs"], device=device).view(-1, 2)
            self.pairs = PairBatch(stim, pairs, torch.rand(s["pairs"], device=device) * 2 - 1)
            params.append({"params": [self.regularizer.gamma_logits], "weight_decay": 0.0})
        self.optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def step(self, model=None):
        if self.kind == "same_images":  # the plain step over the same images: no similarity term
            return same_images_step(self)
        return training_step(
            model or self.model,
            self.optimizer,
            self.x,
            self.y,
            self.alpha,
            self.regularizer,
            self.pairs,
            self.runtime.amp_dtype,
        )


def same_images_step(rig: StepRig):
    """Cross-entropy on the batch plus a forward/backward of the stimulus images through the taps with a
    loss that costs nothing (the mean of the last tap): the regularized step's unavoidable work, without
    the similarity computation itself. Regularized / this = the regularizer's own overhead."""
    with rig.runtime.autocast():
        logits = rig.model(rig.x)
        taps = rig.model.taps(rig.pairs.images)
    loss = F.cross_entropy(logits.float(), rig.y) + 1e-3 * taps[-1].float().mean()
    rig.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    rig.optimizer.step()
    return loss.detach()


class CompiledTaps(torch.nn.Module):
    """torch.compile'd forward and taps of one network (training_step calls both)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.compiled = torch.compile(model)

    def forward(self, x):
        return self.compiled(x)

    def taps(self, x):
        return self.compiled(x, return_taps=True)[1]


def time_steps(run_step, n: int, warmup: int, device) -> float:
    """Seconds per step after ``warmup`` steps, with the device drained before and after."""
    for _ in range(warmup):
        run_step()
    synchronize(device)
    tic = time.perf_counter()
    for _ in range(n):
        run_step()
    synchronize(device)
    return (time.perf_counter() - tic) / n


def kernel_ms_per_step(run_step, device, n: int = 5) -> float:
    """GPU kernel time per step from the profiler: divided by the wall time, how busy the GPU is.

    Well below 1 means the step is bound by kernel launches and host work, not by the GPU's arithmetic.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            run_step()
        synchronize(device)
    total_us = sum(event.device_time for event in prof.events() if event.device_type == DeviceType.CUDA)
    return total_us / 1e3 / n


def graphed_step(rig: StepRig, warmup: int):
    """The step as the pipeline runs it under NEUREG_CUDA_GRAPHS: models.graphs.GraphedStep, with the
    per-step copies of the batch into the static buffers included in the timing."""
    from neureg.models.vision.graphs import GraphedStep

    def step_fn(x, y, pair_batch):
        if rig.kind == "same_images":
            return same_images_step(rig)
        return training_step(
            rig.model, rig.optimizer, x, y, rig.alpha, rig.regularizer, pair_batch, rig.runtime.amp_dtype
        )

    modules = [rig.model] + ([rig.regularizer] if rig.regularizer is not None else [])
    graphed = GraphedStep(step_fn, modules, rig.optimizer, rig.x, rig.y, rig.pairs)
    return lambda: graphed(rig.x, rig.y, rig.pairs)


def bench_steps(s: dict, runtime: Runtime, budget: float, results: dict) -> None:
    """Section ``step``: ms per training step of every variant and mode, then the regularizer's overhead ratios."""
    device = runtime.torch_device
    variants = [
        (kind, mode)
        for mode in ("eager", "graph", "compiled")
        for kind in ("plain", "same_images", "regularized", "vone")
    ]
    if runtime.amp:  # float32 references for the bf16 numbers
        variants += [("plain", "eager_fp32"), ("plain", "graph_fp32")]
    for kind, mode in variants:
        rig_runtime = runtime if not mode.endswith("_fp32") else Runtime(device=runtime.device)
        base_mode = mode.removesuffix("_fp32")
        name = f"step/{kind}/{mode}"
        if base_mode == "graph" and not runtime.on_cuda:
            results[name] = {"status": "n/a on CPU"}
            continue
        if mode == "compiled" and (kind in ("vone", "same_images") or not runtime.on_cuda):
            results[name] = {"status": "not measured"}  # CPU: C++ codegen alone takes ~50 s
            continue
        if mode == "compiled" and time_left(budget) < 0.6 * budget:
            results[name] = {"status": "skipped (budget)"}
            continue
        if time_left(budget) < 5:
            results[name] = {"status": "skipped (budget)"}
            continue
        try:
            rig = StepRig(kind, s, rig_runtime)
            tic = time.perf_counter()
            if base_mode == "eager":
                run = rig.step
            elif base_mode == "graph":
                run = graphed_step(rig, s["warmup"])
            else:
                compiled = CompiledTaps(rig.model)
                run = functools.partial(rig.step, compiled)
                run()
                synchronize(device)
            setup = time.perf_counter() - tic
            seconds = time_steps(run, s["steps"], s["warmup"], device)
            results[name] = {
                "ms_per_step": 1e3 * seconds,
                "setup_s": setup,
                "paper_run_min": seconds * PAPER_STEPS / 60,
                "images_per_s": s["batch"] / seconds,
            }
            if runtime.on_cuda and base_mode in ("eager", "graph"):
                try:
                    results[name]["gpu_busy"] = kernel_ms_per_step(run, device) / (1e3 * seconds)
                except Exception as error:  # noqa: BLE001 - the timing stands without it
                    results[name]["gpu_busy"] = f"profiler failed: {type(error).__name__}"
        except Exception as error:  # a variant that does not work here is reported, not fatal
            results[name] = {"status": f"failed: {type(error).__name__}: {str(error)[:120]}"}
        print(f"  {name}: {results[name]}", flush=True)
    for mode in ("eager", "graph", "compiled"):
        reg = results.get(f"step/regularized/{mode}", {})
        for base in ("plain", "same_images"):
            other = results.get(f"step/{base}/{mode}", {})
            if "ms_per_step" in other and "ms_per_step" in reg:
                results[f"ratio/regularized_over_{base}/{mode}"] = reg["ms_per_step"] / other["ms_per_step"]


# ----------------------------------------------------------------------------------- concurrency
def concurrency_worker(args) -> None:
    """One process of the concurrency test: wait for the common start, step for the window, report."""
    s = sizes(args.tiny)
    runtime = Runtime(device=args.device, amp=args.amp, channels_last=args.amp)
    rig = StepRig("regularized", s, runtime)
    run = rig.step
    if runtime.on_cuda:
        try:
            run = graphed_step(rig, s["warmup"])
        except Exception as error:  # noqa: BLE001 - eager still measures the concurrency
            print(f"graph capture failed ({error}); eager steps", file=sys.stderr)
            rig = StepRig("regularized", s, runtime)
            run = rig.step
    for _ in range(s["warmup"]):
        run()
    synchronize(runtime.torch_device)
    while time.time() < args.start_at:
        time.sleep(0.01)
    steps, tic = 0, time.perf_counter()
    while time.perf_counter() - tic < args.window:
        for _ in range(10):
            run()
        steps += 10
        synchronize(runtime.torch_device)
    print(json.dumps({"steps": steps, "seconds": time.perf_counter() - tic}), flush=True)


def bench_concurrency(s: dict, runtime: Runtime, args, budget: float, results: dict) -> None:
    """Section ``concurrency``: k worker processes step together on the one GPU; their summed rate."""
    for k in s["concurrency"]:
        name = f"concurrency/{k}"
        if time_left(budget) < s["concurrency_seconds"] + 35:
            results[name] = {"status": "skipped (budget)"}
            continue
        start_at = time.time() + (15 if runtime.on_cuda else 8)
        command = (
            [
                sys.executable,
                __file__,
                "--concurrency-worker",
                "--start-at",
                str(start_at),
                "--window",
                str(s["concurrency_seconds"]),
                "--device",
                runtime.device,
            ]
            + (["--tiny"] if args.tiny else [])
            + (["--amp"] if runtime.amp else [])
        )
        procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(k)]
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        rates = []
        for out in outputs:
            lines = [line for line in out.splitlines() if line.startswith("{")]
            if lines:
                row = json.loads(lines[-1])
                rates.append(row["steps"] / row["seconds"])
        if len(rates) != k:
            results[name] = {"status": f"failed: {k - len(rates)} process(es) reported nothing"}
        else:
            total = sum(rates)
            results[name] = {
                "steps_per_s": total,
                "networks_per_hour": total * 3600 / PAPER_STEPS,
                "per_process_steps_per_s": rates,
            }
        print(f"  {name}: {results[name]}", flush=True)


# ----------------------------------------------------------------------------------------- main
def summary(results: dict, device_name: str) -> str:
    """The one table a device run prints: a row per measure, robustness parts one row each."""
    lines = [f"neureg gpu_bench on {device_name}", f"{'measure':44s} value"]
    for name, value in results.items():
        if name == "robustness":
            for part, row in value["parts"].items():
                lines.append(
                    f"{'robustness/' + part:44s} "
                    + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
                )
            lines.append(f"{'robustness/standard_evaluation_s':44s} {value['standard_evaluation_s']:.1f}")
            continue
        if isinstance(value, dict):
            text = ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in value.items()
                if not isinstance(v, list)
            )
        else:
            text = f"{value:.3f}"
        lines.append(f"{name:44s} {text}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the chosen sections within the budget, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the default without CUDA)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if visible, else cpu)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast + channels_last (CUDA only)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all sections together")
    parser.add_argument("--sections", default="step,fused,concurrency,predictive,robustness")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    parser.add_argument("--concurrency-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--window", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.tiny = args.tiny or not args.device.startswith("cuda")
    if args.concurrency_worker:
        concurrency_worker(args)
        return 0
    if not args.device.startswith("cuda"):
        torch.set_num_threads(1)
    runtime = Runtime(device=args.device, amp=args.amp, channels_last=args.amp)
    s = sizes(args.tiny)
    results: dict = {}
    sections = args.sections.split(",")
    print(
        f"gpu_bench: {runtime.describe()}, {'tiny' if args.tiny else 'paper'} sizes, budget {args.budget:.0f} s",
        flush=True,
    )
    # Each section has a deadline (seconds since start) so the whole run fits one lent-device call.
    deadlines = {"step": 0.3, "fused": 0.45, "concurrency": 0.6, "predictive": 0.75, "robustness": 1.0}
    with runtime.kernels():
        if "step" in sections:
            bench_steps(s, runtime, args.budget * deadlines["step"], results)
        if "fused" in sections:
            bench_fused(s, runtime, args.budget * deadlines["fused"], results, time_left)
        if "concurrency" in sections:
            bench_concurrency(s, runtime, args, args.budget * deadlines["concurrency"], results)
        if "predictive" in sections:
            bench_predictive(s, runtime, args.budget * deadlines["predictive"], results)
        if "robustness" in sections:
            bench_robustness(s, runtime, args.budget * deadlines["robustness"], results)
    text = summary(results, runtime.describe())
    print(text, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {"device": runtime.describe(), "tiny": args.tiny, "torch": torch.__version__, "results": results},
                indent=1,
                default=float,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
