"""The training loop: L = cross-entropy + alpha * L_sim, resumable from a checkpoint written every epoch.

Lean by design (after airbench): the whole dataset sits on the device as one tensor, batches are index
slices, augmentation is a single gather, losses accumulate on the device and are read once per epoch.
The similarity term costs one extra forward/backward of the pair images through the same core (the work
no implementation avoids) plus a few dot products; with alpha = 0 (the 'None' condition) no pair is drawn
and no stimulus image is touched.

Randomness. Every random stream (data order, augmentation, pair sampling, VOne noise through torch's
global RNG) is re-seeded at the start of each epoch from (seed, epoch, stream). A run resumed from the
checkpoint of epoch e therefore replays epoch e + 1 exactly as the uninterrupted run did, without having
to carry RNG states in the checkpoint. On the CPU the resumed run is bitwise identical to the
uninterrupted one (the tests check exact equality); on CUDA, with ``Runtime.deterministic`` on, cuDNN
picks deterministic kernels, so the same is expected on the same GPU and software stack.

No per-step host sync. All of an epoch's random numbers (order, crops, flips, pairs) are drawn on the
host at the start of the epoch and copied to the device once; a step only slices device tensors, and
losses are summed on the device and read once per epoch. That keeps the GPU queue full (a blocking
host-to-device copy per step would drain it) and lets a whole step be captured as a CUDA graph.

Stimulus images and BatchNorm. The pair images go through the network in train mode (batch statistics,
as the CIFAR batch does) but with the BatchNorm running statistics frozen: those statistics are what the
network uses at test time on CIFAR images, and stimulus images (another size, another source) must not
leak into them.
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..registry import complete_kwargs
from ..runtime import Runtime, accuracy, as_runtime, memory_batch_size, synchronize
from .checkpoint import load_checkpoint
from .datasets import ClassificationData
from .graphs import GraphedStep
from .networks import build_network, tap_feature_sizes
from .regularizer import PairSampler, SimilarityRegularizer
from .schedule import learning_rate, regularizer_settings, train_settings

#: Test images per forward after training on the CPU: what every CPU row's test accuracy was computed with.
CPU_TEST_BATCH = 500


def derived_seed(seed: int, epoch: int, stream: str) -> int:
    """An independent 63-bit seed per (run seed, epoch, stream), so streams never share random numbers."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class PairBatch:
    """The stimulus images of one step (2P, 1, H, W), their pairs (P, 2) as rows, and the target (P,)."""

    images: torch.Tensor
    pairs: torch.Tensor
    target: torch.Tensor


@dataclass
class TrainResult:
    """What a finished run hands back for storage (``gamma`` is None when alpha = 0: no regularizer)."""

    state_dict: dict[str, torch.Tensor]
    history: list[dict]
    test_accuracy: float
    gamma: list[float] | None
    wall_seconds: float
    device: str
    versions: dict[str, str]
    resumed_from_epoch: int = 0
    configs: dict = field(default_factory=dict)


@contextlib.contextmanager
def frozen_bn_statistics(model: nn.Module):
    """BatchNorm keeps using batch statistics but leaves its running mean and variance untouched."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0  # running <- 1 * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


@dataclass
class EpochPlan:
    """An epoch's random numbers on the device: batch order (steps, B), crop offsets and flips."""

    order: torch.Tensor
    dy: torch.Tensor
    dx: torch.Tensor
    flip: torch.Tensor
    pair_images: torch.Tensor | None  # (steps, 2P) indices into the stimulus images


