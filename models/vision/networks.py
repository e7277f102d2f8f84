"""ResNets for 32x32 grayscale images, with the five feature taps the similarity loss reads.

CIFAR-style (He et al. 2016, section 4.2, as in the common kuangliu/pytorch-cifar ResNets): a 3x3 stride-1
stem with no max-pool, so a 32-px image keeps 32x32 maps in stage 1. The networks are fully convolutional
up to the global average pool, which is what lets stimulus images (e.g. 36x64) go through the same core
at their own size (Li et al. 2019, figure 3).

Taps (docs/science.md §6). Li et al. use ResNet18 conv layers 1, 5, 9, 13, 17: counting the 3x3 convs on
the main path (the 1x1 shortcut convs are not counted), conv 1 is the stem and convs 5, 9, 13, 17 are the
last convs of the four stages. A tap is taken *after* that layer's block is complete (BN, residual add,
ReLU), i.e. the stem output and the output of each stage. For ResNet34 (blocks 3, 4, 6, 3) the same rule,
stem plus the end of each stage, gives conv layers 1, 7, 15, 27, 33 (``TAP_CONV_LAYERS``).

``width`` scales every channel count (64 * width at the stem) so tests and CPU demos can run the true
architecture at a fraction of the cost; width 1 is the paper's network.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..registry import NonNegativeInt, PositiveFloat, PositiveInt, Registry, UnitInterval, complete_kwargs
from ..runtime import evaluation_mode

STAGE_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
#: The architectures a network config's "arch" names; each builder's keyword arguments are its config.
ARCHITECTURES = Registry("architecture", key="arch")
#: Which conv layers (1-based, main path) the five taps follow, per architecture.
TAP_CONV_LAYERS = {"resnet18": (1, 5, 9, 13, 17), "resnet34": (1, 7, 15, 27, 33)}


def stem_channels(width: float) -> int:
    """64 * width, never below 1."""
    return max(1, int(round(64 * width)))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut, ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetStages(nn.Module):
    """The four residual stages (channels c, 2c, 4c, 8c; strides 1, 2, 2, 2) after whatever front end."""

    def __init__(self, blocks_per_stage: tuple[int, ...], base_channels: int):
        super().__init__()
        stages, in_channels = [], base_channels
        for index, n_blocks in enumerate(blocks_per_stage):
            out_channels = base_channels * 2**index
            strides = [1 if index == 0 else 2] + [1] * (n_blocks - 1)
            blocks = []
            for stride in strides:
                blocks.append(BasicBlock(in_channels, out_channels, stride))
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = in_channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of each stage (taps 2..5)."""
        outputs = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            outputs.append(x)
        return outputs


class TappedClassifier(nn.Module):
    """front -> adapter -> four stages -> global average pool -> linear; taps = [front, stage 1..4].

    The front is the CIFAR stem (tap 1 = conv layer 1) or the VOneBlock (tap 1 = its output); the adapter
    is nothing for the plain ResNets and the VOneNet 1x1 bottleneck for VOne-ResNet18, so tap 1 is always
    the first stage of visual processing, not a projection of it.

    ``forward(x)`` gives logits; ``forward(x, return_taps=True)`` gives (logits, taps); ``taps(x)``
    skips the pool and classifier, which the similarity loss never needs.
    """

    def __init__(self, front: nn.Module, adapter: nn.Module, stages: ResNetStages, n_classes: int):
        super().__init__()
        self.front = front
        self.adapter = adapter
        self.stages = stages
        self.fc = nn.Linear(stages.out_channels, n_classes)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        first = self.front(x)
        return [first, *self.stages(self.adapter(first))]

    def forward(self, x: torch.Tensor, return_taps: bool = False):
        taps = self.taps(x)
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(taps[-1], 1), 1))
        return (logits, taps) if return_taps else logits


