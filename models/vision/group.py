"""Training K compatible networks together as one fused model (``fused.py``), each exactly as it trains alone.

A group is an execution setting: every member keeps its own seed, initialisation, data order,
augmentation, stimulus pairs, target, alpha, running centres, gamma, optimizer state, BatchNorm
statistics, checkpoint and result, and gets the numbers it would get alone up to the rounding of grouped
convolutions (``tests/models/vision/test_group.py`` says how close). Compatible means one architecture
and width, one training schedule, one dataset, and, among the regularized members, one stimulus size and
one number of pairs per step (the stimulus batch is fused too; an unregularized member's channels carry
zeros there and receive no gradient from it).

How: each member's run is built as ``training.build_run`` builds it alone (so its initialisation and
sampler are its own), the networks are fused, and one SGD optimizer steps all of them (element-wise the
same update, module notes of fused.py). Each epoch's plan is drawn per member from its own (seed, epoch)
streams; VOne noise from per-member generators seeded as the member's own run seeds the global RNG.
After each epoch the fused weights and momentum are copied back into the members' own runs and each
member's checkpoint is written in the format a run alone writes, so any member resumes alone or in any
group. Members resumed at different epochs train as separate groups. A group of one is ``train_network``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from ..runtime import Runtime, as_runtime, synchronize
from .checkpoint import run_fingerprint, save_checkpoint
from .datasets import ClassificationData
from .fused import FusedVOne, fuse, load_networks, parameter_slices
from .schedule import learning_rate
from .training import (
    TrainingRun,
    TrainResult,
    augment_batch,
    build_run,
    derived_seed,
    epoch_record,
    finish_run,
    frozen_bn_statistics,
    plan_epoch,
    resume,
    train_network,
)


@dataclass
class Member:
    """One network of a group: what ``train_network`` takes for it."""

    net_config: dict
    train_config: dict
    reg_config: dict
    target_images: object = None
    target_similarity: object = None
    seed: int = 0
    checkpoint_path: str | Path | None = None

    def run_args(self, dataset: ClassificationData) -> tuple:
        """The leading arguments ``build_run`` and ``train_network`` share, for this member."""
        return (
            self.net_config,
            self.train_config,
            self.reg_config,
            dataset,
            self.target_images,
            self.target_similarity,
            self.seed,
        )


def train_group(
    members: list[Member],
    dataset: ClassificationData,
    runtime: Runtime | str | None = None,
    progress: Callable[[int, dict], None] | None = None,
    on_checkpoint: Callable[[int, Path, str, int], None] | None = None,
) -> list[TrainResult]:
    """Train ``members`` together; returns each one's TrainResult, in order (module notes).

    ``progress(i, record)`` gets member i's epoch record, ``on_checkpoint(i, path, sha256, epoch)`` follows
    each of its checkpoints. Raises ValueError if the members are not compatible.
    """
    runtime = as_runtime(runtime)
    if len(members) == 1:
        m = members[0]
        return [
            train_network(
                *m.run_args(dataset),
                runtime,
                m.checkpoint_path,
                progress=None if progress is None else (lambda record: progress(0, record)),
                on_checkpoint=None if on_checkpoint is None else (lambda p, d, e: on_checkpoint(0, p, d, e)),
            )
        ]
    with runtime.kernels():
        runs, prints, paths, started = [], [], [], []
        for m in members:
            run = build_run(*m.run_args(dataset), runtime)
            runs.append(run)
            prints.append(run_fingerprint(run.configs, m.seed, dataset, run.stimuli, run.target))
            paths.append(Path(m.checkpoint_path) if m.checkpoint_path is not None else None)
        check_compatible(runs)
        for run, path, fingerprint in zip(runs, paths, prints):
            started.append(resume(run, path, fingerprint))
        by_epoch: dict[int, list[int]] = {}
        for index, epoch in enumerate(started):
            by_epoch.setdefault(epoch, []).append(index)
        for indices in by_epoch.values():
            _train_together(
                [runs[i] for i in indices],
                [paths[i] for i in indices],
                [prints[i] for i in indices],
                indices,
                progress,
                on_checkpoint,
            )
        note = f", group of {len(members)}"
        return [finish_run(run, dataset, started[index], note) for index, run in enumerate(runs)]


def group_signature(run: TrainingRun) -> tuple:
    """What members of one group must share (module notes): network and schedule (``check_compatible``
    adds the regularized members' stimulus size and pairs per step)."""
    network = json.dumps(run.configs["network"], sort_keys=True, default=str)
    schedule = json.dumps(run.configs["train"], sort_keys=True, default=str)
    return network, schedule


def check_compatible(runs: list[TrainingRun]) -> None:
    """ValueError naming what differs, unless ``runs`` can train as one group."""
    first = group_signature(runs[0])
    for run in runs[1:]:
        if group_signature(run) != first:
            raise ValueError("networks train as one group only with the same network and training configs")
    regularized = [run for run in runs if run.regularizer is not None]
    shapes = {tuple(run.stimuli.shape[1:]) for run in regularized}
    pairs = {run.sampler.pairs_per_step for run in regularized}
    if len(shapes) > 1 or len(pairs) > 1:
        raise ValueError(
            f"regularized networks train as one group only with one stimulus size and one number of pairs per "
            f"step (got sizes {sorted(shapes)}, pairs {sorted(pairs)})"
        )
    if len({len(run.train_y) for run in runs}) > 1:
        raise ValueError("networks train as one group only on the same training images")


def _train_together(runs, paths, prints, indices, progress, on_checkpoint) -> None:
    """The epochs the runs (all at one epoch) still have, fused."""
    runtime, train_cfg = runs[0].runtime, runs[0].configs["train"]
    first_epoch, last_epoch = len(runs[0].history), train_cfg["epochs"]
    if first_epoch >= last_epoch:
        return
    device = runtime.torch_device
    fused = fuse([run.model for run in runs]).to(device, memory_format=runtime.memory_format)
    slices = parameter_slices(fused, [run.model for run in runs])
    regularizers = [run.regularizer for run in runs if run.regularizer is not None]
    optimizer = torch.optim.SGD(
        [
            {"params": list(fused.parameters()), "weight_decay": train_cfg["weight_decay"]},
            {"params": [r.gamma_logits for r in regularizers], "weight_decay": 0.0},
        ],
        lr=train_cfg["lr"],
        momentum=train_cfg["momentum"],
        nesterov=train_cfg["nesterov"],
    )
    _momentum_into_group(runs, slices, optimizer)
    for epoch in range(first_epoch, last_epoch):
        records = _group_epoch(fused, runs, optimizer, epoch)
        load_networks(fused, [run.model for run in runs])
        _momentum_into_runs(runs, slices, optimizer)
        for position, (run, record) in enumerate(zip(runs, records)):
            run.history.append(record)
            if paths[position] is not None:
                digest = save_checkpoint(
                    paths[position], prints[position], run.model, run.optimizer, run.regularizer, run.history
                )
                if on_checkpoint is not None:
                    on_checkpoint(indices[position], paths[position], digest, len(run.history))
            if progress is not None:
                progress(indices[position], record)


def _momentum_into_group(runs, slices, optimizer) -> None:
    """Each member's SGD momentum (if it has taken a step) into the fused optimizer's buffers."""
    fused_buffers: dict = {}
    for run, mapping in zip(runs, slices):
        for param, (source, index) in mapping.items():
            buffer = run.optimizer.state.get(param, {}).get("momentum_buffer")
            if buffer is None:
                continue
            target = fused_buffers.setdefault(source, torch.zeros_like(source))
            target[index] = buffer
        if run.regularizer is not None:
            state = run.optimizer.state.get(run.regularizer.gamma_logits, {})
            if state.get("momentum_buffer") is not None:
                optimizer.state[run.regularizer.gamma_logits] = {"momentum_buffer": state["momentum_buffer"].clone()}
    for source, buffer in fused_buffers.items():
        optimizer.state[source] = {"momentum_buffer": buffer}


def _momentum_into_runs(runs, slices, optimizer) -> None:
    """The fused momentum back into each member's own optimizer (what its checkpoint stores)."""
    for run, mapping in zip(runs, slices):
        for param, (source, index) in mapping.items():
            buffer = optimizer.state.get(source, {}).get("momentum_buffer")
            if buffer is not None:
                run.optimizer.state[param] = {"momentum_buffer": buffer[index].detach().clone()}
        if run.regularizer is not None:
            state = optimizer.state.get(run.regularizer.gamma_logits, {})
            if state.get("momentum_buffer") is not None:
                run.optimizer.state[run.regularizer.gamma_logits] = {
                    "momentum_buffer": state["momentum_buffer"].detach().clone()
                }


def _group_epoch(fused, runs, optimizer, epoch: int) -> list[dict]:
    """One epoch of every member, fused; returns each member's history record."""
    runtime, train_cfg = runs[0].runtime, runs[0].configs["train"]
    device, k = runtime.torch_device, len(runs)
    started = time.perf_counter()
    lr = learning_rate(epoch, train_cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    plans = [
        plan_epoch(
            run.seed, epoch, len(run.train_y), train_cfg["batch_size"], train_cfg["augment"], run.sampler, device
        )
        for run in runs
    ]
    if isinstance(fused.front, FusedVOne):
        fused.front.seed([derived_seed(run.seed, epoch, "noise") for run in runs], device)
    regularized = [i for i, run in enumerate(runs) if run.regularizer is not None]
    n_pairs = runs[regularized[0]].sampler.pairs_per_step if regularized else 0
    pairs = torch.arange(2 * n_pairs, device=device).view(-1, 2) if regularized else None
    stimulus_shape = tuple(runs[regularized[0]].stimuli.shape[1:]) if regularized else None
    widths = None
    totals = torch.zeros(k, 4, device=device)
    alphas = torch.tensor([run.alpha for run in runs], device=device)
    fused.train()
    steps = runs[0].steps
    for step in range(steps):
        xs, ys = [], []
        for run, plan in zip(runs, plans):
            index = plan.order[step]
            xs.append(
                augment_batch(run.train_x[index], plan.dy[step], plan.dx[step], plan.flip[step], train_cfg["augment"])
            )
            ys.append(run.train_y[index])
        x = torch.cat(xs, dim=1).contiguous(memory_format=runtime.memory_format)
        y = torch.stack(ys, dim=1)
        amp = runtime.amp_dtype
        autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with autocast:
            logits = fused(x)
        logits = logits.float().view(len(x), k, -1)
        task = torch.stack([F.cross_entropy(logits[:, i], y[:, i]) for i in range(k)])
        sims = torch.zeros(k, device=device)
        if regularized:
            images = []
            for run, plan in zip(runs, plans):
                if run.regularizer is None:
                    images.append(torch.zeros((2 * n_pairs, *stimulus_shape), device=device))
                else:
                    images.append(run.stimuli[plan.pair_images[step]])
            stimuli = torch.cat(images, dim=1).contiguous(memory_format=runtime.memory_format)
            quiet = {i for i, run in enumerate(runs) if run.regularizer is None}
            if isinstance(fused.front, FusedVOne):  # alone, these members never run a stimulus forward
                fused.front.quiet = quiet
            try:
                with autocast, frozen_bn_statistics(fused):
                    taps = fused.taps(stimuli)
            finally:
                if isinstance(fused.front, FusedVOne):
                    fused.front.quiet = set()
            if widths is None:
                widths = [t.shape[1] // k for t in taps]
            parts = []
            for i in range(k):
                if runs[i].regularizer is None:
                    parts.append(torch.zeros((), device=device))
                    continue
                own = [t[:, i * w : (i + 1) * w] for t, w in zip(taps, widths)]
                chosen = plans[i].pair_images[step]
                target = runs[i].target[chosen[0::2], chosen[1::2]]
                parts.append(runs[i].regularizer(own, pairs, target))
            sims = torch.stack(parts)
        losses = task + alphas * sims
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
        correct = (logits.detach().argmax(dim=2) == y).sum(dim=0).float()
        totals += torch.stack([losses.detach(), task.detach(), sims.detach(), correct], dim=1).float()  # as alone
    synchronize(device)
    seconds = (time.perf_counter() - started) / k  # the group's time, shared among its members
    return [epoch_record(run, epoch, lr, totals[i], seconds) for i, run in enumerate(runs)]