def plan_epoch(
    seed: int,
    epoch: int,
    n_train: int,
    batch_size: int,
    mode: str,
    sampler: PairSampler | None,
    device: torch.device,
    pad: int = 4,
) -> EpochPlan:
    """Draw the epoch's order, augmentation and pairs from (seed, epoch) streams on the host; copy once."""
    steps = n_train // batch_size
    order_rng = torch.Generator().manual_seed(derived_seed(seed, epoch, "order"))
    order = torch.randperm(n_train, generator=order_rng)[: steps * batch_size].view(steps, batch_size)
    augment_rng = torch.Generator().manual_seed(derived_seed(seed, epoch, "augment"))
    shape = (steps, batch_size)
    if mode == "none":
        dy = dx = torch.zeros(shape, dtype=torch.long)
        flip = torch.zeros(shape, dtype=torch.bool)
    else:
        dy = torch.randint(0, 2 * pad + 1, shape, generator=augment_rng)
        dx = torch.randint(0, 2 * pad + 1, shape, generator=augment_rng)
        flip = (
            torch.rand(shape, generator=augment_rng) < 0.5
            if mode == "crop_flip"
            else torch.zeros(shape, dtype=torch.bool)
        )
    pair_images = None
    if sampler is not None:
        sampler.reseed(derived_seed(seed, epoch, "pairs"))
        pair_images = torch.stack([sampler.sample()[0] for _ in range(steps)])
    move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
    return EpochPlan(move(order), move(dy), move(dx), move(flip), move(pair_images))


def augment_batch(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, mode: str, pad: int = 4
) -> torch.Tensor:
    """Random crop of the zero-padded images (and horizontal flip) as one gather on x's device. The gather
    comes out channels-last; it is copied to plain NCHW strides, because a 1-channel tensor with NHWC strides
    counts as contiguous (``contiguous()`` keeps it) and sends oneDNN down its NHWC kernels, whose weight
    gradient crashes the process on some CPUs (an AMD EPYC, 2026-12-07; ``models/runtime.py``)."""
    if mode == "none":
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return (
        padded[batch, rows[:, :, None], cols[:, None, :]]
        .permute(0, 3, 1, 2)
        .clone(memory_format=torch.contiguous_format)
    )


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    alpha: float = 0.0,
    regularizer: SimilarityRegularizer | None = None,
    pair_batch: PairBatch | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """One SGD step on CE(batch) + alpha * L_sim(pairs); returns device tensors (no host sync)."""
    autocast = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with autocast:
        logits = model(x)
    task_loss = F.cross_entropy(logits.float(), y)
    loss, sim_loss = task_loss, None
    if alpha > 0:
        with autocast, frozen_bn_statistics(model):
            taps = model.taps(pair_batch.images)
        sim_loss = regularizer(taps, pair_batch.pairs, pair_batch.target)
        loss = task_loss + alpha * sim_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    correct = (logits.detach().argmax(dim=1) == y).sum()
    sim_loss = sim_loss.detach() if sim_loss is not None else None
    return {"loss": loss.detach(), "task_loss": task_loss.detach(), "sim_loss": sim_loss, "correct": correct}


def stimuli_tensor(images) -> torch.Tensor:
    """Stimulus images (N, H, W) or (N, 1, H, W), uint8 0..255 or float in [0, 1], as (N, 1, H, W) in torch's
    default dtype (float32; float64 where a test sets it, to check arithmetic without rounding)."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4 or array.shape[1] != 1:
        raise ValueError(f"stimulus images must be (N, H, W) or (N, 1, H, W) grayscale, got {array.shape}")
    scaled = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(scaled)).to(torch.get_default_dtype())


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}


def _training_subset(dataset: ClassificationData, max_images: int | None) -> tuple[np.ndarray, np.ndarray]:
    if max_images is None or max_images >= len(dataset.train_y):
        return dataset.train_x, dataset.train_y
    keep = np.sort(np.random.default_rng(0).permutation(len(dataset.train_y))[:max_images])
    return dataset.train_x[keep], dataset.train_y[keep]


@dataclass
class TrainingRun:
    """Everything one run holds on the device: network, optimizer, regularizer, data, configs."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    regularizer: SimilarityRegularizer | None
    sampler: PairSampler | None
    stimuli: torch.Tensor | None
    target: torch.Tensor | None
    train_x: torch.Tensor
    train_y: torch.Tensor
    configs: dict
    seed: int
    runtime: Runtime
    history: list[dict] = field(default_factory=list)

    @property
    def alpha(self) -> float:
        return float(self.configs["regularizer"]["alpha"])

    @property
    def steps(self) -> int:
        return len(self.train_y) // self.configs["train"]["batch_size"]


