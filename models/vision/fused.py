"""K networks of one architecture as one model: channel-concatenated, every convolution grouped by network.

Why channels and grouped convolutions (and not ``torch.func`` stacked parameters): BatchNorm normalises
each channel over its batch, so K networks side by side in the channels keep their own batch statistics
and running statistics with no code of their own; every convolution becomes one grouped convolution over
K times the channels, which is what puts more work into each kernel; and the fused model is an ordinary
``nn.Module``, so the training loop, the optimizer, autocast, channels_last and CUDA graphs apply to it
unchanged. (``vmap`` over ``functional_call`` cannot update BatchNorm's running statistics in place, which
training needs.) Measured against K separate models in ``bench/bench_fused.py``.

Layout. Network k owns input channel k (each network sees its own images: its own data order and
augmentation) and channels ``k*C .. (k+1)*C - 1`` of every feature map; its classifier is its own slice of
a batched linear layer. Parameters do not mix, so one SGD step over the fused model is, element by element,
K separate SGD steps with the same learning rate, momentum and weight decay: the same arithmetic, up to
the rounding of grouped against dense convolution kernels.

A fixed VOne front end (the Gabor bank is drawn from ``gabor_seed`` alone, so every network of a
compatible group has the same one) runs once over all K networks' images; each network's neuronal noise
comes from its own generator, seeded as the network's own run seeds torch's global RNG, so it draws the
same noise it would draw alone.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .networks import TappedClassifier
from .vonenet import VOneBlock, neuronal_noise


class FusedLinear(nn.Module):
    """K linear layers as one batched product: (B, K * in) -> (B, K * out)."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.k, self.in_features, self.out_features = len(layers), layers[0].in_features, layers[0].out_features
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]).clone())
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), self.k, self.in_features)
        out = torch.einsum("bki,koi->bko", x, self.weight) + self.bias
        return out.reshape(len(x), self.k * self.out_features)


class FusedVOne(nn.Module):
    """One VOne front end applied to K networks' images, each with its own noise generator."""

    def __init__(self, block: VOneBlock, k: int):
        super().__init__()
        self.block, self.k = copy.deepcopy(block), k
        self.out_channels = k * block.out_channels
        self.generators: list[torch.Generator] | None = None
        self.quiet: set[int] = set()  # members whose noise is not drawn (see group.py: the stimulus pass)

    def seed(self, seeds: list[int], device: torch.device) -> None:
        """Each network's noise stream, seeded as its own run seeds the global RNG (one seed per network)."""
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, k = x.shape[0], self.k
        images = x.reshape(b, k, 1, *x.shape[2:]).transpose(0, 1).reshape(k * b, 1, *x.shape[2:])
        responses = self.block.cell_responses(images)
        responses = responses.reshape(k, b, *responses.shape[1:])
        if self.block.noise:
            noisy = []
            for index in range(k):
                if index in self.quiet:  # a member that would not run this forward alone: draws nothing
                    noisy.append(responses[index])
                    continue
                generator = None if self.generators is None else self.generators[index]
                noisy.append(
                    neuronal_noise(responses[index], self.block.noise_scale, self.block.noise_level, generator)
                )
            responses = torch.stack(noisy)
        out = torch.relu(responses)  # (K, B, C, h, w)
        return out.transpose(0, 1).reshape(b, k * out.shape[2], *out.shape[3:])


