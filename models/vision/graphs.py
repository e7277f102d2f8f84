"""A whole training step captured as one CUDA graph (``NEUREG_CUDA_GRAPHS=1``; CUDA only).

Why: at the paper's batch of 64 a ResNet18 step is a few hundred small kernels, and launching them one
by one from Python leaves a large GPU mostly idle. Replaying the captured step launches them all at once
(docs/gpu.md has the measured speed-up and how busy the GPU then is).

How: the step (forward, similarity term, backward, SGD) is recorded once per epoch on static input
buffers; each step copies its batch into those buffers and replays. The epoch's learning rate is a
Python number baked into the recorded SGD kernels, hence one capture per epoch. Capturing needs a few
warm-up steps (to create gradients and momentum buffers); their effect on the weights, momentum and
regularizer is undone in place before capturing, so the trajectory is that of the eager loop up to float
rounding. Randomness inside the step (VOne noise) comes from torch's CUDA generators, which advance on
every replay: the default one, and for a fused group each member's own (registered with the graph).

One code path, two recordings. ``CudaRecording`` captures and replays a CUDA graph. ``EagerRecording``
runs the recorded function again at each replay, so the warm-up, the undo, the static buffers and the
group's step all run on the CPU too: the tests check there that the graph path's epoch equals the eager
loop's bitwise, which is the graph path's whole claim apart from the capture itself (the CUDA test, run on
a lent GPU, checks that part).
"""

from __future__ import annotations

import contextlib
import copy

import torch

WARMUP_STEPS = 3


class CudaRecording:
    """The function captured once as a CUDA graph; ``replay()`` relaunches it, ``out`` holds its results."""

    def __init__(self, fn, generators=()):
        self.graph = torch.cuda.CUDAGraph()
        for generator in generators:  # each fused member's own noise stream advances on every replay
            self.graph.register_generator_state(generator)
        with torch.cuda.graph(self.graph):
            self.out = fn()

    def replay(self) -> None:
        self.graph.replay()


class EagerRecording:
    """The CPU stand-in: ``replay()`` runs the function again on the same static buffers."""

    def __init__(self, fn, generators=()):
        self.fn, self.out = fn, None

    def replay(self) -> None:
        self.out = self.fn()


def _side_stream(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext(), lambda: None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    return torch.cuda.stream(side), lambda: torch.cuda.current_stream().wait_stream(side)


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class GraphedStep:
    """``step(x, y, pair_batch)`` -> the step function's outputs, by replaying one recorded step.

    ``generators``: CUDA generators the step draws from besides the default one (a fused VOne group's
    per-member noise). ``recording``: ``CudaRecording`` on CUDA tensors, ``EagerRecording`` otherwise.
    """

    def __init__(self, step_fn, modules: list, optimizer, x, y, pair_batch, generators=(), recording=None):
        self.x, self.y = x.clone(), y.clone()
        self.pair_batch = None
        if pair_batch is not None:
            self.pair_batch = type(pair_batch)(
                pair_batch.images.clone(), pair_batch.pairs.clone(), pair_batch.target.clone()
            )
        saved = [copy.deepcopy(m.state_dict()) for m in modules]
        momentum = {
            p: state["momentum_buffer"].clone()
            for p, state in optimizer.state.items()
            if state.get("momentum_buffer") is not None
        }
        restored = [*generators, _default_generator(self.x.device)]
        generator_states = [g.get_state() for g in restored]
        on_side, rejoin = _side_stream(self.x.device)
        with on_side:
            for _ in range(WARMUP_STEPS):
                step_fn(self.x, self.y, self.pair_batch)
        rejoin()
        for module, state in zip(modules, saved):
            module.load_state_dict(state)  # copies in place: the captured kernels see these tensors
        for generator, state in zip(restored, generator_states):
            generator.set_state(state)  # the warm-up's draws (VOne noise) are not the run's
        # Momentum buffers in place too. One that did not exist yet restarts at zero, which is what SGD's
        # first step does (buffer = gradient = 0 * momentum + gradient); recreating it as None would
        # record the first-step branch into the graph and replay it every step.
        for group in optimizer.param_groups:
            for param in group["params"]:
                buffer = optimizer.state.get(param, {}).get("momentum_buffer")
                if buffer is not None:
                    buffer.copy_(momentum[param]) if param in momentum else buffer.zero_()
        optimizer.zero_grad(set_to_none=True)
        recording = recording or (CudaRecording if self.x.is_cuda else EagerRecording)
        self.recording = recording(lambda: step_fn(self.x, self.y, self.pair_batch), generators)

    def __call__(self, x, y, pair_batch) -> dict:
        self.x.copy_(x)
        self.y.copy_(y)
        if pair_batch is not None:
            self.pair_batch.images.copy_(pair_batch.images)
            self.pair_batch.target.copy_(pair_batch.target)
        self.recording.replay()
        return self.recording.out