def build_run(
    net_config: dict,
    train_config: dict,
    reg_config: dict,
    dataset: ClassificationData,
    target_images=None,
    target_similarity=None,
    seed: int = 0,
    runtime: Runtime | str | None = None,
) -> TrainingRun:
    """A fresh run: seeded network and optimizer, target on the device, training data on the device."""
    runtime = as_runtime(runtime)
    net_cfg = {**net_config, "n_classes": dataset.n_classes}
    train_cfg = complete_kwargs(train_settings, train_config, "train config")
    reg_cfg = complete_kwargs(regularizer_settings, reg_config, "regularizer config")
    device, memory_format = runtime.torch_device, runtime.memory_format
    torch.manual_seed(derived_seed(seed, 0, "init"))
    model = build_network(net_cfg).to(device, memory_format=memory_format)

    regularizer = sampler = stimuli = target = None
    if float(reg_cfg["alpha"]) > 0:
        if target_images is None or target_similarity is None:
            raise ValueError("alpha > 0 needs target_images and target_similarity")
        stimuli = stimuli_tensor(target_images).to(device, memory_format=memory_format)
        target = torch.as_tensor(np.asarray(target_similarity), dtype=torch.get_default_dtype(), device=device)
        if target.shape != (len(stimuli), len(stimuli)):
            raise ValueError(f"target similarity {tuple(target.shape)} does not match {len(stimuli)} images")
        sizes = tap_feature_sizes(model, tuple(stimuli.shape[1:]))
        regularizer = SimilarityRegularizer(sizes, reg_cfg["centre_momentum"], reg_cfg["eps"]).to(device)
        sampler = PairSampler(len(stimuli), reg_cfg["pairs_per_step"], seed)

    groups = [{"params": list(model.parameters()), "weight_decay": train_cfg["weight_decay"]}]
    if regularizer is not None:
        groups.append({"params": [regularizer.gamma_logits], "weight_decay": 0.0})
    optimizer = torch.optim.SGD(
        groups, lr=train_cfg["lr"], momentum=train_cfg["momentum"], nesterov=train_cfg["nesterov"]
    )
    train_x, train_y = _training_subset(dataset, train_cfg["max_train_images"])
    run = TrainingRun(
        model,
        optimizer,
        regularizer,
        sampler,
        stimuli,
        target,
        torch.from_numpy(np.ascontiguousarray(train_x)).to(device, torch.get_default_dtype()),
        torch.from_numpy(np.ascontiguousarray(train_y)).to(device),
        {"network": net_cfg, "train": train_cfg, "regularizer": reg_cfg},
        seed,
        runtime,
    )
    if run.steps == 0:
        raise ValueError(f"{len(train_y)} training images make no full batch of {train_cfg['batch_size']}")
    return run


def resume(run: TrainingRun, checkpoint_path: Path | None, fingerprint: str) -> int:
    """Load the run's last finished epoch from its checkpoint, if there is one; returns that epoch."""
    state = load_checkpoint(checkpoint_path, fingerprint, run.runtime.torch_device)
    if state is None:
        return 0
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.regularizer is not None:
        run.regularizer.load_state_dict(state["regularizer"])
    run.history = list(state["history"])
    return len(run.history)


