"""A whole training step captured as one CUDA graph (``NEUREG_CUDA_GRAPHS=1``; CUDA only).

Why: at the paper's batch of 64 a ResNet18 step is a few hundred small kernels, and launching them one
by one from Python leaves a large GPU mostly idle. Replaying the captured step launches them all at once
(docs/gpu.md has the measured speed-up and how busy the GPU then is).

How: the step (forward, similarity term, backward, SGD) is recorded once per epoch on static input
buffers; each step copies its batch into those buffers and replays. The epoch's learning rate is a
Python number baked into the recorded SGD kernels, hence one capture per epoch. Capturing needs a few
warm-up steps (to create gradients and momentum buffers); their effect on the weights, momentum and
regularizer is undone in place before capturing, so the trajectory is that of the eager loop up to float
rounding. Randomness inside the step (VOne noise) comes from torch's CUDA generator, which advances on
every replay.
"""

from __future__ import annotations

import copy

import torch

WARMUP_STEPS = 3


class GraphedStep:
    """``step(x, y, pair_batch)`` -> training_step's outputs, by replaying one captured CUDA graph."""

    def __init__(self, step_fn, modules: list, optimizer, x, y, pair_batch):
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
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                step_fn(self.x, self.y, self.pair_batch)
        torch.cuda.current_stream().wait_stream(side)
        for module, state in zip(modules, saved):
            module.load_state_dict(state)  # copies in place: the captured kernels see these tensors
        # Momentum buffers in place too. One that did not exist yet restarts at zero, which is what SGD's
        # first step does (buffer = gradient = 0 * momentum + gradient); recreating it as None would
        # record the first-step branch into the graph and replay it every step.
        for group in optimizer.param_groups:
            for param in group["params"]:
                buffer = optimizer.state.get(param, {}).get("momentum_buffer")
                if buffer is not None:
                    buffer.copy_(momentum[param]) if param in momentum else buffer.zero_()
        optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step_fn(self.x, self.y, self.pair_batch)

    def __call__(self, x, y, pair_batch) -> dict:
        self.x.copy_(x)
        self.y.copy_(y)
        if pair_batch is not None:
            self.pair_batch.images.copy_(pair_batch.images)
            self.pair_batch.target.copy_(pair_batch.target)
        self.graph.replay()
        return self.out