def _fused_conv(convs: list[nn.Conv2d]) -> nn.Conv2d:
    first, k = convs[0], len(convs)
    fused = nn.Conv2d(
        k * first.in_channels,
        k * first.out_channels,
        first.kernel_size,
        first.stride,
        first.padding,
        first.dilation,
        groups=k * first.groups,
        bias=first.bias is not None,
    )
    with torch.no_grad():
        fused.weight.copy_(torch.cat([c.weight for c in convs]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([c.bias for c in convs]))
    fused.weight.requires_grad_(first.weight.requires_grad)
    return fused


def _fused_norm(norms: list[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    first = norms[0]
    fused = nn.BatchNorm2d(len(norms) * first.num_features, first.eps, first.momentum, first.affine)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(fused, name).copy_(torch.cat([getattr(n, name) for n in norms]))
        fused.num_batches_tracked.copy_(first.num_batches_tracked)
    return fused


def _check_compatible(models: list[nn.Module]) -> None:
    shapes = [[(name, tuple(t.shape)) for name, t in m.state_dict().items()] for m in models]
    if any(s != shapes[0] for s in shapes[1:]):
        raise ValueError("networks fuse only when they share architecture and width (their state shapes differ)")
    fronts = [m.front for m in models if isinstance(m.front, VOneBlock)]
    if fronts and (len(fronts) != len(models) or any(not torch.equal(f.weight, fronts[0].weight) for f in fronts)):
        raise ValueError("VOne networks fuse only with VOne networks of the same Gabor bank")


def fuse(models: list[TappedClassifier]) -> TappedClassifier:
    """One TappedClassifier computing ``models`` side by side (module notes); the inputs are not changed."""
    if not models:
        raise ValueError("nothing to fuse")
    _check_compatible(models)
    k = len(models)
    fused = copy.deepcopy(models[0])
    per_model = [dict(m.named_modules()) for m in models]
    replaced: set[str] = set()
    for name, module in list(models[0].named_modules()):
        if not name or any(name.startswith(done + ".") for done in replaced):
            continue
        same = [modules[name] for modules in per_model]
        if isinstance(module, VOneBlock):
            new = FusedVOne(module, k)
        elif isinstance(module, nn.Conv2d):
            new = _fused_conv(same)
        elif isinstance(module, nn.BatchNorm2d):
            new = _fused_norm(same)
        elif isinstance(module, nn.Linear):
            new = FusedLinear(same)
        else:
            continue
        replaced.add(name)
        parent_name, _, attribute = name.rpartition(".")
        parent = fused.get_submodule(parent_name) if parent_name else fused
        setattr(parent, attribute, new)
    fused.k = k
    return fused


def network_slices(fused: TappedClassifier, models: list[TappedClassifier]) -> list[dict[str, torch.Tensor]]:
    """Each network's state dict, cut from the fused model's (views, no copies): what ``models[i]`` would
    hold had it trained alone. Keys and shapes are those of ``models[i].state_dict()``."""
    k = fused.k
    fused_state = fused.state_dict()
    out = []
    for index, model in enumerate(models):
        state = {}
        for name, tensor in model.state_dict().items():
            source = fused_state.get(name, fused_state.get(name.replace("front.", "front.block.", 1)))
            if source is None:
                raise KeyError(f"the fused model has no {name}")
            if name.endswith("num_batches_tracked") or (source.shape == tensor.shape and name.startswith("front.")):
                state[name] = source  # a counter all networks share, or the shared fixed Gabor bank
            elif source.shape[0] == k and source.shape[1:] == tensor.shape:
                state[name] = source[index]  # the batched classifier
            else:
                size = tensor.shape[0]
                state[name] = source[index * size : (index + 1) * size]
        out.append(state)
    return out


def parameter_slices(fused: TappedClassifier, models: list[TappedClassifier]) -> list[dict[nn.Parameter, slice]]:
    """For each network: its own parameters mapped to (fused parameter, index) pairs, so per-parameter
    state (SGD momentum) can move between the fused model and the networks."""
    k = fused.k
    fused_params = dict(fused.named_parameters())
    out = []
    for index, model in enumerate(models):
        pairs = {}
        for name, param in model.named_parameters():
            source = fused_params[name]
            if source.shape[0] == k and source.shape[1:] == param.shape:
                pairs[param] = (source, index)
            else:
                size = param.shape[0]
                pairs[param] = (source, slice(index * size, (index + 1) * size))
        out.append(pairs)
    return out


def load_networks(fused: TappedClassifier, models: list[TappedClassifier]) -> None:
    """Copy the fused model's weights and statistics into each network (after training, for storage)."""
    for model, state in zip(models, network_slices(fused, models), strict=True):
        model.load_state_dict({name: value.detach().clone() for name, value in state.items()})