def run_epoch(run: TrainingRun, epoch: int) -> dict:
    """One epoch (0-based) of SGD; returns its history record. Reads the device once, at the end."""
    train_cfg, runtime = run.configs["train"], run.runtime
    started = time.perf_counter()
    lr = learning_rate(epoch, train_cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    plan = plan_epoch(
        run.seed,
        epoch,
        len(run.train_y),
        train_cfg["batch_size"],
        train_cfg["augment"],
        run.sampler,
        runtime.torch_device,
    )
    torch.manual_seed(derived_seed(run.seed, epoch, "noise"))
    totals = torch.zeros(4, device=runtime.torch_device)  # loss, task loss, similarity loss, correct
    pairs = (
        None
        if run.sampler is None
        else torch.arange(2 * run.sampler.pairs_per_step, device=runtime.torch_device).view(-1, 2)
    )
    run.model.train()

    def step_fn(x, y, pair_batch):
        return training_step(run.model, run.optimizer, x, y, run.alpha, run.regularizer, pair_batch, runtime.amp_dtype)

    graphed = None
    for step in range(run.steps):
        index = plan.order[step]
        x = augment_batch(run.train_x[index], plan.dy[step], plan.dx[step], plan.flip[step], train_cfg["augment"])
        x = x.contiguous(memory_format=runtime.memory_format)
        pair_batch = None
        if plan.pair_images is not None:
            images = plan.pair_images[step]
            pair_batch = PairBatch(run.stimuli[images], pairs, run.target[images[0::2], images[1::2]])
        if runtime.graphs_active:
            if graphed is None:  # once per epoch: the epoch's lr is baked into the captured SGD step
                modules = [run.model] + ([run.regularizer] if run.regularizer is not None else [])
                graphed = GraphedStep(step_fn, modules, run.optimizer, x, run.train_y[index], pair_batch)
            out = graphed(x, run.train_y[index], pair_batch)
        else:
            out = step_fn(x, run.train_y[index], pair_batch)
        totals += torch.stack(
            [
                out["loss"],
                out["task_loss"],
                out["sim_loss"] if out["sim_loss"] is not None else out["loss"] * 0,
                out["correct"].float(),
            ]
        ).float()
    synchronize(runtime.torch_device)
    return epoch_record(run, epoch, lr, totals, time.perf_counter() - started)


def epoch_record(run: TrainingRun, epoch: int, lr: float, totals: torch.Tensor, seconds: float) -> dict:
    """An epoch's history record from its device sums (loss, task loss, similarity loss, correct)."""
    loss, task, sim, correct = (float(v) for v in totals.cpu())
    return {
        "epoch": epoch + 1,
        "train_loss": loss / run.steps,
        "task_loss": task / run.steps,
        "sim_loss": sim / run.steps if run.alpha > 0 else None,
        "train_acc": correct / (run.steps * run.configs["train"]["batch_size"]),
        "lr": lr,
        "gamma": run.regularizer.gamma().tolist() if run.regularizer is not None else None,
        "seconds": seconds,
    }


def finish_run(run: TrainingRun, dataset: ClassificationData, resumed_from: int, device_note: str = "") -> TrainResult:
    """A trained run's result: its test accuracy (VOne noise seeded from (seed, epochs, "evaluation")), its
    weights on the host, and what was run where. Call inside the runtime's ``kernels()``."""
    runtime = run.runtime
    eval_started = time.perf_counter()
    torch.manual_seed(derived_seed(run.seed, run.configs["train"]["epochs"], "evaluation"))
    test_x = dataset.test_x
    batch = runtime.eval_batch_size or memory_batch_size(
        run.model, test_x.shape[1:], len(test_x), runtime.device, cpu_batch=CPU_TEST_BATCH, gradient=False
    )
    test_accuracy = accuracy(run.model, test_x, dataset.test_y, batch)
    eval_seconds = time.perf_counter() - eval_started
    return TrainResult(
        state_dict={k: v.detach().cpu() for k, v in run.model.state_dict().items()},
        history=run.history,
        test_accuracy=test_accuracy,
        gamma=run.regularizer.gamma().tolist() if run.regularizer is not None else None,
        wall_seconds=sum(r["seconds"] for r in run.history) + eval_seconds,
        device=runtime.describe() + device_note,
        versions=_versions(),
        resumed_from_epoch=resumed_from,
        configs=run.configs,
    )
