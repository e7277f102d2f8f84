"""Training K compatible networks together as one fused model (``fused.py``), each exactly as it trains alone.

A group is an execution setting: every member keeps its own seed, initialisation, data order,
augmentation, stimulus pairs, target, alpha, running centres, gamma, optimizer state, BatchNorm
statistics, checkpoint and result, and gets the numbers it would get alone up to the rounding of grouped
convolutions (``tests/models/vision/test_group.py`` says how close). Members must share one
architecture and width, one training schedule and one dataset (``check_compatible`` refuses others: the
caller groups by those keys). Within that, members whose stimuli differ in size or pairs per step, or
that resume from different epochs, train as separate sub-groups (``partitions``): the stimulus batch is
fused too, and resumed and fresh members never step together. An unregularized member's channels carry
zeros in the stimulus batch and receive no gradient from it.

How: each member's run is built as ``training.build_run`` builds it alone (so its initialisation and
sampler are its own). Each epoch the live members are fused and one SGD optimizer steps all of them
(element-wise the same update, module notes of fused.py); after the epoch the fused weights and momentum
go back into the members' own runs, each member's checkpoint is written in the format a run alone writes
(so any member resumes alone or in any group), and a member whose loss is no longer finite is dropped
from the group as failed, the others going on. Each epoch's plan is drawn per member from its own
(seed, epoch) streams; VOne noise from per-member generators seeded as the member's own run seeds the
global RNG. A sub-group of one trains through ``training.run_epoch``, so a group of one is, bitwise, the
run alone (``train_network`` is that group of one).

Failures stay per member: a member that cannot be built (its target does not fit its images), whose
checkpoint belongs to another run, or that diverges gets its exception in its place of the result list;
the others train and finish. A callback that raises (a kill, a stop) ends the whole group, leaving each
member's last checkpoint to resume from.
"""

from __future__ import annotations

