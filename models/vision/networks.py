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

from ..runtime import evaluation_mode

STAGE_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
ARCHITECTURES = ("resnet18", "resnet34", "vone_resnet18")
#: Which conv layers (1-based, main path) the five taps follow, per architecture.
TAP_CONV_LAYERS = {"resnet18": (1, 5, 9, 13, 17), "resnet34": (1, 7, 15, 27, 33)}


def default_network_config() -> dict:
    """Every key build_network reads; VOne keys matter only for arch 'vone_resnet18'."""
    from .vonenet import default_vone_config

    return {"arch": "resnet18", "width": 1.0, "n_classes": 10, "in_channels": 1, **default_vone_config()}


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


def build_network(config: dict | None = None) -> TappedClassifier:
    """The network a config names (missing keys take ``default_network_config()`` values).

    Initialisation draws from torch's global RNG: seed it first for a reproducible network. The VOne
    Gabor bank is drawn from its own ``gabor_seed`` and is the same for every training seed, as in VOneNet.
    """
    cfg = {**default_network_config(), **(config or {})}
    arch = cfg["arch"]
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHITECTURES}")
    base = stem_channels(cfg["width"])
    if arch == "vone_resnet18":
        from .vonenet import VOneBlock

        front = VOneBlock.from_config(cfg)
        # VOneNet's bottleneck: a bias-free 1x1 conv from the V1 channels into the backend, no BN.
        adapter = nn.Conv2d(front.out_channels, base, 1, bias=False)
        stages = ResNetStages(STAGE_BLOCKS["resnet18"], base)
    else:
        front = cifar_stem(cfg["in_channels"], base)
        adapter = nn.Identity()
        stages = ResNetStages(STAGE_BLOCKS[arch], base)
    model = TappedClassifier(front, adapter, stages, cfg["n_classes"])
    _init_weights(model)
    return model


def tap_feature_sizes(model: nn.Module, image_shape: tuple[int, int, int]) -> list[int]:
    """Flattened length of each tap for one image of shape (C, H, W), found by a probe forward.

    The probe runs in eval mode under no_grad, so neither BN statistics nor gradients are touched.
    """
    with evaluation_mode(model), torch.no_grad():
        taps = model.taps(torch.zeros((1, *image_shape), device=next(model.parameters()).device))
    return [int(t[0].numel()) for t in taps]