def cifar_stem(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv layer 1: 3x3, stride 1, BN, ReLU; no max-pool (32-px inputs)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()
    )


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, as torchvision's ResNets), BN to identity; fixed buffers untouched."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.weight.requires_grad:
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _resnet(blocks: tuple[int, ...], width: float, n_classes: int, in_channels: int) -> TappedClassifier:
    base = stem_channels(width)
    model = TappedClassifier(cifar_stem(in_channels, base), nn.Identity(), ResNetStages(blocks, base), n_classes)
    _init_weights(model)
    return model


@ARCHITECTURES.register()
def resnet18(width: PositiveFloat = 1.0, n_classes: PositiveInt = 10, in_channels: PositiveInt = 1) -> TappedClassifier:
    """The paper's network (Li et al. 2019): CIFAR ResNet18, ``width`` scaling every channel count."""
    return _resnet(STAGE_BLOCKS["resnet18"], width, n_classes, in_channels)


@ARCHITECTURES.register()
def resnet34(width: PositiveFloat = 1.0, n_classes: PositiveInt = 10, in_channels: PositiveInt = 1) -> TappedClassifier:
    """A deeper backbone, to ask whether the regularizer's effect depends on depth."""
    return _resnet(STAGE_BLOCKS["resnet34"], width, n_classes, in_channels)


@ARCHITECTURES.register(condition="VOne", rank=9)
def vone_resnet18(
    width: PositiveFloat = 1.0,
    n_classes: PositiveInt = 10,
    in_channels: PositiveInt = 1,
    simple_channels: NonNegativeInt = 256,
    complex_channels: NonNegativeInt = 256,
    visual_degrees: PositiveFloat = 8.0,
    image_size: PositiveInt = 32,
    sf_max: PositiveFloat | None = None,
    sf_corr: UnitInterval = 0.75,
    ksize: PositiveInt = 7,
    stride: PositiveInt = 1,
    k_exc: PositiveFloat = 25.0,
    noise: bool = True,
    noise_scale: PositiveFloat = 0.35,
    noise_level: PositiveFloat = 0.07,
    gabor_seed: NonNegativeInt = 0,
) -> TappedClassifier:
    """VOneNet's control (Dapello et al. 2020): a fixed Gabor-and-noise V1 front replaces the stem.

    The keyword arguments after ``n_classes`` are the VOneBlock's (docs/science.md §8, ``VOneBlock.build``).
    """
    vone = {name: value for name, value in locals().items() if name not in ("width", "n_classes")}
    from .vonenet import VOneBlock

    front = VOneBlock.build(**vone)
    base = stem_channels(width)
    # VOneNet's bottleneck: a bias-free 1x1 conv from the V1 channels into the backend, no BN.
    adapter = nn.Conv2d(front.out_channels, base, 1, bias=False)
    model = TappedClassifier(front, adapter, ResNetStages(STAGE_BLOCKS["resnet18"], base), n_classes)
    _init_weights(model)
    return model


def build_network(config: dict | None = None) -> TappedClassifier:
    """The network a config names (``arch`` defaults to resnet18; other keys are the builder's arguments).

    Initialisation draws from torch's global RNG: seed it first for a reproducible network.
    """
    return ARCHITECTURES.build({"arch": "resnet18", **(config or {})})


def tap_feature_sizes(model: nn.Module, image_shape: tuple[int, int, int]) -> list[int]:
    """Flattened length of each tap for one image of shape (C, H, W), found by a probe forward.

    The probe runs in eval mode under no_grad, so neither BN statistics nor gradients are touched.
    """
    with evaluation_mode(model), torch.no_grad():
        taps = model.taps(torch.zeros((1, *image_shape), device=next(model.parameters()).device))
    return [int(t[0].numel()) for t in taps]


def vone_config(**overrides) -> dict:
    """A VOneBlock's keyword arguments: ``vone_resnet18``'s after ``n_classes``, defaults filled and checked."""
    full = complete_kwargs(vone_resnet18, overrides, "VOneBlock")
    return {name: value for name, value in full.items() if name not in ("width", "n_classes")}