import json
import math
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
from .graphs import GraphedStep
from .schedule import learning_rate
from .training import (
    PairBatch,
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
    run_epoch,
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


class TrainingDiverged(FloatingPointError):
    """A run's loss stopped being finite: its weights say nothing, so it is a failure, not a result."""


def train_group(
    members: list[Member],
    dataset: ClassificationData,
    runtime: Runtime | str | None = None,
    progress: Callable[[int, dict], None] | None = None,
    on_checkpoint: Callable[[int, Path, str, int], None] | None = None,
    on_finished: Callable[[int, TrainResult], None] | None = None,
) -> list[TrainResult | Exception]:
    """Train ``members`` together; returns, in order, each one's TrainResult or the exception it failed with.

    ``progress(i, record)`` gets member i's epoch record, ``on_checkpoint(i, path, sha256, epoch)`` follows
    each of its checkpoints, ``on_finished(i, outcome)`` each member's TrainResult as soon as its sub-group
    ends (where a worker stores it) or its exception as soon as it fails. Raises ValueError if the members
    do not share network, schedule and data.
    """
    runtime = as_runtime(runtime)
    outcomes: list[TrainResult | Exception | None] = [None] * len(members)
    with runtime.kernels():
        runs, prints, paths, started = {}, {}, {}, {}
        for index, m in enumerate(members):
            try:
                run = build_run(*m.run_args(dataset), runtime)
                prints[index] = run_fingerprint(run.configs, m.seed, dataset, run.stimuli, run.target)
                paths[index] = Path(m.checkpoint_path) if m.checkpoint_path is not None else None
                started[index] = resume(run, paths[index], prints[index])
                runs[index] = run
            except (ValueError, TypeError, RuntimeError) as exc:  # this member's inputs, not the group's
                outcomes[index] = exc
        check_compatible(list(runs.values()))
        for index, outcome in enumerate(outcomes):
            if outcome is not None and on_finished is not None:
                on_finished(index, outcome)
        for indices in partitions(runs, started):
            finished = _train_partition(runs, indices, paths, prints, progress, on_checkpoint, outcomes, on_finished)
            note = f", group of {len(indices)}" if len(indices) > 1 else ""
            for index in finished:
                outcomes[index] = finish_run(runs[index], dataset, started[index], note)
                if on_finished is not None:
                    on_finished(index, outcomes[index])
    return outcomes


def group_signature(run: TrainingRun) -> tuple:
    """What members of one group must share: network, schedule and training images."""
    network = json.dumps(run.configs["network"], sort_keys=True, default=str)
    schedule = json.dumps(run.configs["train"], sort_keys=True, default=str)
    return network, schedule, len(run.train_y)


def check_compatible(runs: list[TrainingRun]) -> None:
    """ValueError naming what differs, unless ``runs`` share network, schedule and training images."""
    if not runs:
        return
    first = group_signature(runs[0])
    for run in runs[1:]:
        if group_signature(run)[:2] != first[:2]:
            raise ValueError("networks train as one group only with the same network and training configs")
        if group_signature(run) != first:
            raise ValueError("networks train as one group only on the same training images")


def partitions(runs: dict[int, TrainingRun], started: dict[int, int]) -> list[list[int]]:
    """The sub-groups that step together: one resumed epoch, one stimulus size and number of pairs per step.

    Unregularized members join the largest regularized sub-group of their epoch (they carry zeros in its
    stimulus batch), or form their own."""
    regularized: dict[tuple, list[int]] = {}
    plain: dict[int, list[int]] = {}
    for index, run in runs.items():
        if run.regularizer is None:
            plain.setdefault(started[index], []).append(index)
        else:
            stimulus = (tuple(run.stimuli.shape[1:]), run.sampler.pairs_per_step)
            regularized.setdefault((started[index], stimulus), []).append(index)
    out = [(key[0], list(indices)) for key, indices in sorted(regularized.items(), key=lambda item: -len(item[1]))]
    for epoch, indices in plain.items():
        host = next((group for first, group in out if first == epoch), None)
        if host is None:
            out.append((epoch, list(indices)))
        else:
            host.extend(indices)
    return [sorted(group) for _, group in out]


def _train_partition(runs, indices, paths, prints, progress, on_checkpoint, outcomes, on_finished) -> list[int]:
    """The epochs a sub-group (all at one epoch) still has; returns the members that finished."""
    alive = list(indices)
    train_cfg = runs[alive[0]].configs["train"]
    epoch = len(runs[alive[0]].history)
    while alive and epoch < train_cfg["epochs"]:
        together = [runs[i] for i in alive]
        records = [run_epoch(together[0], epoch)] if len(together) == 1 else _fused_epoch(together, epoch)
        for index, record in zip(alive, records):  # failures first: a stop during the others' checkpoints
            if not all(math.isfinite(record[k]) for k in ("train_loss", "task_loss")):  # must not lose them
                outcomes[index] = TrainingDiverged(
                    f"training diverged: the loss is {record['train_loss']} in epoch {epoch + 1} "
                    f"(task loss {record['task_loss']}); its weights are not stored"
                )
                if on_finished is not None:
                    on_finished(index, outcomes[index])
        for index, record in zip(alive, records):
            if outcomes[index] is not None:
                continue
            run = runs[index]
            run.history.append(record)
            if paths[index] is not None:
                digest = save_checkpoint(
                    paths[index], prints[index], run.model, run.optimizer, run.regularizer, run.history
                )
                if on_checkpoint is not None:
                    on_checkpoint(index, paths[index], digest, len(run.history))
            if progress is not None:
                progress(index, record)
        alive = [i for i in alive if outcomes[i] is None]
        epoch += 1
    return alive


def _fused_epoch(runs: list[TrainingRun], epoch: int) -> list[dict]:
    """One epoch of ``runs`` as one fused model; weights and momentum go back into the runs afterwards."""
    runtime, train_cfg = runs[0].runtime, runs[0].configs["train"]
    fused = fuse([run.model for run in runs]).to(runtime.torch_device, memory_format=runtime.memory_format)
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
    counters = [_batch_counters(run.model) for run in runs]
    fused_before = _batch_counters(fused)
    records = _group_epoch(fused, runs, optimizer, epoch)
    fused_after = _batch_counters(fused)
    load_networks(fused, [run.model for run in runs])
    _momentum_into_runs(runs, slices, optimizer)
    for run, before in zip(runs, counters):
        # BatchNorm counts its train-mode forwards. The fused counter also counts the stimulus pass, which
        # an unregularized member alone never runs: each member gets the count its run alone would have.
        for name, counter in _batch_counters(run.model, live=True).items():
            added = run.steps if run.regularizer is None else fused_after[name] - fused_before[name]
            counter.copy_(before[name] + added)
    return records


def _batch_counters(model, live: bool = False) -> dict:
    """BatchNorm's ``num_batches_tracked`` buffers by name: copies, or the buffers themselves (``live``)."""
    return {
        name.replace("front.block.", "front.", 1): buffer if live else buffer.clone()
        for name, buffer in model.named_buffers()
        if name.endswith("num_batches_tracked")
    }


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


def group_step_function(fused, runs: list[TrainingRun], optimizer):
    """``step(x, y, pair_batch)`` for the fused model: x (B, K, H, W) with member k's images in channel k,
    y (B, K), pair_batch.images (2P, K, h, w) and pair_batch.target (K, P) (zeros for an unregularized
    member). Returns per-member device tensors (K,): loss, task loss, similarity loss, correct. The
    same function runs eagerly or recorded as a CUDA graph (``graphs.GraphedStep``)."""
    runtime, k = runs[0].runtime, len(runs)
    device = runtime.torch_device
    alphas = torch.tensor([run.alpha for run in runs], device=device)
    quiet = {i for i, run in enumerate(runs) if run.regularizer is None}

    def step(x, y, pair_batch):
        with runtime.autocast():
            logits = fused(x)
        logits = logits.float().view(len(x), k, -1)
        task = torch.stack([F.cross_entropy(logits[:, i], y[:, i]) for i in range(k)])
        sims = torch.zeros(k, device=device)
        if pair_batch is not None:
            if isinstance(fused.front, FusedVOne):  # alone, these members never run a stimulus forward
                fused.front.quiet = quiet
            try:
                with runtime.autocast(), frozen_bn_statistics(fused):
                    taps = fused.taps(pair_batch.images)
            finally:
                if isinstance(fused.front, FusedVOne):
                    fused.front.quiet = set()
            widths = [t.shape[1] // k for t in taps]
            parts = []
            for i, run in enumerate(runs):
                if run.regularizer is None:
                    parts.append(torch.zeros((), device=device))
                    continue
                own = [t[:, i * w : (i + 1) * w] for t, w in zip(taps, widths)]
                parts.append(run.regularizer(own, pair_batch.pairs, pair_batch.target[i]))
            sims = torch.stack(parts)
        losses = task + alphas * sims
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
        correct = (logits.detach().argmax(dim=2) == y).sum(dim=0).float()
        return {"loss": losses.detach(), "task_loss": task.detach(), "sim_loss": sims.detach(), "correct": correct}

    return step


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
    generators = []
    if isinstance(fused.front, FusedVOne):
        fused.front.seed([derived_seed(run.seed, epoch, "noise") for run in runs], device)
        generators = fused.front.generators if fused.front.block.noise else []
    regularized = [i for i, run in enumerate(runs) if run.regularizer is not None]
    pairs = stimulus_shape = None
    if regularized:
        n_pairs = runs[regularized[0]].sampler.pairs_per_step
        pairs = torch.arange(2 * n_pairs, device=device).view(-1, 2)
        stimulus_shape = tuple(runs[regularized[0]].stimuli.shape[1:])
        blank_images = torch.zeros((2 * n_pairs, *stimulus_shape), device=device)
        blank_target = torch.zeros(n_pairs, device=device, dtype=runs[regularized[0]].target.dtype)
    step_fn = group_step_function(fused, runs, optimizer)
    graphed = None
    totals = torch.zeros(k, 4, device=device)
    fused.train()
    for step in range(runs[0].steps):
        xs, ys = [], []
        for run, plan in zip(runs, plans):
            index = plan.order[step]
            xs.append(
                augment_batch(run.train_x[index], plan.dy[step], plan.dx[step], plan.flip[step], train_cfg["augment"])
            )
            ys.append(run.train_y[index])
        x = torch.cat(xs, dim=1).contiguous(memory_format=runtime.memory_format)
        y = torch.stack(ys, dim=1)
        pair_batch = None
        if regularized:
            images, targets = [], []
            for run, plan in zip(runs, plans):
                if run.regularizer is None:
                    images.append(blank_images)
                    targets.append(blank_target)
                    continue
                chosen = plan.pair_images[step]
                images.append(run.stimuli[chosen])
                targets.append(run.target[chosen[0::2], chosen[1::2]])
            stimuli = torch.cat(images, dim=1).contiguous(memory_format=runtime.memory_format)
            pair_batch = PairBatch(stimuli, pairs, torch.stack(targets))
        if runtime.graphs_active:
            if graphed is None:  # once per epoch: the epoch's lr is baked into the recorded SGD step
                modules = [fused] + [runs[i].regularizer for i in regularized]
                graphed = GraphedStep(step_fn, modules, optimizer, x, y, pair_batch, generators)
            out = graphed(x, y, pair_batch)
        else:
            out = step_fn(x, y, pair_batch)
        totals += torch.stack([out["loss"], out["task_loss"], out["sim_loss"], out["correct"]], dim=1).float()
    synchronize(device)
    seconds = (time.perf_counter() - started) / k  # the group's time, shared among its members
    return [epoch_record(run, epoch, lr, totals[i], seconds) for i, run in enumerate(runs)]


def train_network(
    net_config: dict,
    train_config: dict,
    reg_config: dict,
    dataset: ClassificationData,
    target_images=None,
    target_similarity=None,
    seed: int = 0,
    runtime: Runtime | str | None = None,
    checkpoint_path: str | Path | None = None,
    progress: Callable[[dict], None] | None = None,
    on_checkpoint: Callable[[Path, str, int], None] | None = None,
) -> TrainResult:
    """Train one network; resume from ``checkpoint_path`` if it holds a finished epoch of this same run.

    ``target_images`` (N, H, W) and ``target_similarity`` (N, N) are needed when alpha > 0. ``runtime``
    (a Runtime or a device string; default the CPU) says how to execute, never what to compute.
    ``progress`` is called with each epoch's history record, ``on_checkpoint(path, sha256, epoch)`` after
    each checkpoint is written (where the caller records its digest). The checkpoint is left in place at the end
    (the caller deletes it once the result is stored); a checkpoint of a different run (configs, seed,
    data, target) raises ValueError, a loss that stops being finite ``TrainingDiverged``. Seeds
    torch's global RNG (initialisation, each epoch's VOne noise). It is ``train_group`` of one member.
    """
    member = Member(net_config, train_config, reg_config, target_images, target_similarity, seed, checkpoint_path)
    [outcome] = train_group(
        [member],
        dataset,
        runtime,
        progress=None if progress is None else (lambda _, record: progress(record)),
        on_checkpoint=None
        if on_checkpoint is None
        else (lambda _, path, digest, epoch: on_checkpoint(path, digest, epoch)),
    )
    if isinstance(outcome, Exception):
        raise outcome
    return outcome
